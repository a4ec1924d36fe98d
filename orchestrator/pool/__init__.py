"""The worker pool: where the coordinator's stages run.

The coordinator decides and persists; a :class:`WorkerPool` only runs what it is given
and says what came back. Keeping Ray behind this small protocol (Ray Tune's
controller / executor split) lets the coordinator's dispatch, retry, node-loss, cancel,
timeout and carbon-hold logic be unit-tested in seconds against an in-process fake.

Implementations (siblings named after the technology):

- :class:`orchestrator.pool.ray.RayWorkerPool`: one ``StageWorker`` actor per node slot,
  pinned with ``NodeAffinitySchedulingStrategy`` (what real sweeps use);
- :class:`orchestrator.pool.fake.FakeWorkerPool`: runs scripted stages in-process, for tests.

Contract of one call: :meth:`WorkerPool.submit` sends a *list* of tasks to one slot's
worker, which runs them one at a time, in order, and returns one
:class:`~workers.types.StageResult` per task together (the cohort seam: a later change
measures models in cohorts, one call per cohort). A slot's worker runs its calls in
submission order, one at a time. When the worker dies (killed, OOM, its node leaving)
every call queued on it completes as *lost* with a one-line reason; the pool never
writes to the store and never retries: the coordinator decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Mapping, Protocol, Sequence

from orchestrator.cluster import NodeInfo
from orchestrator.scheduler import Slot
from workers.types import StageResult, StageTask

# (artifact/file keys a call's stages read, the blobs of those keys as returned by
# WorkerPool.put), in the same order; empty when every node reads the shared root
Shipment = tuple[tuple[str, ...], Sequence[Any]]


@dataclass(frozen=True)
class Completion:
    """What one submitted call came back with: ``results`` (one per task, in submission
    order) or, when its worker was lost, ``results`` None and ``lost`` the reason."""

    handle: Hashable
    results: tuple[StageResult, ...] | None
    lost: str | None = None


class SlotBook:
    """The slot bookkeeping every pool shares: the live ``slots`` and the ``lost_nodes``
    whose slot :meth:`drop` removed."""

    slots: list[Slot]
    lost_nodes: list[NodeInfo]

    def drop(self, slot: Slot) -> None:
        """Remove *slot* (its node left the cluster); its node joins ``lost_nodes``."""
        if slot in self.slots:
            self.slots.remove(slot)
            self.lost_nodes.append(slot.node)

    def learn(self, facts: Mapping[str, Mapping[str, Any]]) -> None:
        """Give each slot's node what its own hardware *facts* (:meth:`WorkerPool.hardware`)
        say it runs, so placement never chooses a node that cannot run a stage."""
        from orchestrator.cluster import with_facts

        for slot in self.slots:
            slot.node = with_facts(slot.node, facts.get(slot.node.node_id))


class WorkerPool(Protocol):
    """Runs stage tasks on node slots; see the module docstring for the contract.

    ``slots`` are the live slots in a stable order (the scheduler's order); a slot's
    ``busy_keys`` are kept by the coordinator, except that :meth:`restart` clears them.
    ``lost_nodes`` are the nodes whose slot was dropped because the node left.
    """

    slots: list[Slot]
    lost_nodes: list[NodeInfo]

    def hardware(self) -> dict[str, dict[str, Any]]:
        """Hardware facts read on each slot's node, by node id. A worker that does not
        start raises :class:`~orchestrator.errors.ClusterError` naming its node."""
        ...

    def submit(self, slot: Slot, tasks: Sequence[StageTask], shipment: Shipment = ((), ())) -> Hashable:
        """Queue one call running *tasks* (at least one) on *slot*'s worker; a handle."""
        ...

    def wait(self, handles: Sequence[Hashable], *, num_returns: int = 1, timeout_s: float) -> list[Completion]:
        """Completions of *handles* that are ready: returns once *num_returns* are (or
        all, if fewer are given), or after *timeout_s* with what is ready then. Each
        handle completes once; a completed handle must not be waited on again."""
        ...

    def kill(self, slot: Slot) -> None:
        """Kill *slot*'s worker: every call queued on it completes as lost."""
        ...

    def restart(self, slot: Slot) -> bool:
        """Replace *slot*'s dead worker by a new one on the same node; False when it
        cannot start there (the node is leaving)."""
        ...

    def drop(self, slot: Slot) -> None:
        """Remove *slot* (its node left the cluster); its node joins ``lost_nodes``."""
        ...

    def alive_node_ids(self) -> set[str]:
        """Ids of the nodes the cluster still lists as alive."""
        ...

    def progress(self, slots: Sequence[Slot]) -> list[tuple[str, dict[str, Any]]]:
        """(stage key, report) pairs the stages running on *slots* reported since the
        last call, oldest first per slot; a worker that does not answer is skipped."""
        ...

    def put(self, blob: bytes) -> Any:
        """Hand *blob* (a packed artifact or file) to the pool once; the returned token
        goes into a :data:`Shipment` as often as needed."""
        ...

    def shutdown(self) -> None:
        """Stop every worker (dead ones are already gone)."""
        ...


__all__ = ["Completion", "Shipment", "WorkerPool"]
