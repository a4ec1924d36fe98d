"""Drives a sweep's DAG on Ray: dispatch ready stages, collect, persist, retry, resume.

The coordinator is the only place that acts on Ray and the only writer to the store.
Each tick of :meth:`Coordinator.step`:

1. heartbeat (every ``heartbeat_s``): stamp the sweep and the artifact claims it holds;
   a ``greensweep cancel`` seen here stops the sweep;
2. reuse stages whose artifact already exists (this sweep's store or another sweep's);
3. place ready stages on free worker slots (:mod:`orchestrator.scheduler`: ``fifo``, or
   carbon-aware with the decision and its ``fifo`` counterfactual stored), claiming an
   artifact key first so two sweeps never build the same artifact at once;
4. wait (bounded) for results and persist every one that is ready in one transaction.

Failure handling: a stage that raises is ``failed`` (error and traceback stored) and its
descendants ``skipped``; a worker that dies mid-stage (SIGKILL, OOM, its node leaving)
loses the attempt, which is retried on a compatible live node up to ``max_attempts``;
a node that left takes its slot with it, and a stage whose target node type has no live
node left fails with a message naming that type. Every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from orchestrator.cluster import NodeInfo
from orchestrator.plan import Plan, PlannedStage
from orchestrator.scheduler import Slot, choose_slot, compatible
from orchestrator.spec import SweepSpec
from workers.artifacts import read_manifest, verified_manifest
from workers.stages.registry import get_kind
from workers.types import ArtifactInfo, DatasetRef, ModelRef, StageResult, StageTask

WAIT_TICK_S = 1.0
PROGRESS_POLL_S = 5.0  # how often running stages' progress reports are drained
PROGRESS_TIMEOUT_S = 30.0
ACTOR_START_TIMEOUT_S = 180.0
RESTART_TIMEOUT_S = 60.0  # a replacement worker that does not answer by then: its node is gone
BATCH_WINDOW_S = 0.02  # how long a tick waits to collect a batch of short stages
SHORT_STAGE_S = 0.5  # stages of a kind whose median run is shorter may queue on a busy worker  # a worker actor that does not answer by then is reported


class Progress(Protocol):
    """Receives progress events; the CLI prints them (plain lines or a live display)."""

    def stage_started(self, stage: PlannedStage, node: NodeInfo) -> None: ...
    def stage_finished(self, stage: PlannedStage, result: StageResult, done: int, total: int) -> None: ...
    def stage_reused(self, stage: PlannedStage, done: int, total: int) -> None: ...
    def stage_skipped(self, stage: PlannedStage, reason: str) -> None: ...
    def stage_progress(self, stage: PlannedStage, report: dict[str, Any]) -> None: ...
    def stage_retrying(self, stage: PlannedStage, node: NodeInfo, attempt: int, reason: str) -> None: ...
    def stage_requeued(self, stage: PlannedStage, reason: str) -> None: ...
    def stage_waiting(self, stage: PlannedStage, note: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class RunOptions:
    """How a sweep is driven; stored with the sweep so ``resume`` drives it the same way.

    ``max_attempts``: attempts per stage when its worker dies (a stage that raises is not
    retried: it would raise again). ``stage_timeout_s``: an attempt running longer is
    killed and counts as lost (timed from when it starts on its worker, not while it
    waits in the worker's queue). ``stale_after_s``: a coordinator (or artifact claim)
    whose heartbeat is older is presumed dead. ``queue_depth``: at most
    this many stages queued on one worker -- only stages of kinds whose median run is
    under ``SHORT_STAGE_S`` ever queue behind another (they still run one at a time
    there; it hides the dispatch round trip). Long stages and carbon-aware placement keep
    one stage per worker, so placement is decided when a worker is free.
    """

    max_attempts: int = 3
    stage_timeout_s: float = 24 * 3600.0
    heartbeat_s: float = 5.0
    stale_after_s: float = 60.0
    queue_depth: int = 64
    transfer: str = "shared"  # "shared": one artifact root every node reads; "object-store": ship bytes

    def to_json(self) -> dict[str, Any]:
        return {"max_attempts": self.max_attempts, "stage_timeout_s": self.stage_timeout_s,
                "heartbeat_s": self.heartbeat_s, "stale_after_s": self.stale_after_s,
                "queue_depth": self.queue_depth, "transfer": self.transfer}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RunOptions:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass
class SweepOutcome:
    sweep_id: str
    status: str  # succeeded | partial | failed | cancelled
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0


def coordinator_id() -> str:
    """``host:pid`` of this coordinator process, stored as the sweep's owner."""
    return f"{socket.gethostname()}:{os.getpid()}"


def coordinator_gone(owner: str | None) -> bool:
    """True when *owner* (``host:pid``) is a coordinator on this host whose process no
    longer exists: its sweep may be taken over at once, without waiting for its heartbeat
    to go stale. Unknown (another host): False."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
    """One :class:`workers.actor.StageWorker` actor per live greensweep node.

    With *cache_dir* (artifact transfer ``object-store``: nodes share no disk) each worker
    keeps artifacts under its own ``<cache_dir>/<node id>`` on its node.

    Each actor runs stages one at a time (Ray's default concurrency group has one
    thread); ``describe`` and ``progress`` answer from a separate ``control`` group while a
    stage runs. A slot whose actor died is replaced by :meth:`restart` while its node
    lives, and dropped by :meth:`drop` when its node left the cluster.
    """

    def __init__(self, nodes: list[NodeInfo], cache_dir: str | None = None) -> None:
        import ray

        from workers.actor import StageWorker

        self.cache_dir = cache_dir
        self._remote_cls = ray.remote(concurrency_groups={"control": 1})(StageWorker)
        self.slots: list[Slot] = [Slot(node=n, handle=self._start(n)) for n in nodes]
        self.lost_nodes: list[NodeInfo] = []

    def _start(self, node: NodeInfo) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        cpus = max(1, node.num_cpus)
        return self._remote_cls.options(
            num_cpus=cpus,
            num_gpus=min(node.num_gpus, 1),
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        ).remote(node.node_id, dict(node.labels), cpus, "cuda" if node.num_gpus else "cpu",
                 f"{self.cache_dir}/{node.node_id[:16]}" if self.cache_dir else None)

    def hardware(self, timeout_s: float = ACTOR_START_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """Hardware facts read on each node. A worker that does not start within
        *timeout_s* is named in a :class:`~orchestrator.errors.ClusterError`."""
        import ray

        from orchestrator.errors import ClusterError

        refs = {s.handle.describe.options(concurrency_group="control").remote(): s for s in self.slots}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
        if pending:
            late = ", ".join(f"{refs[r].node.node_id[:12]} ({refs[r].node.node_type})" for r in pending)
            raise ClusterError(f"worker actors on node(s) {late} did not start within {timeout_s:.0f}s -- check "
                               "`ray status` for those nodes' resources and health")
        out = {}
        for ref in ready:
            try:
                out[refs[ref].node.node_id] = ray.get(ref)
            except ray.exceptions.RayError as e:
                n = refs[ref].node
                raise ClusterError(f"worker on node {n.node_id[:12]} ({n.node_type}) failed to start: "
                                   f"{' '.join(str(e).split())[:200]}") from None
        return out

    def alive_node_ids(self) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}

    def restart(self, slot: Slot, timeout_s: float = RESTART_TIMEOUT_S) -> bool:
        """Replace the slot's dead worker by a new one on the same node; True once the new
        worker answers. False when it cannot start there within *timeout_s* (the node is
        going away: Ray may still list it as alive for several seconds after it died)."""
        import ray

        try:
            ray.kill(slot.handle)
        except Exception:  # noqa: BLE001 - already dead
            pass
        slot.handle = self._start(slot.node)
        slot.busy_keys.clear()
        probe = slot.handle.describe.options(concurrency_group="control").remote()
        ready, _ = ray.wait([probe], timeout=timeout_s)
        if not ready:
            return False
        try:
            ray.get(ready[0])
        except ray.exceptions.RayError:
            return False
        return True

    def drop(self, slot: Slot) -> None:
        if slot in self.slots:
            self.slots.remove(slot)
            self.lost_nodes.append(slot.node)

    def shutdown(self) -> None:
        import ray

        for s in self.slots:
            try:
                ray.kill(s.handle)
            except Exception:  # noqa: BLE001 - a dead actor is already gone
                pass


@dataclass
class _Running:
    stage: PlannedStage
    slot: Slot
    attempt: int
    started: datetime
    started_mono: float


class Coordinator:
    def __init__(self, *, store: Any, spec: SweepSpec, plan: Plan, sweep_id: str, artifact_root: str,
                 pool: WorkerPool, progress: Progress, carbon: Any = None, placer: Any = None,
                 options: RunOptions | None = None, initial_status: dict[str, str] | None = None) -> None:
        """*carbon* is an ``orchestrator.carbon.IntensityProvider`` (None: no carbon
        accounting); its regions were checked against the nodes' before work started.
        *placer* is an :class:`orchestrator.scheduler.online.CarbonPlacer` (None: ``fifo``).
        *initial_status* (resume) gives stages already done: ``succeeded``/``reused``."""
        self.store, self.spec, self.plan = store, spec, plan
        self.sweep_id, self.artifact_root = sweep_id, artifact_root
        self.pool, self.progress, self.carbon, self.placer = pool, progress, carbon, placer
        self.options = options or RunOptions()
        self.status: dict[str, str] = {s.key: "pending" for s in plan.stages}
        for key, st in (initial_status or {}).items():
            if key in self.status:
                self.status[key] = st
        # incremental bookkeeping, so a tick costs O(ready + in flight), not O(stages)
        self._position = {s.key: i for i, s in enumerate(plan.stages)}
        self._children = plan.children()
        self._parent = {s.key: s.parent_key for s in plan.stages}
        self._counts_by: dict[str, int] = {}
        for v in self.status.values():
            self._counts_by[v] = self._counts_by.get(v, 0) + 1
        self._ready_keys: set[str] = {k for k in self.status if self._is_ready(k)}
        self._reuse_checked: set[str] = set()
        self._kind_s: dict[str, list[float]] = {}  # recent durations per kind: short stages pipeline
        self.in_flight: dict[Any, _Running] = {}
        self._held_notes: dict[str, tuple[str, str]] = {}  # stage key -> (node, start) last said it waits for
        self._slot_done: dict[int, float] = {}  # id(slot) -> when its last stage's result came in
        self.claimed: set[str] = set()
        self.waiting_on: dict[str, str] = {}  # stage key -> sweep building its artifact
        self.cancelled = False
        self._blobs: dict[str, Any] = {}  # artifact key -> object ref of its packed bytes
        self._last_progress_poll = time.monotonic()
        self._last_heartbeat = 0.0

    # -- helpers -------------------------------------------------------------------------

    def _is_ready(self, key: str) -> bool:
        parent = self._parent[key]
        return self.status[key] == "pending" and (parent is None or self.status[parent] in ("succeeded", "reused"))

    def _set(self, key: str, status: str) -> None:
        """Move stage *key* to *status*, keeping the counters and the ready set true."""
        old = self.status[key]
        if old == status:
            return
        self.status[key] = status
        self._counts_by[old] -= 1
        self._counts_by[status] = self._counts_by.get(status, 0) + 1
        if self._is_ready(key):
            self._ready_keys.add(key)
        else:
            self._ready_keys.discard(key)
        if status in ("succeeded", "reused"):
            for child in self._children.get(key, ()):
                if self._is_ready(child):
                    self._ready_keys.add(child)
        if status == "pending":
            self._reuse_checked.discard(key)

    def _done_count(self) -> int:
        return sum(self._counts_by.get(k, 0) for k in ("succeeded", "reused", "failed", "skipped"))

    def _open_count(self) -> int:
        return self._counts_by.get("pending", 0) + self._counts_by.get("running", 0)

    def _ready(self) -> list[PlannedStage]:
        return [self.plan.stage(k) for k in sorted(self._ready_keys, key=self._position.__getitem__)]

    def _short(self, kind: str) -> bool:
        """Stages of *kind* have been finishing in under SHORT_STAGE_S: queueing several
        on one worker hides the dispatch round trip (they still run one at a time)."""
        recent = self._kind_s.get(kind, ())
        return len(recent) >= 3 and sorted(recent)[len(recent) // 2] < SHORT_STAGE_S

    def _capacity(self, stage: PlannedStage, queued: list[str], short: set[str]) -> bool:
        """May *stage* join a worker that already holds *queued*? Only short kinds queue,
        and only behind short kinds (*short*: the kinds :meth:`_short` holds short now);
        so a queue is all short when its ends are."""
        if not queued:
            return True
        if self.placer is not None or len(queued) >= self.options.queue_depth or stage.kind not in short:
            return False
        return self.plan.stage(queued[0]).kind in short and self.plan.stage(queued[-1]).kind in short

    def _skip_descendants(self, key: str, reason: str) -> None:
        for k in self.plan.descendants(key):
            if self.status[k] == "pending":
                self._set(k, "skipped")
                self.store.mark_stage_skipped(self.sweep_id, k, reason)
                self.progress.stage_skipped(self.plan.stage(k), reason)

    def _try_reuse(self, stage: PlannedStage) -> bool:
        """Reuse an artifact built earlier (this sweep's store or another sweep's)."""
        if not get_kind(stage.kind).produces_artifact:
            return False
        manifest = verified_manifest(self.artifact_root, stage.key)
        if manifest is None:
            if read_manifest(self.artifact_root, stage.key) is not None:
                self.progress.warning(f"the artifact of {stage.label} at {self.artifact_root}/{stage.key} fails its "
                                      "checksum (its weights changed after they were written); building it again")
            return False
        path = f"{self.artifact_root}/{stage.key}"
        self.store.record_stage_result(self.sweep_id, StageResult(
            key=stage.key, kind=stage.kind, status="succeeded", duration_s=0.0, node_id="",
            artifact=artifact_from_manifest(stage.key, path, manifest),
        ))
        self.store.mark_stage_reused(self.sweep_id, stage.key)
        self._set(stage.key, "reused")
        self.waiting_on.pop(stage.key, None)
        self.progress.stage_reused(stage, self._done_count(), len(self.status))
        return True

    def _claim(self, stage: PlannedStage) -> bool:
        """May this sweep build *stage*'s artifact now? False while another live sweep
        builds the same key (this one then waits and reuses it)."""
        if not get_kind(stage.kind).produces_artifact or stage.key in self.claimed:
            return True
        holder = self.store.claim_artifact(stage.key, self.sweep_id, stale_after_s=self.options.stale_after_s)
        if holder is None:
            self.claimed.add(stage.key)
            self.waiting_on.pop(stage.key, None)
            return True
        if self.waiting_on.get(stage.key) != holder:
            self.waiting_on[stage.key] = holder
            self.progress.warning(f"{stage.label} ({stage.key[:12]}) is being built by sweep {holder}; "
                                  "waiting to reuse it")
        return False

    def _release(self, key: str) -> None:
        if key in self.claimed:
            self.claimed.discard(key)
            self.store.release_artifact(key, self.sweep_id)

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> None:
        """One tick: heartbeat, reuse, dispatch what fits, collect ready results."""
        self._heartbeat()
        if self.cancelled:
            return
        self._dispatch()
        if not self.in_flight:
            if self._ready():
                time.sleep(min(WAIT_TICK_S, 0.2))  # waiting for a claim, a window or a slot
            return
        self._collect()

    def _dispatch(self) -> None:
        ready: list[PlannedStage] = []
        for stage in self._ready():
            if (stage.key not in self._reuse_checked or stage.key in self.waiting_on) and self._try_reuse(stage):
                continue  # checked once when it became ready, and while another sweep builds it
            self._reuse_checked.add(stage.key)
            ready.append(stage)
        if not ready:
            return
        queued = {id(sl): list(sl.busy_keys) for sl in self.pool.slots}
        if self.placer is not None:
            free = [sl for sl in self.pool.slots if not sl.busy_keys]
            if not free:
                return
            decisions = self.placer.place(ready, free, self.pool.slots, self.status, self.plan)
            for key, (where_when, note) in self.placer.held_notes(self.pool.slots).items():
                if self._held_notes.get(key) != where_when:  # said once, and again when the plan moves it
                    self._held_notes[key] = where_when
                    self.progress.stage_waiting(self.plan.stage(key), note)
        else:
            decisions = []
            short = {k for k in self._kind_s if self._short(k)}
            for stage in ready:
                open_slots = [sl for sl in self.pool.slots if self._capacity(stage, queued[id(sl)], short)]
                if not open_slots:
                    if not any(len(q) < self.options.queue_depth for q in queued.values()):
                        break  # every worker is full: the rest wait for the next tick
                    continue
                load = {i: len(q) for i, q in queued.items()}
                slot = choose_slot(stage, open_slots, load)
                if slot is not None:
                    decisions.append((stage, slot, None))
                    queued[id(slot)].append(stage.key)
        dispatch: list[tuple[PlannedStage, Slot, Any]] = []
        for stage, slot, decision in decisions:
            if not self._claim(stage):
                continue
            slot.busy_keys.append(stage.key)
            dispatch.append((stage, slot, decision))
        if not dispatch:
            return
        shipments = [self._shipment(stage) for stage, _, _ in dispatch]  # before anything is marked running
        attempts = self.store.mark_stages_running(self.sweep_id, [(s.key, sl.node.node_id) for s, sl, _ in dispatch])
        now, mono = datetime.now(timezone.utc), time.monotonic()
        for (stage, slot, decision), (keys, blobs) in zip(dispatch, shipments):
            if decision is not None:
                self.store.record_placement(self.sweep_id, decision)
            self._set(stage.key, "running")
            ref = slot.handle.run.remote(task_for(self.spec, self.sweep_id, stage, self.artifact_root), keys, *blobs)
            self.in_flight[ref] = _Running(stage, slot, attempts[stage.key], now, mono)
            self.progress.stage_started(stage, slot.node)

    def _shipment(self, stage: PlannedStage) -> tuple[tuple[str, ...], list[Any]]:
        """Artifacts *stage* reads, as object-store refs, when nodes share no disk."""
        if self.options.transfer != "object-store":
            return (), []
        import ray

        from workers.artifacts import FILE_PREFIX, file_entry, pack

        keys = [k for k in (stage.parent_key,) if k]
        teacher = str(stage.params.get("teacher") or "")
        if teacher.startswith("artifact:"):
            keys.append(teacher.removeprefix("artifact:"))
        # files the spec names travel too, checked against the digest taken at spec time
        files: dict[str, str] = {}
        if stage.parent_key is None and self.spec.model.checkpoint and self.spec.checkpoint_sha256:
            files[self.spec.model.checkpoint] = self.spec.checkpoint_sha256
        if teacher.startswith("checkpoint:") and stage.params.get("teacher_sha256"):
            files[teacher.removeprefix("checkpoint:")] = str(stage.params["teacher_sha256"])
        keys += [file_entry(sha, path) for path, sha in files.items()]
        refs = []
        for k in keys:
            if k not in self._blobs:
                self._blobs[k] = ray.put(self._file_bytes(k) if k.startswith(FILE_PREFIX) else pack(self.artifact_root, k))
            refs.append(self._blobs[k])
        return tuple(keys), refs

    def _file_bytes(self, entry: str) -> bytes:
        from orchestrator.errors import ArtifactError
        from workers.artifacts import parse_file_entry

        _, path = parse_file_entry(entry)
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ArtifactError(f"cannot read {path} to ship it to the nodes ({e.strerror}); it must stay readable "
                                f"here while the sweep runs -- restore it, then: greensweep resume {self.sweep_id}") from None

    def _install(self, result: StageResult) -> StageResult:
        """A result that carries its artifact (no shared disk): install it under the
        artifact root, checksum verified, and point the result at it."""
        import dataclasses

        from workers.artifacts import ArtifactTransferError, unpack

        if result.artifact_blob is None:
            return result
        try:
            unpack(self.artifact_root, result.key, result.artifact_blob)
        except (ArtifactTransferError, OSError) as e:
            return dataclasses.replace(result, status="failed", artifact=None, artifact_blob=None,
                                       error=f"its artifact arrived damaged: {e}")
        artifact = dataclasses.replace(result.artifact, path=f"{self.artifact_root}/{result.key}")
        return dataclasses.replace(result, artifact=artifact, artifact_blob=None)

    def _collect(self) -> None:
        import ray

        refs = list(self.in_flight)
        ready, rest = ray.wait(refs, num_returns=1, timeout=WAIT_TICK_S)
        if ready and rest:
            # take the other results that are there too; when short stages are queued, give
            # them a moment to finish so one transaction persists a batch of them
            short = {k for k in self._kind_s if self._short(k)}
            window = BATCH_WINDOW_S if all(r.stage.kind in short for r in self.in_flight.values()) else 0
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=window)
            ready = ready + more
        self._drain_progress(force=bool(ready))
        finished: list[tuple[_Running, StageResult]] = []
        lost: list[tuple[_Running, str]] = []
        for ref in ready:
            run = self.in_flight.pop(ref)
            self._slot_done[id(run.slot)] = time.monotonic()
            try:
                finished.append((run, self._install(ray.get(ref))))
            except ray.exceptions.RayActorError as e:
                lost.append((run, " ".join(str(e).split())[:200]))
            except ray.exceptions.RayError as e:  # e.g. the task's result could not be fetched
                lost.append((run, f"{e.__class__.__name__}: {' '.join(str(e).split())[:200]}"))
        self._check_timeouts(lost)
        if finished:
            self._persist(finished)
        if lost:
            self._handle_lost(lost)

    def _persist(self, finished: list[tuple[_Running, StageResult]]) -> None:
        self.store.record_stage_results(self.sweep_id, [r for _, r in finished])
        end = datetime.now(timezone.utc)
        for run, result in finished:
            stage = run.stage
            if stage.key in run.slot.busy_keys:
                run.slot.busy_keys.remove(stage.key)
            self._release(stage.key)
            if result.status == "succeeded":
                self._account_carbon(stage, run.slot.node, run.started, end)
            self._set(stage.key, result.status)
            samples = self._kind_s.setdefault(stage.kind, [])
            samples.append(result.duration_s)
            del samples[:-20]
            if self.placer is not None:
                self.placer.observe(stage, run.slot.node, result)
            self.progress.stage_finished(stage, result, self._done_count(), len(self.status))
            if result.status == "failed":
                self._skip_descendants(stage.key, f"parent stage {stage.label} ({stage.key[:12]}) failed: {result.error}")

    def _check_timeouts(self, lost: list[tuple[_Running, str]]) -> None:
        """Attempts running past ``stage_timeout_s``: kill their worker; they are lost."""
        import ray

        limit = self.options.stage_timeout_s
        now = time.monotonic()
        # a worker runs its queue in order, one stage at a time: only the oldest stage
        # dispatched to a slot is running, since the later of its dispatch and the end of
        # the slot's previous stage; the clock of the stages queued behind it has not started
        running: dict[int, tuple[Any, _Running]] = {}
        for ref, run in self.in_flight.items():
            head = running.get(id(run.slot))
            if head is None or run.started_mono < head[1].started_mono:
                running[id(run.slot)] = (ref, run)
        for ref, run in running.values():
            began = max(run.started_mono, self._slot_done.get(id(run.slot), 0.0))
            if now - began > limit:
                ray.kill(run.slot.handle)  # its other queued stages come back as lost
                self.in_flight.pop(ref)
                lost.append((run, f"the attempt ran past the stage timeout of {limit:g}s and was killed"))

    def _handle_lost(self, lost: list[tuple[_Running, str]]) -> None:
        """Worker deaths: restart the worker where its node lives, drop the slot where the
        node left, and retry each lost stage while it has attempts left."""
        alive = self.pool.alive_node_ids()
        handled: set[int] = set()
        for run, _ in lost:
            slot = run.slot
            if id(slot) in handled or slot not in self.pool.slots:
                continue
            handled.add(id(slot))
            # every other stage queued on that actor is lost with it
            for ref, other in list(self.in_flight.items()):
                if other.slot is slot:
                    self.in_flight.pop(ref)
                    lost.append((other, "its worker died while it was queued"))
            if slot.node.node_id in alive and self.pool.restart(slot):
                continue
            alive.discard(slot.node.node_id)  # a worker that cannot restart there: the node is leaving
            self.pool.drop(slot)
            self.progress.warning(f"node {slot.node.node_id[:12]} ({slot.node.node_type}, region "
                                  f"{slot.node.region or '-'}) left the cluster; its stages are re-placed")
        for run, why in lost:
            stage, node = run.stage, run.slot.node
            self._release(stage.key)
            gone = node.node_id not in alive
            reason = (f"node {node.node_id[:12]} ({node.node_type}) left the cluster during the stage" if gone
                      else f"worker on node {node.node_id[:12]} ({node.node_type}) died during the stage: {why}")
            if run.attempt < self.options.max_attempts:
                self.store.end_attempt(self.sweep_id, stage.key, "lost", reason, back_to_pending=True)
                self._set(stage.key, "pending")
                self.progress.stage_retrying(stage, node, run.attempt + 1, reason)
            else:
                self.store.end_attempt(self.sweep_id, stage.key, "lost", reason)
                err = f"gave up after {run.attempt} attempt(s): {reason}"
                result = StageResult(key=stage.key, kind=stage.kind, status="failed", duration_s=0.0,
                                     node_id=node.node_id, error=err)
                self.store.record_stage_result(self.sweep_id, result)
                self._set(stage.key, "failed")
                self.progress.stage_finished(stage, result, self._done_count(), len(self.status))
                self._skip_descendants(stage.key, f"parent stage {stage.label} ({stage.key[:12]}) failed: {err}")

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

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat < self.options.heartbeat_s:
            return
        self._last_heartbeat = now
        if self.store.heartbeat(self.sweep_id, sorted(self.claimed)):
            self.progress.warning(f"sweep {self.sweep_id}: cancel requested -- stopping running stages")
            self._cancel()

    def _cancel(self) -> None:
        """Stop: kill the workers running stages, close their attempts as cancelled and
        put the stages back to pending (``resume`` runs them again)."""
        import ray

        for run in self.in_flight.values():
            try:
                ray.kill(run.slot.handle)
            except Exception:  # noqa: BLE001 - already dead
                pass
            self.store.end_attempt(self.sweep_id, run.stage.key, "cancelled", "sweep cancelled",
                                   back_to_pending=True)
            self._set(run.stage.key, "pending")
        self.in_flight.clear()
        self.cancelled = True

    def _drain_progress(self, *, force: bool = False) -> None:
        """Persist what running stages reported (e.g. epochs), every PROGRESS_POLL_S."""
        import ray

        now = time.monotonic()
        if not force and now - self._last_progress_poll < PROGRESS_POLL_S:
            return
        self._last_progress_poll = now
        busy = [s for s in self.pool.slots if s.busy_keys]
        if not busy or not any(get_kind(self.plan.stage(k).kind).produces_artifact
                               for s in busy for k in s.busy_keys):
            return
        refs = [s.handle.progress.options(concurrency_group="control").remote() for s in busy]
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

    def _fail_unrunnable(self) -> bool:
        """Fail ready stages that no live slot can ever take (their target node type has
        no live node left); True when it failed any."""
        if self.in_flight:
            return False
        stuck = [s for s in self._ready() if not any(compatible(s, sl.node) for sl in self.pool.slots)]
        for s in stuck:
            lost = sorted({n.node_id[:12] for n in self.pool.lost_nodes if compatible(s, n)})
            gone = f" (node(s) {', '.join(lost)} left the cluster)" if lost else ""
            what = f"node type {s.target!r}" if s.target else "any node type"
            err = f"no live node of {what} is left to run this stage{gone} -- add such a node and run: " \
                  f"greensweep resume {self.sweep_id}"
            self._set(s.key, "failed")
            self.store.record_stage_result(self.sweep_id, StageResult(
                key=s.key, kind=s.kind, status="failed", duration_s=0.0, node_id="", error=err))
            self._skip_descendants(s.key, err)
        return bool(stuck)

    def run(self) -> SweepOutcome:
        start = time.perf_counter()
        try:
            while not self.cancelled and self._open_count():
                if self._fail_unrunnable():
                    continue
                self.step()
        except KeyboardInterrupt:
            self._cancel()
        if self.cancelled:
            self.store.release_sweep(self.sweep_id, "cancelled")
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
        self.store.release_sweep(self.sweep_id, status)
        return SweepOutcome(self.sweep_id, status, counts, time.perf_counter() - start)

    def _counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.status.values():
            out[v] = out.get(v, 0) + 1
        return out
