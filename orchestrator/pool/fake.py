"""An in-process worker pool with scripted behaviour, for the coordinator's unit tests.

It keeps the contract of :class:`orchestrator.pool.WorkerPool` -- a slot's worker runs
its calls in submission order, one at a time; a worker that dies loses every call
queued on it; a dropped node never comes back -- without Ray, threads or processes,
so a test drives a whole sweep in milliseconds. What a stage does is scripted::

    def script(task, node, attempt):          # attempt: 1 on the first start of task.key
        if task.params.get("index") == 2 and attempt == 1:
            return Die("killed by the OOM killer")
        return None                           # None: succeed at once

    pool = FakeWorkerPool(nodes, script)

Steps: :class:`Succeed` (the default), :class:`Fail` (the stage raised), :class:`Die`
(the worker is lost), :class:`LeaveNode` (the node disappears with its worker),
:class:`Block` (runs until :meth:`FakeWorkerPool.release` is called for its key),
:class:`Execute` (runs the stage's real runner in-process). A
step runs when its call reaches the head of its slot's queue, at the next
:meth:`~FakeWorkerPool.wait`. ``calls`` logs every submission: (node id, stage keys);
``depths`` how many calls its worker held right after it; ``started`` each stage start.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Mapping, Sequence

from orchestrator.cluster import NodeInfo
from orchestrator.pool import Completion, Shipment, SlotBook
from orchestrator.scheduler import Slot
from workers.types import StageResult, StageTask


@dataclass(frozen=True)
class Succeed:
    metrics: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0
    progress: tuple[dict[str, Any], ...] = ()  # reports the stage makes while it runs


@dataclass(frozen=True)
class Fail:
    error: str = "RuntimeError: scripted failure"


@dataclass(frozen=True)
class Die:
    reason: str = "The actor died unexpectedly before finishing this task (scripted)"


@dataclass(frozen=True)
class LeaveNode:
    """The stage's node leaves the cluster while the stage runs: its worker is lost,
    the node is no longer alive and no worker restarts there."""


@dataclass(frozen=True)
class Block:
    """The stage runs until the test calls ``pool.release(key)``, then succeeds with
    *then* (a kill or the node leaving ends it first)."""

    then: Succeed | Fail = Succeed()


@dataclass(frozen=True)
class Execute:
    """Run the stage for real, in this process, on a :class:`workers.actor.StageWorker`
    of the slot's node: its registered runner, its artifacts under the task's artifact
    root, its progress reports."""


Step = Succeed | Fail | Die | LeaveNode | Block | Execute
Script = Callable[[StageTask, NodeInfo, int], "Step | None"]


@dataclass
class _Call:
    handle: int
    slot: Slot
    tasks: list[StageTask]
    shipment: Shipment
    generation: int
    results: list[StageResult] = field(default_factory=list)
    blocked_on: str | None = None  # the key of the stage waiting for release
    then: Succeed | Fail | None = None


class FakeWorkerPool(SlotBook):
    """:class:`~orchestrator.pool.WorkerPool` whose stages run in the calling thread.

    *script* (default: every stage succeeds at once) decides each stage's step when it
    starts. *restart_ok* False makes every restart fail, as on a node that is going away.
    *facts* adds hardware facts per node id to what :meth:`hardware` says (e.g. a node's
    ``precisions``, as ``workers.hardware.runtime_precisions`` reads them on a real one).
    """

    def __init__(self, nodes: Sequence[NodeInfo], script: Script | None = None, *, restart_ok: bool = True,
                 facts: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.slots: list[Slot] = [Slot(node=n, handle=0) for n in nodes]  # handle: the worker's generation
        self.lost_nodes: list[NodeInfo] = []
        self.script: Script = script or (lambda task, node, attempt: None)
        self.restart_ok = restart_ok
        self.facts = dict(facts or {})
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.started: list[tuple[str, str]] = []  # (node id, stage key) as each stage starts
        self.depths: list[int] = []  # calls on the slot's worker right after each submission
        self.attempts: dict[str, int] = {}
        self.kills = 0
        self.restarts = 0
        self.blobs: list[bytes] = []
        self._alive = {n.node_id for n in nodes}
        self._queues: dict[int, list[_Call]] = {id(s): [] for s in self.slots}
        self._done: dict[int, Completion] = {}
        self._released: set[str] = set()
        self._reports: dict[int, list[tuple[str, dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._workers: dict[int, Any] = {}  # id(slot) -> StageWorker, for Execute steps

    # -- what a test does ---------------------------------------------------------------

    def release(self, key: str) -> None:
        """Let the blocked stage *key* finish (now, or as soon as it starts)."""
        with self._cond:
            self._released.add(key)
            self._cond.notify_all()

    def remove_node(self, node_id: str) -> None:
        """The node leaves the cluster: its worker's calls are lost, restarts there fail."""
        with self._cond:
            self._alive.discard(node_id)
            for slot in self.slots:
                if slot.node.node_id == node_id:
                    self._lose_all(slot, f"node {node_id[:12]} is gone")
            self._cond.notify_all()

    def queued(self, slot: Slot) -> int:
        """Calls waiting or running on *slot*'s worker now."""
        return len(self._queues.get(id(slot), ()))

    # -- the protocol ---------------------------------------------------------------------

    def hardware(self) -> dict[str, dict[str, Any]]:
        return {s.node.node_id: {"hostname": f"fake-{s.node.node_id[:8]}", "cpu_model": "fake CPU",
                                 "gpus": [], "num_cpus": s.node.num_cpus, **self.facts.get(s.node.node_id, {})}
                for s in self.slots}

    def submit(self, slot: Slot, tasks: Sequence[StageTask], shipment: Shipment = ((), ())) -> Hashable:
        if not tasks:
            raise ValueError("submit needs at least one task")
        with self._cond:
            call = _Call(next(self._ids), slot, list(tasks), shipment, slot.handle)
            self.calls.append((slot.node.node_id, tuple(t.key for t in tasks)))
            if slot not in self.slots or slot.node.node_id not in self._alive:
                self._done[call.handle] = Completion(call.handle, None, "the actor is dead (its node is gone)")
            else:
                self._queues[id(slot)].append(call)
            self.depths.append(self.queued(slot))
            return call.handle

    def wait(self, handles: Sequence[Hashable], *, num_returns: int = 1, timeout_s: float) -> list[Completion]:
        wanted = list(handles)
        if not wanted:
            return []
        need = min(max(1, num_returns), len(wanted))
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                self._advance()
                ready = [h for h in wanted if h in self._done]
                left = deadline - time.monotonic()
                if len(ready) >= need or left <= 0:
                    return [self._done.pop(h) for h in ready]
                self._cond.wait(left)

    def kill(self, slot: Slot) -> None:
        with self._cond:
            self.kills += 1
            self._lose_all(slot, "The actor was killed (ray.kill)")

    def restart(self, slot: Slot) -> bool:
        with self._cond:
            self._lose_all(slot, "The actor was replaced")
            slot.busy_keys.clear()
            if not self.restart_ok or slot.node.node_id not in self._alive:
                return False
            self.restarts += 1
            slot.handle += 1
            return True

    def alive_node_ids(self) -> set[str]:
        return set(self._alive)

    def progress(self, slots: Sequence[Slot]) -> list[tuple[str, dict[str, Any]]]:
        with self._cond:
            out: list[tuple[str, dict[str, Any]]] = []
            for s in slots:
                out.extend(self._reports.pop(id(s), []))
            return out

    def put(self, blob: bytes) -> Any:
        self.blobs.append(blob)
        return blob

    def shutdown(self) -> None:
        with self._cond:
            for s in list(self.slots):
                self._lose_all(s, "the pool shut down")

    # -- the workers -----------------------------------------------------------------------

    def _lose_all(self, slot: Slot, reason: str) -> None:
        queue = self._queues.setdefault(id(slot), [])
        for call in queue:
            self._done[call.handle] = Completion(call.handle, None, reason)
        queue.clear()  # in place: _advance may be walking it

    def _advance(self) -> None:
        """Run every slot's queue as far as it goes: head calls run their stages until
        one blocks, dies or ends; a finished call completes and the next one starts."""
        for slot in list(self.slots):
            queue = self._queues[id(slot)]
            while queue:
                call = queue[0]
                if not self._run_call(call):
                    break  # blocked
                if queue and queue[0] is call:
                    queue.pop(0)
                    self._done[call.handle] = Completion(call.handle, tuple(call.results))

    def _run_call(self, call: _Call) -> bool:
        """Advance *call*; False while a stage of it is blocked. A worker death empties
        the slot's queue (the call completes as lost) and counts as advanced."""
        if call.blocked_on is not None:
            if call.blocked_on not in self._released:
                return False
            self._released.discard(call.blocked_on)
            call.results.append(self._finish(call, call.tasks[len(call.results)], call.then or Succeed()))
            call.blocked_on = call.then = None
        node = call.slot.node
        while len(call.results) < len(call.tasks):
            task = call.tasks[len(call.results)]
            attempt = self.attempts[task.key] = self.attempts.get(task.key, 0) + 1
            self.started.append((node.node_id, task.key))
            step = self.script(task, node, attempt) or Succeed()
            if isinstance(step, Die):
                self._lose_all(call.slot, step.reason)
                return True
            if isinstance(step, LeaveNode):
                self._alive.discard(node.node_id)
                self._lose_all(call.slot, f"node {node.node_id[:12]} left the cluster (scripted)")
                return True
            if isinstance(step, Execute):
                call.results.append(self._execute(call.slot, task))
                continue
            if isinstance(step, Block):
                if task.key in self._released:
                    self._released.discard(task.key)
                    step = step.then
                else:
                    call.blocked_on, call.then = task.key, step.then
                    return False
            call.results.append(self._finish(call, task, step))
        return True

    def _execute(self, slot: Slot, task: StageTask) -> StageResult:
        from workers.actor import StageWorker  # torch: only for tests that execute stages

        worker = self._workers.get(id(slot))
        if worker is None:
            worker = self._workers[id(slot)] = StageWorker(slot.node.node_id, {}, num_threads=max(1, slot.node.num_cpus))
        result = worker.run(task)
        self._reports.setdefault(id(slot), []).extend(worker.progress())
        return result

    def _finish(self, call: _Call, task: StageTask, step: Succeed | Fail) -> StageResult:
        node_id = call.slot.node.node_id
        if isinstance(step, Fail):
            return StageResult(key=task.key, kind=task.kind, status="failed", duration_s=0.0, node_id=node_id,
                               error=step.error, traceback="(scripted)")
        if step.progress:
            self._reports.setdefault(id(call.slot), []).extend((task.key, dict(r)) for r in step.progress)
        metrics = step.metrics or {"index": int(task.params.get("index", 0))}
        return StageResult(key=task.key, kind=task.kind, status="succeeded", duration_s=step.duration_s,
                           node_id=node_id, metrics=dict(metrics))
