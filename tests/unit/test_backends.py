"""workers.backends: the execution seam every evaluation goes through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from workers.backends import BACKENDS, BackendSpec, get_backend, register_backend
from workers.backends.base import Backend, ThreadSettings


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_torch_is_registered_with_what_the_planner_may_read() -> None:
    spec = get_backend("torch")
    assert set(spec.runs) == {"torch", "quanto"} and spec.runs["quanto"] == ("fp32",) and spec.installed()
    assert spec.devices["cpu"] == ("fp32", "bf16") and "fp16" in spec.devices["cuda"]
    assert isinstance(spec.load(), Backend)
    with pytest.raises(KeyError, match="unknown runtime 'tensorrtx'; known runtimes: torch, onnxruntime, openvino"):
        get_backend("tensorrtx")


def test_torch_deployable_runs_the_module_and_records_how() -> None:
    model, x = _tiny(), torch.randn(5, 1, 4, 4)
    backend = get_backend("torch").load()
    deployable = backend.prepare(model, {"size_bytes": 1234}, precision="fp32", device="cpu",
                                 threads=ThreadSettings(intra_op=1), example=x, cache_dir=None)
    with torch.no_grad():
        assert torch.equal(deployable.run(x), model(x))
    info = deployable.describe()
    assert info["runtime"] == "torch" and info["runtime_version"] == torch.__version__
    assert info["precision"] == "fp32" and info["device"] == "cpu"
    assert info["threads"]["intra_op"] == 1 == torch.get_num_threads()
    assert deployable.size_bytes == 1234


def test_torch_refuses_what_it_cannot_run(monkeypatch) -> None:
    import workers.hardware

    backend = get_backend("torch").load()
    assert "CUDA devices only" in backend.unsupported("cpu", "fp16")
    with pytest.raises(ValueError, match="CUDA devices only"):
        backend.prepare(_tiny(), {"size_bytes": 1}, precision="fp16", device="cpu",
                        threads=ThreadSettings(intra_op=1), example=torch.zeros(1, 16), cache_dir=None)
    monkeypatch.setattr(workers.hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert "neither AVX512-BF16 nor AMX" in backend.unsupported("cpu", "bf16")
    monkeypatch.setattr(workers.hardware, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    assert backend.unsupported("cpu", "bf16") is None
    if not torch.cuda.is_available():
        assert "no CUDA device" in backend.unsupported("cuda:0", "fp32")


def test_thread_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ThreadSettings(intra_op=0)


def test_a_runtime_is_one_registration() -> None:
    spec = register_backend(BackendSpec("echo", "workers.backends.torch:TorchBackend", package="torch",
                                        module="torch", runs={"torch": ("fp32",)}, devices={"cpu": ("fp32",)}))
    try:
        assert get_backend("echo") is spec and spec.load().version() == torch.__version__
    finally:
        BACKENDS.pop("echo")
    with pytest.raises(ValueError, match="unknown precisions \\['int3'\\]"):
        register_backend(BackendSpec("bad", "x:Y", package="x", module="x", runs={"torch": ("int3",)}, devices={}))


def test_pairing_says_why_a_runtime_cannot_run_a_model() -> None:
    ort, ov, torch_ = (get_backend(n) for n in ("onnxruntime", "openvino", "torch"))
    assert ort.pairing("torch", "fp32") is None and ov.pairing("openvino", "auto") is None
    assert ort.pairing("openvino", "fp32") == "an openvino model runs on openvino, not on onnxruntime"
    assert torch_.pairing("quanto", "bf16") == "torch runs a quanto model at fp32, not bf16"
    assert ort.pairing("torch", "fp16", "cpu") == "onnxruntime on cpu runs fp32, not fp16"
    assert ort.pairing(None, "fp16", "cuda") is None
    assert ort.install_hint("cuda") == "onnxruntime-gpu" and ort.install_hint("cpu") == "onnxruntime"
