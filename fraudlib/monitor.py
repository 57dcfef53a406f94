"""Watching the champion between retrains: its metrics on each new labelled month, drift of
every input feature and of its scores (PSI), and alerts.

For a month of the transaction store (``fraudlib.store``) and the champion served by Triton:

* **metrics**: the month's transactions scored by the served champion inside their graph
  context (``scoring.score_transactions``, the same path as ``fraud score``), AUPRC and the
  metrics at the champion's own threshold; the reference is the champion's AUPRC on its own test
  window (the newest labelled months it was promoted on), scored the same way now;
* **feature drift**: PSI of every edge input column (Errors, City, Zip, Chip, Amount and the
  causal features; a binary- or one-hot-coded column compared as its category) between the
  champion's training window and the month, on non-fraud rows: the training window is kept
  undersampled (all fraud, a random draw of non-fraud), so only its non-fraud rows are an
  unbiased sample of the traffic;
* **score drift**: PSI of the champion's scores on the month's non-fraud rows against its scores
  on the non-fraud edges of its training data's validation months (the newest part of its
  training window, a fair sample as for the features, and rows it was not fitted on: on the
  rows it was fitted on its scores are biased low, PSI 0.14-0.23 against months without
  drift), scored the way a month is: placed in its test graph as context and sent to the
  served champion;
* **alert** when the AUPRC fell by more than ``auprc_drop_alert`` below the reference or a PSI
  exceeds ``psi_alert`` (0.2: the usual "significant shift" level): the notebook shows it at
  the top, the champion's MLflow training run gets the tags ``monitor.alert`` /
  ``monitor.month``, the flow ends in the state ``Alert``.

Each result is added to ``<runs>/monitor/history.json`` (one entry per month, rewritten
atomically) for the month-by-month history plot, where a change of champion marks a promotion.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fraudlib import settings, store

PSI_ALERT = 0.2
AUPRC_DROP_ALERT = 0.1
PSI_BINS = 10
_EPSILON = 1e-4  # floor of a bin's share: an empty bin would make PSI infinite
HISTORY = "history.json"
SCORE_REFERENCE_EDGES = 20_000  # at most this many training-window edges scored: 2,000 per PSI bin


@dataclass
class MonitorResult:
    month: str
    status: str  # "ok", "alert", or "skipped" (nothing to monitor, see alert/note)
    alert: str  # "" when none: the reasons, "; "-joined
    note: str = ""
    champion_version: int | None = None  # the registry version
    rows: int = 0
    fraud: int = 0
    scored: int = 0
    auprc: float | None = None
    reference_auprc: float | None = None
    metrics: dict = field(default_factory=dict)
    score_psi: float | None = None
    max_feature_psi: float | None = None
    drift: list = field(default_factory=list)  # [{"feature", "psi"}], highest first

    def glue(self) -> dict:
        """The small values the notebook glues (no tables)."""
        return {k: v for k, v in asdict(self).items() if k not in ("drift", "metrics") and v is not None}


def psi(reference: np.ndarray, current: np.ndarray, bins: int = PSI_BINS, categorical: bool = False) -> float:
    """Population stability index of ``current`` against ``reference``: sum over bins of
    (cur - ref) * ln(cur / ref) of the bins' shares; numeric values in ``bins`` quantile bins of
    the reference, categorical values one bin per category."""
    reference, current = np.asarray(reference), np.asarray(current)
    if not len(reference) or not len(current):
        return float("nan")
    if categorical:
        categories = np.union1d(np.unique(reference), np.unique(current))
        ref = np.searchsorted(categories, reference)
        cur = np.searchsorted(categories, current)
        n = len(categories)
    else:
        edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1))[1:-1])
        ref, cur = np.searchsorted(edges, reference, side="right"), np.searchsorted(edges, current, side="right")
        n = len(edges) + 1
    ref_share = np.maximum(np.bincount(ref, minlength=n) / len(reference), _EPSILON)
    cur_share = np.maximum(np.bincount(cur, minlength=n) / len(current), _EPSILON)
    return float(np.sum((cur_share - ref_share) * np.log(cur_share / ref_share)))


def column_values(edge_attr: np.ndarray, encoders: dict) -> dict[str, tuple[np.ndarray, bool]]:
    """Each edge input column's values from encoded edge features: (values, categorical)."""
    out, at = {}, 0
    for e in encoders["edge"]:
        if e["kind"] == "binary":
            width = e["width"]
            bits = edge_attr[:, at:at + width].astype(np.int64)
            out[e["name"]] = (bits @ (1 << np.arange(width - 1, -1, -1)), True)
        elif e["kind"] == "onehot":
            width = len(e["categories"])
            block = edge_attr[:, at:at + width]
            out[e["name"]] = (np.where(block.any(axis=1), block.argmax(axis=1), -1), True)
        else:
            width = 1
            out[e["name"]] = (edge_attr[:, at].astype(np.float64), False)
        at += width
    return out


def feature_drift(reference: np.ndarray, current: np.ndarray, encoders: dict) -> pd.DataFrame:
    """PSI per edge input column, highest first."""
    ref, cur = column_values(reference, encoders), column_values(current, encoders)
    table = pd.DataFrame([{"feature": name, "psi": psi(values, cur[name][0], categorical=categorical),
                           "kind": "category" if categorical else "number"}
                          for name, (values, categorical) in ref.items()])
    return table.sort_values("psi", ascending=False, kind="stable").reset_index(drop=True)


def run(store_dir: str = "", month: str = "", triton_url: str = "", run_dir: str = "",
        auprc_drop_alert: float = AUPRC_DROP_ALERT, psi_alert: float = PSI_ALERT) -> MonitorResult:
    """The monitoring notebook's one call: ``month`` (default the newest sealed one) of the store
    (default ``$FRAUD_STORE`` or ``<runs>/store``) against the champion served by ``triton_url``
    (default ``$TRITON_URL``, else an embedded Triton on the model repository). Skips, saying
    why, when there is no store, no month or no champion."""
    import contextlib

    from fraudlib import registry
    from fraudlib.triton_server import connect_or_start

    store_dir = store_dir or str(store.store_root())
    sealed = store.months(store_dir) if store.is_store(store_dir) else []
    if not sealed:
        return MonitorResult(month=month, status="skipped", alert="",
                             note=f"no transactions in the store {store_dir}: nothing to monitor "
                                  "(fraud ingest FILE adds a month)")
    month = month or sealed[-1]
    if month not in sealed:
        raise store.StoreError(f"month {month} is not in the store {store_dir} (sealed: {sealed[0]} .. {sealed[-1]})")
    if registry.champion() is None:
        return MonitorResult(month=month, status="skipped", alert="", note="no champion yet: nothing to monitor")
    with contextlib.ExitStack() as services:
        client = services.enter_context(connect_or_start(triton_url or os.environ.get("TRITON_URL"),
                                                         settings.run_folder(run_dir) / "triton.log"))
        if not client.is_model_ready(settings.TRITON_MODEL_NAME):  # a server just started (explicit model control)
            from fraudlib import lifecycle

            lifecycle.repository(client).load()
        return monitor_month(store_dir, month, client, auprc_drop_alert, psi_alert)


def month_rows(store_dir: str | Path, month: str) -> pd.DataFrame:
    """The month's transactions from the store (StoreError naming the store when absent)."""
    return store.read(store_dir, since=month, before=store.month_text(store.month_key(month) + 1))


def monitor_month(store_dir: str | Path, month: str, client, auprc_drop_alert: float = AUPRC_DROP_ALERT,
                  psi_alert: float = PSI_ALERT, history_dir: str | Path | None = None) -> MonitorResult:
    """Monitor the served champion on ``month`` of the store (module docstring); records the
    result in the history and, for an alert, on the champion's MLflow run."""
    from fraudlib import features, graph_store, metrics, registry, scoring, tracking
    from fraudlib.preprocess import encode_transactions, read_test_rows, with_causal_features

    champion = registry.champion()
    if champion is None:
        return MonitorResult(month=month, status="skipped", alert="", note="no champion yet: nothing to monitor")
    graph_dir = registry.graph_dir_of(champion)
    encoders = graph_store.read_encoders(graph_dir)
    starts = encoders.get("features", {}).get("history_from_minute")
    if starts is not None and int(features.minutes(*(int(p) for p in month.split("-")), 1, 0)) < starts:
        first = np.datetime64(int(starts), "m").astype("datetime64[D]")
        return MonitorResult(month=month, status="skipped", alert="", champion_version=champion.version,
                             note=f"{month} is older than the champion's test window (from {first}): "
                                  "the champion is monitored on months after the data it was chosen on")
    frame = month_rows(store_dir, month)
    result = MonitorResult(month=month, status="ok", alert="", champion_version=champion.version, rows=len(frame),
                           fraud=int(frame["Is Fraud?"].sum()))
    meta = scoring.champion_meta(client)
    threshold = float(meta.get("threshold", metrics.DEFAULT_THRESHOLD))
    scored = scoring.score_transactions(client, frame, graph_dir)
    result.scored = int(scored["fraud_probability"].notna().sum())
    result.metrics = scoring.label_metrics(scored, threshold) or {}
    result.auprc = result.metrics.get("auprc")
    reference_rows = read_test_rows(graph_dir)
    reference = scoring.score_transactions(client, reference_rows.drop(columns=_causal(reference_rows)), graph_dir)
    result.reference_auprc = (scoring.label_metrics(reference, threshold) or {}).get("auprc")

    legit = frame[frame["Is Fraud?"].to_numpy() == 0].reset_index(drop=True)
    _, _, current = encode_transactions(with_causal_features(legit, graph_dir, encoders), encoders)
    train = graph_store.read_part(graph_dir, "train")
    baseline = (np.asarray(train.split) == "train") & (train.label == 0)
    drift = feature_drift(train.edge_attr[baseline], current, encoders)
    month_scores = scored[(scored["Is Fraud?"] == 0) & scored["fraud_probability"].notna()]["fraud_probability"]
    # Scores: the validation months' non-fraud edges, the part of the training data the champion
    # was not fitted on (it only stopped XGBoost and set the threshold). On the rows it was fitted
    # on its scores are biased low: PSI 0.14-0.23 against drift-free months, an alert every month.
    unfitted = (np.asarray(train.split) == "validation") & (train.label == 0)
    result.score_psi = psi(reference_scores(client, graph_dir, train.edges(unfitted),
                                            scoring.field_hops(meta["architecture"])), month_scores.to_numpy())
    result.max_feature_psi = float(drift["psi"].max()) if len(drift) else None
    result.drift = drift.to_dict("records")

    reasons = []
    if result.auprc is not None and result.reference_auprc is not None \
            and result.reference_auprc - result.auprc > auprc_drop_alert:
        reasons.append(f"AUPRC {result.auprc:.3f} on {month} is {result.reference_auprc - result.auprc:.3f} below "
                       f"the champion's {result.reference_auprc:.3f} on its test window (margin {auprc_drop_alert})")
    if result.auprc is None:
        result.note = f"{month} has {result.fraud} fraud among {result.scored} scored rows: no AUPRC"
    drifted = drift[drift["psi"] > psi_alert]
    if len(drifted):
        reasons.append("PSI above " + f"{psi_alert}: " + ", ".join(f"{r.feature} {r.psi:.2f}" for r in drifted.itertuples()))
    if result.score_psi is not None and result.score_psi > psi_alert:
        reasons.append(f"score PSI {result.score_psi:.2f} > {psi_alert}")
    result.alert = "; ".join(reasons)
    result.status = "alert" if reasons else "ok"
    tracking.set_tags(champion.run_id, {"monitor.month": month, "monitor.alert": result.alert or "none",
                                        f"monitor.alert.{month}": result.alert or "none"})
    record(result, history_dir)
    return result


def reference_scores(client, graph_dir: str | Path, edges, n_hops: int, seed: int = 0) -> np.ndarray:
    """The served champion's scores on ``edges`` of its graph directory (a random
    ``SCORE_REFERENCE_EDGES`` of them at most), scored as a month's rows are
    (``scoring.score_in_context``): placed in the test graph as context, cut to their
    receptive field, sent to the public model (the champion)."""
    from fraudlib import graph_store, scoring

    chosen = np.arange(edges.num_edges)
    if len(chosen) > SCORE_REFERENCE_EDGES:
        chosen = np.sort(np.random.default_rng(seed).choice(chosen, SCORE_REFERENCE_EDGES, replace=False))
    if not len(chosen):
        return np.zeros(0)
    scores, _ = scoring.score_in_context(graph_store.read_part(graph_dir, "test"), edges.edge_index[0, chosen],
                                         edges.edge_index[1, chosen], edges.edge_attr[chosen],
                                         scoring.served_champion(client), n_hops)
    return scores


def _causal(frame: pd.DataFrame) -> list[str]:
    from fraudlib import features

    return [c for c in features.NAMES if c in frame.columns]


def history_path(history_dir: str | Path | None = None) -> Path:
    return Path(history_dir or settings.runs_root() / "monitor") / HISTORY


def read_history(history_dir: str | Path | None = None) -> pd.DataFrame:
    """One row per monitored month, oldest first: month, champion_version, auprc, reference_auprc,
    score_psi, max_feature_psi, alert, promoted (the champion changed since the month before)."""
    path = history_path(history_dir)
    entries = json.loads(path.read_text()) if path.is_file() else []
    table = pd.DataFrame(entries, columns=["month", "champion_version", "auprc", "reference_auprc", "score_psi",
                                           "max_feature_psi", "alert", "at"])
    table = table.sort_values("month", kind="stable").reset_index(drop=True)
    previous = table["champion_version"].shift()
    table["promoted"] = previous.notna() & (table["champion_version"] != previous)
    return table


def record(result: MonitorResult, history_dir: str | Path | None = None) -> Path:
    """Add (or replace) the month's entry in the history, written atomically."""
    path = history_path(history_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [e for e in (json.loads(path.read_text()) if path.is_file() else []) if e["month"] != result.month]
    entries.append({"month": result.month, "champion_version": result.champion_version, "auprc": result.auprc,
                    "reference_auprc": result.reference_auprc, "score_psi": result.score_psi,
                    "max_feature_psi": result.max_feature_psi, "alert": result.alert,
                    "at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(sorted(entries, key=lambda e: e["month"]), indent=1))
    os.replace(tmp, path)
    return path


def drift_plot(drift: pd.DataFrame, psi_alert: float = PSI_ALERT):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.25 * len(drift))))
    shown = drift.iloc[::-1]
    ax.barh(shown["feature"], shown["psi"], color=np.where(shown["psi"] > psi_alert, "tab:red", "tab:blue"))
    ax.axvline(psi_alert, color="tab:red", linestyle="--", label=f"alert at PSI {psi_alert}")
    ax.set_xlabel("PSI (training window -> this month, non-fraud rows)")
    ax.legend(loc="lower right")
    return fig


def history_plot(history: pd.DataFrame):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 3))
    ax.plot(history["month"], history["auprc"], marker="o", label="champion AUPRC on the month")
    ax.plot(history["month"], history["reference_auprc"], linestyle=":", label="on its own test window")
    for i, row in history[history["promoted"]].iterrows():
        ax.axvline(i, color="tab:green", alpha=0.5)
        ax.annotate(f"promoted v{int(row['champion_version'])}", (i, ax.get_ylim()[1]), rotation=90, va="top",
                    fontsize=8, color="tab:green")
    for i in history.index[history["alert"].fillna("").astype(bool)]:
        ax.plot(i, history.loc[i, "auprc"], "rx", markersize=10)
    ax.set_ylabel("AUPRC")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(loc="lower left", fontsize=8)
    return fig
