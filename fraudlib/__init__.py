"""fraudlib: the helper package behind the fraud-model lifecycle notebooks."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _unshadow_triton() -> None:
    """Drop the project root from sys.path (``python -c`` / ``python -m`` from the root put it there).

    Its ``triton/`` folder (the Python-backend model files, not a package) would otherwise be
    imported as the ``triton`` package that torch probes for, and torch_geometric fails to
    import. fraudlib itself is installed, so it does not need the root on the path.
    """
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not _os.path.isdir(_os.path.join(root, "triton")):
        return
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != root]


_unshadow_triton()

# torch and xgboost each bring an OpenMP runtime; with the default (active) wait policy one's
# idle threads spin while the other computes: XGBoost after GNN training ran 5x slower
# (71.6 s instead of 11.2 s on the full-size graph). Set before either library loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
