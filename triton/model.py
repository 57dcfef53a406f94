"""Triton Python backend of the fraud model: GNN embeddings + XGBoost, with Shapley values.

Copied into every model version directory beside ``gnn_model.py`` (the GNN architecture),
``state_dict_gnn_model.pth``, ``embedding_based_xgboost.json`` and ``meta.json``. It reads only
that directory and never imports fraudlib, so a version keeps working after fraudlib changes.
fraudlib.model_export.load_model imports this same file to predict in-process, so Triton and
in-process scoring run one function. On CPU, requests of up to 64 edges run in C: the GNN's
message passing in ``libsage.so`` (sage.c) when it reproduces torch's within float32 rounding,
the XGBoost trees in ``libforest.so`` (forest.c) when it reproduces XGBoost exactly; both are
compiled at export and checked at every load.

Serving contract (blueprint 2.0.0): inputs x_user [U', Fu], x_merchant [M', Fm],
edge_index_user_to_merchant [2, E] (row 0 indexes x_user, row 1 x_merchant),
edge_attr_user_to_merchant [E, Fe], optional feature masks (one group id per column) and
COMPUTE_SHAP [1]. Outputs PREDICTION [E, 1] (fraud probability of every edge, computed with
message passing over the edges sent) and shap_values_{user,merchant,user_to_merchant}
[E, groups]: Captum Shapley value sampling where a player is one feature group, ablated to 0 on
every node (or edge) of the graph at once; [0, groups] when COMPUTE_SHAP is false.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported in-process by fraudlib.model_export.load_model
    pb_utils = None

if pb_utils is not None and "sklearn" not in sys.modules:
    # xgboost imports scikit-learn, when installed, for its estimator classes, which this
    # backend never uses: 1.5 s of every model load (scipy, pandas). Inside the Triton stub
    # nothing else needs it, so xgboost is imported as if it were absent.
    sys.modules["sklearn"] = None  # `import sklearn` raises ImportError
    try:
        import xgboost as xgb
    finally:
        del sys.modules["sklearn"]
else:
    import xgboost as xgb

# Shapley values cost n_samples x groups forward passes over the whole request graph: above
# this many edges per request (config parameter max_shap_edges) an explanation is refused with
# a 400 instead of holding a model instance for seconds.
MAX_SHAP_EDGES = 8192
# A request of at least this many edges (config parameter bulk_edges) is a batch job (an
# evaluation of a test period), not a transaction: on CPU it is scored with every core the
# instance may use, not the one thread of a serving request (6.2M edges: 55 s one-threaded
# through Triton; the same scores).
BULK_EDGES = 1 << 20
# A request of more edges builds the trees' input (158 floats an edge) and walks the trees in
# batches of this many edges: 165 MB at a time, not 3.9 GB for the 6.2M edges of 100M rows.
BATCH_EDGES = 1 << 18
SHAP_OUTPUTS = ("shap_values_user", "shap_values_merchant", "shap_values_user_to_merchant")
MASK_INPUTS = ("feature_mask_user", "feature_mask_merchant", "edge_feature_mask_user_to_merchant")


@contextmanager
def _serial_torch():
    """torch and xgboost bring separate OpenMP runtimes whose idle threads spin: alternating
    between them many times (Shapley sampling) runs ~10x slower unless torch stays serial."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _DensePredict:
    """``booster.inplace_predict(features, validate_features=False)`` for a dense float32 array:
    the same C call (XGBoosterPredictFromDense) without the Python wrapper around it, which took
    0.1-0.35 ms of a one-transaction request's 0.5 ms of XGBoost (tests/test_model_export.py
    checks the two agree bitwise)."""

    _CONFIG = json.dumps({"type": 0, "training": False, "iteration_begin": 0, "iteration_end": 0,
                          "missing": float("nan"), "strict_shape": False, "cache_id": 0}).encode()

    def __init__(self, booster: xgb.Booster):
        self.booster = booster  # keeps the handle alive
        self.lib = ctypes.CDLL(xgb.libpath.find_lib_path()[0])  # the library xgboost loaded
        self.lib.XGBGetLastError.restype = ctypes.c_char_p

    def __call__(self, features: np.ndarray) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=np.float32)
        interface = json.dumps({"data": [features.ctypes.data, True], "shape": list(features.shape),
                                "strides": None, "typestr": "<f4", "version": 3}).encode()
        shape, dims = ctypes.POINTER(ctypes.c_uint64)(), ctypes.c_uint64()
        preds = ctypes.POINTER(ctypes.c_float)()
        if self.lib.XGBoosterPredictFromDense(self.booster.handle, interface, self._CONFIG, None, ctypes.byref(shape),
                                              ctypes.byref(dims), ctypes.byref(preds)) != 0:
            raise RuntimeError(f"XGBoost prediction failed: {self.lib.XGBGetLastError().decode()}")
        size = int(np.prod([shape[i] for i in range(dims.value)]))
        # The buffer belongs to the booster and is reused by its next call: copy it out.
        return np.ctypeslib.as_array(preds, (size,)).copy() if size else np.zeros(0, np.float32)


class _Forest(ctypes.Structure):
    """forest_t of forest.c."""
    ARRAYS = ("roots", "feature", "value", "left", "right", "default_left")
    _fields_ = [("n_trees", ctypes.c_int32), ("n_features", ctypes.c_int32), ("base_margin", ctypes.c_float)] + [
        (name, ctypes.c_void_p) for name in ARRAYS]


class _CompiledPredict:
    """The booster's trees evaluated by forest.c (``libforest.so`` in the version directory,
    compiled by fraudlib.model_export): same answer as ``_DensePredict`` bit for bit, without
    XGBoost's per-call JSON parsing and dispatch, for requests of up to MAX_ROWS edges. Use
    ``load``, which checks that."""

    LIBRARY = "libforest.so"
    # Up to here forest.c is faster; beyond, XGBoost's predictor, which walks each tree for a
    # block of rows at a time, is (1.7 vs 3.3 ms for 1,024 rows, 0.01 vs 0.14 ms for one).
    MAX_ROWS = 64

    def __init__(self, library: Path, trees: list[dict], n_features: int, base_margin: float):
        def flat(key: str, dtype) -> np.ndarray:  # one array over all trees' nodes
            return np.concatenate([t[key] for t in trees]).astype(dtype)

        sizes = [len(t["left_children"]) for t in trees]
        roots = np.cumsum([0] + sizes[:-1])
        shift = np.repeat(roots, sizes)  # a tree's node ids become indices into the flat arrays
        leaf = flat("left_children", np.int64) == -1
        self.arrays = {  # kept alive: the struct holds their addresses
            "roots": roots.astype(np.int32),
            "feature": np.where(leaf, 0, flat("split_indices", np.int64)).astype(np.int32),
            "value": flat("split_conditions", np.float32),  # a leaf's value, on a leaf
            "left": np.where(leaf, -1, flat("left_children", np.int64) + shift).astype(np.int32),
            "right": np.where(leaf, -1, flat("right_children", np.int64) + shift).astype(np.int32),
            "default_left": flat("default_left", np.uint8),
        }
        self.n_features = n_features
        self.forest = _Forest(len(trees), n_features, base_margin,
                              *(self.arrays[name].ctypes.data for name in _Forest.ARRAYS))
        self.lib = ctypes.CDLL(str(library))
        self.lib.forest_predict.restype = None
        self.lib.forest_predict.argtypes = [ctypes.POINTER(_Forest), ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_void_p]
        self.forest_ref = ctypes.byref(self.forest)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"the XGBoost input must have shape [-1, {self.n_features}], "
                             f"got {list(features.shape)}")
        out = np.empty(features.shape[0], dtype=np.float32)
        self.lib.forest_predict(self.forest_ref, features.ctypes.data, features.shape[0], out.ctypes.data)
        return out

    @classmethod
    def load(cls, version_dir: Path, reference: _DensePredict) -> tuple[_CompiledPredict | None, str]:
        """The compiled predictor, or None and why XGBoost's own must serve instead."""
        library = version_dir / cls.LIBRARY
        if not library.is_file():
            return None, f"no {cls.LIBRARY} in the version directory"
        learner = json.loads(reference.booster.save_raw("json"))["learner"]
        booster, params = learner["gradient_booster"], learner["learner_model_param"]
        base_score = json.loads(params["base_score"]) if params["base_score"].startswith("[") else [
            float(params["base_score"])]
        trees = booster.get("model", {}).get("trees", [])
        unsupported = [what for what, bad in (
            (f"booster {booster.get('name')}", booster.get("name") != "gbtree"),
            (f"objective {learner['objective']['name']}", learner["objective"]["name"] != "binary:logistic"),
            ("several outputs", len(base_score) != 1 or int(params.get("num_class", 0)) > 1
             or int(params.get("num_target", 1)) != 1),
            ("categorical splits", any(any(t["split_type"]) for t in trees)),
            ("no trees", not trees)) if bad]
        if unsupported:
            return None, f"the compiled trees do not support {', '.join(unsupported)}"
        # ProbToMargin of binary:logistic, in float32 as XGBoost computes it.
        base_margin = float(-np.log(np.float32(1) / np.float32(base_score[0]) - np.float32(1), dtype=np.float32))
        try:
            compiled = cls(library, trees, int(params["num_feature"]), base_margin)
        except (OSError, AttributeError) as error:  # built for another platform, or from another source
            return None, f"{cls.LIBRARY} does not load here: {error}"
        probe = compiled.probe_rows()
        if not np.array_equal(compiled(probe), reference(probe)):
            return None, f"{cls.LIBRARY} does not reproduce XGBoost's predictions on probe rows"
        return compiled, f"compiled trees ({cls.LIBRARY}), equal to XGBoost on {len(probe)} probe rows"

    def probe_rows(self, n: int = 512) -> np.ndarray:
        """Rows whose features sit on, just below and just above the trees' thresholds, with some
        missing values: where a differing comparison would show."""
        rng = np.random.default_rng(0)
        a = self.arrays
        split = a["left"] >= 0
        rows = rng.normal(size=(n, self.n_features)).astype(np.float32)
        for feature in np.unique(a["feature"][split]):
            thresholds = a["value"][split & (a["feature"] == feature)]
            picks = rng.choice(thresholds, n)
            nudge = rng.integers(-1, 2, n)  # one float32 step down, none, one up
            rows[:, feature] = np.where(nudge < 0, np.nextafter(picks, -np.inf),
                                        np.where(nudge > 0, np.nextafter(picks, np.inf), picks))
        rows[rng.random(rows.shape) < 0.02] = np.nan
        return np.ascontiguousarray(rows, dtype=np.float32)


class _Sage(ctypes.Structure):
    """sage_t of sage.c."""
    _fields_ = [("n_hops", ctypes.c_int32), ("hidden", ctypes.c_int32), ("user_dim", ctypes.c_int32),
                ("merchant_dim", ctypes.c_int32), ("weights", ctypes.c_void_p)]


class _CompiledGNN:
    """The GNN's message passing of small requests by sage.c (``libsage.so`` in the version
    directory, compiled by fraudlib.model_export): ``gnn.edge_features`` within float32 rounding,
    without torch's per-operator dispatch (0.24 ms of a one-transaction request). Plain mean
    SAGEConv layers only. Use ``load``, which checks it against torch."""

    LIBRARY = "libsage.so"
    # The requests whose trees forest.c evaluates: one fast path, torch and XGBoost beyond it.
    MAX_EDGES = _CompiledPredict.MAX_ROWS
    # The Linear layers' sums may run in another order than torch's BLAS: a few float32 ulps.
    TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

    def __init__(self, library: Path, weights: list[np.ndarray], dims: dict[str, int]):
        self.weights = [np.ascontiguousarray(w, dtype=np.float32) for w in weights]  # kept alive
        self.pointers = (ctypes.c_void_p * len(weights))(*(w.ctypes.data for w in self.weights))
        self.dims = dims
        self.widths = tuple(dims.values())  # x_user, x_merchant, edge_attr: what sage.c trusts
        hidden = self.weights[0].shape[0]
        self.width = dims["x_user"] + dims["x_merchant"] + 2 * hidden + dims["edge_attr_user_to_merchant"]
        self.sage = _Sage(len(weights) // 6, hidden, dims["x_user"], dims["x_merchant"],
                          ctypes.cast(self.pointers, ctypes.c_void_p))
        self.lib = ctypes.CDLL(str(library))
        f = self.lib.sage_edge_features
        f.restype = ctypes.c_int
        f.argtypes = [ctypes.POINTER(_Sage), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32,
                      ctypes.c_void_p]
        self.sage_ref = ctypes.byref(self.sage)

    def __call__(self, x_user: np.ndarray, x_merchant: np.ndarray, edge_index: np.ndarray,
                 edge_attr: np.ndarray) -> np.ndarray:
        """The XGBoost input of every edge, from inputs checked by FraudPredictor.check (float32,
        int64 node ids in range)."""
        x_user, x_merchant, edge_attr = (np.ascontiguousarray(a, dtype=np.float32)
                                         for a in (x_user, x_merchant, edge_attr))
        widths = (x_user.shape[1], x_merchant.shape[1], edge_attr.shape[1])
        if widths != self.widths:
            raise ValueError(f"feature widths {widths}, the model takes {self.widths}")
        users, merchants = (np.ascontiguousarray(ids, dtype=np.int64) for ids in edge_index)
        out = np.empty((len(users), self.width), dtype=np.float32)
        if self.lib.sage_edge_features(self.sage_ref, x_user.ctypes.data, len(x_user), x_merchant.ctypes.data,
                                       len(x_merchant), users.ctypes.data, merchants.ctypes.data, len(users),
                                       edge_attr.ctypes.data, edge_attr.shape[1], out.ctypes.data) != 0:
            raise MemoryError(f"{self.LIBRARY}: out of memory for {len(users)} edges")
        return out

    @classmethod
    def load(cls, version_dir: Path, gnn, edge_types: tuple, dims: dict[str, int]) -> tuple[_CompiledGNN | None, str]:
        """The compiled message passing, or None and why torch must serve instead."""
        library = version_dir / cls.LIBRARY
        if not library.is_file():
            return None, f"no {cls.LIBRARY} in the version directory"
        if not getattr(gnn, "_plain_sage", False) or len(gnn.convs) == 0:
            return None, f"{cls.LIBRARY} supports plain mean SAGEConv layers only"
        weights = [w.detach().cpu().numpy() for hop in gnn.convs for kind in edge_types
                   for w in (hop.convs[kind].lin_l.weight, hop.convs[kind].lin_l.bias, hop.convs[kind].lin_r.weight)]
        try:
            compiled = cls(library, weights, dims)
        except (OSError, AttributeError) as error:  # built for another platform, or from another source
            return None, f"{cls.LIBRARY} does not load here: {error}"
        graphs = compiled.probe_graphs()
        with torch.inference_mode():
            for graph in graphs:
                expected = gnn.edge_features(*(torch.from_numpy(a) for a in graph)).numpy()
                if not np.allclose(compiled(*graph), expected, **cls.TOLERANCE):
                    return None, f"{cls.LIBRARY} does not reproduce torch's message passing on probe graphs"
        return compiled, (f"compiled message passing ({cls.LIBRARY}), equal to torch's within float32 "
                          f"rounding on {len(graphs)} probe graphs")

    def probe_graphs(self) -> list[tuple[np.ndarray, ...]]:
        """Graphs of 1 to MAX_EDGES edges, with nodes of several edges and nodes of none."""
        rng = np.random.default_rng(0)
        graphs = []
        for n_edges in (1, 2, 3, 8, 21, self.MAX_EDGES):
            n_users, n_merchants = rng.integers(1, n_edges + 2, 2)
            graphs.append((rng.normal(0, 2, (n_users, self.dims["x_user"])).astype(np.float32),
                           rng.normal(0, 2, (n_merchants, self.dims["x_merchant"])).astype(np.float32),
                           np.stack([rng.integers(0, n_users, n_edges), rng.integers(0, n_merchants, n_edges)]),
                           rng.normal(0, 2, (n_edges, self.dims["edge_attr_user_to_merchant"])).astype(np.float32)))
        return graphs


def _shapley_value_sampling():
    """captum's ShapleyValueSampling, imported on the first explanation: 0.65 s less per load."""
    from captum.attr import ShapleyValueSampling

    return ShapleyValueSampling


def _import_by_path(path: Path, prefix: str):
    """Import ``path`` under a name unique to its location, so two versions never share a module."""
    name = f"{prefix}_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _touched(x: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``x`` that ``ids`` touch, in order, and ``ids`` renumbered over them (as
    given when every row is touched, as in a client-compacted request)."""
    present = np.zeros(len(x), dtype=bool)
    present[ids] = True
    if present.all():
        return x, ids
    return x[present], (np.cumsum(present) - 1)[ids]


class FraudPredictor:
    """The model of one version directory; inputs are numpy arrays as in the serving contract."""

    def __init__(self, version_dir: Path | str, device: str = "cpu"):
        version_dir = Path(version_dir)
        self.meta = json.loads((version_dir / "meta.json").read_text())
        self.device = device
        gnn_model = _import_by_path(version_dir / "gnn_model.py", "fraud_gnn_model")
        self.gnn = gnn_model.FraudGNN(**self.meta["architecture"])
        state = torch.load(version_dir / "state_dict_gnn_model.pth", map_location=device, weights_only=True)
        self.gnn.load_state_dict(state)
        self.gnn.to(device).eval()
        self.booster = xgb.Booster(model_file=str(version_dir / "embedding_based_xgboost.json"))
        self.booster.set_param({"device": device})
        self.xgboost_predict = _DensePredict(self.booster)
        arch = self.meta["architecture"]
        self.dims = {"x_user": arch["user_channels"], "x_merchant": arch["merchant_channels"],
                     "edge_attr_user_to_merchant": arch["edge_channels"]}
        # On CPU, small requests run in C: the trees by forest.c when it reproduces XGBoost
        # exactly, the message passing by sage.c when it reproduces torch's within rounding.
        self.compiled_predict, self.tree_path = None, "XGBoost (the model is on a GPU)"
        self.compiled_gnn, self.gnn_path = None, "torch (the model is on a GPU)"
        if device == "cpu":
            self.compiled_predict, self.tree_path = _CompiledPredict.load(version_dir, self.xgboost_predict)
            self.compiled_gnn, self.gnn_path = _CompiledGNN.load(
                version_dir, self.gnn, (gnn_model.USER_TO_MERCHANT, gnn_model.MERCHANT_TO_USER), self.dims)
        self.default_masks = dict(zip(MASK_INPUTS, (self.meta["feature_masks"][k]
                                                    for k in ("user", "merchant", "edge"))))
        self._no_shapley = self._empty_shapley(None)

    def check(self, x_user, x_merchant, edge_index, edge_attr) -> tuple[np.ndarray, ...]:
        """The inputs as float32/int64 arrays; ValueError naming the input when one is invalid."""
        arrays = {"x_user": x_user, "x_merchant": x_merchant, "edge_attr_user_to_merchant": edge_attr}
        for name, a in arrays.items():
            a = np.asarray(a)
            if a.ndim != 2 or a.shape[1] != self.dims[name]:
                raise ValueError(f"{name} must have shape [-1, {self.dims[name]}], got {list(a.shape)}")
            if a.dtype.kind != "f":
                raise ValueError(f"{name} must be floating point, got {a.dtype}")
            with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: caught below
                a = a.astype(np.float32, copy=False)
            if not np.isfinite(a).all():
                raise ValueError(f"{name} contains NaN, infinite or values beyond float32's range")
            arrays[name] = a
        edge_index = np.asarray(edge_index)
        if edge_index.ndim != 2 or edge_index.shape[0] != 2:
            raise ValueError(f"edge_index_user_to_merchant must have shape [2, -1], got {list(edge_index.shape)}")
        if edge_index.dtype.kind not in "iu":
            raise ValueError(f"edge_index_user_to_merchant must be integer, got {edge_index.dtype}")
        n_edges = edge_index.shape[1]
        if arrays["edge_attr_user_to_merchant"].shape[0] != n_edges:
            raise ValueError(f"edge_attr_user_to_merchant has {arrays['edge_attr_user_to_merchant'].shape[0]} "
                             f"rows but edge_index_user_to_merchant has {n_edges} edges")
        for row, name in ((0, "x_user"), (1, "x_merchant")):
            ids = edge_index[row]
            if n_edges and (ids.min() < 0 or ids.max() >= arrays[name].shape[0]):
                raise ValueError(f"edge_index_user_to_merchant row {row} must index {name} rows "
                                 f"0..{arrays[name].shape[0] - 1}, got {ids.min()}..{ids.max()}")
        return (arrays["x_user"], arrays["x_merchant"], edge_index.astype(np.int64, copy=False),
                arrays["edge_attr_user_to_merchant"])

    def _scores(self, x_user: torch.Tensor, x_merchant: torch.Tensor, edge_index: torch.Tensor,
                edge_attr: torch.Tensor, edges: torch.Tensor | None = None) -> np.ndarray:
        n = edge_index.shape[1] if edges is None else edges.shape[0]
        if n <= BATCH_EDGES:
            features = self.gnn.edge_features(x_user, x_merchant, edge_index, edge_attr, edges)
            return self.predict_dense(features.cpu().numpy())
        rows, n = self.gnn.edge_feature_rows(x_user, x_merchant, edge_index, edge_attr, edges)
        out = np.empty(n, dtype=np.float32)
        for start in range(0, n, BATCH_EDGES):  # the trees' input a batch at a time (memory)
            stop = min(n, start + BATCH_EDGES)
            out[start:stop] = self.predict_dense(rows(start, stop).cpu().numpy())
        return out

    def predict_dense(self, features: np.ndarray) -> np.ndarray:
        """XGBoost's probabilities for the rows of ``features``, float32 [rows]."""
        if self.compiled_predict is not None and len(features) <= _CompiledPredict.MAX_ROWS:
            return self.compiled_predict(features)
        return self.xgboost_predict(features)

    @torch.inference_mode()  # cheaper than no_grad: no version counters on a request's tensors
    def predict(self, x_user, x_merchant, edge_index, edge_attr, edges=None) -> np.ndarray:
        """Fraud probability of every edge, float32 [E]; with ``edges`` (positions), of those
        edges only: the messages are passed over every edge, the trees walked for these (a few
        rows scored inside a context of millions of edges cost the context's message passing,
        not millions of tree walks)."""
        x_user, x_merchant, edge_index, edge_attr = self.check(x_user, x_merchant, edge_index, edge_attr)
        if edges is not None:
            edges = np.asarray(edges)
            n = edge_index.shape[1]
            if edges.ndim != 1 or edges.dtype.kind not in "iu" or (edges.size and not 0 <= edges.min() <= edges.max() < n):
                raise ValueError(f"edges must be a list of edge positions in 0..{n - 1}, got {edges!r:.80}")
            edges = edges.astype(np.int64, copy=False)
        if edge_index.shape[1] == 0 or (edges is not None and edges.size == 0):
            return np.zeros(0, dtype=np.float32)
        # Only the nodes the edges touch take part in message passing: drop the others, so a
        # one-transaction request costs one transaction's work whatever node tables it carries.
        users, merchants = edge_index
        x_user, src = _touched(x_user, users)
        x_merchant, dst = _touched(x_merchant, merchants)
        edge_index = edge_index if src is users and dst is merchants else np.stack([src, dst])
        if self.compiled_gnn is not None and edge_index.shape[1] <= _CompiledGNN.MAX_EDGES:
            features = self.compiled_gnn(x_user, x_merchant, edge_index, edge_attr)
            return self.predict_dense(features if edges is None else features[edges])
        inputs = [self._tensor(a) for a in (x_user, x_merchant, edge_index, edge_attr)]
        return self._scores(*inputs, None if edges is None else self._tensor(edges)).astype(np.float32)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """``array`` on the model's device; on CPU without a copy (and 3x cheaper than as_tensor)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor if self.device == "cpu" else tensor.to(self.device)

    def _groups(self, widths: tuple[int, int, int], masks: dict | None) -> list[np.ndarray]:
        """Per input, the group rank (0..groups-1, by ascending group id) of each feature column."""
        masks = {**self.default_masks, **(masks or {})}
        ranks = []
        for name, width in zip(MASK_INPUTS, widths):
            mask = np.asarray(masks[name])
            if mask.shape != (width,) or mask.dtype.kind not in "iu" or (width and mask.min() < 0):
                raise ValueError(f"{name} must hold {width} non-negative integer group ids, "
                                 f"got shape {list(mask.shape)} of {mask.dtype}")
            ranks.append(np.unique(mask, return_inverse=True)[1].reshape(-1))
        return ranks

    def no_shapley(self, masks: dict | None = None) -> dict:
        """The Shapley outputs when none are computed: [0, groups] each."""
        if not masks:  # the common case, computed once: 0.07 ms less per request
            return self._no_shapley
        return self._empty_shapley(masks)

    def _empty_shapley(self, masks: dict | None) -> dict:
        ranks = self._groups(tuple(self.dims.values()), masks)
        return {name: np.zeros((0, int(r.max(initial=-1)) + 1), np.float32) for name, r in zip(SHAP_OUTPUTS, ranks)}

    def shapley(self, x_user, x_merchant, edge_index, edge_attr, masks: dict | None = None) -> dict:
        """Shapley values {output name: float32 [E, groups]} of every edge's fraud probability.

        ``masks`` maps the mask input names to one group id per feature column (default: the
        trained masks). Group columns come in ascending group id.
        """
        x_user, x_merchant, edge_index, edge_attr = self.check(x_user, x_merchant, edge_index, edge_attr)
        ranks = self._groups((x_user.shape[1], x_merchant.shape[1], edge_attr.shape[1]), masks)
        if edge_index.shape[1] == 0:
            return self.no_shapley(masks)

        t = lambda a: torch.as_tensor(a, device=self.device)  # noqa: E731
        xu, xm, ei, ea = t(x_user), t(x_merchant), t(edge_index), t(edge_attr)
        src, dst = ei

        def forward(xu_edges, xm_edges, ea_edges):
            # Captum ablates the same groups for every edge in one evaluation, so all copies of a
            # node's row agree and scattering them back rebuilds the ablated node table.
            xu_ablated, xm_ablated = xu.clone(), xm.clone()
            xu_ablated[src], xm_ablated[dst] = xu_edges, xm_edges
            return torch.as_tensor(self._scores(xu_ablated, xm_ablated, ei, ea_edges))

        # Captum numbers the players across all inputs: offset each input's group ranks.
        offsets = np.cumsum([0] + [int(r.max(initial=-1)) + 1 for r in ranks[:-1]])
        feature_mask = tuple(t(r + o)[None, :] for r, o in zip(ranks, offsets))
        shap = self.meta.get("shap", {})
        with torch.random.fork_rng(devices=[]), _serial_torch():  # same permutations in Triton and in-process
            torch.manual_seed(int(shap.get("seed", 0)))
            attributions = _shapley_value_sampling()(forward).attribute(
                (xu[src], xm[dst], ea), feature_mask=feature_mask, n_samples=int(shap.get("n_samples", 8)))
        out = {}
        for name, attribution, r in zip(SHAP_OUTPUTS, attributions, ranks):
            # Every column of a group carries the group's value: keep the group's first column.
            first_column = [int(np.flatnonzero(r == g)[0]) for g in range(int(r.max(initial=-1)) + 1)]
            out[name] = attribution[:, first_column].detach().cpu().numpy().astype(np.float32)
        return out


class InvalidRequest(ValueError):
    """A request the model cannot answer as sent: HTTP 400 with the reason."""


class Busy(RuntimeError):
    """The model has no capacity for this request now: HTTP 503, retry later."""


class _ExplanationSlot:
    """At most one explanation at a time per version and server: the model's other instances
    stay free for scoring (config.pbtxt runs several). A lock on the version directory (flock,
    released when the holding process dies), taken without waiting: a waiting instance would
    be one less for scoring."""

    def __init__(self, directory: Path):
        self.directory = directory

    @contextmanager
    def __call__(self):
        import fcntl
        import os

        fd = os.open(self.directory, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise Busy("another explanation (COMPUTE_SHAP) is running on this model version; "
                           "retry when it has finished") from None
            yield
        finally:
            os.close(fd)  # releases the lock


def _error(message: str, code: str):
    """A TritonError with its code where the backend has codes (INVALID_ARG: HTTP 400)."""
    return pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)) \
        if hasattr(pb_utils.TritonError, code) else pb_utils.TritonError(message)


class TritonPythonModel:
    """Triton entry points around FraudPredictor."""

    def initialize(self, args):
        config = json.loads(args.get("model_config") or "{}")
        parameters = config.get("parameters", {})

        def setting(key: str, default: int) -> int:  # a config parameter (string_value), else the default
            value = parameters.get(key, {}).get("string_value")
            return int(value) if value else default

        self.max_shap_edges = setting("max_shap_edges", MAX_SHAP_EDGES)
        self.bulk_edges = setting("bulk_edges", BULK_EDGES)
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.explanation_slot = _ExplanationSlot(Path(__file__).resolve().parent)
        device = "cpu"
        if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
            device = f"cuda:{args['model_instance_device_id']}"
        if device == "cpu":
            # Triton scales with model instances; intra-op threads in each one fight over the
            # cores (and torch's and xgboost's OpenMP pools spin against each other).
            torch.set_num_threads(1)
        self.predictor = FraudPredictor(Path(__file__).resolve().parent, device)
        if device == "cpu":
            self.predictor.booster.set_param({"nthread": 1})
        version = f"{args['model_name']} version {args['model_version']}"
        pb_utils.Logger.log_info(f"{version}: trees evaluated by {self.predictor.tree_path}")
        pb_utils.Logger.log_info(f"{version}: message passing of small requests by {self.predictor.gnn_path}")

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        # One pass over the inputs (pb_utils.get_input_tensor_by_name lists them all per name).
        tensors = {tensor.name(): tensor for tensor in request.inputs()}

        def get(name):
            tensor = tensors.get(name)
            return None if tensor is None else tensor.as_numpy()

        try:
            graph = [get(n) for n in ("x_user", "x_merchant", "edge_index_user_to_merchant",
                                      "edge_attr_user_to_merchant")]
            masks = {name: mask for name in MASK_INPUTS if (mask := get(name)) is not None}
            compute_shap = get("COMPUTE_SHAP")
            explain = compute_shap is not None and compute_shap.size > 0 and bool(compute_shap.reshape(-1)[0])
            n_edges = graph[2].shape[-1] if graph[2] is not None and graph[2].ndim == 2 else None
            if n_edges == 0:
                raise InvalidRequest("empty graph: edge_index_user_to_merchant holds no edges; send at least "
                                     "one transaction (with its cards' and merchants' context)")
            if explain and n_edges is not None and n_edges > self.max_shap_edges:
                raise InvalidRequest(
                    f"COMPUTE_SHAP asks Shapley values for {n_edges} edges; this model explains at most "
                    f"{self.max_shap_edges} edges per request (config parameter max_shap_edges): explain the "
                    f"transactions in smaller graphs (each with its context), or score without COMPUTE_SHAP")
            with self._threads(n_edges):
                scores = self.predictor.predict(*graph)
            if explain:
                with self.explanation_slot():
                    shap = self.predictor.shapley(*graph, masks=masks)
            else:
                shap = self.predictor.no_shapley(masks)
        except ValueError as error:  # the request, not the model: HTTP 400 with the reason
            return pb_utils.InferenceResponse(error=_error(f"invalid request: {error}", "INVALID_ARG"))
        except Busy as error:  # HTTP 503
            return pb_utils.InferenceResponse(error=_error(f"busy: {error}", "UNAVAILABLE"))
        except Exception as error:  # a response, never a dead model instance
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {error!r}"))
        # Only the outputs the client asked for (all when it named none) travel back.
        requested = set(request.requested_output_names())
        outputs = {"PREDICTION": scores.reshape(-1, 1), **shap}
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, values) for name, values in outputs.items() if name in requested])

    @contextmanager
    def _threads(self, n_edges: int | None):
        """Every core for a bulk request on CPU (``bulk_edges``), one thread otherwise."""
        if self.predictor.device != "cpu" or not n_edges or n_edges < self.bulk_edges or self.cores == 1:
            yield
            return
        pb_utils.Logger.log_info(f"bulk request: {n_edges} edges scored with {self.cores} threads")
        torch.set_num_threads(self.cores)
        self.predictor.booster.set_param({"nthread": self.cores})
        try:
            yield
        finally:
            torch.set_num_threads(1)
            self.predictor.booster.set_param({"nthread": 1})

    def finalize(self):
        self.predictor = None
