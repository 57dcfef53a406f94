"""MLflow model registry: one registered model, its versions and aliases.

Aliases: ``champion`` (what Triton serves), ``challenger`` (while staged),
``previous-champion`` (after a promotion, for rollback). Each registry version carries the
Triton version it is served as and the data manifest it was trained on, as tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlflow.exceptions import MlflowException

from fraudlib import settings, tracking

TRITON_VERSION_TAG = "triton_version"
MANIFEST_TAG = "data_manifest"


@dataclass(frozen=True)
class RegistryVersion:
    version: int
    run_id: str
    triton_version: int | None
    manifest_hash: str | None
    aliases: tuple[str, ...]


def _to_version(mv) -> RegistryVersion:
    tags = mv.tags or {}
    triton = tags.get(TRITON_VERSION_TAG)
    return RegistryVersion(
        version=int(mv.version),
        run_id=mv.run_id,
        triton_version=int(triton) if triton not in (None, "") else None,
        manifest_hash=tags.get(MANIFEST_TAG),
        aliases=tuple(getattr(mv, "aliases", ()) or ()),
    )


def _ensure_registered_model(client, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="GNN embeddings + XGBoost fraud classifier served by Triton "
            f"as '{settings.TRITON_MODEL_NAME}'.")


def register(run_id: str, triton_version: int, manifest_hash: str | None,
             name: str = settings.REGISTERED_MODEL_NAME) -> RegistryVersion:
    """Register the training run's pyfunc model as a new version linked to that run."""
    client = tracking.configure()
    _ensure_registered_model(client, name)
    mv = client.create_model_version(
        name=name,
        source=tracking.pyfunc_model_uri(run_id),
        run_id=run_id,
        tags={TRITON_VERSION_TAG: str(triton_version), MANIFEST_TAG: manifest_hash or ""},
    )
    return _to_version(client.get_model_version(name, mv.version))


def by_alias(alias: str, name: str = settings.REGISTERED_MODEL_NAME) -> RegistryVersion | None:
    client = tracking.configure()
    try:
        return _to_version(client.get_model_version_by_alias(name, alias))
    except MlflowException:
        return None


def champion(name: str = settings.REGISTERED_MODEL_NAME) -> RegistryVersion | None:
    return by_alias(settings.CHAMPION_ALIAS, name)


def graph_dir_of(version: RegistryVersion | None) -> Path | None:
    """The graph directory the version was trained on (its training run's ``graph_dir`` tag)."""
    if version is None:
        return None
    tag = tracking.configure().get_run(version.run_id).data.tags.get("graph_dir")
    return Path(tag) if tag else None


def versions(name: str = settings.REGISTERED_MODEL_NAME) -> list[RegistryVersion]:
    client = tracking.configure()
    try:
        found = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
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
    except MlflowException:
        pass


def mark_challenger(version: int, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    tracking.configure().set_registered_model_alias(name, settings.CHALLENGER_ALIAS, str(version))


def clear_challenger(name: str = settings.REGISTERED_MODEL_NAME) -> None:
    _delete_alias(tracking.configure(), name, settings.CHALLENGER_ALIAS)


PROMOTE_STEPS = ("previous_champion_alias_written", "champion_alias_written", "challenger_alias_removed")


def promote(version: int, name: str = settings.REGISTERED_MODEL_NAME, on_step=None) -> None:
    """``champion`` -> version; the old champion becomes ``previous-champion``.

    Three alias writes, in this order (``on_step(step)`` after each, :data:`PROMOTE_STEPS`):
    running it again after a crash between them finishes it, and ``lifecycle.reconcile``
    repairs what a crash left (``previous-champion`` on the champion, a stale ``challenger``).
    """
    client = tracking.configure()
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
    tracking.configure().set_registered_model_alias(name, alias, str(version))


def delete_alias(alias: str, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    _delete_alias(tracking.configure(), name, alias)


def restore_champion(version: int, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    """Point ``champion`` back at ``version`` after a rollback, leaving other aliases."""
    client = tracking.configure()
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
    tracking.log_metrics(run_id, metrics)
    tracking.set_tags(run_id, tags)


def tag_version(version: int, key: str, value: str, name: str = settings.REGISTERED_MODEL_NAME) -> None:
    tracking.configure().set_model_version_tag(name, str(version), key, value)
