"""Not a Python package: this folder holds the Triton Inference Server side of the project (the
Python-backend ``model.py`` and the C it compiles, the ``config.pbtxt`` template, Dockerfile,
compose file).

A Python started at the repository root has the root on ``sys.path`` first, so ``import triton``
finds this folder before the real ``triton`` package (OpenAI Triton, torch's GPU compiler).
Without this file the folder would be imported as an empty namespace package: torch would then
believe triton installed and ``import torch_geometric`` fails (``module 'triton' has no
attribute 'language'``). This file hands the import on to the real package wherever it is
installed (a GPU host), and otherwise fails exactly as a missing package does, so torch sees no
triton. It never runs anything of the folder's own.
"""

import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
_elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
_spec = _machinery.PathFinder.find_spec(__name__, _elsewhere)
if _spec is None or _spec.loader is None:
    del _sys.modules[__name__]
    raise ModuleNotFoundError(f"No module named {__name__!r} ({_os.path.dirname(__file__)} holds the Triton "
                              "Inference Server files of the project, not the triton package)", name=__name__)
_module = _util.module_from_spec(_spec)
_sys.modules[__name__] = _module  # the import statement returns what sys.modules holds
_spec.loader.exec_module(_module)
