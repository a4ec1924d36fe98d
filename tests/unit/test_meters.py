"""workers.meters: the Meter contract, the composite meter and the factory's probe order."""

from __future__ import annotations

import gc
import time

import pytest

from workers.meters import (
    EnergyMeter,
    Meter,
    MeterError,
    NullMeter,
    Sensor,
    Skip,
    make_meter,
    nvml,
)
from workers.meters.base import Domain
from workers.types import EnergyReading


@pytest.fixture(autouse=True)
def reset_meter_singletons(monkeypatch):
    """Each test probes NVML afresh (the module caches its init outcome)."""
    monkeypatch.setattr(nvml, "_init_outcome", None)


class ConstantPowerSensor(Sensor):
    """A sensor whose domain draws ``power_w`` all the time."""

    def __init__(self, domain: Domain, power_w: float, source: str = "rapl") -> None:
        self.domain = domain
        self.source = source  # type: ignore[assignment]
        self.power_w = power_w
        self._start_s: float | None = None
        self.closed = 0

    def start(self) -> None:
        self._start_s = time.perf_counter()

    def stop(self) -> float:
        assert self._start_s is not None
        energy_j = self.power_w * (time.perf_counter() - self._start_s)
        self._start_s = None
        return energy_j

    def close(self) -> None:
        self.closed += 1


class FailingSensor(ConstantPowerSensor):
    def stop(self) -> float:
        raise MeterError("sensor went away")


# -- the null meter ------------------------------------------------------------------------


def test_null_meter_measures_duration_and_no_energy():
    meter = NullMeter()
    meter.begin()
    time.sleep(0.02)
    reading = meter.end()
    assert isinstance(reading, EnergyReading)
    assert 0.015 <= reading.duration_s < 1.0
    assert (reading.gpu_energy_j, reading.cpu_energy_j, reading.dram_energy_j) == (None, None, None)
    assert (reading.gpu_source, reading.cpu_source, reading.dram_source) == ("none", "none", "none")
    assert reading.total_energy_j is None


def test_null_meter_windows_are_independent():
    meter = NullMeter()
    meter.begin()
    time.sleep(0.03)
    long = meter.end()
    meter.begin()
    short = meter.end()
    assert short.duration_s < long.duration_s


def test_end_without_begin_raises():
    meter = NullMeter()
    with pytest.raises(RuntimeError, match="without a matching begin"):
        meter.end()
    meter.begin()
    meter.end()
    with pytest.raises(RuntimeError):
        meter.end()  # a window closes once


def test_begin_twice_raises():
    meter = NullMeter()
    meter.begin()
    with pytest.raises(RuntimeError, match="already open|while a window is open"):
        meter.begin()


def test_null_meter_idle_power_is_unknown_not_zero():
    meter = NullMeter()
    assert meter.measure_idle(0.01) == {"gpu": None, "cpu": None, "dram": None}
    meter.begin()
    reading = meter.end()
    assert (reading.gpu_idle_power_w, reading.cpu_idle_power_w, reading.dram_idle_power_w) == (None, None, None)


def test_meter_is_abstract():
    with pytest.raises(TypeError):
        Meter()  # type: ignore[abstract]


# -- the composite meter -------------------------------------------------------------------


def test_energy_meter_reports_each_domain_with_its_source():
    meter = EnergyMeter(["cpu"], [ConstantPowerSensor("cpu", 20.0), ConstantPowerSensor("dram", 5.0)])
    meter.begin()
    time.sleep(0.05)
    reading = meter.end()
    assert reading.cpu_energy_j == pytest.approx(20.0 * reading.duration_s, rel=0.05)
    assert reading.dram_energy_j == pytest.approx(5.0 * reading.duration_s, rel=0.05)
    assert (reading.gpu_energy_j, reading.gpu_source) == (None, "none")
    assert (reading.cpu_source, reading.dram_source) == ("rapl", "rapl")


def test_idle_power_is_sampled_and_carried_by_later_readings():
    meter = EnergyMeter(["cpu"], [ConstantPowerSensor("cpu", 20.0)])
    idle = meter.measure_idle(0.05)
    assert idle["cpu"] == pytest.approx(20.0, rel=0.05) and idle["gpu"] is None and idle["dram"] is None
    meter.begin()
    reading = meter.end()
    assert reading.cpu_idle_power_w == idle["cpu"] and reading.gpu_idle_power_w is None
    assert meter.describe()["idle_power_w"] == idle


def test_measure_idle_needs_a_positive_duration():
    with pytest.raises(ValueError, match="idle_s"):
        NullMeter().measure_idle(0.0)


def test_one_source_per_domain():
    with pytest.raises(ValueError, match="two sensors for the cpu domain"):
        EnergyMeter(["cpu"], [ConstantPowerSensor("cpu", 1.0), ConstantPowerSensor("cpu", 2.0)])


def test_describe_shape():
    skip = Skip("rapl", "absent", "no powercap tree")
    meter = EnergyMeter(["cpu"], [ConstantPowerSensor("cpu", 1.0, "estimate-tdp")], {"cpu": [skip]})
    d = meter.describe()
    assert d["devices"] == ["cpu"] and d["idle_power_w"] is None
    assert set(d["domains"]) == {"gpu", "cpu", "dram"}
    assert d["domains"]["cpu"] == {"source": "estimate-tdp", "skipped": [skip.to_dict()]}
    assert d["domains"]["gpu"] == {"source": "none", "skipped": []}


def test_sensor_failure_is_a_meter_error_and_the_meter_recovers():
    failing = FailingSensor("cpu", 1.0)
    meter = EnergyMeter(["cpu"], [failing])
    meter.begin()
    with pytest.raises(MeterError, match="sensor went away"):
        meter.end()
    assert failing.closed >= 1  # background resources released
    meter.begin()  # the failed window is closed; a new one may open


def test_collected_meter_closes_its_sensors():
    sensor = ConstantPowerSensor("cpu", 1.0)
    meter = EnergyMeter(["cpu"], [sensor])
    meter.begin()  # a stage that raised would leave this window open
    del meter
    gc.collect()
    assert sensor.closed == 1


# -- the factory on this machine (no NVML, no RAPL sysfs) ---------------------------------


def _skips(meter: Meter, domain: str) -> list[dict[str, str]]:
    return meter.describe()["domains"][domain]["skipped"]


def test_factory_on_a_cpu_stage_without_sensors(tmp_path):
    """CPU stage, no powercap tree: gpu not applicable, cpu estimated, dram unknown -- each with why."""
    meter = make_meter("cpu", powercap_root=tmp_path / "no-powercap")
    d = meter.describe()
    assert {k: v["source"] for k, v in d["domains"].items()} == {"gpu": "none", "cpu": "estimate-tdp", "dram": "none"}
    assert [(s["backend"], s["reason"]) for s in _skips(meter, "gpu")] == [("nvml", "not-applicable")]
    assert [(s["backend"], s["reason"]) for s in _skips(meter, "cpu")] == [("rapl", "absent")]
    assert [(s["backend"], s["reason"]) for s in _skips(meter, "dram")] == [
        ("rapl", "absent"), ("estimate-tdp", "unsupported")]
    assert "no-powercap" in _skips(meter, "cpu")[0]["detail"]
    meter.begin()
    reading = meter.end()
    assert reading.cpu_source == "estimate-tdp" and reading.cpu_energy_j is not None
    assert reading.gpu_energy_j is None and reading.dram_energy_j is None


def test_factory_on_a_cuda_stage_without_nvml(tmp_path, monkeypatch):
    """NVML's library is missing: the GPU domain is skipped as absent, never 0 J."""
    from tests.unit.test_nvml import FakeNvml

    monkeypatch.setattr(nvml, "pynvml", FakeNvml(devices=[], init_error="LibraryNotFound"))
    meter = make_meter("cuda:0", powercap_root=tmp_path)
    gpu = meter.describe()["domains"]["gpu"]
    assert gpu["source"] == "none"
    assert [(s["backend"], s["reason"]) for s in gpu["skipped"]] == [("nvml", "absent")]
    assert "no NVIDIA driver" in gpu["skipped"][0]["detail"]


def test_factory_real_probe_order_here():
    """Whatever this machine has, every domain has a source and a non-measured one a reason."""
    meter = make_meter("cpu")
    for domain, info in meter.describe()["domains"].items():
        assert info["source"] in ("nvml-counter", "nvml-power", "rapl", "estimate-tdp", "none")
        if info["source"] == "none":
            assert info["skipped"], f"{domain} has no figure and no reason"
    assert meter.describe()["domains"]["cpu"]["source"] in ("rapl", "estimate-tdp")


def test_factory_falls_back_to_the_null_meter_when_nothing_measures(tmp_path, monkeypatch):
    from workers.meters import estimate, factory

    def no_estimate(domain, cpu_tdp_w=None, cpu_model=None):
        raise estimate.SensorUnavailable("unsupported", "estimates disabled")

    monkeypatch.setattr(factory.estimate, "probe_estimate", no_estimate)
    meter = make_meter("cpu", powercap_root=tmp_path)
    assert isinstance(meter, NullMeter)
    assert [s["reason"] for s in _skips(meter, "cpu")] == ["absent", "unsupported"]


def test_factory_uses_rapl_before_the_estimate(tmp_path):
    from tests.unit.test_rapl import make_zone

    make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=1_000)
    meter = make_meter("cpu", powercap_root=tmp_path)
    cpu = meter.describe()["domains"]["cpu"]
    assert cpu["source"] == "rapl" and cpu["skipped"] == []
    assert meter.describe()["domains"]["dram"]["skipped"][0]["reason"] == "unsupported"


def test_factory_passes_a_catalog_tdp_to_the_estimate(tmp_path):
    meter = make_meter("cpu", cpu_tdp_w=64.0, powercap_root=tmp_path)
    cpu = meter.describe()["domains"]["cpu"]
    assert cpu["source"] == "estimate-tdp" and cpu["tdp_origin"] == "catalog"
