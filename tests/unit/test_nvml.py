"""workers.meters.nvml with NVML mocked where it is imported (``workers.meters.nvml.pynvml``)
and torch's CUDA device properties faked, so no GPU is needed."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import pynvml
import pytest
import torch

from workers.meters import MeterError, SensorUnavailable, make_meter, nvml


@dataclass
class FakeGpu:
    """One physical GPU as NVML sees it. ``counter``: has the energy counter (Volta+)."""

    uuid: str
    pci_bus_id: str  # NVML's form, "00000000:17:00.0"
    name: str = "NVIDIA H200"
    counter: bool = True
    energy_mj: int = 1_000_000
    power_mw: int | Callable[[], int] = 100_000
    power_supported: bool = True
    fail: dict[str, BaseException] = field(default_factory=dict)  # NVML function -> error
    power_reads: int = 0


class FakeNvml:
    """The slice of ``pynvml`` the meter uses, over a list of :class:`FakeGpu` (NVML order)."""

    def __init__(self, devices: list[FakeGpu], init_error: str | None = None) -> None:
        for name in dir(pynvml):
            if name.startswith("NVMLError"):
                setattr(self, name, getattr(pynvml, name))
        self.devices = devices
        self.init_error = init_error
        self.init_calls = 0

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error:
            raise getattr(pynvml, f"NVMLError_{self.init_error}")()

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeGpu:
        for gpu in self.devices:
            if gpu.uuid == uuid:
                return gpu
        raise pynvml.NVMLError_NotFound()

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str) -> FakeGpu:
        for gpu in self.devices:
            if gpu.pci_bus_id.lower() == bus_id.lower():
                return gpu
        raise pynvml.NVMLError_NotFound()

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        return handle.name

    def nvmlDeviceGetPciInfo(self, handle: FakeGpu) -> SimpleNamespace:
        return SimpleNamespace(busId=handle.pci_bus_id.encode())  # a C char array: bytes

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        self._maybe_fail(handle, "energy")
        if not handle.counter:
            raise pynvml.NVMLError_NotSupported()
        return handle.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._maybe_fail(handle, "power")
        if not handle.power_supported:
            raise pynvml.NVMLError_NotSupported()
        handle.power_reads += 1
        return handle.power_mw() if callable(handle.power_mw) else handle.power_mw

    @staticmethod
    def _maybe_fail(handle: FakeGpu, what: str) -> None:
        if what in handle.fail:
            raise handle.fail[what]


class FakeUuid:
    """torch's ``_CUuuid``: prints the UUID without NVML's "GPU-" prefix."""

    def __init__(self, nvml_uuid: str) -> None:
        self._text = nvml_uuid.removeprefix("GPU-")

    def __str__(self) -> str:
        return self._text


@dataclass
class FakeProps:
    uuid: FakeUuid
    pci_domain_id: int
    pci_bus_id: int
    pci_device_id: int


GPU_A = FakeGpu(uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000", pci_bus_id="00000000:17:00.0")
GPU_B = FakeGpu(uuid="GPU-bbbbbbbb-0000-0000-0000-000000000000", pci_bus_id="00000000:65:00.0")


@pytest.fixture(autouse=True)
def reset_meter_singletons(monkeypatch):
    """Each test initialises its own fake NVML (the module caches the init outcome)."""
    monkeypatch.setattr(nvml, "_init_outcome", None)


@pytest.fixture
def gpus(monkeypatch):
    """Install fake GPUs: NVML sees every one in the given order; torch sees those in
    CUDA_VISIBLE_DEVICES (physical indices), renumbered from 0 as CUDA does."""
    synced: list[str] = []

    def install(devices: list[FakeGpu], visible: str | None = None, **nvml_kwargs: Any) -> FakeNvml:
        fake = FakeNvml(devices, **nvml_kwargs)
        monkeypatch.setattr(nvml, "pynvml", fake)
        if visible is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
            order = list(range(len(devices)))
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
            order = [int(i) for i in visible.split(",")]

        def props(index: int) -> FakeProps:
            gpu = devices[order[index]]
            domain, bus, rest = gpu.pci_bus_id.split(":")
            return FakeProps(FakeUuid(gpu.uuid), int(domain, 16), int(bus, 16), int(rest.split(".")[0], 16))

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", props)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(str(device)))
        fake.synced = synced  # type: ignore[attr-defined]
        return fake

    return install


def fresh(gpu: FakeGpu, **changes: Any) -> FakeGpu:
    return FakeGpu(**{**gpu.__dict__, "fail": {}, "power_reads": 0, **changes})


def test_counter_path(gpus, tmp_path):
    a = fresh(GPU_A)
    fake = gpus([a])
    meter = make_meter("cuda:0", powercap_root=tmp_path)
    meter.begin()
    a.energy_mj += 12_345
    reading = meter.end()
    assert reading.gpu_energy_j == pytest.approx(12.345) and reading.gpu_source == "nvml-counter"
    assert fake.synced == ["cuda:0", "cuda:0"]  # the device's queue drained at both edges
    gpu = meter.describe()["domains"]["gpu"]
    assert gpu["source"] == "nvml-counter" and gpu["skipped"] == []
    assert gpu["gpus"] == [{"cuda_device": "cuda:0", "uuid": a.uuid, "pci_bus_id": "00000000:17:00.0",
                            "name": "NVIDIA H200", "source": "nvml-counter"}]


def test_sampling_path_for_a_pre_volta_gpu(gpus, tmp_path):
    """The counter answers NOT_SUPPORTED: power is sampled (<= 100 ms) and integrated."""
    p100 = fresh(GPU_A, name="Tesla P100-PCIE-16GB", counter=False, power_mw=150_000)
    gpus([p100])
    meter = make_meter("cuda:0", powercap_root=tmp_path, nvml_sampling_period_s=0.02)
    assert meter.describe()["domains"]["gpu"]["source"] == "nvml-power"
    meter.begin()
    time.sleep(0.3)
    reading = meter.end()
    assert reading.gpu_source == "nvml-power"
    assert reading.gpu_energy_j == pytest.approx(150.0 * reading.duration_s, rel=0.05)
    assert p100.power_reads >= 1 + 5  # probe, edges, and the thread's samples in between


def test_trapezoid_integration(monkeypatch):
    """Energy is the trapezoid area under the samples, edge to edge."""
    clock = iter([0.0, 1.0, 3.0])
    powers = iter([100_000, 200_000, 200_000])  # mW at t = 0, 1, 3
    monkeypatch.setattr(nvml.time, "perf_counter", lambda: next(clock))
    gpu = fresh(GPU_A, counter=False, power_mw=lambda: next(powers))
    monkeypatch.setattr(nvml, "pynvml", FakeNvml([gpu]))
    binding = nvml.GpuBinding("cuda:0", gpu.uuid, gpu.pci_bus_id, gpu.name, "nvml-power", gpu)
    integrator = nvml._PowerIntegrator([binding], period_s=60.0)  # the thread never samples here
    integrator.start()  # t=0: 100 W
    integrator.sample()  # t=1: 200 W
    assert integrator.stop() == pytest.approx(150.0 * 1 + 200.0 * 2)  # closing sample at t=3


def test_nvml_error_during_a_window_is_a_meter_error(gpus, tmp_path):
    a = fresh(GPU_A)
    gpus([a])
    meter = make_meter("cuda:0", powercap_root=tmp_path)
    meter.begin()
    a.fail["energy"] = pynvml.NVMLError_GpuIsLost()
    with pytest.raises(MeterError, match=r"NVML energy counter of cuda:0 .*GPU is lost"):
        meter.end()


def test_sampling_thread_error_is_a_meter_error(gpus, tmp_path):
    old = fresh(GPU_A, counter=False)
    gpus([old])
    meter = make_meter("cuda:0", powercap_root=tmp_path, nvml_sampling_period_s=0.01)
    meter.begin()
    old.fail["power"] = pynvml.NVMLError_Unknown()
    time.sleep(0.1)
    with pytest.raises(MeterError, match="NVML power sampling failed"):
        meter.end()


@pytest.mark.parametrize(
    ("setup", "reason", "text"),
    [
        (dict(init_error="LibraryNotFound"), "absent", "no NVIDIA driver"),
        (dict(init_error="DriverNotLoaded"), "absent", "no NVIDIA driver"),
        (dict(init_error="Unknown"), "error", "NVML init failed"),
        (dict(gpu=dict(fail={"energy": pynvml.NVMLError_NoPermission()})), "no-permission", "Insufficient Permissions"),
        (dict(gpu=dict(counter=False, power_supported=False, name="GRID K520")), "unsupported",
         "GRID K520 .* reports neither total energy nor power usage"),
    ],
)
def test_why_nvml_was_skipped(gpus, tmp_path, setup, reason, text):
    gpus([fresh(GPU_A, **setup.get("gpu", {}))], init_error=setup.get("init_error"))
    meter = make_meter("cuda:0", powercap_root=tmp_path)
    gpu = meter.describe()["domains"]["gpu"]
    assert gpu["source"] == "none"
    (skip,) = gpu["skipped"]
    assert skip["backend"] == "nvml" and skip["reason"] == reason
    assert re.search(text, skip["detail"]), skip["detail"]
    meter.begin()
    assert meter.end().gpu_energy_j is None  # unknown, not 0 J


def test_cuda_device_is_found_by_uuid_not_index(gpus, tmp_path):
    """CUDA_VISIBLE_DEVICES=1,0: cuda:0 is NVML's device 1, and cuda:1 is NVML's device 0."""
    a, b = fresh(GPU_A, energy_mj=0), fresh(GPU_B, energy_mj=0)
    gpus([a, b], visible="1,0")
    meter0 = make_meter("cuda:0", powercap_root=tmp_path)
    meter1 = make_meter("cuda:1", powercap_root=tmp_path)
    assert meter0.describe()["domains"]["gpu"]["gpus"][0]["uuid"] == b.uuid
    assert meter1.describe()["domains"]["gpu"]["gpus"][0]["uuid"] == a.uuid
    meter0.begin()
    b.energy_mj += 7_000
    a.energy_mj += 1_000
    assert meter0.end().gpu_energy_j == pytest.approx(7.0)


def test_pci_bus_id_when_the_uuid_is_not_nvmls(gpus, tmp_path):
    """A MIG instance has its own UUID, which NVML's GPU lookup does not know: fall back
    to the PCI bus id (the whole GPU's energy)."""
    a = fresh(GPU_A)
    gpus([a])
    nvml.pynvml.devices = [fresh(a, uuid="GPU-0f0f0f0f-0000-0000-0000-000000000000")]  # NVML knows another UUID
    binding = nvml.bind_cuda_device("cuda:0")
    assert binding.pci_bus_id == "00000000:17:00.0" and binding.uuid == "GPU-0f0f0f0f-0000-0000-0000-000000000000"


def test_unknown_uuid_without_a_pci_bus_id_is_skipped_with_a_reason(gpus, tmp_path, monkeypatch):
    gpus([fresh(GPU_A)])
    nvml.pynvml.devices = [fresh(GPU_A, uuid="GPU-0f0f0f0f-0000-0000-0000-000000000000")]
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: SimpleNamespace(uuid=FakeUuid(GPU_A.uuid)))
    (skip,) = make_meter("cuda:0", powercap_root=tmp_path).describe()["domains"]["gpu"]["skipped"]
    assert skip["reason"] == "error" and "NVML knows no GPU with cuda:0's UUID" in skip["detail"]


def test_every_gpu_of_the_stage_is_summed(gpus, tmp_path):
    a, b = fresh(GPU_A, energy_mj=0), fresh(GPU_B, counter=False, power_mw=50_000)
    gpus([a, b])
    meter = make_meter("cuda:0", devices=["cuda:0", "cuda:1"], powercap_root=tmp_path, nvml_sampling_period_s=0.02)
    gpu = meter.describe()["domains"]["gpu"]
    assert gpu["source"] == "nvml-power"  # the weaker method labels the sum
    assert [g["source"] for g in gpu["gpus"]] == ["nvml-counter", "nvml-power"]
    meter.begin()
    a.energy_mj += 3_000
    time.sleep(0.2)
    reading = meter.end()
    assert reading.gpu_energy_j == pytest.approx(3.0 + 50.0 * reading.duration_s, rel=0.05)


def test_default_cuda_device_is_the_current_one(gpus, tmp_path):
    gpus([fresh(GPU_A), fresh(GPU_B)])
    assert nvml.bind_cuda_device("cuda").uuid == GPU_A.uuid


def test_nvml_is_initialised_once(gpus, tmp_path):
    fake = gpus([fresh(GPU_A)])
    make_meter("cuda:0", powercap_root=tmp_path)
    make_meter("cuda:0", powercap_root=tmp_path)
    assert fake.init_calls == 1


def test_a_failed_init_is_not_retried_per_meter(gpus, tmp_path):
    fake = gpus([fresh(GPU_A)], init_error="LibraryNotFound")
    make_meter("cuda:0", powercap_root=tmp_path)
    make_meter("cuda:0", powercap_root=tmp_path)
    assert fake.init_calls == 1


def test_sampling_period_is_at_most_100_ms():
    binding = nvml.GpuBinding("cuda:0", GPU_A.uuid, GPU_A.pci_bus_id, GPU_A.name, "nvml-power", GPU_A)
    with pytest.raises(ValueError, match="sampling_period_s"):
        nvml.NvmlSensor([binding], sampling_period_s=0.2)


def test_cpu_only_stage_never_touches_nvml(gpus, tmp_path):
    fake = gpus([fresh(GPU_A)])
    with pytest.raises(SensorUnavailable, match="uses no CUDA device"):
        nvml.probe_nvml(["cpu"])
    make_meter("cpu", powercap_root=tmp_path)
    assert fake.init_calls == 0


def test_a_transient_init_error_is_retried(gpus, tmp_path):
    fake = gpus([fresh(GPU_A)], init_error="Unknown")
    assert make_meter("cuda:0", powercap_root=tmp_path).describe()["domains"]["gpu"]["source"] == "none"
    fake.init_error = None
    assert make_meter("cuda:0", powercap_root=tmp_path).describe()["domains"]["gpu"]["source"] == "nvml-counter"
    assert fake.init_calls == 2
