"""The ``noop`` stage: returns at once, with no artifact and no measurement.

It exists to measure the machinery rather than the work: a sweep of noop stages costs
exactly what dispatching, running on a worker actor, collecting and persisting a stage
costs (``benchmarks/overhead.py``). The kind is hidden: a sweep spec cannot name it.

It is also how tests of the machinery (timeouts, kills, cancels) get a stage that is
*certainly* still running when they act: with ``hold_file`` set, the stage waits while
that file exists, so the test decides when it ends instead of guessing from a sleep.
:func:`hold_while` is the same wait for the real training loop, which honours it only
when a test sets ``GREENSWEEP_TEST_HOLD_DIR`` (see :func:`hold_for_test`); users never
set it and then nothing waits.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from workers.types import StageOutput, StageTask, WorkerEnv

# A directory; while ``<dir>/<stage kind>`` exists, a training stage of that kind waits
# after each checkpointed (and reported) epoch. For tests only: unset, nothing waits.
HOLD_DIR_ENV = "GREENSWEEP_TEST_HOLD_DIR"
HOLD_POLL_S = 0.05
HOLD_TIMEOUT_S = 900.0  # a failure bound for a test that never releases, not a timing


class HoldTimeout(RuntimeError):
    """A held stage was not released within its bound (the test that held it is gone)."""


def hold_while(path: Path, timeout_s: float = HOLD_TIMEOUT_S) -> float:
    """Wait while *path* exists; return the seconds waited (0.0 when it did not exist).

    Raises :class:`HoldTimeout` after *timeout_s*, so a stage held by a test that died
    fails with a line naming the file instead of hanging its worker forever."""
    start = time.monotonic()
    while path.exists():
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise HoldTimeout(f"held by {path} for more than {timeout_s:g}s -- delete the file to release it")
        time.sleep(HOLD_POLL_S)
    return time.monotonic() - start


def hold_for_test(kind: str) -> None:
    """The training loop's test hook: wait while ``$GREENSWEEP_TEST_HOLD_DIR/<kind>``
    exists. A no-op (one environment lookup) when the variable is unset."""
    hold_dir = os.environ.get(HOLD_DIR_ENV)
    if hold_dir:
        hold_while(Path(hold_dir) / kind)


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Wait while ``hold_file`` exists (bounded by ``hold_timeout_s``), then do nothing
    for ``sleep_s`` (default 0); the metrics echo the stage's index so a persisted row is
    traceable."""
    hold_file = task.params.get("hold_file")
    held_s = 0.0
    if hold_file:
        held_s = hold_while(Path(hold_file), float(task.params.get("hold_timeout_s", HOLD_TIMEOUT_S)))
    time.sleep(float(task.params.get("sleep_s", 0.0)))
    metrics: dict[str, float | int] = {"index": int(task.params.get("index", 0))}
    if hold_file:
        metrics["held_s"] = held_s
    return StageOutput(metrics=metrics)
