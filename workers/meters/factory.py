"""The factory a stage asks for a meter: probe the backends per domain, in order.

Probe order, per domain (the first backend that works is used; each one that does not
is recorded with its reason, and :meth:`~workers.meters.base.Meter.describe` shows it):

* ``gpu``:  NVML (the energy counter, else power sampling, per GPU) -> none
* ``cpu``:  RAPL packages -> TDP estimate -> none
* ``dram``: RAPL DRAM subzones -> none (there is no DRAM estimate)

When no domain has a sensor the result is a :class:`~workers.meters.base.NullMeter`
(time only), never a meter that reports 0 J.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from workers.meters import estimate, nvml, rapl
from workers.meters.base import Domain, EnergyMeter, Meter, NullMeter, Sensor, SensorUnavailable, Skip


def make_meter(
    device: str,
    *,
    devices: Sequence[str] | None = None,
    cpu_tdp_w: float | None = None,
    powercap_root: str | os.PathLike[str] = rapl.DEFAULT_POWERCAP_ROOT,
    nvml_sampling_period_s: float = nvml.DEFAULT_SAMPLING_PERIOD_S,
) -> Meter:
    """The best meter for work on torch ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``).

    ``devices`` lists every torch device the stage uses when it is more than
    ``device`` (the ``gpu`` domain sums their GPUs; the window edges wait for each).
    ``cpu_tdp_w`` is the full-load power of all this node's logical CPUs from a
    node-type catalog, used only if the TDP estimate is reached. ``powercap_root`` is
    where the RAPL tree is read. Probing never raises for a missing or unreadable
    sensor; it records why and moves on.
    """
    used = tuple(devices) if devices is not None else (device,)
    if device not in used:
        used = (device, *used)
    probes: dict[Domain, tuple[tuple[str, Callable[[], Sensor]], ...]] = {
        "gpu": (("nvml", lambda: nvml.probe_nvml(used, nvml_sampling_period_s)),),
        "cpu": (
            ("rapl", lambda: rapl.probe_rapl("cpu", powercap_root)),
            ("estimate-tdp", lambda: estimate.probe_estimate("cpu", cpu_tdp_w)),
        ),
        "dram": (
            ("rapl", lambda: rapl.probe_rapl("dram", powercap_root)),
            ("estimate-tdp", lambda: estimate.probe_estimate("dram")),
        ),
    }
    sensors: list[Sensor] = []
    skipped: dict[Domain, list[Skip]] = {}
    for domain, backends in probes.items():
        skipped[domain] = []
        for backend, probe in backends:
            try:
                sensors.append(probe())
                break
            except SensorUnavailable as e:
                skipped[domain].append(Skip(backend, e.reason, e.detail))
    if not sensors:
        return NullMeter(device, skipped)
    return EnergyMeter(used, sensors, skipped)
