"""Chaos on a real local Ray: killed workers, a node leaving, a killed coordinator and
``resume``, ``cancel``, and concurrent sweeps sharing one store and one artifact root.

Every test asserts the exact set of results (one row per point, no gaps, no duplicate
measurements) and the attempts recorded for the stages that were hit.

No test guesses how long a stage runs. The stage a test hits is *held*: the test creates
``<hold dir>/<kind>`` and names the directory in ``GREENSWEEP_TEST_HOLD_DIR``; the
training loop then waits after each checkpointed, reported epoch while that file exists
(``workers.stages.noop.hold_for_test``). The test waits on store state -- the stage
``running`` with an epoch recorded -- acts, and deletes the file to let the stage (or its
retry) go on. The waits' bounds are failure bounds, far above any run on a loaded machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from orchestrator.store import Store
from workers.stages.noop import HOLD_DIR_ENV

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

WAIT_S = 600.0  # failure bound of every wait on the sweep's state (a CI machine can be slow)

GREENSWEEP = str(Path(sys.executable).parent / "greensweep")

SPEC = """
name: chaos
seed: 3
model:
  arch: vit_tiny_patch16_224
  kwargs: {{img_size: 8, patch_size: 2, in_chans: 1, depth: 2, embed_dim: 48, num_heads: 3}}
dataset: {{name: digits}}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.003}}
pipelines:
  - name: unstructured
    stages:
      - prune: {{method: unstructured, ratio: [0.3, 0.6]}}
evaluate: {{targets: {targets}, batch_size: 256, warmup_batches: 1, repeats: 2, min_window_s: 0.05, warmup_s: 0.05, idle_s: 0.05}}
{extra}
"""


def _spec(tmp_path: Path, *, epochs: int = 2, targets: str = "[local]", extra: str = "", name: str = "spec") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(SPEC.format(epochs=epochs, targets=targets, extra=extra))
    return path


def _env(tmp_path: Path, db: str) -> dict[str, str]:
    return {**os.environ, "GREENSWEEP_ARTIFACTS": str(tmp_path / "artifacts"), "GREENSWEEP_DB_URL": db,
            "GREENSWEEP_DEBUG": "", HOLD_DIR_ENV: str(tmp_path / "holds")}


def _hold(tmp_path: Path, kind: str) -> Path:
    """Hold every *kind* stage of the sweeps run with :func:`_env` (*tmp_path*) after each
    epoch until the returned file is deleted."""
    path = tmp_path / "holds" / kind
    path.parent.mkdir(exist_ok=True)
    path.touch()
    return path


def _wait_held(store: Store, sweep_id: str, kind: str):
    """The *kind* stage once it is running and has recorded an epoch: held (see
    :func:`_hold`), it is then still running until the test releases it."""
    stage = _wait_for(lambda: (st := _stage(store, sweep_id, kind)).status == "running" and st, WAIT_S,
                      f"{kind} to start")
    _wait_for(lambda: len(store.progress(sweep_id, stage.key)) >= 1, WAIT_S, f"a {kind} epoch to be recorded")
    return stage


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def _stage(store: Store, sweep_id: str, kind: str):
    return next(st for st in store.stages(sweep_id) if st.kind == kind)


def _assert_complete(store: Store, sweep_id: str, n_points: int) -> None:
    rows = store.results(sweep_id)
    assert sorted(r.point_index for r in rows) == list(range(n_points))
    assert all(r.status in ("succeeded", "reused") and r.top1 is not None for r in rows), \
        [(r.point, r.status) for r in rows]
    for r in rows:
        if r.status == "succeeded":
            reps = store.measurements(sweep_id, r.eval_key)
            assert sorted(m.repeat for m in reps) == [0, 1]  # exactly the repeats, never twice


def _latest_sweep(db: str) -> str | None:
    try:
        with Store.open(db) as s:
            return s.latest_sweep_id()
    except Exception:  # noqa: BLE001 - the store may not exist yet
        return None


def test_worker_sigkill_mid_stage_is_retried_and_persisted_once(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/store.db"
    hold = _hold(tmp_path, "train")
    proc = subprocess.Popen([GREENSWEEP, "run", str(_spec(tmp_path, epochs=3)), "--progress", "plain"],
                            cwd=tmp_path, env=_env(tmp_path, db), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        sweep_id = _wait_for(lambda: _latest_sweep(db), WAIT_S, "the sweep to be recorded")
        with Store.open(db) as store:
            _wait_held(store, sweep_id, "train")  # held after its first epoch
            assert _stage(store, sweep_id, "train").status == "running"
            (node,) = store.nodes()
            os.kill(node.hardware["pid"], signal.SIGKILL)
        hold.unlink()  # the retry runs through
        out, _ = proc.communicate(timeout=WAIT_S)
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "retry" in out.lower()
    with Store.open(db) as store:
        train = _stage(store, sweep_id, "train")
        attempts = store.attempts(sweep_id, train.key)
        assert [a.status for a in attempts] == ["lost", "succeeded"]
        assert "died" in attempts[0].error
        assert train.status == "succeeded" and train.attempts == 2
        _assert_complete(store, sweep_id, 3)
        assert store.get_sweep(sweep_id).status == "succeeded"


def test_coordinator_sigkill_then_resume_finishes_without_rerunning(tmp_path: Path) -> None:
    """Kill the coordinator (and the local Ray it started) while a fine-tuning stage is
    mid-way (held after its first of 3 epochs): ``resume`` does not run the finished
    stages again and the fine-tuning continues from its last epoch checkpoint."""
    db = f"sqlite:///{tmp_path}/store.db"
    env = _env(tmp_path, db)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC.format(epochs=2, targets="[local]", extra="").replace(
        "      - prune: {method: unstructured, ratio: [0.3, 0.6]}",
        "      - prune: {method: unstructured, ratio: 0.5}\n      - finetune: {epochs: 3, lr: 0.001}"))
    hold = _hold(tmp_path, "finetune")
    proc = subprocess.Popen([GREENSWEEP, "run", str(spec), "--progress", "plain"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        sweep_id = _wait_for(lambda: _latest_sweep(db), WAIT_S, "the sweep to be recorded")
        with Store.open(db) as store:
            ft = _wait_held(store, sweep_id, "finetune")
        os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and the local Ray it started
        proc.wait(timeout=60)
    finally:
        hold.unlink()  # resume's fine-tuning runs through
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    with Store.open(db) as store:
        assert store.get_sweep(sweep_id).status == "running"  # nobody closed it
        done_before = {st.key for st in store.stages(sweep_id) if st.status == "succeeded"}
        assert {_stage(store, sweep_id, k).key for k in ("train", "prune")} <= done_before
        assert ft.key not in done_before
        epochs_before = len(store.progress(sweep_id, ft.key))
        assert 1 <= epochs_before < 3  # mid-way

    done = subprocess.run([GREENSWEEP, "resume", sweep_id, "--progress", "plain"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming sweep" in done.stdout
    with Store.open(db) as store:
        assert store.get_sweep(sweep_id).status == "succeeded"
        for key in done_before:  # finished stages were not run again
            assert [a.status for a in store.attempts(sweep_id, key)] == ["succeeded"]
        assert [a.status for a in store.attempts(sweep_id, ft.key)] == ["lost", "succeeded"]
        finetune = _stage(store, sweep_id, "finetune")
        assert finetune.metrics["resumed_from_epoch"] >= epochs_before >= 1  # from its last checkpoint
        rows = store.results(sweep_id)
        assert sorted(r.point_index for r in rows) == [0, 1]
        assert all(r.status == "succeeded" and r.top1 is not None for r in rows)

    again = subprocess.run([GREENSWEEP, "resume", sweep_id], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=WAIT_S)
    assert again.returncode == 0 and "already succeeded" in again.stdout


@pytest.mark.parametrize("how", ["cancel", "sigterm"])
def test_cancel_or_sigterm_stops_a_running_sweep_resumably(tmp_path: Path, how: str) -> None:
    """``greensweep cancel`` and ``kill PID`` (SIGTERM) both stop the sweep cleanly: its
    running stage (held, so certainly still running) is cancelled, the sweep is
    resumable, and no traceback or Ray stack dump reaches the user."""
    db = f"sqlite:///{tmp_path}/store.db"
    env = _env(tmp_path, db)
    hold = _hold(tmp_path, "train")
    proc = subprocess.Popen([GREENSWEEP, "run", str(_spec(tmp_path, epochs=3)), "--progress", "plain"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        sweep_id = _wait_for(lambda: _latest_sweep(db), WAIT_S, "the sweep to be recorded")
        with Store.open(db) as store:
            _wait_held(store, sweep_id, "train")
        if how == "cancel":
            c = subprocess.run([GREENSWEEP, "cancel", sweep_id], cwd=tmp_path, env=env, capture_output=True,
                               text=True, timeout=WAIT_S)
            assert c.returncode == 0 and "cancel requested" in c.stdout, c.stdout + c.stderr
        else:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=WAIT_S)  # the held training ends only by being cancelled
    finally:
        hold.unlink(missing_ok=True)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert f"greensweep resume {sweep_id}" in out
    assert "Traceback" not in out and "SIGTERM received" not in out
    with Store.open(db) as store:
        assert store.get_sweep(sweep_id).status == "cancelled"
        train = _stage(store, sweep_id, "train")
        assert train.status == "pending"
        assert [a.status for a in store.attempts(sweep_id, train.key)] == ["cancelled"]
    c2 = subprocess.run([GREENSWEEP, "cancel", sweep_id], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=WAIT_S)
    assert c2.returncode == 0 and "already ended (cancelled)" in c2.stdout



def test_four_concurrent_sweeps_share_store_and_artifacts(tmp_path: Path, db_url: str) -> None:
    """Four coordinators (each with its own local Ray), one store, one artifact root, the
    same stages: every shared artifact is built by exactly one sweep; every sweep ends
    with its complete results."""
    with Store.open(db_url, upgrade=True):
        pass  # schema created once, before the race
    env = _env(tmp_path, db_url)
    spec = _spec(tmp_path, epochs=2)
    procs = [subprocess.Popen([GREENSWEEP, "run", str(spec), "--progress", "plain"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    try:
        outs = [p.communicate(timeout=WAIT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n\n".join(outs)
    with Store.open(db_url) as store:
        sweeps = [s.id for s in store.list_sweeps()]
        assert len(sweeps) == 4
        built: dict[str, list[str]] = {}
        for sid in sweeps:
            assert store.get_sweep(sid).status == "succeeded"
            _assert_complete(store, sid, 3)
            for st in store.stages(sid):
                if st.kind != "evaluate" and st.status == "succeeded":
                    built.setdefault(st.key, []).append(sid)
        # train + two prunes: each built exactly once across the four sweeps
        assert len(built) == 3 and all(len(v) == 1 for v in built.values()), built


def test_node_loss_replaces_stages_and_fails_the_lost_type_by_name(tmp_path: Path) -> None:
    """A node leaves mid-training: the training is re-placed on the remaining node; the
    evaluations pinned to the lost node type fail naming it; the others succeed."""
    from orchestrator import cluster
    from orchestrator.catalog import CLUSTERS_DIR
    from orchestrator.cli import main

    db = f"sqlite:///{tmp_path}/store.db"
    spec = _spec(tmp_path, epochs=3, targets="[cpu-small, cpu-xeon]")
    os.environ["GREENSWEEP_ARTIFACTS"] = str(tmp_path / "artifacts")
    os.environ[HOLD_DIR_ENV] = str(tmp_path / "holds")  # the simulated nodes start from this process
    hold = _hold(tmp_path, "train")
    removed: dict[str, str] = {}
    failures: list[BaseException] = []

    def remove_training_node() -> None:  # the chaos monkey; the sweep runs on the main thread
        try:
            sweep_id = _wait_for(lambda: _latest_sweep(db), WAIT_S, "the sweep to be recorded")
            with Store.open(db) as store:
                train = _wait_held(store, sweep_id, "train")
                victim = next(n for n in cluster._simulated.list_all_nodes() if n.node_id == train.node_id)
                removed["type"] = next(n.node_type for n in store.nodes() if n.node_id == train.node_id)
                removed["sweep"] = sweep_id
                cluster._simulated.remove_node(victim, allow_graceful=False)
                # Released only once the loss is recorded: a worker of the removed node can
                # outlive its raylet for a moment, and released it would finish the training.
                _wait_for(lambda: any(a.status == "lost" for a in store.attempts(sweep_id, train.key)), WAIT_S,
                          "the coordinator to record the training's loss")
        except BaseException as e:  # noqa: BLE001 - reported by the test
            failures.append(e)
        finally:
            hold.unlink(missing_ok=True)  # the re-placed training runs through

    t = threading.Thread(target=remove_training_node, daemon=True)
    t.start()
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(spec), "--db", db, "--cluster", str(CLUSTERS_DIR / "local-sim.yaml"),
                  "--progress", "plain", "--max-attempts", "3"])
    finally:
        os.environ.pop("GREENSWEEP_ARTIFACTS", None)
        os.environ.pop(HOLD_DIR_ENV, None)
        hold.unlink(missing_ok=True)
    t.join(timeout=60)
    assert not failures, failures
    codes = [exit_info.value.code]
    sweep_id, lost_type = removed["sweep"], removed["type"]
    assert codes == [1]  # partial: the lost type's evaluations failed
    with Store.open(db) as store:
        train = _stage(store, sweep_id, "train")
        attempts = store.attempts(sweep_id, train.key)
        assert [a.status for a in attempts] == ["lost", "succeeded"]
        assert "left the cluster" in attempts[0].error and attempts[1].node_id != attempts[0].node_id
        rows = store.results(sweep_id)
        assert sorted(r.point_index for r in rows) == list(range(6))
        for r in rows:
            if r.target == lost_type:
                evaluation = next(st for st in store.stages(sweep_id) if st.key == r.eval_key)
                assert r.status == "failed" and f"node type {lost_type!r}" in evaluation.error
            else:
                assert r.status == "succeeded" and r.top1 is not None
        assert store.get_sweep(sweep_id).status == "partial"
