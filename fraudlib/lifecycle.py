"""Champion/challenger jobs: evaluate a trained model against the served champion, then
deploy the decision. Stages 3 and 4 call these; each is also usable without notebooks.

The Triton repository (``triton_repo``) and the MLflow registry (``registry``) change
together here, in an order that ``reconcile`` can always repair: Triton first (journalled),
then the registry.

Resuming after a crash (``run_pipeline.py --resume`` runs the failed stage again with the same
inputs) finishes or undoes what the crash interrupted, from what it finds:

- stage 3 (``evaluate``): the repository is reconciled first (an interrupted staging, e.g. a
  copy that died on a full disk, is undone) and what it repaired is printed; a challenger that
  this training run staged earlier (``staged.json`` names the run, whether or not the
  ``challenger`` alias was written) is rejected and staged again.
- stage 4 (``deploy``): when Triton already serves the challenger (the crash came after the
  switch, before the registry), the registry's aliases are written; when it is already archived
  as rejected, the registry is told; an interrupted promotion is undone and done again.

Crash points (tests install a hook with ``triton_repo.set_crash_hook``): :data:`EVALUATE_STEPS`
(``evaluate.<step>``), :data:`PROMOTE_DEPLOY_STEPS` and :data:`REJECT_DEPLOY_STEPS`
(``deploy.<step>``), besides the repository's own steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# metrics and promotion (scikit-learn) and tracking (MLflow) are imported where used: the
# diagnosis that `fraud status` runs needs neither, and answers in well under two seconds.
from fraudlib import registry, settings
from fraudlib.graph_store import ENCODERS, Graph, manifest_hash, read_encoders, read_part
from fraudlib.triton_repo import (PromotionFailed,
                                  ReconcileReport, RepositoryError, TritonRepository, crash_point,
                                  describe_owner, graph_inputs, owned_by_this_process)
from fraudlib.triton_server import TritonClient, TritonError

if TYPE_CHECKING:
    from fraudlib import promotion

log = logging.getLogger(__name__)

REJECTED_TAG = registry.REJECTED_TAG
ROLLED_BACK = "rolled-back"

EVALUATE_STEPS = ("reconciled", "staged", "registered", "challenger_marked", "scored", "logged")
PROMOTE_DEPLOY_STEPS = ("triton_promoted", *registry.PROMOTE_STEPS)
REJECT_DEPLOY_STEPS = ("triton_rejected", "challenger_alias_removed", "rejected_tag_written")


def _point(stage: str, step: str) -> None:
    crash_point(f"{stage}.{step}")


@dataclass
class Evaluation:
    challenger_version: int  # Triton version of the staged challenger
    champion_version: int | None  # Triton version of the champion, if any
    registry_version: int  # registry version of the challenger
    challenger_metrics: dict
    champion_metrics: dict | None
    decision: promotion.Decision
    thresholds: dict  # each model's own operating threshold ("challenger", "champion")
    labels: np.ndarray = field(repr=False)
    challenger_scores: np.ndarray = field(repr=False)
    champion_scores: np.ndarray | None = field(repr=False)
    champion_unusable: str | None = None  # why the champion could not score this graph
    # How the two were compared when the champion was preprocessed with other encoders.
    comparison: str | None = None
    # Where a model's threshold did not come from its meta.json (a package without one).
    threshold_notes: list[str] = field(default_factory=list)
    # What was repaired before staging (state a crashed run left), as printed.
    repairs: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float | None]]:
        """The comparison as a table, one column per model (and ``delta`` with a champion):
        AUPRC and ROC AUC, the promotion metric's bootstrap interval (for ``delta``: the paired
        interval the decision used), and each model's threshold with its precision, recall, F1
        and alert rate (fraction flagged) at it."""
        d = self.decision
        label = f"{d.metric} {d.level * 100:g}%" if d.level is not None else f"{d.metric} interval"
        rows = ("auprc", "roc_auc", f"{label} low", f"{label} high", "threshold",
                "precision", "recall", "f1", "alert_rate")

        def column(m: dict, interval) -> dict:
            low, high = interval if interval is not None else (None, None)
            values = [m["auprc"], m["roc_auc"], low, high, m["threshold"],
                      *(m[f"{k}_at_threshold"] for k in ("precision", "recall", "f1", "alert_rate"))]
            return dict(zip(rows, values))

        table = {f"challenger (v{self.challenger_version})": column(self.challenger_metrics, d.challenger_interval)}
        if self.champion_metrics is not None:
            champion = column(self.champion_metrics, d.champion_interval)
            table[f"champion (v{self.champion_version})"] = champion
            challenger = next(iter(table.values()))
            delta = {k: challenger[k] - champion[k] for k in rows}
            delta[f"{label} low"], delta[f"{label} high"] = d.delta_low, d.delta_high
            table["delta"] = delta
        return table


@dataclass(frozen=True)
class Deployment:
    action: str  # promote, reject or rolled-back
    champion_version: int | None  # Triton version serving afterwards
    registry_champion: int | None  # registry version with the champion alias afterwards
    health: str
    repairs: tuple[str, ...] = ()  # what an earlier, interrupted attempt left and this one finished


def repository(client: TritonClient | None, root: Path | str | None = None,
               run_id: str | None = None) -> TritonRepository:
    return TritonRepository(Path(root) if root else settings.triton_model_repository(), client, run_id=run_id)


def registry_champion_triton_version(versions: list[registry.RegistryVersion] | None = None) -> int | None:
    champion = registry.champion() if versions is None else registry.alias_of(versions, settings.CHAMPION_ALIAS)
    return champion.triton_version if champion else None


def reconcile(client: TritonClient | None, root: Path | str | None = None,
              reject_challenger: bool = False, force: bool = False) -> ReconcileReport:
    """Bring repository, Triton and registry back to one consistent champion, aliases included.

    ``reject_challenger`` also drops a staged challenger whose run is gone (a live run's
    challenger stays unless ``force``; the report says so).
    """
    repo = repository(client, root)
    staged = repo.state().challenger
    report = repo.reconcile(registry_champion_triton_version(), reject_challenger=reject_challenger, force=force)
    if staged is not None and staged in repo.state().archived:  # dropped: say so in the registry too
        for v in registry.versions():
            if v.triton_version == staged and not v.rejected:
                registry.tag_version(v.version, REJECTED_TAG,
                                     "dropped by reconcile: the run that staged it did not finish deploying it")
    aliases = repair_aliases(repo)
    return dataclasses.replace(report, actions=(*report.actions, *aliases)) if aliases else report


def _by_triton_version(versions: list[registry.RegistryVersion]) -> dict[int, registry.RegistryVersion]:
    found: dict[int, registry.RegistryVersion] = {}
    for v in versions:  # oldest first: the newest registration of a Triton version wins
        if v.triton_version is not None:
            found[v.triton_version] = v
    return found


def alias_problems(repo: TritonRepository, versions: list[registry.RegistryVersion] | None = None
                   ) -> list[tuple[str, str, int | None]]:
    """Aliases that disagree with the repository: (description, alias, the registry version it
    should be on, None: removed). ``champion`` is the repository reconcile's business, except
    when the registry has none while a version serves (a first promotion that died before the
    registry was written). ``versions``: the registry as read already (default: read it now)."""
    state = repo.state()
    versions = registry.versions() if versions is None else versions
    by_triton = _by_triton_version(versions)
    problems = []
    champion = registry.alias_of(versions, settings.CHAMPION_ALIAS)
    if champion is None and state.champion is not None and state.champion in by_triton:
        champion = by_triton[state.champion]
        problems.append((f"alias champion is on no version while Triton version {state.champion} "
                         f"(registry version {champion.version}) serves", settings.CHAMPION_ALIAS, champion.version))
    want = by_triton.get(state.challenger) if state.challenger is not None else None
    have = registry.alias_of(versions, settings.CHALLENGER_ALIAS)
    if have is not None and (want is None or have.version != want.version):
        where = (f"version {want.version} (Triton version {state.challenger}, staged)" if want
                 else "no version (no challenger is staged)")
        problems.append((f"alias challenger is on registry version {have.version} (Triton version "
                         f"{have.triton_version}, not staged); it belongs on {where}",
                         settings.CHALLENGER_ALIAS, want.version if want else None))
    previous = registry.alias_of(versions, settings.PREVIOUS_CHAMPION_ALIAS)
    if previous is not None and champion is not None and previous.version == champion.version:
        before = repo.previous_champion()
        target = by_triton.get(before) if before is not None else None
        target = target if target is not None and target.version != champion.version else None
        where = (f"version {target.version} (Triton version {before}, which the champion replaced)" if target
                 else "no version")
        problems.append((f"alias previous-champion is on the champion (registry version {previous.version}); "
                         f"it belongs on {where}", settings.PREVIOUS_CHAMPION_ALIAS,
                         target.version if target else None))
    return problems


def repair_aliases(repo: TritonRepository) -> list[str]:
    """Move or remove the aliases a crash between alias writes left stale; what was done."""
    actions = []
    for problem, alias, version in alias_problems(repo):
        if version is None:
            registry.delete_alias(alias)
        else:
            registry.set_alias(alias, version)
        actions.append(f"registry: {problem}: {'moved' if version is not None else 'removed'}")
    return actions


@dataclass(frozen=True)
class Diagnosis:
    """Why the repository cannot serve one champion agreed with the registry right now.

    ``live``: a pipeline is at work (it holds the repository lock, or evaluates a challenger it
    staged): wait for it. ``problems``: state a crashed run left, or a disagreement with the
    registry: ``fraud reconcile`` repairs it (the next pipeline run repairs it by itself too).
    ``fatal``: nothing to repair (no champion yet).
    """
    live: tuple[str, ...]
    problems: tuple[str, ...]
    fatal: tuple[str, ...] = ()

    @property
    def advice(self) -> str | None:
        if self.live:
            return ("a pipeline is at work: wait for it to finish (`fraud status` shows when), then try again. "
                    "Do not reconcile meanwhile: the repository is not broken, and rejecting that run's "
                    "challenger would break the run")
        if self.problems:
            return ("a run that is gone left this: `fraud reconcile` repairs it (the next pipeline run also "
                    "repairs it by itself)")
        if self.fatal:
            return "run the pipeline first (make run); `fraud reconcile` has nothing to repair here"
        return None


def diagnose(root: Path | str | None = None, versions: list[registry.RegistryVersion] | None = None) -> Diagnosis:
    """Tell a live pipeline apart from state a crashed run left (disk and registry only).
    ``versions``: the registry as read already (``registry.read_versions``; default: read it now)."""
    repo = repository(None, root)
    live, problems, fatal = [], [], []
    holder = repo.lock_holder()
    if holder is not None:
        live.append(f"{describe_owner(holder)} holds the repository lock for its {holder.get('operation', '?')} "
                    f"since {holder.get('since', '?')}")
    try:
        state = repo.state()
    except RepositoryError as e:
        return Diagnosis(tuple(live), (str(e),))
    if state.journal and holder is None:
        j = state.journal
        problems.append(f"an interrupted {j.get('op')} of version {j.get('version')} (steps done: {j.get('steps')}), "
                        "left by a run that is gone")
    if state.challenger is not None:
        owner = repo.challenger_owner() or {}
        at = owner.get("at", "?")
        if owner.get("alive") is not False and not owned_by_this_process(owner):
            unsure = " (on another host: cannot check it is alive)" if owner.get("alive") is None else ""
            live.append(f"{describe_owner(owner)} is evaluating challenger version {state.challenger}, "
                        f"staged at {at}{unsure}")
        else:
            problems.append(f"version {state.challenger} is still staged as a challenger by "
                            f"{describe_owner(owner)}, which is gone (staged at {at})")
    if live:  # the registry may lag the repository while a pipeline works: not a problem yet
        return Diagnosis(tuple(live), tuple(problems))
    versions = registry.versions() if versions is None else versions
    registry_version = registry_champion_triton_version(versions)
    if state.champion is None and registry_version is None:
        fatal.append("no champion is on disk: run the pipeline first (make run)")
    elif registry_version != state.champion:
        problems.append(f"the repository serves version {state.champion} but the registry's champion is "
                        f"Triton version {registry_version}")
    else:
        problems.extend(p for p, _, _ in alias_problems(repo, versions))
    return Diagnosis((), tuple(problems), tuple(fatal))


def find_training_run(model_dir: Path | str) -> str:
    """The MLflow training run that logged this model package (tag ``model_dir``)."""
    from fraudlib import tracking

    client = tracking.configure()
    experiment = client.get_experiment_by_name(settings.EXPERIMENT_NAME)
    runs = client.search_runs(
        [experiment.experiment_id] if experiment else [],
        filter_string=f"tags.model_dir = '{Path(model_dir).resolve()}'",
        order_by=["attributes.start_time DESC"], max_results=1) if experiment else []
    if not runs:
        raise LookupError(f"no MLflow training run logged the model package {model_dir}: "
                          "pass mlflow_run_id, or train it with notebooks/02_train.ipynb")
    return runs[0].info.run_id


def operating_threshold(version_dir: Path | str, role: str) -> tuple[float, str | None]:
    """(threshold, note) of a model version: ``threshold`` from its own ``meta.json``, chosen on
    its validation set at training. A version whose meta.json has none (a package from outside
    the train stage) gets 0.5, and the note says so; a threshold that is not a finite number is
    a ValueError."""
    from fraudlib import metrics

    path = Path(version_dir) / "meta.json"
    meta = json.loads(path.read_text())
    value = meta.get("threshold")
    if value is None:
        return metrics.DEFAULT_THRESHOLD, (f"the {role}'s {path} has no threshold: its threshold metrics are "
                                           f"at {metrics.DEFAULT_THRESHOLD}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise ValueError(f"the {role}'s {path} has threshold {value!r}: not a finite number")
    return float(value), None


def _package_version_dir(model_dir: Path) -> Path:
    """The one version folder of a model package (or the folder itself when it holds meta.json)."""
    if (model_dir / "meta.json").is_file():
        return model_dir
    versions = [p for p in model_dir.iterdir() if p.name.isdigit() and (p / "meta.json").is_file()] \
        if model_dir.is_dir() else []
    if len(versions) != 1:
        raise FileNotFoundError(f"{model_dir} is not a model package with one version folder holding meta.json")
    return versions[0]


def _prediction(out: dict) -> np.ndarray:
    return np.asarray(out["PREDICTION"], dtype=np.float64).reshape(-1)


def champion_view(test: Graph, graph_dir: Path | str, champion_graph_dir: Path | str | None
                  ) -> tuple[Graph, np.ndarray | None]:
    """The test transactions as the champion sees them, and which of them it can score.

    When the champion was trained on a graph with the same encoders (or its training run names
    no graph), that is the test graph itself (None: all of them). When its preprocessing fitted other
    encoders (new cards or merchants change a binary code's width, a new undersampling draw
    changes the categories), the raw test rows are re-encoded with the champion's saved
    encoders: the same transactions and labels, with the features it was trained on. A row
    whose card or merchant the champion's encoders never saw cannot be scored by it.
    """
    from fraudlib.preprocess import encode_graph, read_test_rows

    if champion_graph_dir is None:
        return test, None
    ours, theirs = Path(graph_dir) / ENCODERS, Path(champion_graph_dir) / ENCODERS
    if not theirs.is_file():  # same widths need not mean the same codes: do not guess
        raise FileNotFoundError(f"the champion's encoders {theirs} are gone (its preprocessed graph was "
                                "deleted), so the test rows cannot be encoded as it was trained")
    if ours.read_bytes() == theirs.read_bytes():
        return test, None
    graph, known = encode_graph(read_test_rows(graph_dir), read_encoders(champion_graph_dir))
    if not np.array_equal(graph.label, test.label[known]):
        raise ValueError(f"the raw test rows of {graph_dir} do not match its test graph: preprocess again")
    return graph, known


def _reject_own_earlier_challenger(repo: TritonRepository, mlflow_run_id: str) -> str | None:
    """A challenger that this training run staged in an earlier attempt that failed (the run
    is being resumed) is rejected, so that it can be staged and scored again; a challenger
    of another run is left alone (stage refuses, saying how to clear it). The earlier attempt
    may have died before writing the ``challenger`` alias: ``staged.json`` names the run."""
    staged = repo.state().challenger
    if staged is None:
        return None
    owner = repo.challenger_owner() or {}
    earlier = registry.by_alias(settings.CHALLENGER_ALIAS)
    by_alias = earlier is not None and (earlier.run_id, earlier.triton_version) == (mlflow_run_id, staged)
    if not (by_alias or owner.get("run") == mlflow_run_id):
        return None
    repo.reject(staged, registry_champion_version=registry_champion_triton_version())
    if earlier is not None and earlier.triton_version == staged:
        registry.clear_challenger()
    for v in registry.versions():
        if v.run_id == mlflow_run_id and v.triton_version == staged:
            registry.tag_version(v.version, REJECTED_TAG, "replaced: evaluated again by the same training run")
    return f"rejected version {staged}, staged by an earlier attempt of this training run, to stage it again"


CHALLENGER_WAIT_S = 1800.0  # how long stage 3 waits for another live run's challenger
_WAIT_POLL_S = 2.0


def _another_live_challenger(repo: TritonRepository, mlflow_run_id: str) -> tuple[int, dict] | None:
    """(version, owner) of a challenger that a live run other than this one staged, else None."""
    staged = repo.state().challenger
    owner = repo.challenger_owner() if staged is not None else None
    if (owner is None or owner.get("alive") is False or owner.get("run") == mlflow_run_id
            or owned_by_this_process(owner)):
        return None
    return staged, owner


def _wait_for_another_runs_challenger(repo: TritonRepository, mlflow_run_id: str, deadline: float) -> None:
    """Return when no live run other than this one has a challenger staged, or at ``deadline``."""
    said = None
    while time.monotonic() < deadline:
        other = _another_live_challenger(repo, mlflow_run_id)
        if other is None:
            return
        if said is None or time.monotonic() - said >= 30:
            staged, owner = other
            log.warning("waiting for %s to promote or reject challenger version %s (staged at %s; until %.0f s "
                        "from now)", describe_owner(owner), staged, owner.get("at", "?"), deadline - time.monotonic())
            said = time.monotonic()
        time.sleep(_WAIT_POLL_S)


def evaluate(model_dir: Path | str, graph_dir: Path | str, client: TritonClient, mlflow_run_id: str,
             metric: str | None = None, min_improvement: float = 0.0, bootstrap_samples: int = 1000,
             confidence_level: float = 0.95, bootstrap_seed: int = 0,
             repo_root: Path | str | None = None,
             wait_s: float = CHALLENGER_WAIT_S) -> Evaluation:
    """Stage the model as the challenger, score it and the champion on the test graph with
    explicit versions, and decide (``promotion.decide``: paired bootstrap of ``metric``, promote
    when the interval's lower bound is above ``min_improvement``). Each model's threshold
    metrics are at its own threshold (its meta.json). The challenger is registered with alias
    ``challenger``.

    A challenger that another live run staged is waited for (up to ``wait_s``: that run promotes
    or rejects it in its stage 4; then staging refuses, naming the run). State a crashed run left
    is repaired first, and what was repaired is printed (and kept in ``Evaluation.repairs``). ``metric``: default ``promotion.DEFAULT_METRIC``."""
    from fraudlib import metrics, promotion

    metric = metric or promotion.DEFAULT_METRIC
    promotion.check_settings(metric, min_improvement, bootstrap_samples, confidence_level, bootstrap_seed)
    challenger_threshold, note = operating_threshold(_package_version_dir(Path(model_dir)), "challenger")
    notes = [note] if note else []
    test: Graph = read_part(graph_dir, "test")
    fraud = int(test.label.sum())
    if not 0 < fraud < test.label.size:
        raise ValueError(f"the test period of {graph_dir} has {fraud:,} fraud among {test.label.size:,} transactions: "
                         "both classes are needed to compare models")
    settings_ = dict(metric=metric, min_improvement=min_improvement, n_boot=bootstrap_samples,
                     level=confidence_level, seed=bootstrap_seed)

    repo = repository(client, repo_root, run_id=mlflow_run_id)
    deadline = time.monotonic() + wait_s
    while True:
        _wait_for_another_runs_challenger(repo, mlflow_run_id, deadline)
        repairs = list(reconcile(client, repo_root).actions)
        own = _reject_own_earlier_challenger(repo, mlflow_run_id)
        repairs += [own] if own else []
        if repairs:
            log.warning("repaired the Triton repository before staging: %s", "; ".join(repairs))
        _point("evaluate", "reconciled")
        try:
            version = repo.stage(Path(model_dir), registry_champion_version=registry_champion_triton_version())
            break
        except RepositoryError:  # another run staged first: wait for it, unless time is up
            if _another_live_challenger(repo, mlflow_run_id) is None or time.monotonic() >= deadline:
                raise
    _point("evaluate", "staged")
    registered = registry.register(mlflow_run_id, version, manifest_hash(graph_dir))
    _point("evaluate", "registered")
    registry.mark_challenger(registered.version)
    _point("evaluate", "challenger_marked")

    champion_version = repo.state().champion
    champion_scores = champion_metrics = unusable = comparison = None
    decision = champion_note = None
    with ThreadPoolExecutor(1) as pool:
        # Both models scored at once: a model instance on a CPU host is one thread.
        challenger_job = pool.submit(lambda: _prediction(repo.score(version, graph_inputs(test))))
        if champion_version is not None:
            try:
                champion_threshold, champion_note = operating_threshold(repo.version_dir(champion_version), "champion")
                champion_test, known = champion_view(test, graph_dir, registry.graph_dir_of(registry.champion()))
                if known is not None and not known.any():
                    raise ValueError(f"none of the {known.size:,} test transactions has a card and a merchant "
                                     "that the champion's encoders know")
                champion_scores = _prediction(repo.score(champion_version, graph_inputs(champion_test)))
            except (TritonError, OSError, ValueError) as e:
                unusable = f"the champion (version {champion_version}) cannot score this test set: {e}"
        challenger_scores = challenger_job.result()
    challenger_metrics = metrics.report(test.label, challenger_scores, challenger_threshold)
    thresholds = {"challenger": challenger_threshold}
    labels = test.label
    if champion_scores is not None:
        try:
            compared_labels, compared, compared_metrics = labels, challenger_scores, challenger_metrics
            if known is not None:  # both are compared on the rows the champion could score
                comparison = (f"the champion's preprocessing fitted other encoders: the test rows were "
                              f"re-encoded with them; compared on {int(known.sum()):,} of {known.size:,} test "
                              f"transactions (the others have a card or merchant the champion never saw)")
                compared_labels, compared = labels[known], challenger_scores[known]
                compared_metrics = metrics.report(compared_labels, compared, challenger_threshold)
            champion_metrics = metrics.report(compared_labels, champion_scores, champion_threshold)
            # A metric undefined on the compared rows (no fraud left among them) is a ValueError.
            decision = promotion.decide(compared_labels, compared, champion_scores, **settings_,
                                        challenger_threshold=challenger_threshold,
                                        champion_threshold=champion_threshold)
            labels, challenger_scores, challenger_metrics = compared_labels, compared, compared_metrics
            thresholds["champion"] = champion_threshold
        except ValueError as e:
            unusable = f"the champion (version {champion_version}) cannot score this test set: {e}"
            champion_scores = champion_metrics = comparison = decision = None
    if unusable:
        key = metric if metric in metrics.RANKING_METRICS else f"{metric}_at_threshold"
        decision = promotion.Decision(
            promotion.REJECT, unusable + "; compare on a common test set or promote explicitly",
            metric, float(challenger_metrics[key]), None, float(min_improvement))
    elif decision is None:  # no champion: the first model
        decision = promotion.decide(labels, challenger_scores, None, **settings_,
                                    challenger_threshold=challenger_threshold)
    else:
        notes += [champion_note] if champion_note else []
        if comparison:
            decision = dataclasses.replace(decision, reason=f"{decision.reason} ({comparison})")
    _point("evaluate", "scored")
    registry.log_evaluation(mlflow_run_id, challenger_metrics, champion_metrics,
                            decision.decision, decision.reason, detail=decision)
    _point("evaluate", "logged")
    return Evaluation(version, champion_version, registered.version, challenger_metrics, champion_metrics,
                      decision, thresholds, labels, challenger_scores, champion_scores, unusable, comparison, notes,
                      repairs)


def pending_decision(client: TritonClient | None, root: Path | str | None = None) -> tuple[str, int, int] | None:
    """(decision, challenger Triton version, registry version) of the staged challenger, as
    evaluate logged it on its training run; None when no challenger is staged. Lets stage 4
    act on stage 3's decision when the notebooks run one by one, without the runner's glue."""
    from fraudlib import tracking

    staged = repository(client, root).state().challenger
    challenger = registry.by_alias(settings.CHALLENGER_ALIAS)
    if staged is None or challenger is None or challenger.triton_version != staged:
        return None
    decision = tracking.configure().get_run(challenger.run_id).data.tags.get("promotion_decision")
    return (decision, staged, challenger.version) if decision else None


def deploy(decision: str, challenger_version: int, registry_version: int, client: TritonClient,
           repo_root: Path | str | None = None) -> Deployment:
    """Act on the decision: promote (Triton, then registry alias) or reject.

    A failed health check after promotion restores the previous champion in Triton, leaves
    the registry's champion alias where it was, and is reported as ``rolled-back``.

    Run again after a crash with the same arguments (a resumed stage 4), it finishes what the
    crashed attempt began: Triton already switched or already rejected, only the registry is
    written (``Deployment.repairs`` says so); an interrupted Triton step is undone and done again.
    """
    from fraudlib import promotion

    if decision not in (promotion.PROMOTE, promotion.REJECT):
        raise ValueError(f"decision must be {promotion.PROMOTE!r} or {promotion.REJECT!r}, got {decision!r}")
    promoting = decision == promotion.PROMOTE
    repo = repository(client, repo_root)
    registry_champion = registry_champion_triton_version()
    state = repo.state()
    repairs: list[str] = []
    if not promoting and (state.journal or {}).get("op") == "reject" and \
            state.journal.get("version") == challenger_version:
        repo.reconcile(registry_champion)  # an interrupted reject of this version is finished
        state = repo.state()
    if state.journal is None and state.challenger != challenger_version:
        # Not staged (any more): an earlier attempt got past the Triton step, or it failed.
        left = repo.archive_reason(challenger_version)
        if promoting and state.champion == challenger_version:
            repairs.append(f"Triton already serves version {challenger_version} (an earlier attempt stopped "
                           "before the registry was written): the registry follows")
        elif not promoting and left == "rejected":
            repairs.append(f"version {challenger_version} was already rejected in Triton (an earlier attempt "
                           "stopped before the registry was written): the registry follows")
        elif promoting and left is not None and left.startswith("failed_"):
            current = registry.champion()
            _rolled_back_in_registry(registry_version, f"rolled back: version {challenger_version} {left}")
            return Deployment(ROLLED_BACK, state.champion, current.version if current else None,
                              f"an earlier attempt rolled version {challenger_version} back ({left})",
                              (f"registry told of the earlier attempt's roll-back of version {challenger_version}",))
    step = lambda name: _point("deploy", name)  # noqa: E731
    if promoting:
        if repairs:  # the server may have restarted since (a resumed run starts its own): load first
            repo.load(challenger_version)
            health = repo.health_check()
        else:
            try:
                health = repo.promote(challenger_version, registry_champion_version=registry_champion)
            except PromotionFailed as e:
                _rolled_back_in_registry(registry_version, f"rolled back: {e}")
                current = registry.champion()
                return Deployment(ROLLED_BACK, repo.state().champion, current.version if current else None, str(e))
        step("triton_promoted")
        registry.promote(registry_version, on_step=step)
        return Deployment(promotion.PROMOTE, challenger_version, registry_version, health.reason, tuple(repairs))
    if not repairs:
        repo.reject(challenger_version, registry_champion_version=registry_champion)
    step("triton_rejected")
    challenger = registry.by_alias(settings.CHALLENGER_ALIAS)
    if challenger is None or challenger.version == registry_version:
        registry.clear_challenger()
    step("challenger_alias_removed")
    registry.tag_version(registry_version, REJECTED_TAG, registry.NOT_BETTER)
    step("rejected_tag_written")
    current = registry.champion()
    return Deployment(promotion.REJECT, repo.state().champion, current.version if current else None,
                      repo.health_check().reason, tuple(repairs))


def _rolled_back_in_registry(registry_version: int, why: str) -> None:
    challenger = registry.by_alias(settings.CHALLENGER_ALIAS)
    if challenger is None or challenger.version == registry_version:
        registry.clear_challenger()
    registry.tag_version(registry_version, REJECTED_TAG, why)
