"""Validation against test AUPRC of the full model and the features-only XGBoost (docs/model_quality.md).
Its arguments are bench_quality case folders under /tmp/bq, from
`benchmarks/bench_quality.py --work /tmp/bq`. It prints one JSON line per case."""
import sys, json, numpy as np
from fraudlib import training, metrics
def wap(y, s, w_neg):
    o = np.argsort(-s, kind="stable"); y = y[o]
    tp = np.cumsum(y == 1); fp = np.cumsum(y == 0) * w_neg
    prec = tp / (tp + fp)
    return float(prec[y == 1].sum() / max(1, (y == 1).sum()))
stash = {}
orig = training._evaluate
def ev(y, scores, alert_rate):
    stash.setdefault("runs", []).append((y["validation"], scores["validation"], y["test"], scores["test"]))
    return orig(y, scores, alert_rate)
training._evaluate = ev
for case in sys.argv[1:]:
    g = f"/tmp/bq/{case}/graph"; stash.clear()
    r = training.train(g, f"/tmp/bq/exp/{case}", progress=False, seed=int(case[-len('0-causal'):-len('-causal')]), gnn_params={"num_epochs": 8}, keep_gnn="always")
    rate = training.context_rate(g)
    names = list(r.metrics)  # order of all_scores
    out = {"case": case}
    for name, (yv, sv, yt, st) in zip(names, stash["runs"]):
        out[name] = {"val_auprc": metrics.auprc(yv, sv), "val_weighted": wap(yv, sv, 1 / rate), "test": metrics.auprc(yt, st)}
    print(json.dumps(out), flush=True)
