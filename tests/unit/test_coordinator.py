"""The coordinator against the in-process fake pool and a real SQLite store: dispatch
order, capacity and queue depth, retries, lost attempts on node loss, cancel, the stage
timeout and carbon holds -- in seconds, without Ray."""

from __future__ import annotations

import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from orchestrator import coordinator as coordinator_module
from orchestrator.cluster import NodeInfo
from orchestrator.coordinator import Coordinator, RunOptions, coordinator_gone, coordinator_id
from orchestrator.plan import Plan, PlannedStage, stage_key
from orchestrator.pool.fake import Block, Die, Fail, FakeWorkerPool, LeaveNode, Succeed
from orchestrator.spec import parse_spec
from orchestrator.store import Store
from workers.types import StageTask

CARRIER = """
name: fake-pool
model: {arch: noop, pretrained: true}
dataset: {name: synthetic}
"""


@pytest.fixture(autouse=True)
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tick waits 1 s for results on a real cluster; the fake answers at once."""
    monkeypatch.setattr(coordinator_module, "WAIT_TICK_S", 0.01)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store.open(f"sqlite:///{tmp_path / 'store.db'}")
    try:
        yield s
    finally:
        s.close()


class Events:
    """A Progress that records every event as (name, stage label or message, extra)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, Any, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            first = getattr(args[0], "label", args[0]) if args else None
            self.seen.append((name, first, args[1:]))
        return record

    def named(self, name: str) -> list[tuple[Any, tuple[Any, ...]]]:
        return [(first, rest) for n, first, rest in self.seen if n == name]


def node(i: int, node_type: str = "cpu-a") -> NodeInfo:
    return NodeInfo(node_id=f"node{i:02d}" + "f" * 28, node_type=node_type, region="EU", num_cpus=1, num_gpus=0,
                    address="127.0.0.1")


def make_plan(shape: list[tuple[str, int | None, str | None]]) -> Plan:
    """Stages from (kind, parent index or None, target) tuples, in plan order."""
    root = stage_key("root", "fake", {"run": uuid.uuid4().hex})
    stages: list[PlannedStage] = []
    for i, (kind, parent, target) in enumerate(shape):
        params = {"index": i} if target is None else {"index": i, "target": target}
        parent_key = stages[parent].key if parent is not None else None
        key = stage_key(parent_key or root, kind, params)
        stages.append(PlannedStage(key, kind, params, parent_key, f"{kind}({i})", target))
    return Plan(root_key=root, stages=tuple(stages), points=(), naive_stage_count=len(stages),
                _by_key={s.key: s for s in stages})


def make_coordinator(store: Store, tmp_path: Path, plan: Plan, pool: FakeWorkerPool, *, placer: Any = None,
                     **options: Any) -> tuple[Coordinator, Events]:
    spec = parse_spec(CARRIER, check_arch=False)
    opts = RunOptions(**options)
    sweep_id = f"sw-{uuid.uuid4().hex[:12]}"
    root = str(tmp_path / "artifacts")
    store.create_sweep(sweep_id=sweep_id, name="fake-pool", spec_text=spec.source_text, spec_hash=spec.spec_hash,
                       artifact_root=root,
                       stages=[{"key": s.key, "kind": s.kind, "params": dict(s.params), "parent_key": s.parent_key,
                                "target": s.target} for s in plan.stages],
                       points=[], naive_stage_count=len(plan.stages), options=opts.to_json())
    store.take_sweep(sweep_id, coordinator_id(), stale_after_s=opts.stale_after_s)
    events = Events()
    coord = Coordinator(store=store, spec=spec, plan=plan, sweep_id=sweep_id, artifact_root=root, pool=pool,
                        progress=events, placer=placer, options=opts)
    return coord, events


def index_of(task: StageTask) -> int:
    return int(task.params["index"])


def attempts_of(store: Store, sweep_id: str, key: str) -> list[tuple[str, str | None, str | None]]:
    return [(a.status, a.node_id, a.error) for a in store.attempts(sweep_id, key)]


# -- dispatch --------------------------------------------------------------------------------


def test_stages_dispatch_in_plan_order_and_children_only_after_their_parent(store, tmp_path):
    # 0 -> (1, 2), 1 -> 3; 4 is independent
    plan = make_plan([("noop", None, None), ("noop", 0, None), ("noop", 0, None), ("noop", 1, None),
                      ("noop", None, None)])
    pool = FakeWorkerPool([node(1), node(2)])
    coord, events = make_coordinator(store, tmp_path, plan, pool)
    outcome = coord.run()
    assert (outcome.status, outcome.counts) == ("succeeded", {"succeeded": 5})
    order = [keys[0] for _, keys in pool.calls]
    keys = [s.key for s in plan.stages]
    assert order[:2] == [keys[0], keys[4]]  # the two roots first, one per free worker
    assert order.index(keys[1]) < order.index(keys[3]) and order.index(keys[1]) < order.index(keys[2])
    assert all(len(k) == 1 for _, k in pool.calls)  # one stage per call
    assert {st.status for st in store.stages(outcome.sweep_id)} == {"succeeded"}
    assert len(events.named("stage_finished")) == 5
    assert store.get_sweep(outcome.sweep_id).status == "succeeded"


def test_long_stages_take_one_worker_each_until_one_is_free(store, tmp_path):
    plan = make_plan([("noop", None, None)] * 4)
    pool = FakeWorkerPool([node(1), node(2)], lambda task, n, attempt: Block())
    coord, _ = make_coordinator(store, tmp_path, plan, pool)
    coord.step()
    assert len(pool.calls) == 2 and {n for n, _ in pool.calls} == {node(1).node_id, node(2).node_id}
    assert max(pool.depths) == 1  # not known to be short: nothing queues behind a running stage
    pool.release(plan.stages[0].key)
    coord.step()  # collects stage 0
    coord.step()  # its worker takes stage 2
    assert [k[0] for _, k in pool.calls] == [s.key for s in plan.stages[:3]]
    for s in plan.stages:
        pool.release(s.key)
    assert coord.run().status == "succeeded"


def test_short_stages_queue_on_a_worker_up_to_queue_depth(store, tmp_path):
    plan = make_plan([("noop", None, None)] * 9)
    pool = FakeWorkerPool([node(1)])
    coord, _ = make_coordinator(store, tmp_path, plan, pool, queue_depth=2)
    outcome = coord.run()
    assert outcome.status == "succeeded"
    # three runs make noop a short kind; then two queue at once on the one worker, never more
    assert pool.depths[:3] == [1, 1, 1]
    assert max(pool.depths) == 2
    assert [k[0] for _, k in pool.calls] == [s.key for s in plan.stages]


# -- retries and lost attempts ------------------------------------------------------------------


def test_a_dead_worker_loses_the_attempt_and_the_stage_is_retried_up_to_max_attempts(store, tmp_path):
    plan = make_plan([("noop", None, None), ("noop", 0, None), ("noop", None, None)])
    pool = FakeWorkerPool([node(1)], lambda task, n, attempt: Die("killed by OOM") if index_of(task) == 0
                          and attempt < 3 else None)
    coord, events = make_coordinator(store, tmp_path, plan, pool, max_attempts=3)
    outcome = coord.run()
    assert outcome.status == "succeeded"
    first = plan.stages[0].key
    tries = attempts_of(store, outcome.sweep_id, first)
    assert [t[0] for t in tries] == ["lost", "lost", "succeeded"]
    assert "died during the stage: killed by OOM" in (tries[0][2] or "")
    assert pool.restarts == 2
    assert [attempt for _, (node_, attempt, _) in events.named("stage_retrying")] == [2, 3]
    assert next(st for st in store.stages(outcome.sweep_id) if st.key == first).attempts == 3


def test_a_stage_that_keeps_losing_its_worker_fails_after_max_attempts_and_skips_its_children(store, tmp_path):
    plan = make_plan([("noop", None, None), ("noop", 0, None), ("noop", None, None)])
    pool = FakeWorkerPool([node(1)], lambda task, n, attempt: Die() if index_of(task) == 0 else None)
    coord, _ = make_coordinator(store, tmp_path, plan, pool, max_attempts=2)
    outcome = coord.run()
    assert (outcome.status, outcome.counts) == ("partial", {"failed": 1, "skipped": 1, "succeeded": 1})
    by_key = {st.key: st for st in store.stages(outcome.sweep_id)}
    failed = by_key[plan.stages[0].key]
    assert failed.status == "failed" and failed.error.startswith("gave up after 2 attempt(s): worker on node node01")
    assert [t[0] for t in attempts_of(store, outcome.sweep_id, failed.key)] == ["lost", "lost"]
    assert by_key[plan.stages[1].key].status == "skipped"


def test_a_stage_that_raises_fails_without_retry(store, tmp_path):
    plan = make_plan([("noop", None, None), ("noop", 0, None)])
    pool = FakeWorkerPool([node(1)], lambda task, n, attempt: Fail("ValueError: bad") if index_of(task) == 0 else None)
    coord, _ = make_coordinator(store, tmp_path, plan, pool, max_attempts=3)
    outcome = coord.run()
    assert outcome.status == "failed" and outcome.counts == {"failed": 1, "skipped": 1}
    assert [t[0] for t in attempts_of(store, outcome.sweep_id, plan.stages[0].key)] == ["failed"]
    assert pool.restarts == 0


def test_stages_queued_behind_a_dying_stage_are_lost_with_it_and_rerun(store, tmp_path):
    plan = make_plan([("noop", None, None)] * 6)
    pool = FakeWorkerPool([node(1)], lambda task, n, attempt: Die() if index_of(task) == 4 and attempt == 1 else None)
    coord, _ = make_coordinator(store, tmp_path, plan, pool, queue_depth=3)
    outcome = coord.run()
    assert outcome.status == "succeeded"
    lost = [a for a in store.attempts(outcome.sweep_id) if a.status == "lost"]
    assert plan.stages[4].key in {a.stage_key for a in lost}
    assert len(pool.started) == len(plan.stages) + 1  # the dead attempt, then every stage once


# -- node loss ------------------------------------------------------------------------------


def test_a_node_that_leaves_drops_its_slot_and_the_stage_is_replaced_on_a_live_node(store, tmp_path):
    plan = make_plan([("noop", None, None), ("noop", None, None)])
    leave_once = {"done": False}

    def script(task: StageTask, n: NodeInfo, attempt: int) -> Any:
        if n.node_id == node(1).node_id and not leave_once["done"]:
            leave_once["done"] = True
            return LeaveNode()
        return None

    pool = FakeWorkerPool([node(1), node(2)], script)
    coord, events = make_coordinator(store, tmp_path, plan, pool)
    outcome = coord.run()
    assert outcome.status == "succeeded"
    assert [s.node.node_id for s in pool.slots] == [node(2).node_id]
    assert [n.node_id for n in pool.lost_nodes] == [node(1).node_id]
    tries = attempts_of(store, outcome.sweep_id, plan.stages[0].key)
    assert [(t[0], t[1]) for t in tries] == [("lost", node(1).node_id), ("succeeded", node(2).node_id)]
    assert "left the cluster during the stage" in (tries[0][2] or "")
    assert any("left the cluster; its stages are re-placed" in msg for msg, _ in events.named("warning"))


def test_a_pinned_stage_whose_node_type_has_no_live_node_left_fails_naming_the_type(store, tmp_path):
    # 0 (flexible) -> 1 @ cpu-b, 0 -> 2 @ cpu-a; the only cpu-b node leaves during 1
    plan = make_plan([("noop", None, None), ("evaluate", 0, "cpu-b"), ("evaluate", 0, "cpu-a")])
    pool = FakeWorkerPool([node(1, "cpu-a"), node(2, "cpu-b")],
                          lambda task, n, attempt: LeaveNode() if n.node_type == "cpu-b" else None)
    coord, _ = make_coordinator(store, tmp_path, plan, pool, max_attempts=3)
    outcome = coord.run()
    assert outcome.status == "partial"
    by_key = {st.key: st for st in store.stages(outcome.sweep_id)}
    pinned = by_key[plan.stages[1].key]
    assert pinned.status == "failed"
    assert "no live node of node type 'cpu-b' is left" in pinned.error
    assert f"node(s) {node(2).node_id[:12]} left the cluster" in pinned.error
    assert f"greensweep resume {outcome.sweep_id}" in pinned.error
    assert by_key[plan.stages[2].key].status == "succeeded"
    assert [t[0] for t in attempts_of(store, outcome.sweep_id, pinned.key)] == ["lost"]


def test_a_worker_that_cannot_restart_means_its_node_is_leaving(store, tmp_path):
    plan = make_plan([("noop", None, None), ("noop", None, None)])
    pool = FakeWorkerPool([node(1), node(2)],
                          lambda task, n, attempt: Die() if n.node_id == node(1).node_id else None, restart_ok=False)
    coord, _ = make_coordinator(store, tmp_path, plan, pool)
    outcome = coord.run()
    assert outcome.status == "succeeded"
    assert [n.node_id for n in pool.lost_nodes] == [node(1).node_id]


# -- cancel and timeout ------------------------------------------------------------------------


def test_the_stores_cancel_flag_stops_the_sweep_and_running_stages_go_back_to_pending(store, tmp_path):
    plan = make_plan([("noop", None, None), ("noop", None, None)])
    holder: dict[str, Any] = {}

    def script(task: StageTask, n: NodeInfo, attempt: int) -> Any:
        # `greensweep cancel` from another process, while the stage runs
        assert store.request_cancel(holder["sweep"], stale_after_s=60, gone=coordinator_gone) == "requested"
        return Block()

    pool = FakeWorkerPool([node(1)], script)
    coord, events = make_coordinator(store, tmp_path, plan, pool, heartbeat_s=0.0)
    holder["sweep"] = coord.sweep_id
    outcome = coord.run()
    assert outcome.status == "cancelled"
    assert store.get_sweep(coord.sweep_id).status == "cancelled"
    assert pool.kills == 1 and not coord.in_flight
    stages = {st.key: st.status for st in store.stages(coord.sweep_id)}
    assert set(stages.values()) == {"pending"}
    assert [t[0] for t in attempts_of(store, coord.sweep_id, plan.stages[0].key)] == ["cancelled"]
    assert any("cancel requested" in msg for msg, _ in events.named("warning"))


def test_an_attempt_past_the_stage_timeout_is_killed_lost_and_retried(store, tmp_path):
    plan = make_plan([("noop", None, None)])
    pool = FakeWorkerPool([node(1)], lambda task, n, attempt: Block() if attempt == 1 else None)
    coord, _ = make_coordinator(store, tmp_path, plan, pool, stage_timeout_s=0.2, max_attempts=2)
    start = time.monotonic()
    outcome = coord.run()
    assert outcome.status == "succeeded"
    assert time.monotonic() - start < 5
    tries = attempts_of(store, outcome.sweep_id, plan.stages[0].key)
    assert [t[0] for t in tries] == ["lost", "succeeded"]
    assert "ran past the stage timeout of 0.2s" in (tries[0][2] or "")
    assert pool.kills == 1 and pool.restarts == 1


def test_stages_queued_behind_a_running_one_are_not_on_the_clock(store, tmp_path):
    # three instant stages make noop short; then the slow ones queue on the one worker: each
    # runs 0.15 s, within the 0.25 s timeout, though the last starts ~0.45 s after dispatch
    plan = make_plan([("noop", None, None)] * 7)

    def script(task: StageTask, n: NodeInfo, attempt: int) -> Any:
        if index_of(task) >= 3:
            time.sleep(0.15)
        return None

    pool = FakeWorkerPool([node(1)], script)
    coord, _ = make_coordinator(store, tmp_path, plan, pool, stage_timeout_s=0.25, max_attempts=1)
    outcome = coord.run()
    assert outcome.status == "succeeded", [(s.status, s.error) for s in store.stages(outcome.sweep_id)]
    assert max(pool.depths) > 1


# -- carbon holds -------------------------------------------------------------------------------


class HoldingPlacer:
    """A carbon placer that holds stage *held* until monotonic time *until* (a cleaner
    window later), and places everything else at once on the first free slot."""

    policy = "greedy-carbon"

    def __init__(self, held: str, until: float) -> None:
        self.held, self.until = held, until
        self.observed: list[str] = []

    def place(self, ready, free, slots, status, plan):
        out, taken = [], set()
        for stage in ready:
            if stage.key == self.held and time.monotonic() < self.until:
                continue
            slot = next((s for s in free if id(s) not in taken), None)
            if slot is None:
                break
            taken.add(id(slot))
            out.append((stage, slot, self._decision(stage, slot)))
        return out

    def held_notes(self, slots):
        if time.monotonic() >= self.until:
            return {}
        return {self.held: ((slots[0].node.node_id, "later"), "waits for a cleaner window")}

    def observe(self, stage, node_, result):
        self.observed.append(stage.key)

    def _decision(self, stage, slot):
        now = datetime.now(timezone.utc)
        n = slot.node
        return {"stage_key": stage.key, "policy": self.policy, "node_id": n.node_id, "node_type": n.node_type,
                "region": n.region, "start_at": now, "expected_duration_s": 1.0, "expected_energy_j": 10.0,
                "expected_intensity_g_per_kwh": 100.0, "expected_carbon_g": 0.1, "estimate_source": "catalog",
                "fifo_node_id": n.node_id, "fifo_node_type": n.node_type, "fifo_region": n.region,
                "fifo_start_at": now, "fifo_expected_energy_j": 10.0, "fifo_expected_intensity_g_per_kwh": 200.0,
                "fifo_expected_carbon_g": 0.2}


def test_a_stage_held_for_a_cleaner_window_starts_only_then_and_its_placement_is_stored(store, tmp_path):
    plan = make_plan([("noop", None, None), ("noop", None, None)])
    held = plan.stages[0].key
    pool = FakeWorkerPool([node(1)])
    placer = HoldingPlacer(held, time.monotonic() + 0.3)
    started_at: dict[str, float] = {}

    def script(task: StageTask, n: NodeInfo, attempt: int) -> Any:
        started_at[task.key] = time.monotonic()
        return None

    pool.script = script
    coord, events = make_coordinator(store, tmp_path, plan, pool, placer=placer)
    outcome = coord.run()
    assert outcome.status == "succeeded"
    assert [k[0] for _, k in pool.calls] == [plan.stages[1].key, held]  # the other stage went first
    assert started_at[held] >= placer.until
    assert events.named("stage_waiting") == [("noop(0)", ("waits for a cleaner window",))]  # said once
    assert {p.stage_key for p in store.placements(outcome.sweep_id)} == {s.key for s in plan.stages}
    assert sorted(placer.observed) == sorted(s.key for s in plan.stages)


# -- progress reports and the cohort call ----------------------------------------------------------


def test_progress_a_training_stage_reports_reaches_the_store(store, tmp_path):
    plan = make_plan([("train", None, None)])
    reports = ({"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25})
    pool = FakeWorkerPool([node(1)], lambda task, n, attempt: Succeed(progress=reports))
    coord, events = make_coordinator(store, tmp_path, plan, pool)
    outcome = coord.run()
    assert outcome.status == "succeeded"
    assert store.progress(outcome.sweep_id, plan.stages[0].key) == list(reports)
    assert events.named("stage_progress") == [("train(0)", (reports[-1],))]


def test_one_pool_call_runs_a_cohort_and_returns_one_result_per_stage(tmp_path):
    from orchestrator.coordinator import task_for

    spec = parse_spec(CARRIER, check_arch=False)
    plan = make_plan([("evaluate", None, "cpu-a")] * 3)
    pool = FakeWorkerPool([node(1)], lambda task, n, attempt: Fail() if index_of(task) == 1 else None)
    tasks = [task_for(spec, "sw-x", s, str(tmp_path)) for s in plan.stages]
    handle = pool.submit(pool.slots[0], tasks, (("k",), [pool.put(b"blob")]))
    (done,) = pool.wait([handle], timeout_s=1.0)
    assert done.handle == handle and done.lost is None
    assert [(r.key, r.status) for r in done.results] == [(s.key, st) for s, st in
                                                         zip(plan.stages, ["succeeded", "failed", "succeeded"])]
    assert pool.calls == [(node(1).node_id, tuple(s.key for s in plan.stages))]


def test_the_ray_worker_runs_a_cohort_in_one_call(tmp_path):
    """``StageWorker.run_many``, the method the Ray pool calls for a cohort, in-process."""
    pytest.importorskip("torch")
    from orchestrator.coordinator import task_for
    from workers.actor import StageWorker

    spec = parse_spec(CARRIER, check_arch=False)
    plan = make_plan([("noop", None, None)] * 2)
    worker = StageWorker("node01", {}, 1)
    results = worker.run_many([task_for(spec, "sw-x", s, str(tmp_path)) for s in plan.stages])
    assert [(r.key, r.status, r.metrics["index"]) for r in results] == [(plan.stages[0].key, "succeeded", 0),
                                                                          (plan.stages[1].key, "succeeded", 1)]
    assert worker.run(task_for(spec, "sw-x", plan.stages[1], str(tmp_path))).metrics == {"index": 1}


# -- carbon accounting off the tick ----------------------------------------------------------


class SlowProvider:
    """An intensity provider that answers only when the test lets it (a rate-limited API)."""

    def __init__(self) -> None:
        import threading

        self.go = threading.Event()
        self.asked: list[str] = []

    def intensity(self, region: str, start: datetime, end: datetime):
        from orchestrator.carbon import Intensity

        self.asked.append(region)
        if not self.go.wait(timeout=60):
            raise AssertionError("the test never released the provider")
        return Intensity(g_co2_per_kwh=100.0, source="test", kind="average", region=region)


def test_a_slow_carbon_provider_does_not_hold_up_dispatch(store, tmp_path, monkeypatch):
    """Every stage of a chain is dispatched and finished while the provider has not
    answered for the first one; the figures are stored once it answers."""
    plan = make_plan([("noop", None, None), ("noop", 0, None), ("noop", 1, None)])
    pool = FakeWorkerPool([node(1)])
    coord, events = make_coordinator(store, tmp_path, plan, pool)
    provider = SlowProvider()
    coord.carbon = provider
    recorded: list[str] = []
    real = store.record_carbon
    monkeypatch.setattr(store, "record_carbon", lambda sid, key, figure: (recorded.append(key), real(sid, key, figure)))
    while len(pool.started) < 3:  # the whole chain runs with the first figure still outstanding
        coord.step()
    assert recorded == [] and provider.asked
    provider.go.set()
    outcome = coord.run()
    assert outcome.status == "succeeded" and sorted(recorded) == sorted(s.key for s in plan.stages)


def test_a_failing_carbon_provider_loses_the_figure_not_the_result(store, tmp_path):
    from orchestrator.carbon import CarbonProviderError

    class Down:
        def intensity(self, region, start, end):
            raise CarbonProviderError("electricitymaps: HTTP 503 (gave up after 4 attempts in 3.1 s)")

    plan = make_plan([("noop", None, None)])
    coord, events = make_coordinator(store, tmp_path, plan, FakeWorkerPool([node(1)]))
    coord.carbon = Down()
    assert coord.run().status == "succeeded"
    assert any("no carbon figure for noop(0)" in msg and "HTTP 503" in msg for msg, _ in events.named("warning"))


def test_an_artifact_another_sweep_finished_just_before_the_claim_is_reused_not_rebuilt(store, tmp_path,
                                                                                         monkeypatch):
    """The reuse check and the claim are two steps: another sweep can finish the artifact
    and release its claim in between. The claim then finds the artifact and reuses it."""
    plan = make_plan([("train", None, None)])
    key = plan.stages[0].key
    built: dict[str, dict[str, Any]] = {}
    manifest = {"size_bytes": 1, "sha256": "0" * 64, "materialized": True, "params": 1, "macs": 1}
    monkeypatch.setattr(coordinator_module, "verified_manifest", lambda root, k: built.get(k))
    claim = store.claim_artifact

    def claim_after_the_other_sweep_finished(k: str, sweep_id: str, **kw: Any) -> str | None:
        built[k] = manifest  # the other sweep's artifact appears, its claim is gone
        return claim(k, sweep_id, **kw)

    monkeypatch.setattr(store, "claim_artifact", claim_after_the_other_sweep_finished)
    pool = FakeWorkerPool([node(1)])
    coord, _ = make_coordinator(store, tmp_path, plan, pool)
    outcome = coord.run()
    assert pool.calls == []  # nothing ran
    assert [st.status for st in store.stages(outcome.sweep_id) if st.key == key] == ["reused"]
    assert store.claim_artifact(key, "sw-other", stale_after_s=60.0) is None  # released
