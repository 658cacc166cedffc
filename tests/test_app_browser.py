"""The real dashboard in headless Chromium: `headscope app` on a free localhost port, driven with
Selenium like a user would: open each page, launch a small run, see its heatmap. Screenshots go
to test-artifacts/ (gitignored). Needs the Debian packages chromium and chromium-driver
(`make browser-deps`); skipped with the reason when they are missing.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import make_runs, make_tiny_model_dir

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
START_TIMEOUT = 90
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.skip("headless Chromium not installed (apt-get install chromium chromium-driver, or make browser-deps)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """``headscope app --headless`` on a free port with a tmp runs folder and the tiny model."""
    base = tmp_path_factory.mktemp("browser")
    runs = base / "runs"
    make_runs(runs)
    model = make_tiny_model_dir(base / "tiny-llama")
    port = free_port()
    env = dict(os.environ, HEADSCOPE_RUNS=str(runs), HEADSCOPE_DEBUG="1")
    log = open(base / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "headscope.cli", "app", "--headless", "--port", str(port),
                             "--model", str(model)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        try:
            urllib.request.urlopen(f"{url}/_stcore/health", timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.time() - t0 > START_TIMEOUT:
                log.close()
                pytest.fail(f"the app did not start: {(base / 'app.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield url, runs
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1700",
                 f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(60)
    ARTIFACTS.mkdir(exist_ok=True)
    yield d
    d.quit()


def wait_for(d, cond, timeout: float = 60, what: str = ""):
    """Poll ``cond`` until truthy. Elements found while Streamlit re-renders (a page switch) can
    go stale before they are read: that counts as "not yet", not as a failure."""
    try:
        return WebDriverWait(d, timeout, poll_frequency=0.3,
                             ignored_exceptions=(StaleElementReferenceException,)).until(lambda _: cond())
    except TimeoutException:
        d.save_screenshot(str(ARTIFACTS / "timeout.png"))
        raise AssertionError(f"timed out waiting for {what}; page text: {body(d)[:1500]}")


def body(d) -> str:
    return d.find_element(By.TAG_NAME, "body").text


def settled(d) -> bool:
    """Streamlit has finished the script run (no 'running' indicator)."""
    return not d.find_elements(By.CSS_SELECTOR, "[data-testid='stStatusWidget']")


def no_exception(d) -> None:
    boxes = d.find_elements(By.CSS_SELECTOR, "[data-testid='stException']")
    assert not boxes, boxes[0].text[:1500]


def open_page(d, url: str, title: str, ready: str | None = None, timeout: float = 60):
    d.get(url)
    wait_for(d, lambda: any(h.text == title for h in d.find_elements(By.TAG_NAME, "h1")), timeout, f"page {title}")
    if ready:
        wait_for(d, lambda: ready in body(d), timeout, f"{ready!r} on {title}")
    wait_for(d, lambda: settled(d), timeout, f"{title} to settle")
    no_exception(d)


def external_requests(d) -> list[str]:
    """Console entries about resources the page tried to fetch from anywhere but the app itself."""
    out = []
    for entry in d.get_log("browser"):
        urls = re.findall(r"(?:https?|wss?)://[^\s'\"]+", entry.get("message", ""))
        out += [u for u in urls if not re.match(r"(?:https?|wss?)://(127\.0\.0\.1|localhost)[:/]", u)]
    return out


def plots(d) -> list:
    return d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")


def test_each_page_renders(app, browser):
    url, _ = app
    d = browser
    open_page(d, url, "Runs", "4 of 4 runs")
    wait_for(d, lambda: plots(d), 30, "the details heatmap")
    d.save_screenshot(str(ARTIFACTS / "01-runs.png"))
    open_page(d, f"{url}/heads?run=ind-a", "Heads", "Head drill-down")
    wait_for(d, lambda: len(plots(d)) >= 2, 30, "heatmap and per-example plot")
    assert "L" in body(d) and "Top heads" in body(d)
    d.save_screenshot(str(ARTIFACTS / "02-heads.png"))
    # the model loads in the background; Inspect captures the default prompt by itself once ready
    open_page(d, f"{url}/inspect", "Inspect", "FAI / WAAD over tokens", timeout=120)
    wait_for(d, lambda: len(plots(d)) >= 2, 30, "pattern and FAI/WAAD plots")
    d.save_screenshot(str(ARTIFACTS / "03-inspect.png"))
    open_page(d, f"{url}/intervene", "Intervene", "generated, unmodified", timeout=120)
    assert "KL(p ‖ p̃)" in body(d)
    d.save_screenshot(str(ARTIFACTS / "04-intervene.png"))
    open_page(d, f"{url}/new", "New run", "Jobs")
    d.save_screenshot(str(ARTIFACTS / "05-new-run.png"))
    assert not external_requests(d)  # works offline: nothing fetched from a CDN


def test_runs_page_by_url_and_sidebar_links(app, browser):
    """``/runs?run=ID`` opens the Runs page on that run (it used to pop up "Page not found"); the
    sidebar links reach every page."""
    url, _ = app
    d = browser
    open_page(d, f"{url}/runs?run=ind-b", "Runs", "4 of 4 runs")
    wait_for(d, lambda: plots(d), 30, "the details heatmap")
    assert "Page not found" not in body(d) and d.current_url.endswith("/runs?run=ind-b")
    links = {a.text: a for a in d.find_elements(By.CSS_SELECTOR, "[data-testid='stSidebar'] a")}
    assert {"Runs", "Heads", "Inspect", "Intervene", "New run"} <= set(links)
    links["New run"].click()
    wait_for(d, lambda: any(h.text == "New run" for h in d.find_elements(By.TAG_NAME, "h1")), 60, "New run page")


def test_inspect_all_heads_grid_dla_and_the_ablation_heatmap(app, browser):
    """The prompt-level views: the all-heads grid (a click opens that head's pattern), direct logit
    attribution, and the Intervene page's one-click ablation heatmap."""
    url, _ = app
    d = browser
    open_page(d, f"{url}/inspect", "Inspect", "All heads on this prompt", timeout=120)
    wait_for(d, lambda: "Direct logit attribution" in body(d) and "direct effect on the logit" in body(d), 60,
             "the DLA heatmap")
    grid = wait_for(d, lambda: [p for p in plots(d) if "entropy" in p.text][:1], 60, "the all-heads grid")[0]
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", grid)
    before = len([p for p in plots(d) if " attention" in p.text])
    area = grid.find_elements(By.CSS_SELECTOR, ".nsewdrag")[0]     # the plot area; offsets from its centre
    w, h = area.size["width"], area.size["height"]
    ActionChains(d).move_to_element_with_offset(area, -w // 2 + 4, -h // 2 + 4).click().perform()  # L0H0
    wait_for(d, lambda: "L0H0 attention" in body(d), 60, "the clicked head's pattern")
    wait_for(d, lambda: settled(d), 60, "Inspect to settle")
    no_exception(d)
    assert len([p for p in plots(d) if " attention" in p.text]) >= before
    d.save_screenshot(str(ARTIFACTS / "09-inspect-grid-dla.png"))
    open_page(d, f"{url}/intervene", "Intervene", "Ablation heatmap", timeout=120)
    d.find_element(By.XPATH, "//button[.//p[starts-with(text(), 'sweep ')]]").click()
    wait_for(d, lambda: "with each head zero-ablated" in body(d), 120, "the ablation heatmap")
    wait_for(d, lambda: settled(d), 60, "Intervene to settle")
    no_exception(d)
    d.save_screenshot(str(ARTIFACTS / "10-intervene-sweep.png"))


def _set_number(d, label: str, value: int) -> None:
    box = wait_for(d, lambda: d.find_elements(By.XPATH, f"//input[@aria-label='{label}']"), 60, f"input {label}")[0]
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def test_launch_a_run_and_see_its_heatmap(app, browser):
    url, runs = app
    d = browser
    open_page(d, f"{url}/new", "New run", "launch")
    _set_number(d, "n examples", 2)
    _set_number(d, "seq len", 6)
    d.find_element(By.XPATH, "//button[.//p[text()='launch']]").click()
    wait_for(d, lambda: "started" in body(d), 60, "the job to start")
    d.save_screenshot(str(ARTIFACTS / "06-launched.png"))
    wait_for(d, lambda: "complete · 2 examples" in body(d), 120, "the run to complete")
    new = [p for p in runs.iterdir() if p.name.startswith("induction-")]
    assert len(new) == 1
    # a refresh is a new session: the job is found again from the run store
    d.refresh()
    wait_for(d, lambda: f"{new[0].name}" in body(d) and "complete" in body(d), 60, "the job after a refresh")
    d.save_screenshot(str(ARTIFACTS / "07-after-refresh.png"))
    link = wait_for(d, lambda: d.find_elements(By.XPATH, "//a[.//*[text()='open in Heads']]"), 60, "the Heads link")
    link[0].click()
    wait_for(d, lambda: any(h.text == "Heads" for h in d.find_elements(By.TAG_NAME, "h1")), 60, "Heads page")
    wait_for(d, lambda: d.current_url.endswith(f"run={new[0].name}") and new[0].name in d.page_source and plots(d),
             60, "the new run's heatmap")
    wait_for(d, lambda: settled(d), 60, "Heads to settle")
    no_exception(d)
    heat = plots(d)[0]
    assert heat.find_elements(By.CSS_SELECTOR, "g.hm, .heatmaplayer image, image"), "no heatmap layer drawn"
    assert "induction: previous_token" in heat.text
    d.save_screenshot(str(ARTIFACTS / "08-new-run-heatmap.png"))
    assert not external_requests(d)
