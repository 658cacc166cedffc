"""The repo's folders never stand in for installed packages of the same name (headscope/_shadow.py).

transformers >= 5.25 imports the PyPI package ``kernels``; a clone's top-level ``kernels/`` used to
shadow it whenever the repo root was on ``sys.path``. These tests run real interpreters from the
places a user starts them and look at which file each import actually loaded.
"""
from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import PathFinder
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folders of the repo as top-level packages (headscope/ is the real package; tests/ is not shipped)
TOP_LEVEL = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name not in ("headscope", "tests"))
# folders that some launcher puts first on sys.path: streamlit runs app/streamlit_app.py, benchmarks run as scripts
SCRIPT_DIRS = [ROOT / "app", ROOT / "benchmarks"]


def _python(code: str, cwd: Path, extra_path: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if extra_path:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _installed_paths() -> list[str]:
    """sys.path of this interpreter without the clone's own folders (a venv inside the clone stays)."""
    own = {ROOT, ROOT / "tests", *SCRIPT_DIRS}
    return [p for p in sys.path if p and Path(p).resolve() not in own]


def test_the_layout_has_the_guarded_folders():
    assert {"kernels", "probe", "analyses", "app", "data"} <= set(TOP_LEVEL)


# the two mechanisms of headscope/_shadow.py: the meta-path finder the set-up's .pth installs, and
# the guard in each folder's __init__.py alone (any environment without that .pth)
NO_FINDER = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != '_YieldToInstalled']; "


@pytest.mark.parametrize("prelude", ["", NO_FINDER], ids=["finder", "guard-only"])
@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_folder_yields_to_an_installed_package(name, prelude, tmp_path):
    """An installed package named like a repo folder wins, from the repo root, though '' comes first."""
    fake = tmp_path / "site" / name
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'installed'\n")
    r = _python(prelude + f"import {name}; print({name}.WHO); print({name}.__file__)", cwd=ROOT,
                extra_path=str(tmp_path / "site"))
    assert r.returncode == 0, r.stderr
    who, origin = r.stdout.split()
    assert who == "installed" and Path(origin).resolve() == (fake / "__init__.py").resolve()


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_top_level_folder_is_no_second_copy_of_headscope(name):
    """Without an installed twin, importing the folder top-level fails like a missing module."""
    if PathFinder.find_spec(name, _installed_paths()) is not None:
        pytest.skip(f"an installed package {name!r} exists; covered by the yield test")
    r = _python(f"import {name}", cwd=ROOT)
    assert r.returncode != 0
    assert "ModuleNotFoundError" in r.stderr and f"headscope.{name}" in r.stderr, r.stderr


def test_find_spec_names_the_installed_kernels_in_the_set_up_environment():
    """transformers asks ``importlib.util.find_spec("kernels")`` before importing it; in the
    environment ``make setup`` builds, the answer is HF's package, not the repo folder."""
    import site

    from headscope._shadow import PTH_NAME
    if not any((Path(d) / PTH_NAME).is_file() for d in site.getsitepackages()):
        pytest.skip(f"{PTH_NAME} not installed (an environment not built by make setup): the guard covers it")
    r = _python("import importlib.util as u; print(u.find_spec('kernels').origin)", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert not Path(r.stdout.strip()).resolve().is_relative_to(ROOT / "kernels"), r.stdout


def test_transformers_gets_the_real_kernels_package_from_the_repo_root():
    """The reported failure: loading a model from a REPL in the clone imports HF's ``kernels``."""
    code = ("import transformers.modeling_utils, kernels, sys; from headscope.probe import Probe; "
            "print(kernels.__file__); print(sorted(m for m in sys.modules if m in %r))" % (TOP_LEVEL,))
    r = _python(code, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    origin, loaded = r.stdout.strip().splitlines()
    assert not Path(origin).resolve().is_relative_to(ROOT / "kernels"), origin
    real = PathFinder.find_spec("kernels", _installed_paths())
    assert real is not None and Path(origin).resolve() == Path(real.origin).resolve()
    assert loaded == "['kernels']"  # no other repo folder got imported as a top-level module


@pytest.mark.parametrize("folder", SCRIPT_DIRS, ids=lambda p: p.name)
def test_script_folders_name_no_installed_package(folder):
    """A launcher puts these folders first on sys.path: none of their modules may be named like an
    installed package (``benchmarks/kernels.py`` once would have been imported as HF's ``kernels``)."""
    names = {p.stem for p in folder.glob("*.py")} | {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}
    clashes = sorted(n for n in names if n != "__init__" and PathFinder.find_spec(n, _installed_paths()) is not None)
    assert not clashes, f"{folder} would shadow installed packages: {clashes}"
