"""Energy meters: the :class:`Meter` contract and the factory a stage asks for one.

Stages call :func:`make_meter` and never name a backend, so new sensors plug in here
without touching any stage. Backends are siblings named after their technology:
``nvml.py`` (NVIDIA GPUs), ``rapl.py`` (CPU packages and DRAM from powercap sysfs),
``estimate.py`` (a labelled TDP estimate where no CPU sensor exists).
"""

from __future__ import annotations

from workers.meters.base import (
    DOMAINS,
    Domain,
    EnergyMeter,
    Meter,
    MeterError,
    NullMeter,
    Sensor,
    SensorUnavailable,
    Skip,
)
from workers.meters.factory import make_meter

__all__ = [
    "DOMAINS",
    "Domain",
    "EnergyMeter",
    "Meter",
    "MeterError",
    "NullMeter",
    "Sensor",
    "SensorUnavailable",
    "Skip",
    "make_meter",
]
