"""The NVML meter on a real NVIDIA GPU (marked ``gpu``; skipped where CUDA is unavailable).

Run on a GPU machine with ``pytest -m gpu tests/gpu``. These check what the unit tests
can only mock: that the energy counter and integrated power samples tell the same story
under a steady load, and that a CUDA device is matched to its own NVML handle.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU with CUDA"),
]

WINDOW_S = 10.0
SETTLE_S = 3.0  # load runs this long before the windows open, so power is steady at both edges


@pytest.fixture(autouse=True)
def reset_meter_singletons(monkeypatch):
    from workers.meters import nvml

    monkeypatch.setattr(nvml, "_init_outcome", None)


class SteadyLoad:
    """Back-to-back matmuls on ``device`` in a thread until stopped; the queue is drained
    each iteration so the GPU's work tracks the thread (no minutes of queued kernels)."""

    def __init__(self, device: str, size: int = 8192) -> None:
        self.device = device
        self.size = size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        try:
            a = torch.randn(self.size, self.size, device=self.device, dtype=torch.bfloat16)
            while not self._stop.is_set():
                for _ in range(8):
                    a = torch.tanh(a @ a)
                torch.cuda.synchronize(self.device)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def __enter__(self) -> "SteadyLoad":
        self._thread.start()
        time.sleep(SETTLE_S)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        assert self.error is None, self.error


def test_counter_and_integrated_power_agree_within_5_percent():
    from workers.meters import nvml

    binding = nvml.bind_cuda_device("cuda:0")
    if binding.method != "nvml-counter":
        pytest.skip(f"{binding.name} has no energy counter (pre-Volta): nothing to compare against")
    counter = nvml.NvmlSensor([binding])
    sampled = nvml.NvmlSensor([dataclasses.replace(binding, method="nvml-power")], sampling_period_s=0.02)
    with SteadyLoad("cuda:0"):
        counter.start()
        sampled.start()
        time.sleep(WINDOW_S)
        sampled_j = sampled.stop()
        counter_j = counter.stop()
    assert counter_j > 50.0 * WINDOW_S, f"{binding.name} drew only {counter_j / WINDOW_S:.0f} W under load"
    assert sampled_j == pytest.approx(counter_j, rel=0.05), (sampled_j, counter_j)


def test_every_cuda_device_maps_to_its_own_nvml_handle():
    """UUID and PCI bus id of the handle NVML gives back are those torch reports."""
    import pynvml

    from workers.meters import nvml

    seen = set()
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        binding = nvml.bind_cuda_device(f"cuda:{index}")
        assert binding.uuid.removeprefix("GPU-").removeprefix("MIG-") == str(props.uuid).removeprefix("GPU-")
        bus_id = pynvml.nvmlDeviceGetPciInfo(binding.handle).busId
        bus_id = bus_id.decode() if isinstance(bus_id, bytes) else bus_id
        assert bus_id.lower().endswith(f"{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0")
        seen.add(binding.uuid)
    assert len(seen) == torch.cuda.device_count()  # no two CUDA devices share a handle


def test_mapping_respects_cuda_visible_devices():
    """In a process that sees only the last GPU (as cuda:0), the meter binds that GPU --
    which an index-based lookup would get wrong on any machine with several GPUs."""
    import pynvml

    from workers.meters import nvml

    nvml._ensure_init()
    last = pynvml.nvmlDeviceGetCount() - 1
    expected_uuid = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(last))
    expected_uuid = expected_uuid.decode() if isinstance(expected_uuid, bytes) else expected_uuid
    code = "from workers.meters import nvml; print(nvml.bind_cuda_device('cuda:0').uuid)"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(last), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == expected_uuid


def test_make_meter_measures_a_cuda_stage():
    from workers.meters import make_meter

    meter = make_meter("cuda:0")
    gpu = meter.describe()["domains"]["gpu"]
    assert gpu["source"] in ("nvml-counter", "nvml-power"), gpu["skipped"]
    idle = meter.measure_idle(1.0)
    assert idle["gpu"] is not None and idle["gpu"] > 0
    with SteadyLoad("cuda:0"):
        meter.begin()
        time.sleep(2.0)
        reading = meter.end()
    assert reading.gpu_source == gpu["source"]
    assert reading.gpu_energy_j > idle["gpu"] * reading.duration_s  # load draws more than idle
    assert reading.gpu_idle_power_w == idle["gpu"]
