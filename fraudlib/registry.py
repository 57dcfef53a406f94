"""MLflow model registry: one registered model, its versions and aliases.

Aliases: ``champion`` (what Triton serves), ``challenger`` (while staged),
``previous-champion`` (after a promotion, for rollback). Each registry version carries the
Triton version it is served as and the data manifest it was trained on, as tags.

Writes go through the MLflow client. :func:`read_versions` reads the registry without importing
MLflow (2-3 s of imports): straight from the embedded SQLite store, or over the REST API of a
tracking server; ``fraud status`` uses it to answer in well under two seconds.
"""

from __future__ import annotations

import json
import sqlite3
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from fraudlib import settings

TRITON_VERSION_TAG = "triton_version"
MANIFEST_TAG = "data_manifest"
REJECTED_TAG = "rejected"
NOT_BETTER = "not better than the champion"  # the rejected tag of stage 3's reject: its run's reason says why
REASON_TAG = "promotion_reason"  # on the training run: why stage 3 decided as it did
_HTTP_TIMEOUT_S = 3.0  # a tracking server answers in milliseconds; a cold one takes a second


def __getattr__(name: str):
    """``registry.tracking``, imported on first use (importing it imports MLflow)."""
    if name == "tracking":
        from fraudlib import tracking

        return tracking
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _mlflow_error():
    from mlflow.exceptions import MlflowException

    return MlflowException


def _client():
    from fraudlib import tracking

    return tracking.configure()


@dataclass(frozen=True)
class RegistryVersion:
    version: int
    run_id: str
    triton_version: int | None
    manifest_hash: str | None
    aliases: tuple[str, ...]
    rejected: str | None = None  # the ``rejected`` tag: why deploy rejected or rolled it back
    # a rejected version's run's promotion_reason (read_versions only)
    reason: str | None = field(default=None, compare=False)


def _make_version(version, run_id, tags: dict, aliases, reason: str | None = None) -> RegistryVersion:
    triton = tags.get(TRITON_VERSION_TAG)
    return RegistryVersion(version=int(version), run_id=run_id,
                           triton_version=int(triton) if triton not in (None, "") else None,
                           manifest_hash=tags.get(MANIFEST_TAG), aliases=tuple(aliases or ()),
                           rejected=tags.get(REJECTED_TAG), reason=reason)


def _to_version(mv) -> RegistryVersion:
    return _make_version(mv.version, mv.run_id, mv.tags or {}, getattr(mv, "aliases", ()))


def _ensure_registered_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except _mlflow_error():
        client.create_registered_model(
            name, description="GNN embeddings + XGBoost fraud classifier served by Triton "
            f"as '{settings.TRITON_MODEL_NAME}'.")


def register(run_id: str, triton_version: int, manifest_hash: str | None,
             name: str = settings.REGISTERED_MODEL_NAME) -> RegistryVersion:
    """Register the training run's pyfunc model as a new version linked to that run."""
    client = _client()
    _ensure_registered_model(client, name)
    mv = client.create_model_version(
        name=name,
        source=_pyfunc_model_uri(run_id),
        run_id=run_id,
        tags={TRITON_VERSION_TAG: str(triton_version), MANIFEST_TAG: manifest_hash or ""},
    )
    return _to_version(client.get_model_version(name, mv.version))


def _pyfunc_model_uri(run_id: str) -> str:
    from fraudlib import tracking

    return tracking.pyfunc_model_uri(run_id)


def by_alias(alias: str, name: str = settings.REGISTERED_MODEL_NAME) -> RegistryVersion | None:
    client = _client()
    try:
        return _to_version(client.get_model_version_by_alias(name, alias))
    except _mlflow_error():
        return None


def champion(name: str = settings.REGISTERED_MODEL_NAME) -> RegistryVersion | None:
    return by_alias(settings.CHAMPION_ALIAS, name)


def graph_dir_of(version: RegistryVersion | None) -> Path | None:
    """The graph directory the version was trained on (its training run's ``graph_dir`` tag)."""
    if version is None:
        return None
    tag = _client().get_run(version.run_id).data.tags.get("graph_dir")
    return Path(tag) if tag else None


def versions(name: str = settings.REGISTERED_MODEL_NAME) -> list[RegistryVersion]:
    client = _client()
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except _mlflow_error():
        return []
    return sorted((_to_version(client.get_model_version(name, mv.version)) for mv in found),
                  key=lambda v: v.version)


def for_run(run_id: str, name: str = settings.REGISTERED_MODEL_NAME) -> RegistryVersion | None:
    """The registry version created from that training run, if any."""
    matches = [v for v in versions(name) if v.run_id == run_id]
    return matches[-1] if matches else None


def _delete_alias(client, name: str, alias: str) -> None:
    try:
        client.delete_registered_model_alias(name, alias)
    except _mlflow_error():
        pass


def mark_challenger(version: int, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    _client().set_registered_model_alias(name, settings.CHALLENGER_ALIAS, str(version))


def clear_challenger(name: str = settings.REGISTERED_MODEL_NAME) -> None:
    _delete_alias(_client(), name, settings.CHALLENGER_ALIAS)


PROMOTE_STEPS = ("previous_champion_alias_written", "champion_alias_written", "challenger_alias_removed")


def promote(version: int, name: str = settings.REGISTERED_MODEL_NAME, on_step=None) -> None:
    """``champion`` -> version; the old champion becomes ``previous-champion``.

    Three alias writes, in this order (``on_step(step)`` after each, :data:`PROMOTE_STEPS`):
    running it again after a crash between them finishes it, and ``lifecycle.reconcile``
    repairs what a crash left (``previous-champion`` on the champion, a stale ``challenger``).
    """
    client = _client()
    step = on_step or (lambda _: None)
    old = champion(name)
    if old is not None and old.version != version:
        client.set_registered_model_alias(name, settings.PREVIOUS_CHAMPION_ALIAS, str(old.version))
    step(PROMOTE_STEPS[0])
    client.set_registered_model_alias(name, settings.CHAMPION_ALIAS, str(version))
    step(PROMOTE_STEPS[1])
    _delete_alias(client, name, settings.CHALLENGER_ALIAS)
    step(PROMOTE_STEPS[2])


def set_alias(alias: str, version: int, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    _client().set_registered_model_alias(name, alias, str(version))


def delete_alias(alias: str, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    _delete_alias(_client(), name, alias)


def restore_champion(version: int, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    """Point ``champion`` back at ``version`` after a rollback, leaving other aliases."""
    client = _client()
    client.set_registered_model_alias(name, settings.CHAMPION_ALIAS, str(version))
    _delete_alias(client, name, settings.CHALLENGER_ALIAS)


def log_evaluation(run_id: str, challenger: dict[str, float], champion_metrics: dict[str, float] | None,
                   decision: str, reason: str, detail=None) -> None:
    """Evaluation metrics and the promotion decision, on the challenger's training run.

    ``detail`` (a ``promotion.Decision``) adds the decision's statistics: the promotion metric,
    ``promotion_delta`` with its paired bootstrap interval ``promotion_delta_low``/``_high``, each
    model's interval (``challenger_<metric>_low``/``_high``, ``champion_...``), and as tags the
    metric, level, resamples and min_improvement.
    """
    metrics = {f"challenger_{k}": v for k, v in challenger.items()}
    if champion_metrics:
        metrics.update({f"champion_{k}": v for k, v in champion_metrics.items()})
        metrics.update({f"{k}_delta": challenger[k] - champion_metrics[k]
                        for k in challenger if k in champion_metrics})
    tags = {"promotion_decision": decision, "promotion_reason": reason}
    if detail is not None:
        metrics.update({"promotion_delta": detail.delta, "promotion_delta_low": detail.delta_low,
                        "promotion_delta_high": detail.delta_high})
        for role, interval in (("challenger", detail.challenger_interval), ("champion", detail.champion_interval)):
            if interval is not None:
                metrics[f"{role}_{detail.metric}_low"], metrics[f"{role}_{detail.metric}_high"] = interval
        tags.update({"promotion_metric": detail.metric, "promotion_min_improvement": detail.min_improvement})
        if detail.n_boot is not None:
            tags.update({"promotion_level": detail.level, "promotion_resamples": detail.n_boot,
                         "promotion_seed": detail.seed})
    from fraudlib import tracking

    tracking.log_metrics(run_id, metrics)
    tracking.set_tags(run_id, tags)


def tag_version(version: int, key: str, value: str, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    _client().set_model_version_tag(name, str(version), key, value)


def alias_of(versions: list[RegistryVersion], alias: str) -> RegistryVersion | None:
    """The version among ``versions`` that carries ``alias``."""
    return next((v for v in versions if alias in v.aliases), None)


def last_rejected(versions: list[RegistryVersion]) -> RegistryVersion | None:
    """The newest version deploy rejected or rolled back (its ``rejected`` tag)."""
    return max((v for v in versions if v.rejected), key=lambda v: v.version, default=None)


def read_versions(name: str = settings.REGISTERED_MODEL_NAME, uri: str | None = None) -> list[RegistryVersion]:
    """Every version of the registered model, oldest first, with aliases and tags (and for a
    rejected one its run's ``promotion_reason``), read without importing MLflow: the embedded SQLite store is read
    directly (read-only), a tracking server over its REST API. Other stores (e.g. Databricks)
    go through the MLflow client. An unreachable server or unreadable store raises RuntimeError."""
    uri = uri or settings.mlflow_tracking_uri()
    if uri.startswith("sqlite:///"):
        return _read_sqlite(Path(uri[len("sqlite:///"):]), name)
    if uri.startswith(("http://", "https://")):
        return _read_rest(uri.rstrip("/"), name)
    client = _client()
    found = versions(name)
    return [_make_version(v.version, v.run_id, {TRITON_VERSION_TAG: v.triton_version, MANIFEST_TAG: v.manifest_hash,
                                                REJECTED_TAG: v.rejected}, v.aliases,
                          client.get_run(v.run_id).data.tags.get(REASON_TAG) if v.rejected else None)
            for v in found]


def _read_sqlite(path: Path, name: str) -> list[RegistryVersion]:
    if not path.is_file():
        return []  # no store yet: nothing was ever registered
    try:
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=1.0) as db:
            rows = db.execute("SELECT version, run_id FROM model_versions WHERE name = ? "
                              "AND current_stage != 'Deleted_Internal' ORDER BY version", (name,)).fetchall()
            tags: dict[int, dict] = {}
            for version, key, value in db.execute(
                    "SELECT version, key, value FROM model_version_tags WHERE name = ?", (name,)):
                tags.setdefault(int(version), {})[key] = value
            aliases: dict[int, list] = {}
            for alias, version in db.execute(
                    "SELECT alias, version FROM registered_model_aliases WHERE name = ?", (name,)):
                aliases.setdefault(int(version), []).append(alias)
            runs = sorted({run for _, run in rows if run})
            reasons = dict(db.execute(
                f"SELECT run_uuid, value FROM tags WHERE key = ? AND run_uuid IN ({','.join('?' * len(runs))})",
                (REASON_TAG, *runs)).fetchall()) if runs else {}
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []  # created, never used by MLflow
        raise RuntimeError(f"cannot read the MLflow registry in {path}: {e}") from e
    return [_make_version(v, run, tags.get(int(v), {}), sorted(aliases.get(int(v), [])),
                          reasons.get(run) if REJECTED_TAG in tags.get(int(v), {}) else None)
            for v, run in rows]


def _get_json(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as answer:
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return {}
        raise RuntimeError(f"the MLflow server answered {e.code} to {url}: {e.reason}") from e
    except (OSError, ValueError) as e:
        raise RuntimeError(f"the MLflow server at {url.split('/api/')[0]} is not reachable: {e}") from e


def _read_rest(base: str, name: str) -> list[RegistryVersion]:
    """Versions with tags from the search, aliases from the registered model, and the reason of
    each rejected version from its run: 2 requests plus one per rejected run."""
    query = urllib.parse.urlencode({"filter": f"name = '{name}'", "max_results": 1000})
    found = _get_json(f"{base}/api/2.0/mlflow/model-versions/search?{query}").get("model_versions", [])
    model = _get_json(f"{base}/api/2.0/mlflow/registered-models/get?"
                      + urllib.parse.urlencode({"name": name})).get("registered_model", {})
    aliases: dict[int, list] = {}
    for a in model.get("aliases", []):
        aliases.setdefault(int(a["version"]), []).append(a["alias"])
    out, reasons = [], {}
    for mv in sorted(found, key=lambda m: int(m["version"])):
        run, tags = mv.get("run_id", ""), {t["key"]: t["value"] for t in mv.get("tags", [])}
        if REJECTED_TAG in tags and run and run not in reasons:
            data = _get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={run}").get("run", {}).get("data", {})
            reasons[run] = next((t["value"] for t in data.get("tags", []) if t["key"] == REASON_TAG), None)
        out.append(_make_version(mv["version"], run, tags, sorted(aliases.get(int(mv["version"]), [])),
                                 reasons.get(run) if REJECTED_TAG in tags else None))
    return out
