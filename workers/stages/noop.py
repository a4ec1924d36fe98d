"""The ``noop`` stage: returns at once, with no artifact and no measurement.

It exists to measure the machinery rather than the work: a sweep of noop stages costs
exactly what dispatching, running on a worker actor, collecting and persisting a stage
costs (``benchmarks/overhead.py``). The kind is hidden: a sweep spec cannot name it.
"""

from __future__ import annotations

import time

from workers.types import StageOutput, StageTask, WorkerEnv


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Do nothing (for ``sleep_s``, default 0); the metrics echo the stage's index so a
    persisted row is traceable."""
    time.sleep(float(task.params.get("sleep_s", 0.0)))
    return StageOutput(metrics={"index": int(task.params.get("index", 0))})
