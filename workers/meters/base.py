"""The meter contract: one window, ``begin()`` then ``end() -> EnergyReading``.

A stage measures its work with a :class:`Meter` from :func:`workers.meters.make_meter`.
A window measures what happened between the two calls; the stage decides what goes
inside it (for ``evaluate``: whole passes over the test split, nothing else). A meter is
made for the torch devices a stage uses and waits for their queued work at both edges,
so asynchronous CUDA kernels are counted in the window that launched them (as Zeus does).

Energy is reported per **domain** -- ``gpu``, ``cpu`` (the CPU packages) and ``dram`` --
each from one :class:`Sensor` chosen by the factory, with the **source** of its figure
(``nvml-counter``, ``nvml-power``, ``rapl``, ``estimate-tdp``). A domain no sensor can
see reports ``None`` energy with source ``"none"`` -- never a silent 0 J, which a report
would add up as a real, impossibly good figure -- and :meth:`Meter.describe` says why
each backend was skipped, so a result can show how every figure was obtained.

Idle power is part of the contract: :meth:`Meter.measure_idle` samples each domain while
the stage does nothing, and every later reading carries that baseline, so a reader can
report both gross energy and net energy (gross minus idle power times duration).
"""

from __future__ import annotations

import abc
import time
import weakref
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

from workers.types import EnergyReading, EnergySource

Domain = Literal["gpu", "cpu", "dram"]
DOMAINS: tuple[Domain, ...] = ("gpu", "cpu", "dram")

# Why a backend was not used for a domain:
#   absent          -- no such sensor on this node (no NVIDIA driver, no powercap tree)
#   no-permission   -- the sensor exists but this user may not read it
#   unsupported     -- the hardware lacks the figure (a GPU without power readings,
#                      a CPU without a DRAM zone)
#   not-applicable  -- the stage does not use the device (no CUDA device in a CPU stage)
#   error           -- the sensor answered with an unexpected error while probed
SkipReason = Literal["absent", "no-permission", "unsupported", "not-applicable", "error"]


class MeterError(RuntimeError):
    """A sensor failed. Every vendor error (NVML, sysfs) is translated into this at the
    border, with a message that names the problem and, where there is one, the fix."""


class SensorUnavailable(MeterError):
    """A backend cannot measure a domain on this node; raised while probing, so the
    factory can fall back to the next backend and record :attr:`reason` and the message."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: SkipReason = reason
        self.detail = detail


@dataclass(frozen=True)
class Skip:
    """A backend the factory probed for a domain and did not use, and why."""

    backend: str  # "nvml", "rapl", "estimate-tdp"
    reason: SkipReason
    detail: str  # one line naming the problem and the fix

    def to_dict(self) -> dict[str, str]:
        return {"backend": self.backend, "reason": self.reason, "detail": self.detail}


class Sensor(abc.ABC):
    """Energy of one domain over a window, from one backend.

    A sensor is probed into existence (its constructor or probe function raises
    :class:`SensorUnavailable` when it cannot work here), so a constructed sensor is
    expected to measure; a failure while measuring raises :class:`MeterError`.
    """

    domain: Domain
    source: EnergySource

    @abc.abstractmethod
    def start(self) -> None:
        """Begin accumulating energy (background sampling threads start here)."""

    @abc.abstractmethod
    def stop(self) -> float:
        """Stop accumulating and return the energy since :meth:`start`, in joules."""

    def describe(self) -> dict[str, Any]:
        """JSON-able facts about how this sensor measures (devices, zones, model)."""
        return {}

    def close(self) -> None:
        """Release background resources of a window left open (a stage that raised)."""


class Meter(abc.ABC):
    """One measurement window at a time; a meter may be reused for the next window."""

    @abc.abstractmethod
    def begin(self) -> None:
        """Open a window. Raises ``RuntimeError`` when one is already open."""

    @abc.abstractmethod
    def end(self) -> EnergyReading:
        """Close the window opened by :meth:`begin` and return what it measured, with
        the idle power of :meth:`measure_idle` (None where not sampled).

        Raises ``RuntimeError`` when no window is open and :class:`MeterError` when a
        sensor failed during the window.
        """

    @abc.abstractmethod
    def measure_idle(self, idle_s: float) -> dict[Domain, float | None]:
        """Sample each domain's power for ``idle_s`` seconds while the caller does
        nothing; return it in watts per domain (None where the domain has no sensor)
        and carry it in every later reading's ``*_idle_power_w``."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """How each domain is measured, as a JSON-able dict::

            {"devices": ["cuda:0"],
             "domains": {"gpu": {"source": "nvml-counter", "skipped": [], ...sensor facts},
                         "cpu": {"source": "estimate-tdp",
                                 "skipped": [{"backend": "rapl", "reason": "absent",
                                              "detail": "..."}], ...},
                         "dram": {"source": "none", "skipped": [...]}},
             "idle_power_w": {"gpu": 61.2, "cpu": 9.8, "dram": None} or None}
        """


class EnergyMeter(Meter):
    """A meter made of at most one :class:`Sensor` per domain.

    Window edges: wait for the devices' queued work, then read the clock and start the
    sensors (``begin``); wait again, read the clock, then stop the sensors (``end``).
    Time is ``time.perf_counter_ns`` (integer nanoseconds: no float rounding of a long-running clock).
    """

    def __init__(
        self,
        devices: Sequence[str],
        sensors: Sequence[Sensor] = (),
        skipped: Mapping[Domain, Sequence[Skip]] | None = None,
    ) -> None:
        by_domain: dict[Domain, Sensor] = {}
        for sensor in sensors:
            if sensor.domain in by_domain:
                raise ValueError(f"two sensors for the {sensor.domain} domain; a domain has one source")
            by_domain[sensor.domain] = sensor
        self.devices: tuple[str, ...] = tuple(devices)
        self._sensors = by_domain
        self._skipped: dict[Domain, tuple[Skip, ...]] = {d: tuple((skipped or {}).get(d, ())) for d in DOMAINS}
        self._idle_power_w: dict[Domain, float | None] | None = None
        self._start_ns: int | None = None
        # A stage that raises inside a window leaves sampling threads behind; stop them
        # when the meter is collected.
        weakref.finalize(self, _close_sensors, tuple(by_domain.values()))

    def begin(self) -> None:
        if self._start_ns is not None:
            raise RuntimeError(f"{type(self).__name__}.begin() called while a window is open")
        for device in self.devices:
            synchronize(device)
        self._start_ns = time.perf_counter_ns()
        started: list[Sensor] = []
        try:
            for sensor in self._sensors.values():
                sensor.start()
                started.append(sensor)
        except BaseException:
            self._start_ns = None
            _close_sensors(started)
            raise

    def end(self) -> EnergyReading:
        for device in self.devices:
            synchronize(device)
        end_ns = time.perf_counter_ns()
        if self._start_ns is None:
            raise RuntimeError(f"{type(self).__name__}.end() called without a matching begin()")
        duration_s = (end_ns - self._start_ns) / 1e9
        self._start_ns = None
        energy_j: dict[Domain, float] = {}
        try:
            for domain, sensor in self._sensors.items():
                energy_j[domain] = sensor.stop()
        except BaseException:
            _close_sensors(self._sensors.values())
            raise
        idle = self._idle_power_w or {}
        return EnergyReading(
            duration_s=duration_s,
            gpu_energy_j=energy_j.get("gpu"),
            cpu_energy_j=energy_j.get("cpu"),
            dram_energy_j=energy_j.get("dram"),
            gpu_source=self.source("gpu"),
            cpu_source=self.source("cpu"),
            dram_source=self.source("dram"),
            gpu_idle_power_w=idle.get("gpu"),
            cpu_idle_power_w=idle.get("cpu"),
            dram_idle_power_w=idle.get("dram"),
        )

    def measure_idle(self, idle_s: float) -> dict[Domain, float | None]:
        if idle_s <= 0:
            raise ValueError(f"idle_s must be > 0 to sample idle power, got {idle_s}")
        self.begin()
        time.sleep(idle_s)
        reading = self.end()
        energies = {"gpu": reading.gpu_energy_j, "cpu": reading.cpu_energy_j, "dram": reading.dram_energy_j}
        self._idle_power_w = {
            d: None if energies[d] is None else energies[d] / reading.duration_s for d in DOMAINS
        }
        return dict(self._idle_power_w)

    def source(self, domain: Domain) -> EnergySource:
        """Where ``domain``'s figures come from; ``"none"`` when no sensor sees it."""
        sensor = self._sensors.get(domain)
        return "none" if sensor is None else sensor.source

    def describe(self) -> dict[str, Any]:
        domains: dict[str, Any] = {}
        for d in DOMAINS:
            sensor = self._sensors.get(d)
            domains[d] = {
                "source": self.source(d),
                "skipped": [s.to_dict() for s in self._skipped[d]],
                **(sensor.describe() if sensor is not None else {}),
            }
        return {
            "devices": list(self.devices),
            "domains": domains,
            "idle_power_w": None if self._idle_power_w is None else dict(self._idle_power_w),
        }


class NullMeter(EnergyMeter):
    """Wall-clock time only; every energy domain is unknown (``None``, source ``"none"``).

    The null object the factory falls back to where no sensor exists at all, so time
    per sample is still measured and :meth:`describe` still says why each was skipped.
    """

    def __init__(self, device: str = "cpu", skipped: Mapping[Domain, Sequence[Skip]] | None = None) -> None:
        super().__init__((device,), (), skipped)


def _close_sensors(sensors: Any) -> None:
    for sensor in sensors:
        sensor.close()


def synchronize(device: str) -> None:
    """Wait until the work queued on torch ``device`` has finished (a no-op off CUDA)."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)
