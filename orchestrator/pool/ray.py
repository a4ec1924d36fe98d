"""The Ray worker pool: one :class:`workers.actor.StageWorker` actor per live node.

Each actor is pinned to its node (``NodeAffinitySchedulingStrategy(node_id, soft=False)``)
and runs stages one at a time (Ray's default concurrency group has one thread);
``describe`` and ``progress`` answer from a separate ``control`` group while a stage
runs. Artifacts travel as object-store blobs when nodes share no disk. Ray's errors
stop here: a dead actor is a lost :class:`~orchestrator.pool.Completion`, a worker
that does not start a :class:`~orchestrator.errors.ClusterError`.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

from orchestrator.cluster import NodeInfo
from orchestrator.pool import Completion, Shipment, SlotBook
from orchestrator.scheduler import Slot
from workers.types import StageResult, StageTask
from workers.util import first_line

PROGRESS_TIMEOUT_S = 30.0  # a worker that does not report its progress by then is skipped this time
ACTOR_START_TIMEOUT_S = 180.0  # a worker actor that does not answer by then is reported
RESTART_TIMEOUT_S = 60.0  # a replacement worker that does not answer by then: its node is gone


def _one_line(e: BaseException, limit: int = 200) -> str:
    return first_line(e, limit=limit)


class RayWorkerPool(SlotBook):
    """:class:`~orchestrator.pool.WorkerPool` on Ray.

    With *cache_dir* (artifact transfer ``object-store``: nodes share no disk) each worker
    keeps artifacts under its own ``<cache_dir>/<node id>`` on its node. A slot whose actor
    died is replaced by :meth:`restart` while its node lives, and dropped by :meth:`drop`
    when its node left the cluster.
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
                                   f"{_one_line(e)}") from None
        return out

    def submit(self, slot: Slot, tasks: Sequence[StageTask], shipment: Shipment = ((), ())) -> Hashable:
        """One actor call: ``run`` for one task (what the worker has always run), ``run_many``
        for a cohort; the shipment's blobs are top-level arguments, so Ray resolves them."""
        if not tasks:
            raise ValueError("submit needs at least one task")
        keys, blobs = shipment
        if len(tasks) == 1:
            return slot.handle.run.remote(tasks[0], tuple(keys), *blobs)
        return slot.handle.run_many.remote(list(tasks), tuple(keys), *blobs)

    def wait(self, handles: Sequence[Hashable], *, num_returns: int = 1, timeout_s: float) -> list[Completion]:
        import ray

        refs = list(handles)
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=min(max(1, num_returns), len(refs)), timeout=timeout_s)
        out = []
        for ref in ready:
            try:
                value = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                out.append(Completion(ref, None, _one_line(e)))
                continue
            except ray.exceptions.RayError as e:  # e.g. the task's result could not be fetched
                out.append(Completion(ref, None, f"{e.__class__.__name__}: {_one_line(e)}"))
                continue
            results = (value,) if isinstance(value, StageResult) else tuple(value)
            out.append(Completion(ref, results))
        return out

    def kill(self, slot: Slot) -> None:
        import ray

        try:
            ray.kill(slot.handle)
        except Exception:  # noqa: BLE001 - already dead
            pass

    def restart(self, slot: Slot, timeout_s: float = RESTART_TIMEOUT_S) -> bool:
        """Replace the slot's dead worker by a new one on the same node; True once the new
        worker answers. False when it cannot start there within *timeout_s* (the node is
        going away: Ray may still list it as alive for several seconds after it died)."""
        import ray

        self.kill(slot)
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

    def alive_node_ids(self) -> set[str]:
        import ray

        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}

    def progress(self, slots: Sequence[Slot], timeout_s: float = PROGRESS_TIMEOUT_S) -> list[tuple[str, dict[str, Any]]]:
        import ray

        refs = [s.handle.progress.options(concurrency_group="control").remote() for s in slots]
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out: list[tuple[str, dict[str, Any]]] = []
        for ref in ready:
            try:
                out.extend(ray.get(ref))
            except ray.exceptions.RayError:
                continue  # a dead worker is handled where its stage result is collected
        return out

    def put(self, blob: bytes) -> Any:
        import ray

        return ray.put(blob)

    def shutdown(self) -> None:
        for s in self.slots:
            self.kill(s)
