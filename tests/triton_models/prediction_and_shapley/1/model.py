"""Tiny real Triton Python-backend model for tests: a logistic score per edge.

score = sigmoid(w . [x_user[src] | x_merchant[dst] | edge_attr] + b), weights from meta.json.
"Shapley values" are the exact per-feature-group contributions w_i * x_i of this linear model.
meta.json may also hold test knobs: ``initialize_delay_s`` and ``output_nan`` (true, or a
model name: NaN scores only when served under that name).
"""

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _group_sums(contrib, mask):
    groups = np.unique(mask)
    return np.stack([contrib[:, mask == g].sum(axis=1) for g in groups], axis=1).astype(np.float32)


class TritonPythonModel:
    def initialize(self, args):
        meta = json.loads((Path(__file__).parent / "meta.json").read_text())
        self.dims = meta["dims"]
        self.w = np.asarray(meta["weights"], dtype=np.float64)
        self.b = float(meta["bias"])
        # Test knobs: a slow start (to watch a reload); a broken output (to fail a health
        # check), always (true) or only when served under the given model name.
        time.sleep(float(meta.get("initialize_delay_s", 0.0)))
        broken = meta.get("output_nan", False)
        self.output_nan = broken is True or broken == args["model_name"]

    def _score(self, request):
        def get(name, default=None):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            return default if tensor is None else tensor.as_numpy()

        xu, xm = get("x_user"), get("x_merchant")
        ei, ea = get("edge_index_user_to_merchant"), get("edge_attr_user_to_merchant")
        u, m, e = self.dims["user"], self.dims["merchant"], self.dims["edge"]
        masks = [get("feature_mask_user", np.arange(u)), get("feature_mask_merchant", np.arange(m)),
                 get("edge_feature_mask_user_to_merchant", np.arange(e))]
        for name, a in (("x_user", xu), ("x_merchant", xm), ("edge_attr_user_to_merchant", ea)):
            if not np.isfinite(a).all():
                raise ValueError(f"{name} holds NaN or infinite values")
        for mask, width in zip(masks, (u, m, e)):
            if mask.shape != (width,):
                raise ValueError(f"a feature mask has shape {list(mask.shape)}, expected [{width}]")
        if ea.shape[0] != ei.shape[1]:
            raise ValueError(f"edge_attr has {ea.shape[0]} rows for {ei.shape[1]} edges")
        if ei.size and (ei.min() < 0 or ei[0].max() >= len(xu) or ei[1].max() >= len(xm)):
            raise ValueError("edge_index refers to a node that is not in x_user / x_merchant")
        feats = np.concatenate([xu[ei[0]], xm[ei[1]], ea], axis=1).astype(np.float64)
        contrib = feats * self.w
        score = 1.0 / (1.0 + np.exp(-(contrib.sum(axis=1) + self.b)))
        if self.output_nan:
            score[:] = np.nan
        parts = [contrib[:, :u], contrib[:, u:u + m], contrib[:, u + m:]]
        if not bool(get("COMPUTE_SHAP", np.array([False])).reshape(-1)[0]):
            parts = [p[:0] for p in parts]
        shap = [_group_sums(p, mask) for p, mask in zip(parts, masks)]
        names = ["shap_values_user", "shap_values_merchant", "shap_values_user_to_merchant"]
        out = [pb_utils.Tensor("PREDICTION", score.astype(np.float32).reshape(-1, 1))]
        out += [pb_utils.Tensor(n, s) for n, s in zip(names, shap)]
        return pb_utils.InferenceResponse(output_tensors=out)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._score(request))
            except Exception as e:  # a bad request gets an error response; the model keeps serving
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))))
        return responses
