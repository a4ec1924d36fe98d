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
    assert spec.formats == ("torch",) and "fp32" in spec.precisions and spec.installed()
    assert isinstance(spec.load(), Backend)
    with pytest.raises(KeyError, match="unknown runtime 'tensorrtx'; known runtimes: torch"):
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


def test_torch_refuses_what_it_cannot_run() -> None:
    backend = get_backend("torch").load()
    assert "fp32 only" in backend.unsupported("cpu", "int8")
    with pytest.raises(ValueError, match="fp32 only"):
        backend.prepare(_tiny(), {"size_bytes": 1}, precision="int8", device="cpu",
                        threads=ThreadSettings(intra_op=1), example=torch.zeros(1, 16), cache_dir=None)
    if not torch.cuda.is_available():
        assert "no CUDA device" in backend.unsupported("cuda:0", "fp32")


def test_thread_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ThreadSettings(intra_op=0)


def test_a_runtime_is_one_registration() -> None:
    spec = register_backend(BackendSpec("echo", "workers.backends.torch:TorchBackend", formats=("torch",),
                                        precisions=("fp32",), package="torch", module="torch"))
    try:
        assert get_backend("echo") is spec and spec.load().version() == torch.__version__
    finally:
        BACKENDS.pop("echo")
