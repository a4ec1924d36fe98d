"""GPU energy from NVML (NVIDIA's management library, the ``pynvml`` module of nvidia-ml-py).

Per GPU, the best figure the device offers:

* ``nvml-counter``: ``nvmlDeviceGetTotalEnergyConsumption``, the driver's cumulative
  energy counter in mJ (Volta and newer). A window is the difference of two reads.
* ``nvml-power``: where the counter answers NOT_SUPPORTED (pre-Volta GPUs), a
  background thread samples ``nvmlDeviceGetPowerUsage`` (mW) every
  ``sampling_period_s`` (at most 100 ms) and integrates with the trapezoid rule; the
  window's edges are sampled synchronously, so the integral spans exactly the window.

A stage's CUDA devices are matched to NVML handles by **UUID** (PCI bus id as the
fallback, e.g. for a MIG instance, whose energy is then that of its whole GPU), never
by index: CUDA numbers only the devices in ``CUDA_VISIBLE_DEVICES``, in that order,
while NVML numbers every GPU on the node, so ``cuda:0`` may well be NVML device 3.

Every ``pynvml.NVMLError`` is translated here into :class:`~workers.meters.base.MeterError`
(:class:`~workers.meters.base.SensorUnavailable` while probing). NVML is initialised
once per process and never shut down: it is reference-counted, cheap to keep, and a
shutdown would pull it from under any other thread still using it.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import pynvml

from workers.meters.base import Domain, MeterError, Sensor, SensorUnavailable

GpuMethod = Literal["nvml-counter", "nvml-power"]
DEFAULT_SAMPLING_PERIOD_S = 0.05
MAX_SAMPLING_PERIOD_S = 0.1

# None: not (successfully) tried yet; True: initialised; SensorUnavailable: no NVML here.
_init_outcome: bool | SensorUnavailable | None = None


def _translate(error: pynvml.NVMLError, doing: str) -> SensorUnavailable:
    """An NVML error as the project's error, classified for the factory's skip list."""
    if isinstance(error, (pynvml.NVMLError_LibraryNotFound, pynvml.NVMLError_DriverNotLoaded)):
        return SensorUnavailable("absent", f"NVML {doing}: {error} -- no NVIDIA driver on this node")
    if isinstance(error, pynvml.NVMLError_NoPermission):
        return SensorUnavailable("no-permission", f"NVML {doing}: {error} -- run as a user allowed to query the GPU")
    if isinstance(error, pynvml.NVMLError_NotSupported):
        return SensorUnavailable("unsupported", f"NVML {doing}: {error}")
    return SensorUnavailable("error", f"NVML {doing}: {error}")


def _ensure_init() -> None:
    """Initialise NVML once per process. A missing library or driver is remembered (it
    will not appear mid-run, and each retry would search for the library again); any
    other failure is retried by the next meter."""
    global _init_outcome
    if isinstance(_init_outcome, SensorUnavailable):
        raise SensorUnavailable(_init_outcome.reason, _init_outcome.detail)
    if _init_outcome is None:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            error = _translate(e, "init failed")
            if error.reason == "absent":
                _init_outcome = error
            raise error from e
        _init_outcome = True


@dataclass(frozen=True)
class GpuBinding:
    """One CUDA device matched to its NVML handle, and how its energy is read."""

    cuda_device: str  # "cuda:0", as the stage names it
    uuid: str  # NVML's, e.g. "GPU-8f6f...". The physical GPU, whatever CUDA calls it
    pci_bus_id: str
    name: str
    method: GpuMethod
    handle: Any = dataclasses.field(compare=False, repr=False)

    def to_dict(self) -> dict[str, str]:
        return {"cuda_device": self.cuda_device, "uuid": self.uuid, "pci_bus_id": self.pci_bus_id,
                "name": self.name, "source": self.method}


def bind_cuda_device(device: str) -> GpuBinding:
    """Find the NVML handle of torch ``device`` ("cuda", "cuda:1") and pick its method:
    the energy counter where supported, else power sampling.

    Raises :class:`SensorUnavailable` when NVML cannot be used or the GPU reports
    neither figure.
    """
    _ensure_init()
    cuda_uuid, cuda_pci_bus_id = _cuda_identity(device)
    handle = _handle_for(device, cuda_uuid, cuda_pci_bus_id)
    try:
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        pci_bus_id = _as_str(pynvml.nvmlDeviceGetPciInfo(handle).busId)
    except pynvml.NVMLError as e:
        raise _translate(e, f"reading the identity of {device}") from e
    method: GpuMethod
    try:
        pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        method = "nvml-counter"
    except pynvml.NVMLError_NotSupported:
        try:
            pynvml.nvmlDeviceGetPowerUsage(handle)
        except pynvml.NVMLError_NotSupported as e:
            raise SensorUnavailable(
                "unsupported", f"{name} ({device}, {uuid}) reports neither total energy nor power usage"
            ) from e
        except pynvml.NVMLError as e:
            raise _translate(e, f"reading the power of {device}") from e
        method = "nvml-power"
    except pynvml.NVMLError as e:
        raise _translate(e, f"reading the energy counter of {device}") from e
    return GpuBinding(device, uuid, pci_bus_id, name, method, handle)


def _cuda_identity(device: str) -> tuple[str, str | None]:
    """(UUID, PCI bus id or None) of a torch CUDA device, as CUDA sees it after
    CUDA_VISIBLE_DEVICES. Torch builds without the PCI fields give None."""
    import torch

    if not torch.cuda.is_available():
        raise SensorUnavailable("absent", f"{device}: torch sees no CUDA device on this node")
    try:
        index = torch.device(device).index
        props = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    except (RuntimeError, AssertionError) as e:  # torch's answers for a bad index or a broken CUDA
        raise SensorUnavailable("error", f"{device}: torch cannot describe it: {e}") from e
    pci = [getattr(props, f"pci_{part}_id", None) for part in ("domain", "bus", "device")]
    pci_bus_id = None if None in pci else f"{pci[0]:08X}:{pci[1]:02X}:{pci[2]:02X}.0"
    return str(props.uuid), pci_bus_id


def _handle_for(device: str, cuda_uuid: str, pci_bus_id: str | None) -> Any:
    """NVML handle by UUID (torch prints it without NVML's "GPU-" prefix), else by PCI bus id."""
    uuid = cuda_uuid if cuda_uuid.startswith(("GPU-", "MIG-")) else f"GPU-{cuda_uuid}"
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)
    except pynvml.NVMLError_NotFound as e:
        if pci_bus_id is None:
            raise SensorUnavailable("error", f"NVML knows no GPU with {device}'s UUID {uuid}") from e
    except pynvml.NVMLError as e:
        raise _translate(e, f"finding {device} ({uuid})") from e
    try:
        return pynvml.nvmlDeviceGetHandleByPciBusId(pci_bus_id)
    except pynvml.NVMLError as e:
        raise _translate(e, f"finding {device} by UUID {uuid} or PCI bus id {pci_bus_id}") from e


class NvmlSensor(Sensor):
    """The ``gpu`` domain: the sum over every GPU the stage uses.

    The domain's source is ``nvml-counter`` when every GPU has the counter and
    ``nvml-power`` when any is integrated from power samples (the weaker method labels
    the sum); :meth:`describe` lists each GPU's own.
    """

    domain: Domain = "gpu"

    def __init__(self, bindings: Sequence[GpuBinding], sampling_period_s: float = DEFAULT_SAMPLING_PERIOD_S) -> None:
        if not bindings:
            raise ValueError("an NvmlSensor needs at least one GPU")
        if not 0 < sampling_period_s <= MAX_SAMPLING_PERIOD_S:
            raise ValueError(f"sampling_period_s must be in (0, {MAX_SAMPLING_PERIOD_S}], got {sampling_period_s}")
        self.bindings = tuple(bindings)
        self.sampling_period_s = sampling_period_s
        self.source = "nvml-power" if any(b.method == "nvml-power" for b in bindings) else "nvml-counter"
        self._counters = [b for b in self.bindings if b.method == "nvml-counter"]
        sampled = [b for b in self.bindings if b.method == "nvml-power"]
        self._integrator = _PowerIntegrator(sampled, sampling_period_s) if sampled else None
        self._counter_start_mj: list[int] | None = None

    def start(self) -> None:
        self._counter_start_mj = [_total_energy_mj(b) for b in self._counters]
        if self._integrator is not None:
            self._integrator.start()

    def stop(self) -> float:
        if self._counter_start_mj is None:
            raise RuntimeError("NvmlSensor.stop() called without start()")
        start_mj, self._counter_start_mj = self._counter_start_mj, None
        energy_j = sum(_total_energy_mj(b) - mj for b, mj in zip(self._counters, start_mj)) / 1000.0
        if self._integrator is not None:
            energy_j += self._integrator.stop()
        return energy_j

    def close(self) -> None:
        if self._integrator is not None:
            self._integrator.close()

    def describe(self) -> dict[str, Any]:
        return {"gpus": [b.to_dict() for b in self.bindings], "sampling_period_s": self.sampling_period_s}


def probe_nvml(devices: Sequence[str], sampling_period_s: float = DEFAULT_SAMPLING_PERIOD_S) -> NvmlSensor:
    """An :class:`NvmlSensor` over every CUDA device in ``devices``, or
    :class:`SensorUnavailable` (a GPU domain without all its GPUs would understate)."""
    cuda_devices = [d for d in devices if d.startswith("cuda")]
    if not cuda_devices:
        raise SensorUnavailable("not-applicable", f"the stage uses no CUDA device ({', '.join(devices)})")
    return NvmlSensor([bind_cuda_device(d) for d in cuda_devices], sampling_period_s)


def _as_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _total_energy_mj(binding: GpuBinding) -> int:
    try:
        return pynvml.nvmlDeviceGetTotalEnergyConsumption(binding.handle)
    except pynvml.NVMLError as e:
        raise MeterError(f"NVML energy counter of {binding.cuda_device} ({binding.uuid}): {e}") from e


def _power_w(binding: GpuBinding) -> float:
    try:
        return pynvml.nvmlDeviceGetPowerUsage(binding.handle) / 1000.0
    except pynvml.NVMLError as e:
        raise MeterError(f"NVML power usage of {binding.cuda_device} ({binding.uuid}): {e}") from e


class _PowerIntegrator:
    """Trapezoid integral of sampled power, per GPU, on a background thread."""

    def __init__(self, bindings: Sequence[GpuBinding], period_s: float) -> None:
        self.bindings = tuple(bindings)
        self.period_s = period_s
        self._lock = threading.Lock()
        self._last: list[tuple[float, float]] = []  # (perf_counter s, W) per GPU
        self._energy_j = 0.0
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> None:
        self.close()
        with self._lock:
            self._last = [(time.perf_counter(), _power_w(b)) for b in self.bindings]
            self._energy_j = 0.0
        self._error = None
        self._stop_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nvml-power-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Read every GPU's power now and add the trapezoid since its previous sample."""
        with self._lock:
            for i, binding in enumerate(self.bindings):
                power_w = _power_w(binding)
                now_s = time.perf_counter()
                last_s, last_w = self._last[i]
                self._energy_j += (power_w + last_w) / 2.0 * (now_s - last_s)
                self._last[i] = (now_s, power_w)

    def stop(self) -> float:
        """Stop sampling, take the closing edge sample, return the energy in joules."""
        if self._thread is None:
            raise RuntimeError("_PowerIntegrator.stop() called without start()")
        self.close()
        self._thread = None
        if self._error is not None:
            raise MeterError(f"NVML power sampling failed during the window: {self._error}") from self._error
        self.sample()
        return self._energy_j

    def close(self) -> None:
        self._stop_event.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop_event.wait(self.period_s):
            try:
                self.sample()
            except BaseException as e:  # noqa: BLE001 - surfaced by stop(), not lost in a thread
                self._error = e
                return
