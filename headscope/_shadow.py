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


def give_way(name: str, init_file: str) -> None:
    """Replace the top-level module ``name`` (a repo folder) by the installed package ``name``.

    ``init_file`` is the folder's ``__init__.py``; its grandparent is the repository root, which
    is left out of the search. Failure modes: no installed package of that name ->
    ``ModuleNotFoundError`` naming ``headscope.<name>``; the installed package's own import error
    propagates unchanged.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(init_file)))
    path = [p for p in sys.path if isinstance(p, str) and not _same_dir(p, root)]
    spec = PathFinder.find_spec(name, path)
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
