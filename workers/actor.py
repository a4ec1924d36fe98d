"""StageWorker: the Ray actor that runs stages on one node slot.

One actor per node slot runs one stage at a time, so an ``evaluate`` stage never shares
its node's cores with another stage (timings would lie otherwise). The actor never
writes to the store: it returns a :class:`~workers.types.StageResult` and the
coordinator persists it. Any exception inside a stage becomes a ``failed`` result with a
one-line error and the traceback; the actor itself stays alive for the next stage.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import traceback
from typing import Any, Mapping

from workers.types import StageResult, StageTask, WorkerEnv


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


class StageWorker:
    """Runs stage runners registered in :mod:`workers.stages.registry`.

    Created by the coordinator with ``ray.remote(StageWorker).options(...)``, pinned to
    its node with ``NodeAffinitySchedulingStrategy(node_id, soft=False)``, and with
    ``max_concurrency=2`` so :meth:`progress` answers while :meth:`run` works: a stage
    reports progress (e.g. one dict per training epoch) through
    ``env.report_progress``; the coordinator drains it with :meth:`progress` and
    persists it.
    """

    def __init__(self, node_id: str, labels: Mapping[str, str], num_threads: int, device: str = "cpu",
                 cache_root: str | None = None) -> None:
        """*cache_root*: when set, nodes share no disk with the coordinator: stages read
        and write artifacts under this node-local directory, parents arrive as packed
        bytes through the object store and results carry their artifact back."""
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.env = WorkerEnv(device=device, num_threads=max(1, num_threads), node_id=node_id, labels=dict(labels))
        self._hardware: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._progress: list[tuple[str, dict[str, Any]]] = []
        self.cache_root = cache_root

    def describe(self) -> dict[str, Any]:
        """Hardware facts of this node, read on the node itself."""
        if self._hardware is None:
            from workers.hardware import describe_node, runtime_precisions

            self._hardware = {**describe_node(), "precisions": runtime_precisions(self.env.device),
                              "pid": os.getpid()}
        return self._hardware

    def progress(self) -> list[tuple[str, dict[str, Any]]]:
        """(stage key, report) pairs reported since the last call, oldest first."""
        with self._lock:
            out, self._progress = self._progress, []
        return out

    def run(self, task: StageTask, ship_keys: tuple[str, ...] = (), *blobs: bytes) -> StageResult:
        """Run one stage. *ship_keys* / *blobs*: artifacts the stage reads, packed by the
        coordinator (no shared disk); they are installed under the node's cache first."""
        return self.run_many([task], ship_keys, *blobs)[0]

    def run_many(self, tasks: list[StageTask], ship_keys: tuple[str, ...] = (), *blobs: bytes) -> list[StageResult]:
        """Run several stages in this one call, one result per task: in order, one at a
        time -- or, when they carry a :class:`~workers.types.Cohort`, measured together by
        their kind's cohort runner. The shipped artifacts and files (*ship_keys* / *blobs*,
        for all of them) are installed once, first."""
        if self.cache_root is None:
            return self._run_all(tasks)
        from workers.artifacts import FILE_PREFIX, install_file, pack, unpack

        tasks = [_with_root(task, self.cache_root) for task in tasks]
        try:
            for key, blob in zip(ship_keys, blobs):
                if key.startswith(FILE_PREFIX):
                    local = install_file(self.cache_root, key, blob)
                    tasks = [_with_local_file(task, key, local) for task in tasks]
                else:
                    unpack(self.cache_root, key, blob)
        except Exception as e:  # noqa: BLE001 - reported as the stages' failure
            return [StageResult(key=task.key, kind=task.kind, status="failed", duration_s=0.0,
                                node_id=self.env.node_id, error=f"receiving its input artifact: {one_line(e)}",
                                traceback=traceback.format_exc()) for task in tasks]
        results = []
        for task, result in zip(tasks, self._run_all(tasks)):
            if result.status == "succeeded" and result.artifact is not None:
                result = dataclasses.replace(result, artifact_blob=pack(self.cache_root, task.key))
            results.append(result)
        return results

    def _run_all(self, tasks: list[StageTask]) -> list[StageResult]:
        if tasks and tasks[0].cohort is not None:
            return self._run_cohort(tasks)
        return [self._run(task) for task in tasks]

    def _run_cohort(self, tasks: list[StageTask]) -> list[StageResult]:
        """The cohort measured in one runner call; each stage's duration is its share of it."""
        from workers.stages.registry import get_kind

        start = time.perf_counter()
        try:
            outs: list[Any] = list(get_kind(tasks[0].kind).load_cohort_runner()(tasks, self.env))
        except Exception as e:  # noqa: BLE001 - the whole cohort failed: every stage reports it
            outs = [e] * len(tasks)
        share = (time.perf_counter() - start) / len(tasks)
        return [self._result(task, out, share) for task, out in zip(tasks, outs)]

    def _run(self, task: StageTask) -> StageResult:
        from workers.stages.registry import get_kind

        def report(entry: Mapping[str, Any]) -> None:
            with self._lock:
                self._progress.append((task.key, dict(entry)))

        start = time.perf_counter()
        try:
            runner = get_kind(task.kind).load_runner()
            out: Any = runner(task, dataclasses.replace(self.env, report_progress=report))
        except Exception as e:  # noqa: BLE001 - every stage error is reported, not raised
            out = e
        return self._result(task, out, time.perf_counter() - start)

    def _result(self, task: StageTask, out: Any, duration_s: float) -> StageResult:
        """A runner's output (a StageOutput, or the exception that stopped it) as a result."""
        if isinstance(out, BaseException):
            return StageResult(
                key=task.key,
                kind=task.kind,
                status="failed",
                duration_s=duration_s,
                node_id=self.env.node_id,
                error=one_line(out),
                traceback="".join(traceback.format_exception(out)),
            )
        return StageResult(
            key=task.key,
            kind=task.kind,
            status="succeeded",
            duration_s=duration_s,
            node_id=self.env.node_id,
            metrics=dict(out.metrics),
            artifact=out.artifact,
            repeats=tuple(out.repeats),
            energy=out.energy,
        )


def _with_root(task: StageTask, root: str) -> StageTask:
    """*task* (and its cohort's reference) reading and writing under *root*."""
    task = dataclasses.replace(task, artifact_root=root)
    if task.cohort is not None:
        reference = dataclasses.replace(task.cohort.reference, artifact_root=root)
        task = dataclasses.replace(task, cohort=dataclasses.replace(task.cohort, reference=reference))
    return task


def _with_local_file(task: StageTask, entry: str, local: Any) -> StageTask:
    """*task* (and its cohort's reference) reading the node-local copy *local* wherever it
    named the shipped file."""
    from workers.artifacts import parse_file_entry
    from workers.stages.registry import get_kind

    _, path = parse_file_entry(entry)
    if task.model.checkpoint == path:
        task = dataclasses.replace(task, model=dataclasses.replace(task.model, checkpoint=str(local)))
    task = dataclasses.replace(task, params=get_kind(task.kind).localize(task.params, path, str(local)))
    if task.cohort is not None:
        reference = _with_local_file(task.cohort.reference, entry, local)
        task = dataclasses.replace(task, cohort=dataclasses.replace(task.cohort, reference=reference))
    return task
