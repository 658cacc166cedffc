"""Why the repo's top-level folders can never stand in for installed packages of the same name.

The repository keeps the user's layout: ``kernels/``, ``probe/``, ``analyses/``, ``app/``, ``data/``
at the top, installed as ``headscope.kernels``, ``headscope.probe``, ... (setuptools
``package-dir``). Whenever the repository root is on ``sys.path`` -- ``python -c`` or a REPL
started there, ``python -m pytest``, ``python -m headscope`` -- Python would also find those
folders as *top-level* packages. That breaks real third-party code: transformers >= 5.25 imports the
PyPI package ``kernels`` (Hugging Face hub kernels) while loading ``modeling_utils``, and found the
repo's ``kernels/`` instead (``ImportError: cannot import name 'CUDAProperties'``).

Mechanism, chosen because it holds for every way of starting Python (no environment variable,
pytest option or launcher has to be remembered): each top-level folder's ``__init__.py`` starts with

    if "." not in __name__:   # imported as a top-level module: see headscope/_shadow.py
        from headscope._shadow import give_way
        give_way(__name__, __file__)
    else:
        ...the package body...

The environment ``make setup`` builds also gets a ``.pth`` line (``write_pth``) that puts a finder
first on ``sys.meta_path`` (``install_finder``): from then on the installed package is found before
the folder, by imports and by ``importlib.util.find_spec`` alike (transformers asks the latter before
it imports ``kernels``). The guard below covers every other environment.

``give_way`` loads the installed package of that name from ``sys.path`` without the repository
root and puts it in ``sys.modules`` in this module's place (the import system returns whatever
``sys.modules`` holds after the module ran), or raises ``ModuleNotFoundError`` when no such package
is installed -- exactly what the import would do without the clone. The folders are therefore only
ever importable as ``headscope.*``. ``tests/test_shadowing.py`` fails if any top-level folder gets
imported in place of an installed package, or runs as a second copy of ``headscope.*``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from importlib.machinery import PathFinder


def _same_dir(entry: str, root: str) -> bool:
    try:
        return os.path.samefile(entry or os.curdir, root)
    except OSError:
        return False


def _installed_spec(name: str, root: str):
    """The spec of top-level module ``name`` found on ``sys.path`` without the repository ``root``."""
    return PathFinder.find_spec(name, [p for p in sys.path if isinstance(p, str) and not _same_dir(p, root)])


def give_way(name: str, init_file: str) -> None:
    """Replace the top-level module ``name`` (a repo folder) by the installed package ``name``.

    ``init_file`` is the folder's ``__init__.py``; its grandparent is the repository root, which
    is left out of the search. Failure modes: no installed package of that name ->
    ``ModuleNotFoundError`` naming ``headscope.<name>``; the installed package's own import error
    propagates unchanged.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    spec = _installed_spec(name, root)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the folder {os.path.join(root, name)} is headscope.{name}; "
            f"import it as that)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise


class _YieldToInstalled:
    """A ``sys.meta_path`` finder for the clone's folder names: it answers with the installed package
    of that name (``sys.path`` without the repo root), or None so the normal search goes on (and
    finds the guarded folder). With it even ``importlib.util.find_spec("kernels")`` -- what
    transformers asks before importing -- names the installed package."""

    def __init__(self, root: str, names: frozenset[str]):
        self.root, self.names = root, names

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in self.names:
            return None
        return _installed_spec(name, self.root)


def install_finder() -> None:
    """Put ``_YieldToInstalled`` first on ``sys.meta_path`` when headscope runs from a clone (an
    editable install); a no-op for a wheel install, whose parent folder is site-packages."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")) or any(isinstance(f, _YieldToInstalled)
                                                                       for f in sys.meta_path):
        return
    names = frozenset(n for n in os.listdir(root) if n not in ("headscope", "tests")
                      and os.path.isfile(os.path.join(root, n, "__init__.py")))
    sys.meta_path.insert(0, _YieldToInstalled(root, names))


PTH_NAME = "zz-headscope-yield.pth"   # after setuptools' __editable__ .pth, which makes headscope importable


def write_pth() -> str:
    """Install ``install_finder`` at every interpreter start of this environment (``make setup``
    calls this): a ``.pth`` line in site-packages. A failure there must never break Python's start."""
    import site
    target = os.path.join(site.getsitepackages()[0], PTH_NAME)
    line = ('import sys; exec("try:\\n import headscope._shadow as _s; _s.install_finder()\\n'
            'except Exception:\\n pass")\n')
    with open(target, "w") as f:
        f.write(line)
    return target
