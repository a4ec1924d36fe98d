"""workers.meters: the Meter contract and the null meter (time only, never 0 J)."""

from __future__ import annotations

import time

import pytest

from workers.meters import Meter, NullMeter, make_meter
from workers.types import EnergyReading


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


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_make_meter_falls_back_to_null_meter(device):
    meter = make_meter(device)
    assert isinstance(meter, Meter) and isinstance(meter, NullMeter)


def test_meter_is_abstract():
    with pytest.raises(TypeError):
        Meter()  # type: ignore[abstract]
