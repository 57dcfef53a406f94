"""Champion/challenger operations on a Triton repository, against the real embedded Triton.

The model packages are the tiny real Python-backend model in tests/triton_models (a logistic
score whose weights come from meta.json), so two versions give different answers.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fraudlib.triton_repo import (EVAL_MODEL, LOCK_HOLDER, PROMOTE_STEPS, PUBLIC_MODEL,
                                  REJECT_STEPS, ROLLBACK_STEPS, STAGE_STEPS,
                                  PromotionFailed, RepositoryError, RepositoryLocked,
                                  TritonRepository, health_check_inputs)
from crashes import InjectedCrash, crash_after
from fraudlib.triton_server import EmbeddedTriton, TritonClient, TritonError, TritonUnreachable

TINY_MODEL = Path(__file__).parent / "triton_models" / "prediction_and_shapley"


def make_package(where: Path, bias: float, **knobs) -> Path:
    """A model package as the train stage writes it, with its own bias (and test knobs)."""
    package = where / f"package_{bias}_{len(knobs)}" / PUBLIC_MODEL
    shutil.copytree(TINY_MODEL, package)
    meta_path = package / "1" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "bias": bias, **knobs}))
    return package


GRAPH = health_check_inputs(TINY_MODEL / "config.pbtxt")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("triton")
    (root / "repository").mkdir()
    with EmbeddedTriton(root / "repository", root / "triton.log") as triton:
        yield triton


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture
def repo(server, client):
    """An empty repository on the shared server (models of earlier tests unloaded)."""
    for m in client.repository_index():
        if m.get("state") in ("READY", "LOADING"):
            client.unload_model(m["name"])
    while any(m.get("state") in ("READY", "LOADING") for m in client.repository_index()):
        time.sleep(0.05)
    root = server.model_repository
    for child in root.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    repository = TritonRepository(root, client)
    shutil.rmtree(repository.archive, ignore_errors=True)
    return repository


@pytest.fixture
def packages(tmp_path):
    return [make_package(tmp_path, bias) for bias in (-1.0, 0.0, 1.0)]


def unversioned(client: TritonClient) -> np.ndarray:
    return client.infer(PUBLIC_MODEL, GRAPH, outputs=["PREDICTION"])["PREDICTION"]


def served(repo: TritonRepository) -> set[tuple[str, int]]:
    return {(m, v) for m, v, s in repo.state().triton if s == "READY"}


def champion_repo(repo: TritonRepository, package: Path) -> TritonRepository:
    repo.promote(repo.stage(package))
    return repo


def test_first_stage_and_promote_makes_version_1_the_champion(repo, client, packages):
    version = repo.stage(packages[0])
    assert version == 1
    staged = repo.state()
    assert (staged.champion, staged.challenger) == (None, 1)

    check = repo.promote(1)

    assert check.ok and check.version == 1
    state = repo.state()
    assert (state.champion, state.challenger, state.versions_on_disk) == (1, None, (1,))
    assert served(repo) == {(PUBLIC_MODEL, 1)}
    assert not repo.eval.exists() and state.journal is None
    np.testing.assert_array_equal(unversioned(client), repo.score(1, GRAPH)["PREDICTION"])


def test_unversioned_request_gets_the_champion_while_a_challenger_is_staged(repo, client, packages):
    champion_repo(repo, packages[0])
    champion_answer = repo.score(1, GRAPH)["PREDICTION"]

    assert repo.stage(packages[1]) == 2

    challenger_answer = repo.score(2, GRAPH)["PREDICTION"]
    assert not np.allclose(challenger_answer, champion_answer)
    np.testing.assert_array_equal(unversioned(client), champion_answer)
    assert served(repo) == {(PUBLIC_MODEL, 1), (EVAL_MODEL, 2)}


def test_reject_keeps_the_champion_serving_alone(repo, client, packages):
    champion_repo(repo, packages[0])
    champion_answer = repo.score(1, GRAPH)["PREDICTION"]
    repo.stage(packages[1])

    repo.reject(2)

    state = repo.state()
    assert (state.champion, state.challenger, state.versions_on_disk) == (1, None, (1,))
    assert state.archived == (2,)
    assert served(repo) == {(PUBLIC_MODEL, 1)}
    np.testing.assert_array_equal(unversioned(client), champion_answer)


def test_promote_switches_unversioned_requests_to_the_new_champion(repo, client, packages):
    champion_repo(repo, packages[0])
    repo.stage(packages[1])
    challenger_answer = repo.score(2, GRAPH)["PREDICTION"]

    repo.promote(2)

    state = repo.state()
    assert (state.champion, state.challenger, state.versions_on_disk) == (2, None, (2,))
    assert state.archived == (1,)
    assert served(repo) == {(PUBLIC_MODEL, 2)}
    np.testing.assert_array_equal(unversioned(client), challenger_answer)


def test_unversioned_requests_never_fail_while_the_champion_switches(repo, server, packages,
                                                                     tmp_path):
    champion_repo(repo, packages[0])
    old = repo.score(1, GRAPH)["PREDICTION"]
    repo.stage(make_package(tmp_path, 2.0, initialize_delay_s=1.0))  # a slow load to watch
    new = repo.score(2, GRAPH)["PREDICTION"]
    answers, errors, done = [], [], threading.Event()

    def ask_without_version():
        with TritonClient(server.url) as c:
            while not done.is_set():
                try:
                    answers.append(unversioned(c))
                except TritonError as e:
                    errors.append(e)

    asker = threading.Thread(target=ask_without_version)
    asker.start()
    try:
        repo.promote(2)
    finally:
        done.set()
        asker.join()

    assert errors == []
    seen = ["old" if np.array_equal(a, old) else "new" if np.array_equal(a, new) else "other"
            for a in answers]
    assert seen[0] == "old" and seen[-1] == "new" and "other" not in seen
    assert seen == sorted(seen, key=["old", "new"].index)  # never back to the old one


def test_rollback_serves_the_previous_champion_again(repo, client, packages):
    champion_repo(repo, packages[0])
    first_answer = repo.score(1, GRAPH)["PREDICTION"]
    repo.promote(repo.stage(packages[1]))

    repo.rollback()

    assert repo.state().champion == 1 and served(repo) == {(PUBLIC_MODEL, 1)}
    np.testing.assert_array_equal(unversioned(client), first_answer)


def test_version_numbers_are_never_reused(repo, packages):
    champion_repo(repo, packages[0])
    repo.reject(repo.stage(packages[1]))
    assert repo.stage(packages[2]) == 3


@pytest.mark.parametrize("output_nan, match", [
    (True, "NaN.*Version 1 serves as before"),  # rejected before it serves
    (PUBLIC_MODEL, "Version 1 serves as before"),  # healthy under the evaluation model, broken once public
], ids=["before_the_switch", "after_the_switch"])
def test_a_challenger_failing_its_health_check_leaves_the_champion_serving(repo, client, packages, tmp_path,
                                                                         output_nan, match):
    champion_repo(repo, packages[0])
    champion_answer = repo.score(1, GRAPH)["PREDICTION"]
    repo.stage(make_package(tmp_path, 2.0, output_nan=output_nan))

    with pytest.raises(PromotionFailed, match=match):
        repo.promote(2)

    state = repo.state()
    assert (state.champion, state.challenger, state.archived) == (1, None, (2,))
    assert served(repo) == {(PUBLIC_MODEL, 1)}
    np.testing.assert_array_equal(unversioned(client), champion_answer)


def test_health_check_scores_a_small_graph_with_the_versions_dims(repo, packages):
    champion_repo(repo, packages[0])
    check = repo.health_check()
    assert check.ok and check.version == 1 and check.model == PUBLIC_MODEL


def test_malformed_inputs_get_an_error_and_the_champion_keeps_serving(repo, packages):
    champion_repo(repo, packages[0])
    for bad in ({"x_user": GRAPH["x_user"][:, :2]},
                {"x_merchant": GRAPH["x_merchant"].astype(np.float64)},
                {"edge_attr_user_to_merchant": np.full_like(GRAPH["edge_attr_user_to_merchant"],
                                                            np.nan)}):
        with pytest.raises(TritonError):
            repo.score(1, {**GRAPH, **bad})
    assert repo.health_check(1).ok


def test_unreachable_server_is_a_clear_error_and_nothing_changes(repo, packages):
    champion_repo(repo, packages[0])
    before = sorted(str(p) for p in repo.root.rglob("*"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = TritonRepository(repo.root, TritonClient(f"127.0.0.1:{s.getsockname()[1]}"))
        with pytest.raises(TritonUnreachable, match="not reachable.*TRITON_URL"):
            dead.stage(packages[1])
        with pytest.raises(TritonUnreachable, match="not reachable"):
            dead.promote(1)
    assert sorted(str(p) for p in repo.root.rglob("*")) == before


def test_package_without_config_is_refused_with_a_hint(repo, packages):
    with pytest.raises(RepositoryError, match="did you mean"):
        repo.stage(packages[0].parent)
    assert repo.state().versions_on_disk == ()


@pytest.mark.parametrize("registry_follows", [False, True], ids=["registry-old", "registry-new"])
@pytest.mark.parametrize("step", PROMOTE_STEPS)
def test_crash_at_each_promotion_step_is_reconciled(repo, client, packages, step,
                                                    registry_follows):
    champion_repo(repo, packages[0])
    repo.stage(packages[1])
    answers = {v: repo.score(v, GRAPH)["PREDICTION"] for v in (1, 2)}
    with pytest.raises(InjectedCrash), crash_after(f"promote.{step}"):
        repo.promote(2)

    registry = 2 if registry_follows else 1
    report = repo.reconcile(registry)

    assert report.unfinished["op"] == "promote" and report.unfinished["steps"][-1] == step
    assert report.champion == registry and report.champion_healthy
    expected = {(PUBLIC_MODEL, 2)} if registry_follows else {(PUBLIC_MODEL, 1), (EVAL_MODEL, 2)}
    assert served(repo) == expected
    np.testing.assert_array_equal(unversioned(client), answers[registry])
    state = repo.state()
    assert state.journal is None and not list(repo.root.rglob(".staging-*"))
    if registry_follows:
        assert (state.challenger, state.versions_on_disk) == (None, (2,))
    else:  # back to "champion serves, challenger staged": the promotion can be retried
        assert state.challenger == 2
        repo.promote(2, registry_champion_version=1)
        assert repo.state().champion == 2


# Rollback shares promotion's steps after its first; three of them stand for the rest here.
@pytest.mark.parametrize("op, step", [("stage", s) for s in STAGE_STEPS]
                         + [("reject", s) for s in REJECT_STEPS]
                         + [("rollback", s) for s in ROLLBACK_STEPS
                            if s in ("previous_champion_staged", "public_model_loaded",
                                     "old_champion_archived")])
def test_crash_at_each_step_of_other_transitions_is_reconciled(repo, client, packages, op, step):
    champion_repo(repo, packages[0])
    if op == "rollback":
        repo.promote(repo.stage(packages[1]))
    elif op == "reject":
        repo.stage(packages[1])
    champion = repo.state().champion
    champion_answer = repo.score(champion, GRAPH)["PREDICTION"]
    action = {"stage": lambda: repo.stage(packages[2]), "reject": lambda: repo.reject(2),
              "rollback": lambda: repo.rollback()}[op]
    with pytest.raises(InjectedCrash), crash_after(f"{op}.{step}"):
        action()

    report = repo.reconcile(champion)

    assert report.champion == champion and report.challenger is None and report.champion_healthy
    assert served(repo) == {(PUBLIC_MODEL, champion)}
    assert repo.state().versions_on_disk == (champion,)
    np.testing.assert_array_equal(unversioned(client), champion_answer)


def test_next_operation_reconciles_an_interrupted_one_first(repo, packages):
    champion_repo(repo, packages[0])
    with pytest.raises(InjectedCrash), crash_after("stage.eval_model_written"):
        repo.stage(packages[1])

    assert repo.stage(packages[2], registry_champion_version=1) == 3
    assert repo.state().archived == (2,)


def test_reconcile_keeps_a_staged_challenger_unless_told_to_reject_it(repo, client, packages):
    champion_repo(repo, packages[0])
    repo.stage(packages[1])

    assert repo.reconcile(1).challenger == 2
    report = repo.reconcile(1, reject_challenger=True)

    assert (report.champion, report.challenger) == (1, None)
    assert served(repo) == {(PUBLIC_MODEL, 1)} and repo.state().archived == (2,)


def test_reconcile_without_journal_follows_the_registry_champion(repo, client, packages):
    champion_repo(repo, packages[0])
    first_answer = repo.score(1, GRAPH)["PREDICTION"]
    repo.promote(repo.stage(packages[1]))

    report = repo.reconcile(registry_champion_version=1)

    assert report.champion == 1 and served(repo) == {(PUBLIC_MODEL, 1)}
    np.testing.assert_array_equal(unversioned(client), first_answer)


def test_reconcile_refuses_a_registry_version_that_exists_nowhere(repo, packages):
    champion_repo(repo, packages[0])
    with pytest.raises(RepositoryError, match="neither in .* nor in the archive"):
        repo.reconcile(registry_champion_version=7)
    assert repo.state().champion == 1


def _stage_in_subprocess(root: Path, url: str, package: Path,
                         lock_timeout_s: float = 120) -> subprocess.Popen:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fraudlib.triton_repo import TritonRepository, RepositoryError\n"
        "from fraudlib.triton_server import TritonClient\n"
        f"repo = TritonRepository(Path({str(root)!r}), TritonClient({url!r}), "
        f"lock_timeout_s={lock_timeout_s})\n"
        "try:\n"
        f"    print('staged', repo.stage(Path({str(package)!r})))\n"
        "except RepositoryError as e:\n"
        "    print('refused', e)\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def test_two_processes_staging_at_once_are_serialized(repo, server, packages, tmp_path):
    champion_repo(repo, packages[0])
    slow = make_package(tmp_path, 3.0, initialize_delay_s=1.0)
    procs = [_stage_in_subprocess(repo.root, server.url, p) for p in (slow, packages[1])]
    outputs = sorted(p.communicate()[0].strip() for p in procs)

    assert outputs[0].startswith("refused version 2 is already staged")
    # The stager may still be exiting (a live run: wait) or gone (reconcile rejects its challenger).
    assert "wait for that run to promote or reject it" in outputs[0] or "reject_challenger=True" in outputs[0]
    assert outputs[1] == "staged 2"
    state = repo.state()
    assert (state.champion, state.challenger, state.versions_on_disk) == (1, 2, (1, 2))
    assert not list(repo.root.rglob(".staging-*"))


def test_waiting_for_the_lock_too_long_names_the_holder(repo, server, packages, tmp_path):
    champion_repo(repo, packages[0])
    holder = _stage_in_subprocess(repo.root, server.url,
                                  make_package(tmp_path, 3.0, initialize_delay_s=2.0))
    while not (repo.root / LOCK_HOLDER).exists():
        time.sleep(0.02)
    # No client: Triton may answer a liveness check only after the holder's model load, by
    # when the lock is free again; this test is about the lock.
    impatient = TritonRepository(repo.root, None, lock_timeout_s=0.2)

    with pytest.raises(RepositoryLocked, match=f"'pid': {holder.pid}.*'operation': 'stage'"
                       .replace("'", '"')):
        impatient.reconcile()
    assert holder.communicate()[0].strip() == "staged 2"
    assert os.path.exists(repo.public / "2")
