"""CPU energy *estimated* from a TDP figure and this process's CPU utilisation.

Where no CPU sensor exists (VMs, containers, CPUs without RAPL) the ``cpu`` domain falls
back to this model, labelled ``estimate-tdp`` so nobody mistakes it for a measurement.
There is no DRAM model: DRAM stays unknown (``None``) rather than guessed.

The model, for a window of ``duration_s`` seconds::

    utilisation = clamp(cpu_time_s / (duration_s * cpus), 0, 1)
    energy_j    = duration_s * cpus * watts_per_cpu
                  * (IDLE_FRACTION + (1 - IDLE_FRACTION) * utilisation)

* ``cpu_time_s``: CPU time this process used in the window -- ``time.process_time()``
  (user + system time of every thread, so torch's intra-op threads count) plus the
  CPU time of child processes that ended and were waited for in the window
  (``resource.getrusage(RUSAGE_CHILDREN)``).
* ``cpus``: logical CPUs available to the process -- its affinity mask
  (``os.sched_getaffinity``), lowered to the cgroup v2 quota (``cpu.max``) when a
  container sets one.
* ``watts_per_cpu``: full-load power of one logical CPU. In order: the ``cpu_tdp_w``
  given by the caller (a node-type catalog's figure for all the node's logical CPUs,
  divided by ``os.cpu_count()``); else package TDP / hardware threads of the first
  entry of :data:`TDP_TABLE` whose substring occurs in the CPU model name; else
  :data:`GENERIC_WATTS_PER_CPU`.
* ``IDLE_FRACTION``: the share of full-load power the CPUs draw when idle. 0.2 is the
  typical idle-to-full-load ratio of current servers in SPECpower results; it is a
  model, not a property of this node.

So an idle window costs ``IDLE_FRACTION`` of the available CPUs' TDP and a window that
keeps every available CPU busy costs all of it. The idle share is the same in the
baseline :meth:`~workers.meters.base.Meter.measure_idle` samples, so the *net* estimate
(gross minus idle power times duration) is ``(1 - IDLE_FRACTION) * watts_per_cpu``
times the CPU-seconds the process used.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workers.hardware import cpu_model as describe_cpu_model
from workers.meters.base import Domain, Sensor, SensorUnavailable

IDLE_FRACTION = 0.2
GENERIC_WATTS_PER_CPU = 4.0  # about a current server core's TDP share per hardware thread

# (substring of the CPU model name, package TDP in W, hardware threads per package).
# First match wins, so specific models come before the family fallbacks.
TDP_TABLE: tuple[tuple[str, float, int], ...] = (
    ("EPYC 9654", 360.0, 192),
    ("EPYC 7763", 280.0, 128),
    ("EPYC 7742", 225.0, 128),
    ("Xeon(R) Platinum 8480", 350.0, 112),
    ("Xeon(R) Platinum 8380", 270.0, 80),
    ("Xeon(R) Gold 6248", 150.0, 40),
    ("Xeon(R) CPU E5-2683 v4", 120.0, 32),
    ("Core(TM) i9-13900K", 125.0, 32),
    ("Core(TM) i7-1185G7", 28.0, 8),
    ("EPYC", 280.0, 128),  # unknown EPYC (VMs often hide the model): a 64-core Milan
    ("Xeon", 270.0, 80),  # unknown Xeon: a 40-core Ice Lake
)


@dataclass(frozen=True)
class TdpModel:
    """The figures an estimate uses, and where ``watts_per_cpu`` came from."""

    watts_per_cpu: float
    cpus: float  # logical CPUs available to the process (fractional under a cgroup quota)
    origin: str  # "catalog", "table:<substring>" or "generic-default"
    cpu_model: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "watts_per_cpu": self.watts_per_cpu,
            "cpus": self.cpus,
            "tdp_origin": self.origin,
            "cpu_model": self.cpu_model,
            "idle_fraction": IDLE_FRACTION,
        }


@dataclass(frozen=True)
class CpuEstimate:
    energy_j: float
    utilisation: float  # in [0, 1]


def estimate_cpu_energy(
    duration_s: float, cpu_time_s: float, cpus: float, watts_per_cpu: float, idle_fraction: float = IDLE_FRACTION
) -> CpuEstimate:
    """The module's formula for one window (see the module docstring)."""
    if duration_s <= 0:
        return CpuEstimate(energy_j=0.0, utilisation=0.0)
    utilisation = min(max(cpu_time_s / (duration_s * cpus), 0.0), 1.0)
    energy_j = duration_s * cpus * watts_per_cpu * (idle_fraction + (1.0 - idle_fraction) * utilisation)
    return CpuEstimate(energy_j=energy_j, utilisation=utilisation)


def process_cpu_time_s() -> float:
    """CPU seconds used by this process (all threads) and its waited-for children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


class TdpEstimateSensor(Sensor):
    """The ``estimate-tdp`` source for the ``cpu`` domain."""

    domain: Domain = "cpu"
    source = "estimate-tdp"

    def __init__(self, model: TdpModel) -> None:
        self.model = model
        self._start: tuple[float, float] | None = None  # (wall s, process CPU s)

    def start(self) -> None:
        self._start = (time.perf_counter(), process_cpu_time_s())

    def stop(self) -> float:
        cpu_time_s, wall_s = process_cpu_time_s(), time.perf_counter()
        if self._start is None:
            raise RuntimeError("TdpEstimateSensor.stop() called without start()")
        wall0_s, cpu0_s = self._start
        self._start = None
        return estimate_cpu_energy(wall_s - wall0_s, cpu_time_s - cpu0_s, self.model.cpus, self.model.watts_per_cpu).energy_j

    def describe(self) -> dict[str, Any]:
        return self.model.to_dict()


def probe_estimate(domain: Domain, cpu_tdp_w: float | None = None, cpu_model: str | None = None) -> TdpEstimateSensor:
    """A TDP estimate for ``domain`` (``cpu`` only), or :class:`SensorUnavailable`.

    ``cpu_tdp_w`` is the full-load power of all of this node's logical CPUs (from a
    node-type catalog); ``cpu_model`` overrides the name read from ``/proc/cpuinfo``.
    """
    if domain != "cpu":
        raise SensorUnavailable(
            "unsupported", f"no TDP model for {domain}; its energy is left unknown rather than guessed"
        )
    if cpu_tdp_w is not None and cpu_tdp_w <= 0:
        raise ValueError(f"cpu_tdp_w must be > 0, got {cpu_tdp_w}")
    model_name = cpu_model if cpu_model is not None else describe_cpu_model()
    if cpu_tdp_w is not None:
        watts_per_cpu, origin = cpu_tdp_w / (os.cpu_count() or 1), "catalog"
    else:
        watts_per_cpu, origin = _table_watts_per_cpu(model_name)
    return TdpEstimateSensor(TdpModel(watts_per_cpu, available_cpus(), origin, model_name))


def available_cpus() -> float:
    """Logical CPUs this process may run on: its affinity mask, lowered to the cgroup v2
    CPU quota when one is set."""
    try:
        cpus: float = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return min(cpus, quota) if quota is not None else cpus


def _cgroup_cpu_quota(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """CPUs' worth of time the cgroup may use (``cpu.max`` is "<quota> <period>" or "max ...")."""
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _table_watts_per_cpu(model_name: str | None) -> tuple[float, str]:
    if model_name:
        for substring, tdp_w, threads in TDP_TABLE:
            if substring in model_name:
                return tdp_w / threads, f"table:{substring}"
    return GENERIC_WATTS_PER_CPU, "generic-default"
