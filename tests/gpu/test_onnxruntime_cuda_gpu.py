"""ONNX Runtime on the CUDA provider (marked ``gpu``; skipped without a CUDA GPU and
``onnxruntime-gpu``): an fp32 session agrees with torch and keeps inputs and outputs in GPU
memory (I/O binding), fp16 agrees on top-1. Run with ``pytest -m gpu tests/gpu`` after
``pip install 'greensweep[gpu-runtimes]'``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from workers.backends import get_backend
from workers.backends.base import ThreadSettings, agreement, check_exact
from workers.models import build_model
from workers.types import ModelRef


def _cuda_provider() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _cuda_provider(),
                                                  reason="needs a CUDA GPU and onnxruntime-gpu")]

VIT = ModelRef("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2,
                                        "embed_dim": 64, "num_heads": 2, "num_classes": 10})


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_session_agrees_with_torch_on_gpu_memory(precision: str, tmp_path: Path):
    torch.manual_seed(0)
    model = build_model(VIT, 10).eval().to("cuda:0")
    x = torch.randn(16, 1, 8, 8, device="cuda:0")
    d = get_backend("onnxruntime").load().prepare(model, {"key": f"vit-{precision}", "size_bytes": 1},
                                                 precision=precision, device="cuda:0",
                                                 threads=ThreadSettings(intra_op=1), example=x, cache_dir=tmp_path)
    with torch.no_grad():
        out = d.run(x)
        found, short = agreement(model(x), out), agreement(model(x[:5]), d.run(x[:5]))
    assert out.device.type == "cuda" and d.describe()["settings"]["providers"][0] == "CUDAExecutionProvider"
    if precision == "fp32":
        check_exact(found, "onnxruntime cuda fp32")
        check_exact(short, "onnxruntime cuda fp32")
    else:
        assert found["top1_agreement"] >= 0.9
    d.close()
