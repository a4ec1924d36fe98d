"""Drives a sweep's DAG on Ray: dispatch ready stages, collect, persist.

The coordinator is the only place that acts on Ray and the only writer to the store.
Each tick of :meth:`Coordinator.step` does one thing at a time: reuse stages whose
artifact already exists, dispatch ready stages to free worker slots (placement decided
by :mod:`orchestrator.scheduler`), wait for the next result, persist it. A failed stage
marks its descendants ``skipped``; independent branches go on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from orchestrator.cluster import NodeInfo
from orchestrator.plan import Plan, PlannedStage
from orchestrator.scheduler import Slot, choose_slot
from orchestrator.spec import SweepSpec
from workers.artifacts import verified_manifest
from workers.stages.registry import get_kind
from workers.types import ArtifactInfo, DatasetRef, ModelRef, StageResult, StageTask

WAIT_TICK_S = 1.0
PROGRESS_POLL_S = 5.0  # how often running stages' progress reports are drained
PROGRESS_TIMEOUT_S = 30.0


class Progress(Protocol):
    """Receives progress events; the CLI prints them (plain lines or a live display)."""

    def stage_started(self, stage: PlannedStage, node: NodeInfo) -> None: ...
    def stage_finished(self, stage: PlannedStage, result: StageResult, done: int, total: int) -> None: ...
    def stage_reused(self, stage: PlannedStage, done: int, total: int) -> None: ...
    def stage_skipped(self, stage: PlannedStage, reason: str) -> None: ...
    def stage_progress(self, stage: PlannedStage, report: dict[str, Any]) -> None: ...
    def warning(self, message: str) -> None: ...


@dataclass
class SweepOutcome:
    sweep_id: str
    status: str  # succeeded | partial | failed | cancelled
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


def task_for(spec: SweepSpec, sweep_id: str, stage: PlannedStage, artifact_root: str) -> StageTask:
    return StageTask(
        sweep_id=sweep_id,
        key=stage.key,
        kind=stage.kind,
        params=dict(stage.params),
        parent_key=stage.parent_key,
        model=ModelRef(
            arch=spec.model.arch,
            kwargs=dict(spec.model.kwargs),
            checkpoint=spec.model.checkpoint,
            pretrained=spec.model.pretrained,
        ),
        dataset=DatasetRef(name=spec.dataset.name, path=spec.dataset.path, options=dict(spec.dataset.options)),
        seed=spec.seed,
        artifact_root=artifact_root,
    )


def artifact_from_manifest(key: str, path: str, m: dict[str, Any]) -> ArtifactInfo:
    return ArtifactInfo(
        key=key, path=path, size_bytes=int(m["size_bytes"]), sha256=m["sha256"],
        materialized=bool(m["materialized"]), params=int(m["params"]), macs=int(m["macs"]),
        compression=m.get("compression", {}),
    )


class WorkerPool:
    """One :class:`workers.actor.StageWorker` actor per live greensweep node."""

    def __init__(self, nodes: list[NodeInfo]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from workers.actor import StageWorker

        remote_cls = ray.remote(StageWorker)
        self.slots: list[Slot] = []
        for node in nodes:
            cpus = max(1, node.num_cpus)
            actor = remote_cls.options(
                num_cpus=cpus,
                max_concurrency=2,  # run() and progress() at once
                num_gpus=min(node.num_gpus, 1),
                max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            ).remote(node.node_id, dict(node.labels), cpus, "cuda" if node.num_gpus else "cpu")
            self.slots.append(Slot(node=node, handle=actor))

    def hardware(self) -> dict[str, dict[str, Any]]:
        import ray

        facts = ray.get([s.handle.describe.remote() for s in self.slots])
        return {s.node.node_id: f for s, f in zip(self.slots, facts)}

    def shutdown(self) -> None:
        import ray

        for s in self.slots:
            ray.kill(s.handle)


class Coordinator:
    def __init__(self, *, store: Any, spec: SweepSpec, plan: Plan, sweep_id: str, artifact_root: str,
                 pool: WorkerPool, progress: Progress, carbon: Any = None) -> None:
        """*carbon* is an ``orchestrator.carbon.IntensityProvider`` (None: no carbon
        accounting); its regions were checked against the nodes' before work started."""
        self.store, self.spec, self.plan = store, spec, plan
        self.sweep_id, self.artifact_root = sweep_id, artifact_root
        self.pool, self.progress, self.carbon = pool, progress, carbon
        self.status: dict[str, str] = {s.key: "pending" for s in plan.stages}
        self.in_flight: dict[Any, tuple[PlannedStage, Slot, datetime]] = {}
        self._last_progress_poll = time.monotonic()

    # -- helpers -------------------------------------------------------------------------

    def _done_count(self) -> int:
        return sum(1 for v in self.status.values() if v in ("succeeded", "reused", "failed", "skipped"))

    def _ready(self) -> list[PlannedStage]:
        ok = ("succeeded", "reused")
        return [
            s for s in self.plan.stages
            if self.status[s.key] == "pending" and (s.parent_key is None or self.status[s.parent_key] in ok)
        ]

    def _skip_descendants(self, key: str, reason: str) -> None:
        for k in self.plan.descendants(key):
            if self.status[k] == "pending":
                self.status[k] = "skipped"
                self.store.mark_stage_skipped(self.sweep_id, k, reason)
                self.progress.stage_skipped(self.plan.stage(k), reason)

    def _try_reuse(self, stage: PlannedStage) -> bool:
        """Reuse an artifact built earlier (this sweep's store or another sweep's)."""
        if not get_kind(stage.kind).produces_artifact:
            return False
        manifest = verified_manifest(self.artifact_root, stage.key)
        if manifest is None:
            return False
        path = f"{self.artifact_root}/{stage.key}"
        self.store.record_stage_result(self.sweep_id, StageResult(
            key=stage.key, kind=stage.kind, status="succeeded", duration_s=0.0, node_id="",
            artifact=artifact_from_manifest(stage.key, path, manifest),
        ))
        self.store.mark_stage_reused(self.sweep_id, stage.key)
        self.status[stage.key] = "reused"
        self.progress.stage_reused(stage, self._done_count(), len(self.status))
        return True

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> None:
        """One tick: reuse, dispatch what fits, wait for one result, persist it."""
        import ray

        for stage in self._ready():
            if self._try_reuse(stage):
                continue
            free = [s for s in self.pool.slots if s.busy_key is None]
            slot = choose_slot(stage, free)
            if slot is None:
                continue
            self.status[stage.key] = "running"
            slot.busy_key = stage.key
            self.store.mark_stage_running(self.sweep_id, stage.key, slot.node.node_id)
            ref = slot.handle.run.remote(task_for(self.spec, self.sweep_id, stage, self.artifact_root))
            self.in_flight[ref] = (stage, slot, datetime.now(timezone.utc))
            self.progress.stage_started(stage, slot.node)

        if not self.in_flight:
            return
        ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=WAIT_TICK_S)
        self._drain_progress(force=bool(ready))
        for ref in ready:
            stage, slot, started = self.in_flight.pop(ref)
            slot.busy_key = None
            try:
                result: StageResult = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                result = StageResult(
                    key=stage.key, kind=stage.kind, status="failed", duration_s=0.0,
                    node_id=slot.node.node_id,
                    error=f"worker on node {slot.node.node_id[:12]} died while running the stage: "
                          f"{' '.join(str(e).split())[:200]}",
                )
                self.pool.slots.remove(slot)
            self.store.record_stage_result(self.sweep_id, result)
            if result.status == "succeeded":
                self._account_carbon(stage, slot.node, started, datetime.now(timezone.utc))
            self.status[stage.key] = result.status
            self.progress.stage_finished(stage, result, self._done_count(), len(self.status))
            if result.status == "failed":
                self._skip_descendants(stage.key, f"parent stage {stage.label} ({stage.key}) failed: {result.error}")

    def _account_carbon(self, stage: PlannedStage, node: NodeInfo, start: datetime, end: datetime) -> None:
        """Carbon of a finished stage: its energy x its node region's intensity during
        the stage's run. A provider failure loses the carbon figure, not the result."""
        if self.carbon is None:
            return
        from orchestrator.carbon import CarbonDataError, CarbonProviderError

        try:
            figure = self.carbon.intensity(node.region or "", start, end)
        except (CarbonDataError, CarbonProviderError) as e:
            self.progress.warning(f"no carbon figure for {stage.label} ({stage.key[:12]}): {e}")
            return
        self.store.record_carbon(self.sweep_id, stage.key, figure)

    def _drain_progress(self, *, force: bool = False) -> None:
        """Persist what running stages reported (e.g. epochs), every PROGRESS_POLL_S."""
        import ray

        now = time.monotonic()
        if not force and now - self._last_progress_poll < PROGRESS_POLL_S:
            return
        self._last_progress_poll = now
        busy = [s for s in self.pool.slots if s.busy_key is not None]
        if not busy:
            return
        refs = [s.handle.progress.remote() for s in busy]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PROGRESS_TIMEOUT_S)
        for ref in ready:
            try:
                reports = ray.get(ref)
            except ray.exceptions.RayError:
                continue  # a dead worker is handled where its stage result is collected
            by_key: dict[str, list[dict[str, Any]]] = {}
            for key, entry in reports:
                by_key.setdefault(key, []).append(entry)
            for key, entries in by_key.items():
                self.store.record_progress(self.sweep_id, key, entries)
                self.progress.stage_progress(self.plan.stage(key), entries[-1])

    def _unrunnable(self) -> bool:
        """True when stages are pending but no slot can ever take them."""
        if self.in_flight:
            return False
        ready = self._ready()
        return bool(ready) and all(choose_slot(s, self.pool.slots) is None for s in ready)

    def run(self) -> SweepOutcome:
        start = time.perf_counter()
        self.store.set_sweep_status(self.sweep_id, "running")
        try:
            while any(v in ("pending", "running") for v in self.status.values()):
                if self._unrunnable():
                    for s in self._ready():
                        self.status[s.key] = "failed"
                        err = f"no live worker can run this stage (target {s.target or 'any'}) -- workers died or left"
                        self.store.record_stage_result(self.sweep_id, StageResult(
                            key=s.key, kind=s.kind, status="failed", duration_s=0.0, node_id="", error=err))
                        self._skip_descendants(s.key, err)
                    continue
                self.step()
        except KeyboardInterrupt:
            self.store.set_sweep_status(self.sweep_id, "cancelled")
            return SweepOutcome(self.sweep_id, "cancelled", self._counts(), time.perf_counter() - start)
        counts = self._counts()
        measured = [s.key for s in self.plan.stages if not get_kind(s.kind).produces_artifact]  # evaluations
        ok_evals = sum(1 for k in measured if self.status[k] == "succeeded")
        if counts.get("failed", 0) == 0 and counts.get("skipped", 0) == 0:
            status = "succeeded"
        elif ok_evals:
            status = "partial"
        else:
            status = "failed"
        self.store.set_sweep_status(self.sweep_id, status)
        return SweepOutcome(self.sweep_id, status, counts, time.perf_counter() - start)

    def _counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.status.values():
            out[v] = out.get(v, 0) + 1
        return out
