"""Crash recovery of the champion/challenger lifecycle (issue 13, items 5, 7, 8 and 9).

Real embedded Triton, real MLflow store (the fixtures of test_lifecycle), real processes: a
"pipeline" here is a subprocess running ``lifecycle.evaluate`` (stage 3) and
``lifecycle.deploy`` (stage 4) as the stage notebooks do; a "resume" runs the stage again with
the same inputs, as ``run_pipeline.py --resume`` re-executes the failed stage's notebook.

After every crash, resume or reconcile the invariant is the same (``consistent``): exactly one
model version is READY in Triton, the public model's champion, and it is the Triton version of
the registry's ``champion`` alias.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fraudlib import cli, lifecycle, promotion, registry, settings, tracking, triton_repo
from crashes import InjectedCrash
from test_lifecycle import consistent, env, graph_dir, noisy_package, training_run  # noqa: F401 (fixtures)
from test_triton_repo import make_package

# --- a pipeline in a real process --------------------------------------------------------------

PIPELINE = r"""
import json, os, sys, time
from pathlib import Path
from fraudlib import lifecycle, triton_repo
from fraudlib.triton_server import TritonClient

args = json.loads(sys.argv[1])

def hook(point):
    if point == args.get("pause_at"):
        print("AT", point, flush=True)
        while True:  # the test kills this process here
            time.sleep(60)

if args.get("pause_at"):
    triton_repo.set_crash_hook(hook)
client = TritonClient(args["url"])
if "package" in args:  # stage 3
    e = lifecycle.evaluate(args["package"], args["graph_dir"], client, args["run"], bootstrap_samples=100)
    decision = [e.decision.decision, e.challenger_version, e.registry_version]
    print("EVALUATED", json.dumps(decision), flush=True)
else:
    decision = args["deploy"]
if args.get("wait_for"):  # between stage 3 and stage 4: the runner starts the next kernel
    while not os.path.exists(args["wait_for"]):
        time.sleep(0.05)
if args.get("wait_for") or "deploy" in args:  # stage 4
    d = lifecycle.deploy(*decision, client)
    print("DEPLOYED", d.action, d.champion_version, flush=True)
"""


class Pipeline:
    """A subprocess running stage 3 and/or stage 4 against the test's Triton and MLflow."""

    started: list[Pipeline] = []

    def __init__(self, client, **args):
        Pipeline.started.append(self)
        self.proc = subprocess.Popen([sys.executable, "-c", PIPELINE, json.dumps({"url": client.url, **args})],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for(self, prefix: str, timeout_s: float = 120) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(prefix):
                return line.strip()
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError(f"the pipeline never printed {prefix!r}: {self.proc.stderr.read()[-3000:]}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)  # a real kill: no handler, finally or atexit runs
        self.proc.wait(30)
        self.proc.stdout.close()
        self.proc.stderr.close()

    def finish(self, timeout_s: float = 120) -> str:
        out, err = self.proc.communicate(timeout=timeout_s)
        assert self.proc.returncode == 0, err[-3000:]
        return out


@pytest.fixture(autouse=True)
def no_pipeline_outlives_its_test():
    yield
    while Pipeline.started:
        p = Pipeline.started.pop()
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(30)


@pytest.fixture
def champion(env, graph_dir, tmp_path):
    """A consistent repository with a champion (the first test of the module promotes one).
    What an earlier failed test left staged is rejected first, so each test starts clean."""
    _, client = env
    lifecycle.reconcile(client, reject_challenger=True)
    if registry.champion() is None:
        evaluation = lifecycle.evaluate(make_package(tmp_path, 0.0), graph_dir, client, training_run())
        lifecycle.deploy(promotion.PROMOTE, evaluation.challenger_version, evaluation.registry_version, client)
    return consistent(client)


def aliases_sane(client) -> None:
    """No stale alias: ``challenger`` only on the staged challenger, ``previous-champion`` never
    on the champion."""
    state = lifecycle.repository(client).state()
    challenger = registry.by_alias(settings.CHALLENGER_ALIAS)
    assert (challenger.triton_version if challenger else None) == state.challenger
    previous, champion_ = registry.by_alias(settings.PREVIOUS_CHAMPION_ALIAS), registry.champion()
    assert previous is None or previous.version != champion_.version


def crash(monkeypatch, target, name: str) -> None:
    """``target.name`` raises InjectedCrash: the process dies right before that call."""
    def die(*args, **kwargs):
        raise InjectedCrash(f"crash before {target.__name__}.{name}")
    monkeypatch.setattr(target, name, die)


# --- item 7: resume finishes or undoes the interrupted step -----------------------------------

def test_resume_after_a_crash_between_staging_and_the_challenger_alias_finishes_stage_3(
        env, graph_dir, champion, tmp_path, monkeypatch):
    _, client = env
    run, package = training_run(), make_package(tmp_path, 1.0)
    with monkeypatch.context() as m:
        crash(m, registry, "mark_challenger")  # staged in Triton, registered, no alias yet
        with pytest.raises(InjectedCrash):
            lifecycle.evaluate(package, graph_dir, client, run)
    staged = lifecycle.repository(client).state().challenger
    assert staged is not None and registry.by_alias(settings.CHALLENGER_ALIAS) is None

    again = lifecycle.evaluate(package, graph_dir, client, run)  # --resume runs stage 3 again

    assert again.challenger_version == staged + 1
    assert lifecycle.repository(client).state().challenger == again.challenger_version
    assert registry.by_alias(settings.CHALLENGER_ALIAS).version == again.registry_version
    lifecycle.deploy(again.decision.decision, again.challenger_version, again.registry_version, client)
    assert consistent(client) == champion
    aliases_sane(client)


def test_resume_after_triton_promoted_but_before_the_registry_did_finishes_stage_4(
        env, graph_dir, champion, tmp_path, monkeypatch):
    _, client = env
    evaluation = lifecycle.evaluate(make_package(tmp_path, 2.0), graph_dir, client, training_run())
    with monkeypatch.context() as m:
        crash(m, registry, "promote")  # Triton serves the new version, the registry the old one
        with pytest.raises(InjectedCrash):
            lifecycle.deploy(promotion.PROMOTE, evaluation.challenger_version, evaluation.registry_version, client)
    assert lifecycle.repository(client).state().champion == evaluation.challenger_version
    # A resumed run starts its own server, which loads nothing (explicit model control).
    client.unload_model(triton_repo.PUBLIC_MODEL)
    assert not client.is_model_ready(triton_repo.PUBLIC_MODEL)

    deployment = lifecycle.deploy(promotion.PROMOTE, evaluation.challenger_version,  # --resume: stage 4 again
                                  evaluation.registry_version, client)

    assert deployment.action == promotion.PROMOTE and client.is_model_ready(triton_repo.PUBLIC_MODEL)
    assert consistent(client) == evaluation.challenger_version
    assert registry.champion().version == evaluation.registry_version
    assert registry.by_alias(settings.PREVIOUS_CHAMPION_ALIAS).triton_version == champion
    aliases_sane(client)


def test_resume_after_triton_rejected_but_before_the_registry_did_finishes_stage_4(
        env, graph_dir, champion, tmp_path, monkeypatch):
    _, client = env
    evaluation = lifecycle.evaluate(make_package(tmp_path, 3.0), graph_dir, client, training_run())
    with monkeypatch.context() as m:
        crash(m, registry, "clear_challenger")
        with pytest.raises(InjectedCrash):
            lifecycle.deploy(promotion.REJECT, evaluation.challenger_version, evaluation.registry_version, client)

    deployment = lifecycle.deploy(promotion.REJECT, evaluation.challenger_version,
                                  evaluation.registry_version, client)

    assert deployment.action == promotion.REJECT and consistent(client) == champion
    tags = tracking.configure().get_model_version(settings.REGISTERED_MODEL_NAME, str(evaluation.registry_version)).tags
    assert tags[lifecycle.REJECTED_TAG] == "not better than the champion"
    aliases_sane(client)


# --- item 8: reconcile repairs the registry's aliases too ------------------------------------

def test_reconcile_repairs_a_challenger_alias_left_on_a_rejected_version(env, graph_dir, champion, tmp_path,
                                                                          monkeypatch):
    _, client = env
    evaluation = lifecycle.evaluate(make_package(tmp_path, 4.0), graph_dir, client, training_run())
    with monkeypatch.context() as m:
        crash(m, registry, "clear_challenger")
        with pytest.raises(InjectedCrash):
            lifecycle.deploy(promotion.REJECT, evaluation.challenger_version, evaluation.registry_version, client)
    # A second run stages its own challenger before anyone reconciles.
    other = lifecycle.evaluate(make_package(tmp_path, 5.0), graph_dir, client, training_run())
    registry.mark_challenger(evaluation.registry_version)  # the stale alias, as a crash leaves it

    report = lifecycle.reconcile(client)

    assert report.challenger == other.challenger_version
    assert registry.by_alias(settings.CHALLENGER_ALIAS).version == other.registry_version
    assert any("challenger" in a and "alias" in a for a in report.actions)
    aliases_sane(client)
    lifecycle.deploy(promotion.REJECT, other.challenger_version, other.registry_version, client)
    assert consistent(client) == champion


def test_reconcile_repairs_a_previous_champion_alias_left_on_the_current_champion(
        env, graph_dir, champion, tmp_path, monkeypatch):
    _, client = env
    evaluation = lifecycle.evaluate(make_package(tmp_path, 6.0), graph_dir, client, training_run())
    old_previous = registry.by_alias(settings.PREVIOUS_CHAMPION_ALIAS)
    real_set = registry._client().__class__.set_registered_model_alias
    calls = []

    def set_alias(self, name, alias, version):  # dies after the first alias write of the promotion
        real_set(self, name, alias, version)
        calls.append(alias)
        raise InjectedCrash(f"crash after writing alias {alias}")

    with monkeypatch.context() as m:
        m.setattr(registry._client().__class__, "set_registered_model_alias", set_alias)
        with pytest.raises(InjectedCrash):
            lifecycle.deploy(promotion.PROMOTE, evaluation.challenger_version, evaluation.registry_version, client)
    assert calls == [settings.PREVIOUS_CHAMPION_ALIAS]
    assert registry.by_alias(settings.PREVIOUS_CHAMPION_ALIAS).version == registry.champion().version  # stale

    report = lifecycle.reconcile(client)  # no resume: the operator reconciles

    assert consistent(client) == champion  # the registry's champion wins without a journal
    previous = registry.by_alias(settings.PREVIOUS_CHAMPION_ALIAS)
    assert previous is None or previous.version != registry.champion().version
    assert (previous.version if previous else None) == (old_previous.version if old_previous else None)
    assert any("previous-champion" in a for a in report.actions)
    aliases_sane(client)


# --- item 9: a full disk while staging -------------------------------------------------------

def _copytree_onto_a_full_disk(error):
    """shutil.copytree that copies one file, then fails as a full disk does."""
    def copytree(src, dst, *args, **kwargs):
        first = next(p for p in Path(src).rglob("*") if p.is_file())
        Path(dst).mkdir(parents=True, exist_ok=True)
        shutil.copy2(first, Path(dst) / first.name)
        raise error

    return copytree


def test_a_full_disk_ENOSPC_injected_at_the_copy_step_leaves_nothing_half_staged(
        env, graph_dir, champion, tmp_path, monkeypatch, capsys):
    _, client = env
    repo = lifecycle.repository(client)
    versions_before = len(registry.versions())
    package, run = make_package(tmp_path, 7.0), training_run()
    full = _copytree_onto_a_full_disk(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with monkeypatch.context() as m:
        m.setattr(shutil, "copytree", full)
        with pytest.raises(triton_repo.RepositoryError, match="No space left on device") as failed:
            lifecycle.evaluate(package, graph_dir, client, run)
    assert "partial copy" in str(failed.value) and f"version {champion} serves" in str(failed.value)
    state = repo.state()
    assert state.journal is None and not list(repo.root.rglob(".staging-*"))
    assert len(registry.versions()) == versions_before  # nothing registered
    assert lifecycle.diagnose().problems == ()
    assert consistent(client) == champion


def test_the_next_run_repairs_a_copy_that_died_on_a_full_disk_ENOSPC_and_says_what_it_repaired(
        env, graph_dir, champion, tmp_path, monkeypatch, caplog):
    _, client = env
    repo = lifecycle.repository(client)
    # The copy fails on the full disk and the process dies before it can clean up.
    package = make_package(tmp_path, 8.0)
    full = _copytree_onto_a_full_disk(InjectedCrash("ENOSPC, then killed"))
    run = training_run()
    with monkeypatch.context() as m:
        m.setattr(shutil, "copytree", full)
        with pytest.raises(InjectedCrash):
            lifecycle.evaluate(package, graph_dir, client, run)
    assert repo.state().journal is not None and list(repo.public.glob(".staging-*"))
    caplog.clear()

    with caplog.at_level("WARNING", logger="fraudlib"):
        evaluation = lifecycle.evaluate(package, graph_dir, client, training_run())  # the next run

    said = caplog.text
    assert "repaired the Triton repository" in said and "unfinished stage" in said and ".staging-" in said
    assert any(".staging-" in r for r in evaluation.repairs)
    assert not list(repo.root.rglob(".staging-*"))
    lifecycle.deploy(promotion.REJECT, evaluation.challenger_version, evaluation.registry_version, client)
    assert consistent(client) == champion


# --- item 5: a live pipeline is told apart from a crashed one --------------------------------

def test_serve_while_a_pipeline_evaluates_says_wait_and_reconcile_does_not_break_the_run(
        env, graph_dir, champion, tmp_path, capsys):
    _, client = env
    go = tmp_path / "go"
    run = training_run()
    pipeline = Pipeline(client, package=str(make_package(tmp_path, 9.0)), graph_dir=str(graph_dir), run=run,
                        wait_for=str(go))
    _, staged, _ = json.loads(pipeline.wait_for("EVALUATED").split(" ", 1)[1])  # between stage 3 and 4
    capsys.readouterr()

    assert cli.main(["serve"]) == 2
    refusal = capsys.readouterr().err
    assert "fraud reconcile" not in refusal and "wait" in refusal
    assert f"pid {pipeline.proc.pid}" in refusal and run in refusal and f"version {staged}" in refusal

    assert cli.main(["reconcile", "--triton-url", client.url]) == 0  # the advice a user might still follow
    said = capsys.readouterr().out
    assert lifecycle.repository(client).state().challenger == staged and "still evaluating" in said

    go.touch()
    assert "DEPLOYED" in pipeline.finish()  # the live run was not broken
    assert consistent(client) == champion
    aliases_sane(client)


def test_serve_while_a_pipeline_holds_the_repository_lock_names_the_holder_and_says_wait(
        env, graph_dir, champion, tmp_path, capsys):
    _, client = env
    run = training_run()
    slow = make_package(tmp_path, 10.0, initialize_delay_s=4.0)  # stage holds the lock while it loads
    pipeline = Pipeline(client, package=str(slow), graph_dir=str(graph_dir), run=run)
    repo = lifecycle.repository(None)
    deadline = time.monotonic() + 60
    while (repo.lock_holder() or {}).get("operation") != "stage":
        assert time.monotonic() < deadline and pipeline.proc.poll() is None
        time.sleep(0.02)
    capsys.readouterr()

    assert cli.main(["serve"]) == 2
    refusal = capsys.readouterr().err
    assert "fraud reconcile" not in refusal and "wait" in refusal
    assert f"pid {pipeline.proc.pid}" in refusal and "holds the repository lock" in refusal and "since" in refusal

    decision, version, registered = json.loads(pipeline.wait_for("EVALUATED").split(" ", 1)[1])
    pipeline.finish()
    lifecycle.deploy(promotion.REJECT, version, registered, client)
    assert consistent(client) == champion


def test_serve_after_a_pipeline_was_killed_says_reconcile_and_reconcile_repairs(
        env, graph_dir, champion, tmp_path, capsys):
    _, client = env
    pipeline = Pipeline(client, package=str(make_package(tmp_path, 11.0)), graph_dir=str(graph_dir),
                        run=training_run(), wait_for=str(tmp_path / "never"))
    pipeline.wait_for("EVALUATED")
    pipeline.kill()
    capsys.readouterr()

    assert cli.main(["serve"]) == 2
    refusal = capsys.readouterr().err
    assert "fraud reconcile" in refusal and "gone" in refusal

    assert cli.main(["reconcile", "--triton-url", client.url]) == 0
    assert lifecycle.repository(client).state().challenger is None
    assert lifecycle.diagnose().problems == ()
    assert consistent(client) == champion
    aliases_sane(client)


# --- item 7 with real kills: every step of stages 3 and 4 --------------------------------------

EVALUATE_POINTS = ("evaluate.reconciled", "stage.copying", *(f"stage.{s}" for s in triton_repo.STAGE_STEPS),
                   *(f"evaluate.{s}" for s in lifecycle.EVALUATE_STEPS[1:]))
PROMOTE_POINTS = (*(f"promote.{s}" for s in triton_repo.PROMOTE_STEPS),
                  *(f"deploy.{s}" for s in lifecycle.PROMOTE_DEPLOY_STEPS))
REJECT_POINTS = (*(f"reject.{s}" for s in triton_repo.REJECT_STEPS),
                 *(f"deploy.{s}" for s in lifecycle.REJECT_DEPLOY_STEPS))


@pytest.mark.slow
@pytest.mark.parametrize("point", EVALUATE_POINTS)
def test_kill_at_each_step_of_stage_3_then_resume(env, graph_dir, champion, tmp_path, point):
    _, client = env
    run, package = training_run(), make_package(tmp_path, 20.0)
    pipeline = Pipeline(client, package=str(package), graph_dir=str(graph_dir), run=run, pause_at=point)
    pipeline.wait_for(f"AT {point}")
    pipeline.kill()

    evaluation = lifecycle.evaluate(package, graph_dir, client, run)  # --resume: stage 3 again
    lifecycle.deploy(evaluation.decision.decision, evaluation.challenger_version, evaluation.registry_version,
                     client)

    assert consistent(client) == champion
    aliases_sane(client)


@pytest.mark.slow
@pytest.mark.parametrize("decision, point", [(promotion.PROMOTE, p) for p in PROMOTE_POINTS]
                         + [(promotion.REJECT, p) for p in REJECT_POINTS])
def test_kill_at_each_step_of_stage_4_then_resume(env, graph_dir, champion, tmp_path, decision, point):
    _, client = env
    evaluation = lifecycle.evaluate(make_package(tmp_path, 21.0), graph_dir, client, training_run(),
                                    bootstrap_samples=100)
    args = [decision, evaluation.challenger_version, evaluation.registry_version]
    pipeline = Pipeline(client, deploy=args, pause_at=point)
    pipeline.wait_for(f"AT {point}")
    pipeline.kill()

    deployment = lifecycle.deploy(*args, client)  # --resume: stage 4 again

    assert deployment.action == decision
    expected = evaluation.challenger_version if decision == promotion.PROMOTE else champion
    assert consistent(client) == expected
    aliases_sane(client)
    if decision == promotion.PROMOTE:
        assert registry.by_alias(settings.PREVIOUS_CHAMPION_ALIAS).triton_version == champion
