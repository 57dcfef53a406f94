"""The self-contained Triton model package, and loading a version of it in-process.

``export_model`` writes::

    <out_dir>/prediction_and_shapley/config.pbtxt           complete (dims from the model)
    <out_dir>/prediction_and_shapley/1/model.py             triton/model.py
    <out_dir>/prediction_and_shapley/1/gnn_model.py         fraudlib/gnn.py, verbatim
    <out_dir>/prediction_and_shapley/1/state_dict_gnn_model.pth
    <out_dir>/prediction_and_shapley/1/embedding_based_xgboost.json
    <out_dir>/prediction_and_shapley/1/meta.json
    <out_dir>/prediction_and_shapley/1/forest.c             triton/forest.c, verbatim
    <out_dir>/prediction_and_shapley/1/libforest.so         forest.c compiled (when a C compiler is here)
    <out_dir>/prediction_and_shapley/1/sage.c               triton/sage.c, verbatim
    <out_dir>/prediction_and_shapley/1/libsage.so           sage.c compiled (when a C compiler is here)

into a temporary folder beside the target and renames it into place when complete.
``load_model`` imports a version's own ``model.py``, the code Triton runs, so in-process and
served predictions are one function.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import string
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_geometric
import xgboost as xgb

from fraudlib import gnn
from fraudlib.graph_store import Graph
from fraudlib.settings import TRITON_MODEL_NAME, project_root

VERSION = "1"
FILES = ("model.py", "gnn_model.py", "state_dict_gnn_model.pth", "embedding_based_xgboost.json", "meta.json")
# The compiled fast path of small requests, source -> library: the trees (forest.c) and the
# GNN's message passing (sage.c). Optional: without them the backend uses XGBoost and torch.
NATIVE_SOURCES = {"forest.c": "libforest.so", "sage.c": "libsage.so"}
NATIVE_FILES = tuple(name for pair in NATIVE_SOURCES.items() for name in pair)
# Shapley value sampling: permutations per request, and their seed (answers are repeatable).
SHAP_N_SAMPLES = 8
SHAP_SEED = 0


def _triton_source(name: str) -> Path:
    return project_root() / "triton" / name


def render_config(meta: dict, model_name: str = TRITON_MODEL_NAME) -> str:
    """config.pbtxt of a model from the template, with its feature dims."""
    arch = meta["architecture"]
    template = string.Template(_triton_source("config.pbtxt").read_text())
    return template.substitute(model_name=model_name, user_dim=arch["user_channels"],
                               merchant_dim=arch["merchant_channels"], edge_dim=arch["edge_channels"])


def export_model(out_dir: Path | str, model: gnn.FraudGNN, booster: xgb.Booster, meta: dict) -> Path:
    """Write the model package under ``out_dir`` (replacing one there); returns the model dir.

    ``meta`` must hold ``architecture`` (FraudGNN keyword arguments) and ``feature_masks``
    (user/merchant/edge); library versions and Shapley settings are added here.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "model_name": TRITON_MODEL_NAME,
            "shap": {"n_samples": SHAP_N_SAMPLES, "seed": SHAP_SEED},
            "versions": {"torch": torch.__version__, "torch_geometric": torch_geometric.__version__,
                         "xgboost": xgb.__version__, "numpy": np.__version__}}
    target = out_dir / TRITON_MODEL_NAME
    staging = Path(tempfile.mkdtemp(prefix=f".{TRITON_MODEL_NAME}.", dir=out_dir))
    try:
        version = staging / VERSION
        version.mkdir()
        shutil.copyfile(_triton_source("model.py"), version / "model.py")
        shutil.copyfile(Path(gnn.__file__), version / "gnn_model.py")
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   version / "state_dict_gnn_model.pth")
        booster.save_model(str(version / "embedding_based_xgboost.json"))
        _compile_native(version)
        (version / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=_plain) + "\n")
        (staging / "config.pbtxt").write_text(render_config(meta))
        staging.chmod(0o755)  # mkdtemp makes it private; Triton may run as another user
        if target.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{TRITON_MODEL_NAME}.old.", dir=out_dir))
            target.rename(retired / TRITON_MODEL_NAME)
            staging.rename(target)
            shutil.rmtree(retired)
        else:
            staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _compile_native(version: Path) -> None:
    """forest.c, sage.c and their libraries in ``version``: the CPU backend evaluates small
    requests with them (checked against XGBoost and torch at every load), and uses XGBoost and
    torch themselves when they are missing."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    for source, library in NATIVE_SOURCES.items():
        shutil.copyfile(_triton_source(source), version / source)
        command = [compiler or "cc", "-O2", "-shared", "-fPIC", "-o", str(version / library),
                   str(version / source), "-lm"]
        result = None if compiler is None else subprocess.run(command, capture_output=True, text=True)
        if result is None or result.returncode != 0:
            (version / library).unlink(missing_ok=True)
            why = "no C compiler (set CC or install gcc)" if result is None else result.stderr.strip()
            warnings.warn(f"the model package serves small requests without {library}, more slowly: "
                          f"{' '.join(command)} failed: {why}", stacklevel=3)


def _plain(value):
    """JSON for numpy scalars and arrays in ``meta``."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"meta.json cannot hold {type(value).__name__}")


def version_dir_of(path: Path | str) -> Path:
    """The version folder from a model dir (``.../prediction_and_shapley``) or a version folder."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if (path / VERSION / "meta.json").is_file():
        return path / VERSION
    raise FileNotFoundError(f"{path} is neither a model version folder (with meta.json) nor a model "
                            f"folder holding version {VERSION}/: pass the folder that train() returned")


@dataclass
class LoadedModel:
    """One model version, scoring graphs in-process with the version's own code."""

    version_dir: Path
    meta: dict
    predictor: object  # the version's model.FraudPredictor

    def predict(self, graph: Graph, edges: np.ndarray | None = None) -> np.ndarray:
        """Fraud probability of every edge of ``graph`` (message passing over its own edges),
        or of the edges at positions ``edges`` only (the same values, less work)."""
        return self.predictor.predict(graph.x_user, graph.x_merchant, graph.edge_index, graph.edge_attr, edges=edges)

    def shapley(self, graph: Graph, masks: dict | None = None) -> dict[str, np.ndarray]:
        """Shapley values per edge and feature group, as Triton's shap_values_* outputs."""
        return self.predictor.shapley(graph.x_user, graph.x_merchant, graph.edge_index, graph.edge_attr,
                                      masks=masks)


def load_model(path: Path | str, device: str = "cpu") -> LoadedModel:
    """Load a model version (a version folder, or a model folder holding version 1)."""
    version_dir = version_dir_of(path).resolve()
    missing = [name for name in FILES if not (version_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"model version {version_dir} is incomplete: missing {missing}")
    name = f"fraud_triton_model_{hashlib.sha256(str(version_dir).encode()).hexdigest()[:16]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, version_dir / "model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    predictor = sys.modules[name].FraudPredictor(version_dir, device)
    return LoadedModel(version_dir=version_dir, meta=predictor.meta, predictor=predictor)
