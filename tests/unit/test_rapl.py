"""workers.meters.rapl against fake powercap sysfs trees built in tmp_path."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from workers.meters import MeterError, SensorUnavailable, make_meter, nvml, rapl

MAX_RANGE_UJ = 262_143_328_850  # a real package's max_energy_range_uj


@pytest.fixture(autouse=True)
def reset_meter_singletons(monkeypatch):
    monkeypatch.setattr(nvml, "_init_outcome", None)


def make_zone(parent: Path, dirname: str, name: str, energy_uj: int = 0, max_range_uj: int = MAX_RANGE_UJ) -> Path:
    """One powercap zone directory with the three files the reader uses."""
    zone = parent / dirname
    zone.mkdir(parents=True)
    (zone / "name").write_text(f"{name}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    set_energy(zone, energy_uj)
    return zone


def set_energy(zone: Path, energy_uj: int) -> None:
    """Replace the counter atomically, as the kernel does (a reader never sees half a value)."""
    tmp = zone / "energy_uj.tmp"
    tmp.write_text(f"{energy_uj}\n")
    os.replace(tmp, zone / "energy_uj")


def two_packages_with_dram(root: Path) -> dict[str, Path]:
    zones = {}
    for n in (0, 1):
        package = make_zone(root, f"intel-rapl:{n}", f"package-{n}", energy_uj=1_000_000 * (n + 1))
        zones[f"pkg{n}"] = package
        make_zone(package, f"intel-rapl:{n}:0", "core", energy_uj=5)
        zones[f"dram{n}"] = make_zone(package, f"intel-rapl:{n}:1", "dram", energy_uj=10_000 * (n + 1))
    return zones


def test_one_package(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=5_000_000)
    sensor = rapl.probe_rapl("cpu", tmp_path)
    assert sensor.source == "rapl" and sensor.domain == "cpu"
    sensor.start()
    set_energy(pkg, 7_500_000)
    assert sensor.stop() == pytest.approx(2.5)


def test_two_packages_and_their_dram(tmp_path):
    zones = two_packages_with_dram(tmp_path)
    meter = make_meter("cpu", powercap_root=tmp_path)
    meter.begin()
    set_energy(zones["pkg0"], 1_000_000 + 3_000_000)
    set_energy(zones["pkg1"], 2_000_000 + 4_000_000)
    set_energy(zones["dram0"], 10_000 + 250_000)
    set_energy(zones["dram1"], 20_000 + 750_000)
    reading = meter.end()
    assert reading.cpu_energy_j == pytest.approx(7.0) and reading.cpu_source == "rapl"
    assert reading.dram_energy_j == pytest.approx(1.0) and reading.dram_source == "rapl"
    cpu_zones = meter.describe()["domains"]["cpu"]["zones"]
    assert [z["name"] for z in cpu_zones] == ["package-0", "package-1"]  # core subzones not added again
    assert [z["name"] for z in meter.describe()["domains"]["dram"]["zones"]] == ["dram", "dram"]


def test_wrap_in_the_middle_of_a_window(tmp_path):
    """The counter passes max_energy_range_uj and restarts near 0 inside the window."""
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=1_000_000 - 300, max_range_uj=1_000_000)
    sensor = rapl.probe_rapl("cpu", tmp_path)
    sensor.start()
    set_energy(pkg, 200)  # 300 uJ to the wrap, then 200 after it
    assert sensor.stop() == pytest.approx(500e-6)


def test_several_wraps_are_caught_by_polling(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=900, max_range_uj=1_000)
    sensor = rapl.probe_rapl("cpu", tmp_path)
    sensor.start()
    set_energy(pkg, 100)  # +200 (wrap)
    sensor.poll()  # what the watcher thread does between wraps
    set_energy(pkg, 50)  # +950 (wrap)
    sensor.poll()
    set_energy(pkg, 60)  # +10
    assert sensor.stop() == pytest.approx(1_160e-6)


def test_the_watcher_polls_within_the_window(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=900, max_range_uj=1_000)
    sensor = rapl.RaplSensor("cpu", [rapl._zone(pkg)], poll_interval_s=0.01)
    polls: list[float] = []
    poll = sensor.poll

    def counted_poll() -> None:
        poll()
        polls.append(time.perf_counter())

    sensor.poll = counted_poll  # type: ignore[method-assign]
    sensor.start()
    set_energy(pkg, 100)  # wrap: +200
    seen = len(polls)
    deadline_s = time.perf_counter() + 5.0
    while len(polls) < seen + 2 and time.perf_counter() < deadline_s:  # a whole poll after the write
        time.sleep(0.01)
    set_energy(pkg, 50)  # a second wrap, which a begin/end difference alone would miss: +950
    assert sensor.stop() == pytest.approx(1_150e-6)


def test_poll_interval_follows_the_shortest_wrap(tmp_path):
    big = make_zone(tmp_path, "intel-rapl:0", "package-0", max_range_uj=MAX_RANGE_UJ)
    small = make_zone(tmp_path, "intel-rapl:1", "package-1", max_range_uj=1_000)
    assert rapl.RaplSensor("cpu", [rapl._zone(big)]).poll_interval_s == 10.0  # capped
    assert rapl.RaplSensor("cpu", [rapl._zone(big), rapl._zone(small)]).poll_interval_s == 0.05  # floored
    mid = make_zone(tmp_path, "intel-rapl:2", "package-2", max_range_uj=4_000_000_000)  # 4 kJ: 4 s at 1 kW
    assert rapl.RaplSensor("cpu", [rapl._zone(mid)]).poll_interval_s == pytest.approx(2.0)


def test_root_only_counter_names_the_fix(tmp_path, monkeypatch):
    """Tests run as root, so a chmod 000 file is still readable: simulate the kernel's answer."""
    make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=1)
    real_read = rapl._read_text

    def read_text(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path)

    monkeypatch.setattr(rapl, "_read_text", read_text)
    with pytest.raises(SensorUnavailable) as info:
        rapl.probe_rapl("cpu", tmp_path)
    assert info.value.reason == "no-permission"
    message = str(info.value)
    assert "CVE-2020-8694" in message
    assert "sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj" in message
    assert "udev" in message
    # the factory records it and falls back to the estimate
    meter = make_meter("cpu", powercap_root=tmp_path)
    cpu = meter.describe()["domains"]["cpu"]
    assert cpu["source"] == "estimate-tdp"
    assert cpu["skipped"][0]["reason"] == "no-permission" and "chmod o+r" in cpu["skipped"][0]["detail"]


def test_permission_lost_mid_window_is_a_meter_error(tmp_path, monkeypatch):
    make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=1)
    sensor = rapl.probe_rapl("cpu", tmp_path)
    sensor.start()

    def denied(path: Path) -> str:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(rapl, "_read_text", denied)
    with pytest.raises(MeterError, match="chmod o\\+r"):
        sensor.stop()


def test_unreadable_counter_value_is_a_meter_error(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=1)
    sensor = rapl.probe_rapl("cpu", tmp_path)
    sensor.start()
    (pkg / "energy_uj").write_text("garbage\n")
    with pytest.raises(MeterError, match="cannot read RAPL counter"):
        sensor.stop()


def test_amd_package_under_intel_rapl(tmp_path):
    """AMD Zen through intel_rapl_msr: package-N with a core subzone and no DRAM zone."""
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0", energy_uj=0)
    make_zone(pkg, "intel-rapl:0:0", "core", energy_uj=0)
    meter = make_meter("cpu", powercap_root=tmp_path)
    meter.begin()
    set_energy(pkg, 2_000_000)
    reading = meter.end()
    assert reading.cpu_source == "rapl" and reading.cpu_energy_j == pytest.approx(2.0)
    assert reading.dram_energy_j is None and reading.dram_source == "none"
    dram_skip = meter.describe()["domains"]["dram"]["skipped"][0]
    assert dram_skip["backend"] == "rapl" and dram_skip["reason"] == "unsupported"
    assert "no 'dram' subzone" in dram_skip["detail"]


def test_amd_rapl_control_type(tmp_path):
    pkg = make_zone(tmp_path, "amd-rapl:0", "package-0", energy_uj=10)
    sensor = rapl.probe_rapl("cpu", tmp_path)
    sensor.start()
    set_energy(pkg, 1_000_010)
    assert sensor.stop() == pytest.approx(1.0)


def test_multi_die_packages_are_all_counted(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", "package-0-die-0")
    make_zone(tmp_path, "intel-rapl:1", "package-0-die-1")
    assert [z.name for z in rapl.probe_rapl("cpu", tmp_path).zones] == ["package-0-die-0", "package-0-die-1"]


def test_psys_and_mmio_are_not_counted_twice(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", "package-0")
    make_zone(tmp_path, "intel-rapl:1", "psys")  # the platform, which contains the package
    make_zone(tmp_path, "intel-rapl-mmio:0", "package-0")  # the same package through MMIO
    zones = rapl.probe_rapl("cpu", tmp_path).zones
    assert [(z.path.name, z.name) for z in zones] == [("intel-rapl:0", "package-0")]


def test_packages_are_ordered_numerically(tmp_path):
    for n in (10, 2, 1):
        make_zone(tmp_path, f"intel-rapl:{n}", f"package-{n}")
    assert [z.path.name for z in rapl.probe_rapl("cpu", tmp_path).zones] == ["intel-rapl:1", "intel-rapl:2", "intel-rapl:10"]


def test_dram_needs_every_package(tmp_path):
    make_zone(make_zone(tmp_path, "intel-rapl:0", "package-0"), "intel-rapl:0:0", "dram")
    make_zone(tmp_path, "intel-rapl:1", "package-1")
    with pytest.raises(SensorUnavailable, match="intel-rapl:1.*no 'dram' subzone") as info:
        rapl.probe_rapl("dram", tmp_path)
    assert info.value.reason == "unsupported"


def test_absent_tree(tmp_path):
    with pytest.raises(SensorUnavailable, match="does not exist") as info:
        rapl.probe_rapl("cpu", tmp_path / "powercap")
    assert info.value.reason == "absent"
    with pytest.raises(SensorUnavailable, match="no RAPL package zone") as info:
        rapl.probe_rapl("cpu", tmp_path)  # exists, but empty
    assert info.value.reason == "absent"


def test_rapl_does_not_measure_gpus(tmp_path):
    with pytest.raises(SensorUnavailable) as info:
        rapl.probe_rapl("gpu", tmp_path)
    assert info.value.reason == "not-applicable"


def test_a_garbled_counter_at_probe_time_is_skipped_not_raised(tmp_path):
    pkg = make_zone(tmp_path, "intel-rapl:0", "package-0")
    (pkg / "energy_uj").write_text("\n")
    with pytest.raises(SensorUnavailable, match="cannot read RAPL counter") as info:
        rapl.probe_rapl("cpu", tmp_path)
    assert info.value.reason == "error"
    assert make_meter("cpu", powercap_root=tmp_path).describe()["domains"]["cpu"]["skipped"][0]["reason"] == "error"
