"""Drives a sweep's DAG on a worker pool: dispatch ready stages, collect, persist, retry, resume.

The coordinator is the only place that acts on the workers (through a
:class:`orchestrator.pool.WorkerPool`: Ray for real sweeps, an in-process fake in the
unit tests) and the only writer to the store. Each tick of :meth:`Coordinator.step`:

1. heartbeat (every ``heartbeat_s``): stamp the sweep and the artifact claims it holds;
   a ``greensweep cancel`` seen here stops the sweep;
2. reuse stages whose artifact already exists (this sweep's store or another sweep's);
3. form cohorts of ready evaluations on free slots of their target (:meth:`_dispatch_cohorts`:
   measured together, with the reference, in one call), then place the other ready stages
   on free worker slots (:mod:`orchestrator.scheduler`: ``fifo``, or carbon-aware with the
   decision and its ``fifo`` counterfactual stored), claiming an artifact key first so two
   sweeps never build the same artifact at once;
4. wait (bounded) for results and persist every one that is ready in one transaction.

Failure handling: a stage that raises is ``failed`` (error and traceback stored) and its
descendants ``skipped``; a worker that dies mid-stage (SIGKILL, OOM, its node leaving)
loses the attempt, which is retried on a compatible live node up to ``max_attempts``;
a node that left takes its slot with it, and a stage whose target node type has no live
node left fails with a message naming that type. Every wait is bounded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Hashable

from orchestrator.cluster import NodeInfo
from orchestrator.gate import decide, not_needed
from orchestrator.plan import Plan, PlannedStage
from orchestrator.pool import Completion
from orchestrator.pool import WorkerPool as Pool
from orchestrator.scheduler import Slot, choose_slot, compatible, unmet
from orchestrator.spec import SweepSpec
from workers.artifacts import read_manifest, verified_manifest
from workers.stages.registry import get_kind
from orchestrator.sweep import (  # noqa: F401 - re-exported: callers import them from here
    Progress,
    RunOptions,
    SweepOutcome,
    artifact_from_manifest,
    coordinator_gone,
    coordinator_id,
    task_for,
)
from workers.types import Cohort, StageResult

_ENDED = ("succeeded", "reused", "failed", "skipped")  # a stage that will not run again in this run
WAIT_TICK_S = 1.0  # the longest a tick waits for a result
PROGRESS_POLL_S = 5.0  # how often running stages' progress reports are drained
BATCH_WINDOW_S = 0.02  # how long a tick waits to collect a batch of short stages
CARBON_FINISH_S = 30.0  # how long a finished run waits for carbon figures still being fetched
SHORT_STAGE_S = 0.5  # stages of a kind whose median run is shorter may queue on a busy worker
# A cohort holds every member's model and deployable in memory at once: at most this share
# of the node's memory, at COHORT_BYTES_PER_ARTIFACT_BYTE x each artifact's on-disk size.
COHORT_MEMORY_FRACTION = 0.25
COHORT_BYTES_PER_ARTIFACT_BYTE = 4


@dataclass
class _Running:
    stage: PlannedStage
    slot: Slot
    attempt: int
    started: datetime
    started_mono: float


class Coordinator:
    def __init__(self, *, store: Any, spec: SweepSpec, plan: Plan, sweep_id: str, artifact_root: str,
                 pool: Pool, progress: Progress, carbon: Any = None, placer: Any = None,
                 options: RunOptions | None = None, initial_status: dict[str, str] | None = None) -> None:
        """*carbon* is an ``orchestrator.carbon.IntensityProvider`` (None: no carbon
        accounting); its regions were checked against the nodes' before work started.
        *placer* is an :class:`orchestrator.scheduler.online.CarbonPlacer` (None: ``fifo``).
        *initial_status* (resume) gives stages already done: ``succeeded``/``reused``.
        *pool* runs the stages (:class:`orchestrator.pool.WorkerPool`); the coordinator
        keeps its slots' ``busy_keys``."""
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
        # conditional stages (``when:``): the evaluations each waits for, their decisions,
        # and the stages skipped because a condition said they are not needed
        self._evaluations = {s.key: s.inputs.evaluations for s in plan.stages if s.inputs.evaluations}
        self._waiters: dict[str, list[str]] = {}
        for key, evaluations in self._evaluations.items():
            for ev in evaluations:
                self._waiters.setdefault(ev, []).append(key)
        self._decisions: dict[str, dict[str, Any]] = {}
        self._not_needed: set[str] = set()
        self._ready_keys: set[str] = {k for k in self.status if self._is_ready(k)}
        self._reuse_checked: set[str] = set()
        self._kind_s: dict[str, list[float]] = {}  # recent durations per kind: short stages pipeline
        # pool call handle -> its stages, in the order the call runs them (one today; a
        # cohort call carries several)
        self.in_flight: dict[Hashable, list[_Running]] = {}
        self._held_notes: dict[str, tuple[str, str]] = {}  # stage key -> (node, start) last said it waits for
        self._slot_done: dict[int, float] = {}  # id(slot) -> when its last stage's result came in
        self.claimed: set[str] = set()
        self.waiting_on: dict[str, str] = {}  # stage key -> sweep building its artifact
        self.cancelled = False
        self._blobs: dict[str, Any] = {}  # artifact key -> the pool's token for its packed bytes
        self._last_progress_poll = time.monotonic()
        self._last_heartbeat = 0.0
        # carbon figures being fetched off the tick (a rate-limited API must not stall
        # dispatch): (stage, future of its Intensity), recorded as they arrive
        self._carbon_jobs: list[tuple[PlannedStage, Future]] = []
        self._carbon_pool: ThreadPoolExecutor | None = None
        # stages of kinds measured in cohorts (evaluations), and each node's memory
        self._cohort_keys = [s.key for s in plan.stages if self._in_cohorts(s)]
        self._node_memory: dict[str, int | None] | None = None

    # -- helpers -------------------------------------------------------------------------

    def _is_ready(self, key: str) -> bool:
        parent = self._parent[key]
        return (self.status[key] == "pending" and (parent is None or self.status[parent] in ("succeeded", "reused"))
                and all(self.status[ev] in _ENDED for ev in self._evaluations.get(key, ())))

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
        if status in _ENDED:
            for waiter in self._waiters.get(key, ()):
                if self._is_ready(waiter):
                    self._ready_keys.add(waiter)
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
                self._skip(k, reason)

    def _skip(self, key: str, reason: str, metrics: dict[str, Any] | None = None) -> None:
        self._set(key, "skipped")
        if not_needed(reason):
            self._not_needed.add(key)
        self.store.mark_stage_skipped(self.sweep_id, key, reason, metrics)
        self.progress.stage_skipped(self.plan.stage(key), reason)

    def _decide(self, stage: PlannedStage) -> bool:
        """Decide a conditional stage whose evaluations are stored: True to run it; else
        it is skipped with the reason (and everything after it)."""
        gate = stage.gate
        if gate is None or stage.key in self._decisions:
            return True
        stored = {st.key: st for st in self.store.stages(self.sweep_id)}
        decision = decide(gate, stored.get(gate.parent_eval), stored.get(gate.sibling_eval))
        self._decisions[stage.key] = decision.to_json()
        if decision.run:
            self.progress.warning(f"{stage.label} ({stage.key[:12]}) runs: {decision.reason}")
            return True
        self._skip(stage.key, decision.reason, {"gate": decision.to_json()})
        self._skip_descendants(stage.key, f"{decision.reason} (for {stage.label} {stage.key[:12]}, which this "
                                          "follows)")
        return False

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
            metrics={"gate": self._decisions[stage.key]} if stage.key in self._decisions else {},
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
        if holder is None and verified_manifest(self.artifact_root, stage.key) is not None:
            # Another sweep built it and let go between this sweep's reuse check and its
            # claim (seen with four sweeps on a loaded 2-core machine): reuse, not rebuild.
            self.store.release_artifact(stage.key, self.sweep_id)
            self._try_reuse(stage)
            return False
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
        self._record_carbon()
        self._dispatch()
        if not self.in_flight:
            if self._ready():
                time.sleep(min(WAIT_TICK_S, 0.2))  # waiting for a claim, a window or a slot
            return
        self._collect()

    def _dispatch(self) -> None:
        ready: list[PlannedStage] = []
        for stage in self._ready():
            if not self._decide(stage):
                continue
            if (stage.key not in self._reuse_checked or stage.key in self.waiting_on) and self._try_reuse(stage):
                continue  # checked once when it became ready, and while another sweep builds it
            self._reuse_checked.add(stage.key)
            ready.append(stage)
        cohort_ready = [s for s in ready if self._in_cohorts(s)]
        if cohort_ready:
            self._dispatch_cohorts(cohort_ready)
            ready = [s for s in ready if not self._in_cohorts(s)]
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
            task = task_for(self.spec, self.sweep_id, stage, self.artifact_root)
            handle = self.pool.submit(slot, [task], (keys, blobs))
            self.in_flight[handle] = [_Running(stage, slot, attempts[stage.key], now, mono)]
            self.progress.stage_started(stage, slot.node)

    def _dispatch_cohorts(self, ready: list[PlannedStage]) -> None:
        """Measure ready evaluations together: on each free slot, a cohort of the ready
        evaluations it can run -- once ``cohort_size`` of them are ready, or none that is
        not ready yet could join (its parents are all done: nothing waits on a stage that
        may never run) -- with its target's reference in the same call (workers.types.Cohort).
        Later evaluations form later cohorts, each with the reference measured again."""
        size = self.spec.evaluate.cohort_size
        taken: set[str] = set()
        for slot in self.pool.slots:
            if slot.busy_keys:
                continue
            candidates = [s for s in ready if s.key not in taken and compatible(s, slot.node)]
            if not candidates:
                continue
            if len(candidates) < size and self._more_coming(slot):
                continue
            members = self._within_memory(candidates[:size], slot)
            taken.update(s.key for s in members)
            self._submit_cohort(slot, members)

    def _in_cohorts(self, stage: PlannedStage) -> bool:
        """Is *stage* measured in cohorts? Its kind has a cohort runner and the plan a
        reference for its target (a plan built by hand may have none: one at a time)."""
        return get_kind(stage.kind).cohort_runner is not None and (stage.target or "") in self.plan.references

    def _more_coming(self, slot: Slot) -> bool:
        """Could an evaluation *slot* runs still become ready (its parent not done yet)?
        Not one behind an undecided condition: that waits for evaluations, maybe these."""
        return any(self.status[k] == "pending" and k not in self._ready_keys
                   and compatible(self.plan.stage(k), slot.node) and not self._behind_condition(k)
                   for k in self._cohort_keys)

    def _behind_condition(self, key: str) -> bool:
        """Is *key* (or an ancestor) a conditional stage whose evaluations are not all stored?"""
        if not self._evaluations:  # no conditional stage in this sweep: nothing to walk
            return False
        k: str | None = key
        while k is not None:
            if any(self.status[ev] not in _ENDED for ev in self._evaluations.get(k, ())):
                return True
            k = self._parent.get(k)
        return False

    def _within_memory(self, members: list[PlannedStage], slot: Slot) -> list[PlannedStage]:
        """The first of *members* whose models fit the node's memory budget (at least one)."""
        if self._node_memory is None:
            try:
                self._node_memory = {n: f.get("memory_total_bytes") for n, f in self.pool.hardware().items()}
            except Exception:  # noqa: BLE001 - no figure: no memory cap
                self._node_memory = {}
        memory = self._node_memory.get(slot.node.node_id)
        if not memory:
            return members
        budget = COHORT_MEMORY_FRACTION * memory
        out, used = [], self._model_bytes(self.plan.references[members[0].target or ""])
        for st in members:
            used += self._model_bytes(st)
            if out and used > budget:
                break
            out.append(st)
        return out

    def _model_bytes(self, stage: PlannedStage) -> int:
        manifest = read_manifest(self.artifact_root, stage.parent_key) if stage.parent_key else None
        size = max(int(manifest.get("size_bytes", 0)), int(manifest.get("torch_size_bytes", 0))) if manifest else 0
        return COHORT_BYTES_PER_ARTIFACT_BYTE * size

    def _submit_cohort(self, slot: Slot, members: list[PlannedStage]) -> None:
        reference = self.plan.references[members[0].target or ""]
        keys = sorted(s.key for s in members)
        seed = int(hashlib.sha256(f"{self.spec.seed}:{reference.key}:{','.join(keys)}".encode()).hexdigest()[:8], 16)
        cohort = Cohort(id=f"c-{uuid.uuid4().hex[:12]}", seed=seed,
                        reference=task_for(self.spec, self.sweep_id, reference, self.artifact_root),
                        reference_shown=any(s.key == reference.key for s in members))
        ship_keys: list[str] = []
        ship_refs: list[Any] = []
        for st in [reference, *members]:
            for k, ref in zip(*self._shipment(st)):
                if k not in ship_keys:
                    ship_keys.append(k)
                    ship_refs.append(ref)
        for st in members:
            slot.busy_keys.append(st.key)
        attempts = self.store.mark_stages_running(self.sweep_id, [(s.key, slot.node.node_id) for s in members])
        if self.placer is not None:
            for decision in self.placer.cohort_decisions(members, slot, self.pool.slots):
                self.store.record_placement(self.sweep_id, decision)
        now, mono = datetime.now(timezone.utc), time.monotonic()
        tasks = []
        for st in members:
            self._set(st.key, "running")
            tasks.append(dataclasses.replace(task_for(self.spec, self.sweep_id, st, self.artifact_root),
                                             cohort=cohort))
        handle = self.pool.submit(slot, tasks, (tuple(ship_keys), ship_refs))
        self.in_flight[handle] = [_Running(st, slot, attempts[st.key], now, mono) for st in members]
        for st in members:
            self.progress.stage_started(st, slot.node)

    def _shipment(self, stage: PlannedStage) -> tuple[tuple[str, ...], list[Any]]:
        """Artifacts *stage* reads, as the pool's blob tokens, when nodes share no disk."""
        if self.options.transfer != "object-store":
            return (), []
        from workers.artifacts import FILE_PREFIX, file_entry, pack

        # what the stage reads, as its kind declared it at plan time: the parent, other
        # artifacts (a teacher), and spec-named files checked against their spec-time digest
        keys = [k for k in (stage.parent_key,) if k] + list(stage.inputs.artifacts)
        keys += [file_entry(sha, path) for path, sha in stage.inputs.files]
        refs = []
        for k in keys:
            if k not in self._blobs:
                self._blobs[k] = self.pool.put(self._file_bytes(k) if k.startswith(FILE_PREFIX) else pack(self.artifact_root, k))
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
        handles = list(self.in_flight)
        done = self.pool.wait(handles, num_returns=1, timeout_s=WAIT_TICK_S)
        if done and len(done) < len(handles):
            # take the other results that are there too; when short stages are queued, give
            # them a moment to finish so one transaction persists a batch of them
            short = {k for k in self._kind_s if self._short(k)}
            window = BATCH_WINDOW_S if all(r.stage.kind in short for r in self._runs()) else 0
            taken = {c.handle for c in done}
            rest = [h for h in handles if h not in taken]
            done = done + self.pool.wait(rest, num_returns=len(rest), timeout_s=window)
        self._drain_progress(force=bool(done))
        finished: list[tuple[_Running, StageResult]] = []
        lost: list[tuple[_Running, str]] = []
        for completion in done:
            runs = self.in_flight.pop(completion.handle)
            self._slot_done[id(runs[0].slot)] = time.monotonic()
            finished_runs, why = self._unpack(completion, runs)
            finished += finished_runs
            lost += [(run, why) for run in runs[len(finished_runs):]]
        self._check_timeouts(lost)
        if finished:
            self._persist(finished)
        if lost:
            self._handle_lost(lost)

    def _unpack(self, completion: Completion, runs: list[_Running]) -> tuple[list[tuple[_Running, StageResult]], str]:
        """The finished (run, result) pairs of one call, and why the rest were lost."""
        if completion.results is None:
            return [], completion.lost or "its worker was lost"
        got = [(run, self._install(r)) for run, r in zip(runs, completion.results)]
        return got, f"its worker returned {len(completion.results)} result(s) for {len(runs)} stage(s)"

    def _runs(self) -> list[_Running]:
        return [run for runs in self.in_flight.values() for run in runs]

    def _persist(self, finished: list[tuple[_Running, StageResult]]) -> None:
        finished = [(run, dataclasses.replace(r, metrics={**r.metrics, "gate": self._decisions[r.key]}))
                    if r.key in self._decisions else (run, r) for run, r in finished]
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
        limit = self.options.stage_timeout_s
        now = time.monotonic()
        # a worker runs its queue in order, one call at a time: only the oldest call
        # dispatched to a slot is running, since the later of its dispatch and the end of
        # the slot's previous call; the clock of the calls queued behind it has not started
        running: dict[int, tuple[Hashable, list[_Running]]] = {}
        for handle, runs in self.in_flight.items():
            head = running.get(id(runs[0].slot))
            if head is None or runs[0].started_mono < head[1][0].started_mono:
                running[id(runs[0].slot)] = (handle, runs)
        for handle, runs in running.values():
            slot = runs[0].slot
            began = max(runs[0].started_mono, self._slot_done.get(id(slot), 0.0))
            if now - began > limit:
                self.pool.kill(slot)  # its other queued calls come back as lost
                self.in_flight.pop(handle)
                lost += [(run, f"the attempt ran past the stage timeout of {limit:g}s and was killed") for run in runs]

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
            # every other stage queued on that worker is lost with it
            for handle, others in list(self.in_flight.items()):
                if others[0].slot is slot:
                    self.in_flight.pop(handle)
                    lost += [(other, "its worker died while it was queued") for other in others]
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
        the stage's run, fetched on a helper thread (an HTTP provider may retry for
        seconds) and recorded by :meth:`_record_carbon` on a later tick."""
        if self.carbon is None:
            return
        if self._carbon_pool is None:
            self._carbon_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="greensweep-carbon")
        job = self._carbon_pool.submit(self.carbon.intensity, node.region or "", start, end)
        self._carbon_jobs.append((stage, job))

    def _record_carbon(self, wait_s: float = 0.0) -> None:
        """Store the carbon figures that arrived (waiting up to *wait_s* for the rest).
        A provider failure loses the carbon figure, not the result, and says so."""
        if not self._carbon_jobs:
            return
        from orchestrator.carbon import CarbonDataError, CarbonProviderError
        from orchestrator.errors import first_line

        if wait_s > 0:
            wait_futures([job for _, job in self._carbon_jobs], timeout=wait_s)
        pending = []
        for stage, job in self._carbon_jobs:
            if not job.done():
                pending.append((stage, job))
                continue
            try:
                figure = job.result()
            except (CarbonDataError, CarbonProviderError) as e:
                self.progress.warning(f"no carbon figure for {stage.label} ({stage.key[:12]}): {e}")
            except Exception as e:  # noqa: BLE001 - a provider bug loses the figure, never the sweep
                self.progress.warning(f"no carbon figure for {stage.label} ({stage.key[:12]}): {first_line(e)}")
            else:
                self.store.record_carbon(self.sweep_id, stage.key, figure)
        self._carbon_jobs = pending

    def _finish_carbon(self) -> None:
        """At the end of a run: the figures still coming get :data:`CARBON_FINISH_S`;
        those that do not arrive are named, not silently missing."""
        self._record_carbon(wait_s=CARBON_FINISH_S)
        for stage, _ in self._carbon_jobs:
            self.progress.warning(f"no carbon figure for {stage.label} ({stage.key[:12]}): the intensity provider "
                                  f"did not answer within {CARBON_FINISH_S:.0f} s")
        self._carbon_jobs = []
        if self._carbon_pool is not None:
            self._carbon_pool.shutdown(wait=False, cancel_futures=True)
            self._carbon_pool = None

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
        for run in self._runs():
            self.pool.kill(run.slot)
            self.store.end_attempt(self.sweep_id, run.stage.key, "cancelled", "sweep cancelled",
                                   back_to_pending=True)
            self._set(run.stage.key, "pending")
        self.in_flight.clear()
        self.cancelled = True

    def _drain_progress(self, *, force: bool = False) -> None:
        """Persist what running stages reported (e.g. epochs), every PROGRESS_POLL_S."""
        now = time.monotonic()
        if not force and now - self._last_progress_poll < PROGRESS_POLL_S:
            return
        self._last_progress_poll = now
        busy = [s for s in self.pool.slots if s.busy_keys]
        if not busy or not any(get_kind(self.plan.stage(k).kind).produces_artifact
                               for s in busy for k in s.busy_keys):
            return
        by_key: dict[str, list[dict[str, Any]]] = {}
        for key, entry in self.pool.progress(busy):
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
            if s.target is None and self.pool.slots:  # live nodes lack what it needs (a precision): say why
                gone += f" ({'; '.join(sorted({str(unmet(s, sl.node)) for sl in self.pool.slots}))})"
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
        finally:
            self._finish_carbon()
        if self.cancelled:
            self.store.release_sweep(self.sweep_id, "cancelled")
            return SweepOutcome(self.sweep_id, "cancelled", self._counts(), time.perf_counter() - start)
        counts = self._counts()
        measured = [s.key for s in self.plan.stages if not get_kind(s.kind).produces_artifact]  # evaluations
        ok_evals = sum(1 for k in measured if self.status[k] == "succeeded")
        # a stage its condition said is not needed (and what follows it) is the answer, not a failure
        if counts.get("failed", 0) == 0 and counts.get("skipped", 0) == len(self._not_needed):
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
