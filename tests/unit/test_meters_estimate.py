"""workers.meters.estimate: the labelled TDP estimate used where no CPU sensor exists."""

from __future__ import annotations

import threading
import time

import pytest

from workers.meters import SensorUnavailable, estimate, make_meter, nvml


@pytest.fixture(autouse=True)
def reset_meter_singletons(monkeypatch):
    monkeypatch.setattr(nvml, "_init_outcome", None)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_formula():
    # 2 s on 4 CPUs of 5 W, using 4 CPU-seconds: utilisation 0.5
    e = estimate.estimate_cpu_energy(duration_s=2.0, cpu_time_s=4.0, cpus=4, watts_per_cpu=5.0, idle_fraction=0.2)
    assert e.utilisation == pytest.approx(0.5)
    assert e.energy_j == pytest.approx(2.0 * 4 * 5.0 * (0.2 + 0.8 * 0.5))


def test_utilisation_is_clamped_to_one_and_zero():
    assert estimate.estimate_cpu_energy(1.0, 10.0, 2, 5.0).utilisation == 1.0
    assert estimate.estimate_cpu_energy(1.0, -0.1, 2, 5.0).utilisation == 0.0
    idle = estimate.estimate_cpu_energy(1.0, 0.0, 2, 5.0)
    assert idle.energy_j == pytest.approx(1.0 * 2 * 5.0 * estimate.IDLE_FRACTION)  # idle is not free


def test_busy_window_on_this_machine(tmp_path):
    """No RAPL here: the CPU figure is an estimate, labelled so, and positive when busy."""
    meter = make_meter("cpu", powercap_root=tmp_path)
    assert meter.describe()["domains"]["cpu"]["source"] == "estimate-tdp"
    meter.begin()
    _spin(0.2)
    busy = meter.end()
    assert busy.cpu_source == "estimate-tdp" and busy.cpu_energy_j > 0
    meter.begin()
    time.sleep(0.2)
    idle = meter.end()
    assert busy.cpu_energy_j / busy.duration_s > idle.cpu_energy_j / idle.duration_s


def test_sensor_utilisation_covers_threads(monkeypatch):
    """process CPU time counts every thread (torch's intra-op threads live in-process)."""
    model = estimate.TdpModel(watts_per_cpu=10.0, cpus=2, origin="test", cpu_model=None)
    sensor = estimate.TdpEstimateSensor(model)
    seen: list[estimate.CpuEstimate] = []
    real = estimate.estimate_cpu_energy

    def record(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(estimate, "estimate_cpu_energy", record)
    sensor.start()
    worker = threading.Thread(target=_spin, args=(0.2,))
    worker.start()
    worker.join()
    sensor.stop()
    (window,) = seen
    assert 0.0 <= window.utilisation <= 1.0
    assert window.utilisation > 0.2  # the other thread's spinning was counted


def test_tdp_from_the_table_by_cpu_model_substring():
    sensor = estimate.probe_estimate("cpu", cpu_model="AMD EPYC 7763 64-Core Processor")
    assert sensor.model.origin == "table:EPYC 7763"
    assert sensor.model.watts_per_cpu == pytest.approx(280.0 / 128)
    assert estimate.probe_estimate("cpu", cpu_model="AMD EPYC").model.origin == "table:EPYC"  # VM-masked model


def test_generic_default_for_an_unknown_cpu():
    sensor = estimate.probe_estimate("cpu", cpu_model="Some RISC-V Core")
    assert (sensor.model.origin, sensor.model.watts_per_cpu) == ("generic-default", estimate.GENERIC_WATTS_PER_CPU)


def test_catalog_tdp_wins(monkeypatch):
    monkeypatch.setattr(estimate.os, "cpu_count", lambda: 8)
    sensor = estimate.probe_estimate("cpu", cpu_tdp_w=80.0, cpu_model="AMD EPYC 7763 64-Core Processor")
    assert (sensor.model.origin, sensor.model.watts_per_cpu) == ("catalog", 10.0)
    with pytest.raises(ValueError, match="cpu_tdp_w"):
        estimate.probe_estimate("cpu", cpu_tdp_w=0.0)


def test_available_cpus_respects_a_cgroup_quota(monkeypatch, tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")
    assert estimate._cgroup_cpu_quota(cpu_max) == 1.5
    cpu_max.write_text("max 100000\n")
    assert estimate._cgroup_cpu_quota(cpu_max) is None
    assert estimate._cgroup_cpu_quota(tmp_path / "absent") is None
    monkeypatch.setattr(estimate, "_cgroup_cpu_quota", lambda: 0.5)
    assert estimate.available_cpus() == 0.5


def test_no_dram_estimate():
    with pytest.raises(SensorUnavailable, match="no TDP model for dram") as info:
        estimate.probe_estimate("dram")
    assert info.value.reason == "unsupported"


def test_describe_says_how_the_estimate_was_made(tmp_path):
    cpu = make_meter("cpu", powercap_root=tmp_path).describe()["domains"]["cpu"]
    assert set(cpu) >= {"watts_per_cpu", "cpus", "tdp_origin", "cpu_model", "idle_fraction"}
    assert cpu["idle_fraction"] == estimate.IDLE_FRACTION
