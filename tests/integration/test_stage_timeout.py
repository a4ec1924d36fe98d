"""The stage timeout on a real local Ray: an attempt running past it is killed, counts as
lost and is retried until its attempts run out; stages waiting in a worker's queue are
not on the clock until they start.

The coordinator runs in this process on ``noop`` stages (the hidden kind the overhead
benchmark uses), so the times are the machinery's, not a model's. The stage that must be
timed out is *held* (``hold_file``: it waits while the file exists, and the test never
deletes it), so it cannot end on its own however fast or slow the machine is; the stages
that must not be timed out sleep a small fraction of the timeout, leaving seconds of
slack for a loaded machine.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CARRIER = """
name: timeouts
model: {arch: noop, pretrained: true}
dataset: {name: synthetic}
"""


class Quiet:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@pytest.fixture(scope="module")
def pool() -> Iterator[Any]:
    os.environ.setdefault("RAY_ADDRESS", "local")
    import ray

    from orchestrator import cluster
    from orchestrator.pool.ray import RayWorkerPool as WorkerPool

    cluster.connect(None)
    pool = WorkerPool(cluster.discover_nodes())
    try:
        yield pool
    finally:
        pool.shutdown()
        ray.shutdown()


def run_sweep(pool: Any, tmp_path: Path, stage_params: list[dict[str, Any]],
              **options: Any) -> tuple[Any, Any, str]:
    """Run one sweep of independent noop stages, the i-th with ``stage_params[i]``."""
    from orchestrator.coordinator import Coordinator, RunOptions, coordinator_id
    from orchestrator.plan import Plan, PlannedStage, stage_key
    from orchestrator.spec import parse_spec
    from orchestrator.store import Store

    root = stage_key("root", "timeouts", {"run": uuid.uuid4().hex})
    stages = []
    for i, extra in enumerate(stage_params):
        params = {"index": i, **extra}
        stages.append(PlannedStage(stage_key(root, "noop", params), "noop", params, None, f"noop({i})"))
    plan = Plan(root_key=root, stages=tuple(stages), points=(), naive_stage_count=len(stages),
                _by_key={s.key: s for s in stages})
    spec = parse_spec(CARRIER, check_arch=False)
    opts = RunOptions(**options)
    store = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    sweep_id = f"sw-{uuid.uuid4().hex[:12]}"
    store.create_sweep(sweep_id=sweep_id, name="timeouts", spec_text=spec.source_text, spec_hash=spec.spec_hash,
                       artifact_root=str(tmp_path / "artifacts"),
                       stages=[{"key": s.key, "kind": s.kind, "params": dict(s.params), "parent_key": None,
                                "target": None} for s in plan.stages],
                       points=[], naive_stage_count=len(stages), options=opts.to_json())
    store.take_sweep(sweep_id, coordinator_id(), stale_after_s=opts.stale_after_s)
    coord = Coordinator(store=store, spec=spec, plan=plan, sweep_id=sweep_id, artifact_root=str(tmp_path / "artifacts"),
                        pool=pool, progress=Quiet(), options=opts)
    return coord.run(), store, sweep_id


def test_an_attempt_past_the_timeout_is_killed_lost_and_retried_until_it_fails(pool: Any, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.touch()  # never deleted: only the timeout can end the held stage's attempts
    held = {"hold_file": str(hold), "hold_timeout_s": 240.0}
    outcome, store, sweep_id = run_sweep(pool, tmp_path, [{}, held], stage_timeout_s=3.0, max_attempts=2)
    try:
        assert outcome.status == "partial" and outcome.counts == {"succeeded": 1, "failed": 1}
        slow = store.stages(sweep_id)[1]
        attempts = [a for a in store.attempts(sweep_id) if a.stage_key == slow.key]
        assert [a.status for a in attempts] == ["lost", "lost"]
        assert all("ran past the stage timeout of 3s" in (a.error or "") for a in attempts)
        assert slow.status == "failed"
        assert outcome.wall_s < 240  # killed by the 3 s timeout per attempt, not released by the hold's bound
    finally:
        store.close()


def test_stages_queued_behind_others_are_not_on_the_clock(pool: Any, tmp_path: Path) -> None:
    # three instant stages make noop a short kind; the next five (1 s each, 5 s in all)
    # then queue together on the one worker: each runs within the 3 s timeout with 2 s to
    # spare for a loaded machine, the last only starts 4 s or more after it was dispatched
    # (it would be timed out if the clock counted its wait in the queue)
    outcome, store, sweep_id = run_sweep(pool, tmp_path, [{}] * 3 + [{"sleep_s": 1.0}] * 5,
                                         stage_timeout_s=3.0, max_attempts=1)
    try:
        assert outcome.status == "succeeded", [(s.status, s.error) for s in store.stages(sweep_id)]
        assert all(a.status == "succeeded" for a in store.attempts(sweep_id))
    finally:
        store.close()
