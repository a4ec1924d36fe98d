"""TensorRT on the backend seam (marked ``gpu``; skipped without a CUDA GPU and the
``tensorrt`` package).

Run on such a machine with ``pip install tensorrt`` and ``pytest -m gpu tests/gpu``. The CPU
tests cover the pairing, the run-start refusal off NVIDIA nodes and the symmetric Q/DQ
artifact (``tests/unit/test_plan_runtimes.py``, ``tests/unit/test_backend_runtimes.py``);
these check what only a GPU can: an fp32 engine computes what torch does (TF32 off), an
fp16 engine from the strongly typed fp16 export agrees on top-1, the engine is cached by
GPU and reused, and an int8 engine from the Q/DQ artifact runs in a real evaluation.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from workers.backends import get_backend
from workers.backends.base import ThreadSettings, agreement, check_exact
from workers.modelio import save_artifact
from workers.models import build_model
from workers.stages import evaluate, quantize
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("tensorrt") is None,
                       reason="needs a CUDA GPU and TensorRT (pip install tensorrt)"),
]

VIT = ModelRef("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2,
                                        "embed_dim": 64, "num_heads": 2, "num_classes": 10})
ENV = WorkerEnv(device="cuda:0", num_threads=1)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(VIT, 10).eval().to("cuda:0")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_agrees_with_torch_and_is_cached(precision: str, tmp_path: Path):
    model, x = _model(), torch.randn(16, 1, 8, 8, device="cuda:0")
    backend = get_backend("tensorrt").load()
    manifest = {"key": f"vit-{precision}", "size_bytes": 1}
    d = backend.prepare(model, manifest, precision=precision, device="cuda:0", threads=ThreadSettings(intra_op=1),
                        example=x, cache_dir=tmp_path)
    with torch.no_grad():
        found = agreement(model(x), d.run(x))
        short = agreement(model(x[:5]), d.run(x[:5]))  # the optimization profile takes shorter batches
    if precision == "fp32":
        check_exact(found, "tensorrt fp32")
        check_exact(short, "tensorrt fp32")
    else:
        assert found["top1_agreement"] >= 0.9 and found["max_abs_diff"] < 0.05 * found["max_abs_logit"] + 0.05
    info = d.describe()
    assert info["settings"]["strongly_typed"] and info["settings"]["compute_capability"]
    assert info["settings"]["engine"] == "exported now" and d.size_bytes > 0
    d.close()
    again = backend.prepare(model, manifest, precision=precision, device="cuda:0", threads=ThreadSettings(intra_op=1),
                            example=x, cache_dir=tmp_path)
    assert again.describe()["settings"]["engine"] == "exported earlier (cache)"
    again.close()


def test_int8_engine_from_the_qdq_artifact_in_an_evaluation(tmp_path: Path):
    root = str(tmp_path / "artifacts")
    torch.manual_seed(0)
    save_artifact(build_model(VIT, 10), root=root, key="parent", model_ref=VIT, num_classes=10, input_shape=(1, 8, 8),
                  materialized=True, compression={"chain": []})
    q = StageTask("sw", "q-trt", "quantize", {"engine": "tensorrt", "weights": "int8", "activations": "int8",
                                              "per_channel": True, "calibration_batches": 2, "batch_size": 16},
                  "parent", VIT, DatasetRef("digits"), 0, root)
    quantize.run(q, WorkerEnv(device="cpu", num_threads=1))
    task = StageTask("sw", "ev", "evaluate", {"runtime": "tensorrt", "precision": "fp32", "repeats": 2,
                                              "min_window_s": 0.0, "idle_s": 0.0, "warmup_s": 0.0,
                                              "warmup_batches": 1, "batch_size": 64},
                     "q-trt", VIT, DatasetRef("digits"), 0, root)
    out = evaluate.run(task, ENV)
    assert out.metrics["runtime"]["runtime"] == "tensorrt"
    assert out.metrics["runtime"]["settings"]["engine"] == "quantized payload"
    assert 0.0 <= out.metrics["top1"] <= 1.0 and out.metrics["agreement"]["top1_agreement"] >= 0.5
