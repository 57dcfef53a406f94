"""Champion/challenger jobs (fraudlib.lifecycle) on the real embedded Triton and a real MLflow
store, with the tiny real Python-backend test model (score = sigmoid(w . features + bias))."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from fraudlib import graph_store, lifecycle, metrics, promotion, registry, settings, synthetic, tracking
from fraudlib.preprocess import encode_graph, preprocess, read_test_rows
from fraudlib.graph_store import Graph
from fraudlib.triton_repo import PUBLIC_MODEL, RepositoryError, graph_inputs
from fraudlib.triton_server import EmbeddedTriton
from test_triton_repo import TINY_MODEL, make_package


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setenv("FRAUD_RUNS_DIR", str(root))
    for name in ("MLFLOW_TRACKING_URI", "TRITON_URL", "TRITON_MODEL_REPO"):
        mp.delenv(name, raising=False)
    with EmbeddedTriton(settings.triton_model_repository(), root / "triton.log") as server:
        with server.client() as client:
            yield root, client
    mp.undo()


@pytest.fixture(scope="module")
def graph_dir(env, tmp_path_factory):
    """A test graph labelled so that the bias-0 model is exactly right at threshold 0.5."""
    rng = np.random.default_rng(0)
    meta = json.loads((TINY_MODEL / "1" / "meta.json").read_text())
    dims = meta["dims"]
    g = Graph(x_user=rng.normal(size=(30, dims["user"])).astype(np.float32),
              x_merchant=rng.normal(size=(20, dims["merchant"])).astype(np.float32),
              edge_index=np.vstack([rng.integers(0, 30, 300), rng.integers(0, 20, 300)]),
              edge_attr=rng.normal(size=(300, dims["edge"])).astype(np.float32),
              label=np.zeros(300, np.int64), split=np.full(300, "test", dtype=object),
              user_features=[f"u{i}" for i in range(dims["user"])],
              merchant_features=[f"m{i}" for i in range(dims["merchant"])],
              edge_features=[f"e{i}" for i in range(dims["edge"])],
              feature_mask_user=np.zeros(dims["user"], np.int32),
              feature_mask_merchant=np.ones(dims["merchant"], np.int32),
              feature_mask_edge=np.full(dims["edge"], 2, np.int32))
    x = np.hstack([g.x_user[g.edge_index[0]], g.x_merchant[g.edge_index[1]], g.edge_attr])
    g.label = (x @ np.asarray(meta["weights"]) > 0).astype(np.int64)
    out = tmp_path_factory.mktemp("graph")
    graph_store.write_part(out, "test", g)
    return out


TRUE_WEIGHTS = np.asarray(json.loads((TINY_MODEL / "1" / "meta.json").read_text())["weights"])


def noisy_package(where, noise: float, seed: int = 0, **knobs):
    """The tiny model with its weights perturbed: it ranks the test graph worse than the true
    weights do (a perfect ranking, whatever the bias)."""
    weights = TRUE_WEIGHTS + np.random.default_rng(seed).normal(0, noise, TRUE_WEIGHTS.size)
    return make_package(where / f"noisy_{noise}_{seed}", 0.0, weights=weights.tolist(), **knobs)


def training_run(graph_dir=None) -> str:
    import mlflow

    tags = {"graph_dir": str(graph_dir)} if graph_dir else None
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(), tags=tags) as run:
        return run.info.run_id


def evaluate_and_deploy(env, graph_dir, package):
    _, client = env
    evaluation = lifecycle.evaluate(package, graph_dir, client, training_run())
    deployment = lifecycle.deploy(evaluation.decision.decision, evaluation.challenger_version,
                                  evaluation.registry_version, client)
    return evaluation, deployment


def consistent(client) -> int:
    """Exactly one version serves, and it is the registry champion's Triton version."""
    state = lifecycle.repository(client).state()
    ready = {(m, v) for m, v, s in state.triton if s == "READY"}
    assert ready == {(PUBLIC_MODEL, state.champion)}
    assert lifecycle.registry_champion_triton_version() == state.champion
    return state.champion


def test_the_first_model_is_promoted_in_triton_and_in_the_registry(env, graph_dir, tmp_path):
    evaluation, deployment = evaluate_and_deploy(env, graph_dir, noisy_package(tmp_path, 0.6))
    assert evaluation.champion_version is None and evaluation.decision.decision == promotion.PROMOTE
    assert "first model" in evaluation.decision.reason and evaluation.decision.metric == "auprc"
    assert deployment.action == promotion.PROMOTE and deployment.champion_version == 1
    assert consistent(env[1]) == 1
    assert registry.champion().version == evaluation.registry_version


def test_the_served_champions_explanation_cap_is_read_from_its_version(env):
    """The tiny test model's config sets no max_shap_edges: no cap, read without error from the
    served version's package config (a real package's cap: tests/test_scoring.py)."""
    from fraudlib import scoring

    assert scoring.explanation_cap(env[1]) is None


def test_an_example_whose_receptive_field_exceeds_the_cap_is_explained_in_a_uniform_sample_of_it(
        env, graph_dir, tmp_path):
    from fraudlib import scoring
    from fraudlib.triton_repo import PACKAGE_CONFIG

    repo = lifecycle.repository(env[1])
    if repo.state().champion is None:  # run alone (-k)
        evaluate_and_deploy(env, graph_dir, make_package(tmp_path, 0.0))
    version = repo.version_dir(repo.state().champion)
    config, meta = version / PACKAGE_CONFIG, version / "meta.json"
    text, meta_text = config.read_text(), meta.read_text()
    config.write_text(text + 'parameters: { key: "max_shap_edges" value: { string_value: "40" } }\n')
    meta.write_text(json.dumps({**json.loads(meta_text), "architecture": {"n_hops": 2}}))  # the tiny model: a GNN's
    try:
        example = scoring.explain_example(env[1], graph_dir)
    finally:
        config.write_text(text)
        meta.write_text(meta_text)

    assert example.context_edges == 40 < example.receptive_field  # every edge of this small graph is near
    assert example.receptive_field == scoring.receptive_field(graph_store.read_part(graph_dir, "test"),
                                                              np.array([example.edge])).size
    assert example.shapley["edge"].shape == (len(example.group_names["edge"]),)


def test_the_example_is_found_in_the_scores_the_run_keeps_instead_of_scoring_the_test_period_again(
        env, graph_dir, tmp_path):
    """The evaluate stage keeps the challenger's scores of every test edge in the run folder; the
    deploy stage's example reads them for the champion it explains (same model, same graph)."""
    repo = lifecycle.repository(env[1])
    if repo.state().champion is None:  # run alone (-k)
        evaluate_and_deploy(env, graph_dir, make_package(tmp_path, 0.0))
    meta_file = repo.version_dir(repo.state().champion) / "meta.json"
    meta_text = meta_file.read_text()
    meta = {**json.loads(meta_text), "architecture": {"n_hops": 2}}  # the tiny model: a GNN's
    meta_file.write_text(json.dumps(meta))
    try:
        check_kept_scores(env, graph_dir, tmp_path, meta)
    finally:
        meta_file.write_text(meta_text)


def check_kept_scores(env, graph_dir, tmp_path, meta):
    from fraudlib import scoring

    scored = scoring.explain_example(env[1], graph_dir)
    assert scoring.kept_test_scores(tmp_path, meta, graph_dir) is None
    again = scoring.explain_example(env[1], graph_dir, tmp_path)  # nothing kept: scored again
    assert (again.edge, again.whole_graph_score) == (scored.edge, scored.whole_graph_score)

    kept = np.zeros(graph_store.read_part(graph_dir, "test").num_edges, np.float32)
    kept[7 if scored.edge != 7 else 8] = 1.0  # what the run keeps decides which edge is the highest
    scoring.keep_test_scores(tmp_path, meta, graph_dir, kept)
    example = scoring.explain_example(env[1], graph_dir, tmp_path)
    assert example.edge == int(np.argmax(kept)) and example.edge != scored.edge
    assert example.score == pytest.approx(float(scoring.served_champion(env[1])(
        graph_store.read_part(graph_dir, "test"), [example.edge])[0]), abs=1e-6)  # its score: the model's own
    other = {**meta, "bias": 123}  # another model's kept scores are not this champion's
    assert scoring.kept_test_scores(tmp_path, other, graph_dir) is None


def test_a_better_challenger_is_promoted_and_the_old_champion_becomes_previous(env, graph_dir, tmp_path):
    old = registry.champion()
    evaluation, deployment = evaluate_and_deploy(env, graph_dir, make_package(tmp_path, 0.0))
    assert evaluation.challenger_metrics["auprc"] == pytest.approx(1.0)
    assert evaluation.champion_metrics["auprc"] < 0.95
    d = evaluation.decision
    assert d.decision == promotion.PROMOTE and 0 < d.delta_low <= d.delta <= d.delta_high
    assert d.reason.startswith(f"challenger auprc 1.0000 vs champion {evaluation.champion_metrics['auprc']:.4f}")
    assert f"over {len(evaluation.labels):,} test transactions (1,000 resamples)" in d.reason
    assert deployment.action == promotion.PROMOTE
    assert consistent(env[1]) == evaluation.challenger_version
    assert registry.by_alias(settings.PREVIOUS_CHAMPION_ALIAS).version == old.version


def test_a_worse_challenger_is_rejected_and_the_champion_keeps_serving(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    before = client.infer(PUBLIC_MODEL, graph_inputs(graph_store.read_part(graph_dir, "test")))["PREDICTION"]
    evaluation, deployment = evaluate_and_deploy(env, graph_dir, noisy_package(tmp_path, 0.6, seed=1))
    d = evaluation.decision
    assert d.decision == promotion.REJECT and d.delta_high < 0 and "not > min_improvement 0: reject" in d.reason
    assert deployment.action == promotion.REJECT
    assert consistent(client) == champion
    after = client.infer(PUBLIC_MODEL, graph_inputs(graph_store.read_part(graph_dir, "test")))["PREDICTION"]
    np.testing.assert_array_equal(before, after)
    assert registry.by_alias(settings.CHALLENGER_ALIAS) is None


def test_a_retrain_that_ranks_the_same_is_rejected_on_an_interval_of_exactly_zero(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    # Another bias moves every score (and every metric at 0.5) but not the ranking.
    evaluation, deployment = evaluate_and_deploy(env, graph_dir, make_package(tmp_path, 1.0))
    assert not np.allclose(evaluation.challenger_scores, evaluation.champion_scores)
    d = evaluation.decision
    assert (d.delta, d.delta_low, d.delta_high) == (0.0, 0.0, 0.0) and d.decision == promotion.REJECT
    assert "[+0.0000, +0.0000]" in d.reason
    assert deployment.action == promotion.REJECT and consistent(client) == champion


def test_each_model_is_measured_at_its_own_threshold_from_its_meta_json(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    champion_meta = lifecycle.repository(client).version_dir(champion) / "meta.json"
    meta = json.loads(champion_meta.read_text())
    champion_meta.write_text(json.dumps({**meta, "threshold": 0.7}))
    try:
        evaluation = lifecycle.evaluate(make_package(tmp_path, 1.0, threshold=0.3), graph_dir, client,
                                        training_run())
    finally:
        champion_meta.write_text(json.dumps(meta))
    assert evaluation.thresholds == {"challenger": 0.3, "champion": 0.7} and evaluation.threshold_notes == []
    for role, scores, threshold in (("challenger", evaluation.challenger_scores, 0.3),
                                    ("champion", evaluation.champion_scores, 0.7)):
        reported = getattr(evaluation, f"{role}_metrics")
        expected = metrics.at_threshold(evaluation.labels, scores, threshold)
        assert reported["threshold"] == threshold
        assert {k: reported[f"{k}_at_threshold"] for k in expected} == pytest.approx(expected)
    assert evaluation.challenger_metrics["alert_rate_at_threshold"] > evaluation.champion_metrics["alert_rate_at_threshold"]
    lifecycle.deploy(promotion.REJECT, evaluation.challenger_version, evaluation.registry_version, client)

    # A package without a threshold (from outside the train stage) is measured at 0.5, and told so.
    evaluation = lifecycle.evaluate(make_package(tmp_path, 1.0), graph_dir, client, training_run())
    assert evaluation.thresholds == {"challenger": 0.5, "champion": 0.5}
    assert len(evaluation.threshold_notes) == 2 and all("has no threshold" in n for n in evaluation.threshold_notes)
    lifecycle.deploy(promotion.REJECT, evaluation.challenger_version, evaluation.registry_version, client)
    with pytest.raises(ValueError, match="not a finite number"):
        lifecycle.evaluate(make_package(tmp_path / "bad", 1.0, threshold="high"), graph_dir, client, training_run())
    assert lifecycle.repository(client).state().challenger is None  # refused before staging
    assert consistent(client) == champion


def test_every_evaluate_parameter_reaches_the_decision_and_the_mlflow_run(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    package = noisy_package(tmp_path, 0.2, seed=2, threshold=0.4)

    def evaluate(**parameters):
        run = training_run()
        evaluation = lifecycle.evaluate(package, graph_dir, client, run, **parameters)
        lifecycle.deploy(promotion.REJECT, evaluation.challenger_version, evaluation.registry_version, client)
        return evaluation, run

    base, run = evaluate(bootstrap_samples=200)
    d = base.decision
    assert (d.metric, d.min_improvement, d.n_boot, d.level, d.seed) == ("auprc", 0.0, 200, 0.95, 0)
    assert d.challenger_value == pytest.approx(metrics.auprc(base.labels, base.challenger_scores))
    assert "(200 resamples)" in d.reason and "95% paired" in d.reason
    logged = tracking.configure().get_run(run)
    assert logged.data.metrics["promotion_delta_low"] == pytest.approx(d.delta_low)
    assert logged.data.metrics["promotion_delta_high"] == pytest.approx(d.delta_high)
    assert logged.data.metrics["challenger_auprc_low"] == pytest.approx(d.challenger_interval[0])
    assert logged.data.tags["promotion_metric"] == "auprc" and logged.data.tags["promotion_resamples"] == "200"
    assert logged.data.tags["promotion_reason"] == d.reason

    by_auc, _ = evaluate(metric="roc_auc", bootstrap_samples=200)
    assert by_auc.decision.metric == "roc_auc" and "challenger roc_auc" in by_auc.decision.reason
    assert by_auc.decision.challenger_value == pytest.approx(metrics.roc_auc(base.labels, base.challenger_scores))
    by_f1, _ = evaluate(metric="f1", bootstrap_samples=200)  # at each model's own threshold
    assert by_f1.decision.challenger_value == pytest.approx(
        metrics.at_threshold(base.labels, base.challenger_scores, 0.4)["f1"])
    assert by_f1.decision.champion_value == pytest.approx(
        metrics.at_threshold(base.labels, base.champion_scores, 0.5)["f1"])

    lenient, _ = evaluate(bootstrap_samples=200, min_improvement=d.delta_low - 0.01)
    strict, _ = evaluate(bootstrap_samples=200, min_improvement=d.delta_low + 0.01)
    assert lenient.decision.decision == promotion.PROMOTE and strict.decision.decision == promotion.REJECT
    assert f"min_improvement {d.delta_low + 0.01:g}" in strict.decision.reason

    more, _ = evaluate(bootstrap_samples=400)
    assert more.decision.n_boot == 400 and (more.decision.delta_low, more.decision.delta_high) != (d.delta_low, d.delta_high)
    narrow, _ = evaluate(bootstrap_samples=200, confidence_level=0.5)
    assert narrow.decision.level == 0.5 and "50% paired" in narrow.decision.reason
    assert d.delta_low < narrow.decision.delta_low <= narrow.decision.delta_high < d.delta_high
    reseeded, _ = evaluate(bootstrap_samples=200, bootstrap_seed=3)
    assert reseeded.decision.seed == 3 and reseeded.decision.delta == d.delta
    assert (reseeded.decision.delta_low, reseeded.decision.delta_high) != (d.delta_low, d.delta_high)
    again, _ = evaluate(bootstrap_samples=200)
    assert again.decision == d  # seeded: the same decision, interval and reason

    for bad, message in (({"metric": "accuracy"}, "accuracy"), ({"bootstrap_samples": 0}, "bootstrap_samples"),
                         ({"confidence_level": 95.0}, "confidence_level"), ({"bootstrap_seed": -1}, "bootstrap_seed")):
        with pytest.raises((KeyError, ValueError), match=message):
            lifecycle.evaluate(package, graph_dir, client, training_run(), **bad)
        assert lifecycle.repository(client).state().challenger is None  # refused before staging
    assert consistent(client) == champion


def test_the_evaluate_notebook_passes_every_parameter_and_shows_both_models(env, graph_dir, tmp_path):
    import papermill as pm
    import scrapbook as sb

    from fraudlib.runner import choose_kernel

    root, client = env
    champion = consistent(client)
    run, package = training_run(), noisy_package(tmp_path, 0.6, seed=1, threshold=0.4)  # clearly worse
    executed = tmp_path / "03_evaluate.ipynb"
    pm.execute_notebook(str(settings.project_root() / "notebooks" / "03_evaluate.ipynb"), str(executed),
                        kernel_name=choose_kernel(), progress_bar=False,
                        parameters={"model_dir": str(package), "mlflow_run_id": run, "graph_dir": str(graph_dir),
                                    "triton_url": client.url, "run_dir": str(tmp_path / "run"),
                                    "promotion_metric": "roc_auc", "min_improvement": -1.0,
                                    "bootstrap_samples": 150, "confidence_level": 0.9, "bootstrap_seed": 2})
    glued = sb.read_notebook(str(executed)).scraps.data_dict
    reason = glued["promotion_reason"]
    assert glued["decision"] == promotion.PROMOTE  # worse, but min_improvement -1 lets it through
    assert reason.startswith("challenger roc_auc") and "90% paired bootstrap interval" in reason
    assert "(150 resamples)" in reason and "min_improvement -1: promote" in reason
    delta, low, high = glued["metric_delta_ci"]
    assert low <= delta <= high < 0 and glued["challenger_threshold"] == 0.4
    assert glued["champion_version"] == champion
    table = "".join(o.get("data", {}).get("text/plain", "") for c in sb.read_notebook(str(executed)).cells
                    for o in c.get("outputs", []))
    assert "roc_auc 90% low" in table and "alert_rate" in table and "delta" in table
    logged = tracking.configure().get_run(run).data
    assert logged.metrics["promotion_delta_low"] == pytest.approx(low)
    lifecycle.deploy(promotion.REJECT, glued["challenger_version"], glued["registry_version"], client)
    assert consistent(client) == champion


def test_a_failed_health_check_after_promotion_rolls_back_in_triton_and_registry(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    broken = make_package(tmp_path, 0.0, output_nan=PUBLIC_MODEL)  # fine in evaluation, NaN once public
    evaluation = lifecycle.evaluate(broken, graph_dir, client, training_run())
    deployment = lifecycle.deploy(promotion.PROMOTE, evaluation.challenger_version, evaluation.registry_version,
                                  client)
    assert deployment.action == lifecycle.ROLLED_BACK
    assert consistent(client) == champion


def test_a_crash_after_triton_promoted_but_before_the_registry_did_is_reconciled(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    evaluation = lifecycle.evaluate(make_package(tmp_path, 0.0), graph_dir, client, training_run())
    lifecycle.repository(client).promote(evaluation.challenger_version,
                                         registry_champion_version=champion)  # the process dies here
    lifecycle.reconcile(client)
    assert consistent(client) == champion


def test_a_challenger_that_reconcile_rejects_is_marked_rejected_in_the_registry_too(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    evaluation = lifecycle.evaluate(make_package(tmp_path, 0.0), graph_dir, client, training_run())
    lifecycle.reconcile(client, reject_challenger=True, force=True)  # as if its run had died
    (dropped,) = [v for v in registry.versions() if v.version == evaluation.registry_version]
    assert dropped.rejected == "dropped by reconcile: the run that staged it did not finish deploying it" and not dropped.aliases
    assert consistent(client) == champion


def test_the_decision_of_a_staged_challenger_can_be_found_without_the_runner(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    evaluation = lifecycle.evaluate(make_package(tmp_path, 1.0), graph_dir, client, training_run())
    assert lifecycle.pending_decision(client) == (evaluation.decision.decision, evaluation.challenger_version,
                                                  evaluation.registry_version)
    lifecycle.deploy(*lifecycle.pending_decision(client), client)
    assert lifecycle.pending_decision(client) is None
    assert consistent(client) == champion


def preprocessed(where, rows: int, seed: int = 0):
    synthetic.generate(where / f"{rows}_{seed}.csv", rows, seed=seed)
    return preprocess(where / f"{rows}_{seed}.csv", where / f"graph_{rows}_{seed}")


def package_for(where, summary, bias: float):
    """The tiny model with the feature dimensions of a preprocessed graph."""
    package = make_package(where, bias, dims=summary.dims)
    dims = summary.dims
    meta_path = package / "1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    rng = np.random.default_rng(len(dims))
    meta["weights"] = rng.normal(size=dims["user"] + dims["merchant"] + dims["edge"]).tolist()
    meta_path.write_text(json.dumps(meta))
    config = (package / "config.pbtxt").read_text()
    for name, key in (("x_user", "user"), ("x_merchant", "merchant"), ("edge_attr_user_to_merchant", "edge")):
        config = re.sub(rf'(name: "{name}".*?dims: \[ -1, )\d+', rf"\g<1>{dims[key]}", config)
    (package / "config.pbtxt").write_text(config)
    return package


def test_a_champion_preprocessed_with_other_encoders_scores_the_same_rows_re_encoded(env, tmp_path):
    _, client = env
    old, new = preprocessed(tmp_path, 12_000), preprocessed(tmp_path, 30_000)
    assert old.dims != new.dims  # the challenger's test graph does not fit the champion's inputs
    first = lifecycle.evaluate(package_for(tmp_path, old, -1.0), old.graph_dir, client, training_run(old.graph_dir))
    lifecycle.deploy(promotion.PROMOTE, first.challenger_version, first.registry_version, client)
    assert consistent(client) == first.challenger_version

    evaluation = lifecycle.evaluate(package_for(tmp_path, new, 0.0), new.graph_dir, client,
                                    training_run(new.graph_dir))

    assert evaluation.champion_unusable is None and "re-encoded" in evaluation.decision.reason
    reencoded, known = encode_graph(read_test_rows(new.graph_dir), graph_store.read_encoders(old.graph_dir))
    assert 0 < known.sum() < known.size and f"compared on {known.sum():,} of {known.size:,}" in evaluation.comparison
    served = client.infer(PUBLIC_MODEL, graph_inputs(reencoded))["PREDICTION"].reshape(-1)  # the champion
    np.testing.assert_allclose(evaluation.champion_scores, served, rtol=1e-6)
    whole = lifecycle.repository(client).score(evaluation.challenger_version, graph_inputs(
        graph_store.read_part(new.graph_dir, "test")))["PREDICTION"].reshape(-1)
    np.testing.assert_allclose(evaluation.challenger_scores, whole[known], rtol=1e-6)
    assert np.array_equal(evaluation.labels, graph_store.read_part(new.graph_dir, "test").label[known])
    lifecycle.deploy(evaluation.decision.decision, evaluation.challenger_version, evaluation.registry_version, client)
    consistent(client)


def test_a_champion_that_knows_none_of_the_test_cards_cannot_compare_and_the_challenger_is_rejected(env, tmp_path):
    _, client = env
    old, new = preprocessed(tmp_path, 3_000, seed=1), preprocessed(tmp_path, 30_000)  # no card in common
    first = lifecycle.evaluate(package_for(tmp_path, old, -1.0), old.graph_dir, client, training_run(old.graph_dir))
    lifecycle.deploy(promotion.PROMOTE, first.challenger_version, first.registry_version, client)

    evaluation = lifecycle.evaluate(package_for(tmp_path, new, 0.0), new.graph_dir, client,
                                    training_run(new.graph_dir))

    test = graph_store.read_part(new.graph_dir, "test")
    assert "none of the" in evaluation.champion_unusable and evaluation.champion_scores is None
    assert evaluation.decision.decision == promotion.REJECT and "promote explicitly" in evaluation.decision.reason
    assert len(evaluation.labels) == len(evaluation.challenger_scores) == test.num_edges  # nothing dropped
    lifecycle.deploy(evaluation.decision.decision, evaluation.challenger_version, evaluation.registry_version, client)
    assert consistent(client) == first.challenger_version


def test_evaluating_again_after_a_failed_attempt_replaces_the_runs_own_staged_challenger(env, graph_dir, tmp_path):
    _, client = env
    champion = consistent(client)
    run = training_run()
    package = make_package(tmp_path, 1.0)
    first = lifecycle.evaluate(package, graph_dir, client, run)  # then the stage fails: no deploy

    again = lifecycle.evaluate(package, graph_dir, client, run)  # a resumed run

    assert again.challenger_version == first.challenger_version + 1
    assert lifecycle.repository(client).state().challenger == again.challenger_version
    tags = tracking.configure().get_model_version(settings.REGISTERED_MODEL_NAME, str(first.registry_version)).tags
    assert "evaluated again" in tags[lifecycle.REJECTED_TAG]
    # Another training run's staged challenger is not touched.
    with pytest.raises(RepositoryError, match="already staged"):
        lifecycle.evaluate(make_package(tmp_path, 2.0), graph_dir, client, training_run())
    assert lifecycle.repository(client).state().challenger == again.challenger_version
    lifecycle.deploy(again.decision.decision, again.challenger_version, again.registry_version, client)
    assert consistent(client) == champion


def test_a_champion_whose_preprocessed_graph_was_deleted_is_not_compared_on_a_guess(env, tmp_path):
    _, client = env
    old, new = preprocessed(tmp_path, 12_000), preprocessed(tmp_path, 30_000)
    first = lifecycle.evaluate(package_for(tmp_path, old, -1.0), old.graph_dir, client, training_run(old.graph_dir))
    lifecycle.deploy(promotion.PROMOTE, first.challenger_version, first.registry_version, client)
    shutil.rmtree(old.graph_dir)

    evaluation = lifecycle.evaluate(package_for(tmp_path, new, 0.0), new.graph_dir, client,
                                    training_run(new.graph_dir))

    assert "encoders" in evaluation.champion_unusable and "are gone" in evaluation.champion_unusable
    assert evaluation.decision.decision == promotion.REJECT
    lifecycle.deploy(evaluation.decision.decision, evaluation.challenger_version, evaluation.registry_version, client)
    assert consistent(client) == first.challenger_version
