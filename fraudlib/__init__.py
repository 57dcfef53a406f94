"""fraudlib: the helper package behind the fraud-model lifecycle notebooks."""

import os as _os

__version__ = "0.1.0"


# torch and xgboost each bring an OpenMP runtime; with the default (active) wait policy one's
# idle threads spin while the other computes: XGBoost after GNN training ran 5x slower
# (71.6 s instead of 11.2 s on the full-size graph). Set before either library loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
