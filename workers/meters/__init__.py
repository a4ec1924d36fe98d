"""Energy meters: the :class:`Meter` contract and the factory a stage asks for one.

Stages call :func:`make_meter` and never name a backend, so new sensors plug in here
without touching any stage.
"""

from __future__ import annotations

from workers.meters.base import Meter, NullMeter

__all__ = ["Meter", "NullMeter", "make_meter"]


def make_meter(device: str) -> Meter:
    """Return the best meter for a window of work on torch ``device`` (``"cpu"``, ``"cuda:0"``).

    Today every device gets a :class:`NullMeter` (time only, energy ``None`` with source
    ``"none"``). The real backends plug in here, probed in a documented order with the
    null meter as the last resort: NVML counters/power for CUDA devices, RAPL for CPU and
    DRAM, and a clearly labelled TDP estimate where no sensor exists.
    """
    return NullMeter(device)
