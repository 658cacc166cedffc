"""``headscope`` command line: models, score, runs, report, app.

Exit status: 0 done; 2 a user error, one line on stderr naming what to change; 1 an internal
error, one line naming the file its traceback was saved to (``HEADSCOPE_DEBUG=1`` raises it
instead); 130 Ctrl-C; 143 SIGTERM. Interrupted runs are saved ``partial`` for ``--resume``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from headscope.errors import HeadscopeError, Interrupted, Terminated
from headscope.fmt import number
from headscope.heads import head_label, ranked_heads

DEFAULT_MODEL = "smollm2-135m"

EPILOG = """examples:
  headscope models
  headscope score induction --model smollm2-135m --out runs/induction
  headscope score sinks --model smollm2-135m --data texts.jsonl --limit 20
  headscope circuit ioi --model smollm2-135m   # circuit discovery (EAP-IG), stored as a run
  headscope runs                      # list runs in ./runs (or $HEADSCOPE_RUNS)
  headscope runs show RUN --json
  headscope report RUN [RUN...] --format html --out report.html
  headscope app                       # dashboard on http://localhost:8501
"""


def _runs_dir(args) -> Path:
    from headscope.analyses.store import default_runs_dir
    return Path(args.runs_dir) if getattr(args, "runs_dir", None) else default_runs_dir()


# --------------------------------------------------------------------------- commands
def cmd_models(args) -> int:
    from dataclasses import asdict

    from headscope.probe.models import list_models
    rows = list_models()
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1, default=str))
        return 0
    print(f"{'name':<20} {'installed':<10} {'cached':<7} description")
    for r in rows:
        name = r.name + (" *" if r.default else "")
        print(f"{name:<20} {'yes' if r.installed else 'no':<10} {'yes' if r.cached else 'no':<7} {r.description}")
        if not r.installed:
            print(f"{'':<20} install: {r.install_command}")
    print("\n* default model. Any local model directory (HF format, safetensors) also works: --model /path/to/dir")
    return 0


def cmd_score(args, extra: dict) -> int:
    """One run; under torchrun (``WORLD_SIZE`` > 1) one rank of a data-parallel run (docs/SCALE.md)."""
    from headscope.analyses.base import run_analysis
    from headscope.analyses.distributed import init_from_env
    from headscope.threads import configure_threads
    configure_threads()
    ranks = init_from_env(extra.get("device", "cpu"))
    try:
        run = run_analysis(args.analysis, args.model, data=getattr(args, "data", None), options=extra,
                           out=args.out, resume=args.resume, progress=not args.quiet, ranks=ranks,
                           on_estimate=_print_estimate)
    finally:
        if ranks is not None:
            ranks.close()
    if run is None:   # a rank > 0: rank 0 writes and reports the run
        return 0
    print(f"run {run.meta['status']}: {run.path}")
    _print_summary(run, top=5)
    return 0


def _print_estimate(work, seconds: float) -> None:
    from headscope.analyses.base import describe_estimate
    print(describe_estimate(work, seconds), flush=True)


def cmd_runs(args) -> int:
    from headscope.analyses.store import resolve_run, scan_runs
    if args.action == "show":
        if not args.run:
            raise HeadscopeError("runs show needs a RUN (id or folder)")
        run = resolve_run(args.run, _runs_dir(args))
        if args.json:
            print(json.dumps({**run.meta, "status": run.status}, indent=1))
        else:
            _print_summary(run, top=10, settings=True)
        return 0
    runs, bad = scan_runs(_runs_dir(args))
    if args.analysis:
        runs = [r for r in runs if r.analysis == args.analysis]
    if args.json:
        print(json.dumps([{"id": r.id, "path": str(r.path), "analysis": r.analysis, "status": r.status,
                           "model": _model_id(r), "created": r.meta.get("created")} for r in runs]
                         + [{"id": b.id, "path": str(b.path), "status": "unreadable", "error": b.reason}
                            for b in bad], indent=1))
        return 0
    if not runs and not bad:
        print(f"no runs in {_runs_dir(args)}")
        return 0
    print(f"{'id':<52} {'analysis':<11} {'status':<11} {'model':<16} created")
    for r in runs:
        print(f"{r.id:<52} {r.analysis:<11} {r.status:<11} {_model_id(r):<16} {r.meta.get('created', '')}")
    for b in bad:
        print(f"{b.id:<52} {'?':<11} {'unreadable':<11} {b.reason}")
    return 0


def _model_id(run) -> str:
    model = run.meta.get("model")
    return str(model.get("id")) if isinstance(model, dict) else str(model)


def cmd_report(args) -> int:
    from headscope.analyses.store import resolve_run
    runs = [resolve_run(r, _runs_dir(args)) for r in args.runs]
    from headscope.app.report import write_report
    target = Path(args.out) if args.out else Path(f"report.{args.format}")
    if target.exists() and not args.force:
        raise HeadscopeError(f"{target} exists; pass --force to overwrite it or choose another --out")
    out = write_report(runs, fmt=args.format, out=target)
    print(f"wrote {out}")
    return 0


def cmd_app(args) -> int:
    import subprocess

    from headscope.app import APP_MAIN
    env = dict(os.environ, HEADSCOPE_RUNS=str(_runs_dir(args).resolve()), HEADSCOPE_MODEL=args.model)
    # always headless for Streamlit: otherwise its first run stops at an e-mail prompt (and exits
    # when stdin is not a terminal); the browser is opened here instead
    cmd = [sys.executable, "-m", "streamlit", "run", str(APP_MAIN),
           "--server.address", args.host, "--server.port", str(args.port), "--server.headless", "true",
           "--browser.gatherUsageStats", "false", "--client.toolbarMode", "minimal"]
    print(f"headscope dashboard on http://{args.host}:{args.port}  (runs: {env['HEADSCOPE_RUNS']})")
    if not args.headless:
        threading.Thread(target=_open_when_up, args=(args.host, args.port), daemon=True).start()
    return subprocess.call(cmd, env=env)


def _open_when_up(host: str, port: int, timeout: float = 120.0) -> None:
    """Open the dashboard in the default browser once the server accepts connections."""
    import contextlib
    import socket
    import time
    import webbrowser
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            webbrowser.open(f"http://{host}:{port}")
            return
        time.sleep(0.5)


def _print_summary(run, top: int = 5, settings: bool = False) -> None:
    m = run.meta
    model = m.get("model", {})
    print(f"{run.id}: {m['analysis']} on {model.get('id')} ({model.get('n_layers')} layers x "
          f"{model.get('n_heads')} heads, {model.get('n_kv_heads')} KV) - {run.status}")
    if m.get("error"):
        print(f"  error: {m['error']}")
    if "n_examples" in m:
        print(f"  examples: {m['n_examples']} processed, {m.get('n_used')} used")
    if settings:
        cfg = m.get("config") or {}
        print("  settings: " + (" ".join(f"{k}={number(v)}" for k, v in cfg.items()) or "(defaults)"))
        vers = m.get("versions") or {}
        if vers:
            print("  versions: " + " ".join(f"{k}={v}" for k, v in vers.items()))
    for name, arr in run.scores().items():
        meta = m.get("score_meta", {}).get(name, {})
        if arr.ndim != 2:
            continue
        best = ", ".join(f"{head_label(l, h, meta.get('index'))}={number(arr[l, h], 3)}"
                         for l, h in ranked_heads(arr, top))
        print(f"  {name}: top {best}")
    for k, v in (m.get("summary") or {}).items():
        if isinstance(v, (int, float, str)) or v is None:
            print(f"  {k}: {number(v)}")


# --------------------------------------------------------------------------- parser
def _score_parser(sub) -> None:
    from headscope.analyses.base import list_analyses
    p = sub.add_parser("score", help="run a head-scoring analysis and write a run folder",
                       description="Run a registered analysis; `headscope score NAME --help` lists its options.")
    an = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    for name, cls in list_analyses().items():
        q = an.add_parser(name, help=cls.description, description=cls.description)
        q.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"registry name (see `headscope models`) or local path (default: {DEFAULT_MODEL})")
        if cls.takes_data:
            q.add_argument("--data", default=None, help=cls.data_help or "dataset file (.jsonl with 'text' or .txt)")
        q.add_argument("--out", default=None, help="run folder (default: $HEADSCOPE_RUNS/<analysis>-<model>-<time>)")
        q.add_argument("--resume", action="store_true", help="continue a partial run in --out")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        for o in cls.all_options():
            flag = "--" + o.name.replace("_", "-")
            kw = {"dest": f"opt_{o.name}", "default": None,
                  "help": o.help + (f" (default: {o.default})" if o.default not in (None, "") and "default" not in o.help else "") + (f"; one of {', '.join(map(str, o.choices))}" if o.choices else "")}
            q.add_argument(flag, metavar=o.type.__name__.upper() if o.type is not bool else "BOOL", **kw)


def build_parser(with_score: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headscope", description="headscope: a workbench for attention heads.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs-dir", default=None, help="runs folder (default: ./runs or $HEADSCOPE_RUNS)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    m = sub.add_parser("models", help="list the offline model registry and what is installed/cached")
    m.add_argument("--json", action="store_true")
    if with_score:
        _score_parser(sub)
    else:
        sub.add_parser("score", help="run a head-scoring analysis and write a run folder", add_help=False)
    sub.add_parser("circuit", help="find a head-level circuit for a task: `circuit TASK` = `score circuit --task TASK`",
                   add_help=False)
    r = sub.add_parser("runs", help="list runs, or `runs show RUN`")
    r.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    r.add_argument("run", nargs="?", help="run id or folder (for show)")
    r.add_argument("--analysis", default=None, help="only runs of this analysis")
    r.add_argument("--json", action="store_true", help="machine-readable output (run.json for show)")
    rep = sub.add_parser("report", help="export runs as a circuit report (html, md or json)")
    rep.add_argument("runs", nargs="+", help="run ids or folders (several runs of one model form a circuit view)")
    rep.add_argument("--format", choices=["html", "md", "json"], default="html")
    rep.add_argument("--out", default=None, help="output file (default: report.<format>)")
    rep.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    a = sub.add_parser("app", help="launch the Streamlit dashboard (localhost only by default)",
                       description="Launch the dashboard: browse runs, every head of a prompt (Inspect), "
                                   "interventions and ablation maps (Intervene), new runs. It binds to 127.0.0.1 "
                                   "and reads or writes only the runs folder, uploads and the model cache.")
    a.add_argument("--host", default="127.0.0.1", help="bind address (keep localhost unless you know why)")
    a.add_argument("--port", type=int, default=8501)
    a.add_argument("--model", default=DEFAULT_MODEL, help="model the dashboard opens on")
    a.add_argument("--headless", action="store_true", help="do not try to open a browser")
    return p


def _terminate(signum, frame) -> None:
    """SIGTERM (kill, a batch scheduler, a closed terminal) ends a run like Ctrl-C: the finished
    examples are kept and the run is marked partial, ready for --resume, instead of 'running'."""
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    if threading.current_thread() is not threading.main_thread():   # signals only reach the main thread
        return _main(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _circuit_alias(argv: list[str]) -> list[str]:
    """``headscope circuit TASK ...`` is ``headscope score circuit --task TASK ...``: one analysis,
    two spellings (the second is the registry's)."""
    i = 2 if argv[:1] == ["--runs-dir"] else 0
    if len(argv) <= i or argv[i] != "circuit":
        return argv
    rest = argv[i + 1:]
    task = ["--task", rest.pop(0)] if rest and not rest[0].startswith("-") else []
    return argv[:i] + ["score", "circuit", *task, *rest]


def _main(argv: list[str] | None) -> int:
    argv = _circuit_alias(list(sys.argv[1:] if argv is None else argv))
    try:
        parser = build_parser(with_score="score" in argv)
        args = parser.parse_args(argv)
        if args.command == "models":
            return cmd_models(args)
        if args.command == "score":
            extra = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
            return cmd_score(args, extra)
        if args.command == "runs":
            return cmd_runs(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "app":
            return cmd_app(args)
    except Interrupted as e:
        print(f"headscope: {e}", file=sys.stderr)
        return e.exit_code
    except HeadscopeError as e:
        print(f"headscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:   # outside a run (e.g. while the model loads)
        print("headscope: interrupted", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except Exception as e:  # noqa: BLE001 - the UI is one line; HEADSCOPE_DEBUG=1 shows the trace
        if os.environ.get("HEADSCOPE_DEBUG"):
            raise
        print(f"headscope: internal error: {type(e).__name__}: {e} (traceback saved to {_save_traceback()})",
              file=sys.stderr)
        return 1
    return 0


def _save_traceback() -> str:
    """Write the current exception's traceback to a new file in the temp folder; its path."""
    import tempfile
    import traceback
    fd, path = tempfile.mkstemp(prefix="headscope-crash-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(" ".join(sys.argv) + "\n\n" + traceback.format_exc())
    return path


if __name__ == "__main__":
    sys.exit(main())
