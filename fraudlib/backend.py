"""Dataframe backend: pandas on CPU; on a GPU host, cuDF through ``cudf.pandas``.

``cudf.pandas`` proxies the pandas module: once installed, the same pandas code runs on the
GPU where cuDF supports it and falls back to pandas elsewhere, so fraudlib has one code path.
It only affects ``import pandas`` statements that run after it, so call :func:`activate`
before anything imports pandas (first thing in a notebook; this module imports no pandas).

The GPU is detected with a cheap probe (``nvidia-smi -L`` lists a device), never guessed from
an import succeeding: cuDF may be installed on a machine without a GPU and vice versa.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

PROBE_TIMEOUT_S = 10


@dataclass(frozen=True)
class Backend:
    name: str  # "cudf.pandas" or "pandas"
    reason: str  # why, for the notebook's log


def gpu_available() -> bool:
    """True when the NVIDIA driver lists at least one GPU visible to this process."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        listing = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listing.returncode == 0 and any(line.startswith("GPU ") for line in listing.stdout.splitlines())


def activate(prefer_gpu: bool = True) -> Backend:
    """Install ``cudf.pandas`` when a GPU is present and cuDF is installed; else plain pandas."""
    if not prefer_gpu:
        return Backend("pandas", "GPU not requested")
    if not gpu_available():
        return Backend("pandas", "no GPU detected (nvidia-smi lists none)")
    try:
        import cudf.pandas
    except ImportError:
        return Backend("pandas", "GPU detected but cuDF is not installed (see environment.yml)")
    if not cudf.pandas.LOADED:
        try:
            cudf.pandas.install()
        except RuntimeError as error:  # pandas already imported: too late to interpose
            return Backend("pandas", f"cudf.pandas could not install ({error}); call activate() before importing pandas")
    return Backend("cudf.pandas", "GPU detected and cuDF installed")
