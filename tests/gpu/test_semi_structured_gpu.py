"""2:4 sparsity on torch's semi-structured sparse kernels (marked ``gpu``; skipped without
a CUDA GPU of compute capability 8.0 or newer).

Run on such a machine with ``pytest -m gpu tests/gpu``. The CPU tests
(``tests/unit/test_prune_semi_structured.py``) cover the pattern, the layer selection and
the shape rules; these check what only the GPU can: that the fitting layers really hold
``SparseSemiStructuredTensor`` weights, that the sparse model computes what the dense one
does at the same precision, and that an evaluation records the run as materialized.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers.backends.base import ThreadSettings, agreement
from workers.backends.torch import TorchBackend
from workers.modelio import load_artifact
from workers.sparsity import kernel_backend, kernel_misfit
from workers.stages import evaluate, prune
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv


def _ampere_or_newer() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _ampere_or_newer(),
                       reason="needs a CUDA GPU of compute capability 8.0 (Ampere) or newer for the 2:4 kernels"),
]

# Every Linear but the classifier fits cuSPARSELt's 16 x 16 blocks: qkv (192, 64), proj (64, 64),
# fc1 (256, 64), fc2 (64, 256); head (10, 64) is the classifier.
FITTING = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 10},
)
# mlp_ratio 2.5: fc1 (120, 48) and fc2 (48, 120) fit no kernel block; qkv (144, 48), proj (48, 48) fit cuSPARSELt's.
MIXED = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3, "mlp_ratio": 2.5,
     "num_classes": 10},
)
GPU = WorkerEnv(device="cuda", num_threads=1)


def _pruned(root: str, ref: ModelRef, key: str) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    torch.manual_seed(0)
    out = prune.run(StageTask(sweep_id="s", key=key, kind="prune", params={"method": "semi-structured"},
                              parent_key=None, model=ref, dataset=DatasetRef("digits"), seed=0, artifact_root=root),
                    WorkerEnv(device="cpu", num_threads=1))
    model, manifest = load_artifact(root, key, device="cuda")
    return model, manifest, out.metrics


def _prepare(model: torch.nn.Module, manifest: dict[str, Any], precision: str, example: torch.Tensor):
    return TorchBackend().prepare(model, manifest, precision=precision, device="cuda",
                                  threads=ThreadSettings(intra_op=1), example=example, cache_dir=None)


@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_fitting_layers_run_on_the_sparse_kernels_and_agree_with_the_dense_model(tmp_path, precision, dtype):
    from torch.sparse import SparseSemiStructuredTensor

    model, manifest, metrics = _pruned(str(tmp_path), FITTING, f"fit-{precision}")
    torch.manual_seed(1)
    images = torch.randn(64, 1, 8, 8, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        dense = model(images).float()  # the same pattern on dense kernels, at the same precision
    deployable = _prepare(model, manifest, precision, images)
    record = deployable.sparsity
    assert record is not None and record["materialized"] is True, record
    assert record["kernels"] == kernel_backend() and record["pattern"] == "2:4"
    assert record["sparse_layers"] == metrics["sparse_layers"]  # all eight fit
    assert record["dense_layers"] == [{"name": "head", "why": "the classifier (always dense)"}]
    layers = dict(deployable.model.named_modules())
    for name in record["sparse_layers"]:
        assert isinstance(layers[name].weight, SparseSemiStructuredTensor), name
        assert layers[name].weight.dtype == dtype
    assert not isinstance(model.blocks[0].mlp.fc1.weight, SparseSemiStructuredTensor)  # the reference stays dense
    with torch.no_grad():
        sparse = deployable.run(images)
    found = agreement(dense, sparse)
    tolerance = 2e-2 * max(1.0, found["max_abs_logit"])
    assert found["max_abs_diff"] <= tolerance, found
    assert found["top1_agreement"] >= 0.95, found


def test_layers_whose_shapes_do_not_fit_stay_dense_and_are_listed(tmp_path):
    model, manifest, metrics = _pruned(str(tmp_path), MIXED, "mixed")
    images = torch.randn(16, 1, 8, 8, device="cuda")
    record = _prepare(model, manifest, "fp16", images).sparsity
    assert record is not None
    layers = dict(model.named_modules())
    fits = [n for n in metrics["sparse_layers"] if kernel_misfit(tuple(layers[n].weight.shape), "fp16",
                                                                  kernel_backend()) is None]
    misfits = [n for n in metrics["sparse_layers"] if n not in fits]
    if kernel_backend() == "cusparselt":
        assert fits == ["blocks.0.attn.qkv", "blocks.0.attn.proj"] and misfits == ["blocks.0.mlp.fc1",
                                                                                   "blocks.0.mlp.fc2"]
    assert record["materialized"] is bool(fits)
    assert record["sparse_layers"] == fits
    dense = {d["name"]: d["why"] for d in record["dense_layers"]}
    for name in misfits:
        assert "is not a multiple of" in dense[name], dense


def test_fp32_on_the_gpu_is_simulated_and_says_why(tmp_path):
    model, manifest, metrics = _pruned(str(tmp_path), FITTING, "fp32")
    deployable = _prepare(model, manifest, "fp32", torch.randn(4, 1, 8, 8, device="cuda"))
    assert deployable.sparsity is not None and deployable.sparsity["materialized"] is False
    assert deployable.sparsity["reason"].startswith("fp32: the 2:4 kernels run fp16 / bf16")
    assert deployable.sparsity["sparse_layers"] == metrics["sparse_layers"]
    assert deployable.model is model


def test_a_gpu_evaluation_records_the_run_as_materialized(tmp_path):
    root = str(tmp_path)
    _pruned(root, FITTING, "eval")
    params = {"precision": "fp16", "repeats": 1, "min_window_s": 0.0, "idle_s": 0.0, "warmup_s": 0.0,
              "warmup_batches": 1}
    task = StageTask(sweep_id="s", key="e", kind="evaluate", params=params, parent_key="eval", model=FITTING,
                     dataset=DatasetRef("digits"), seed=0, artifact_root=root)
    metrics = evaluate.run(task, GPU).metrics
    assert metrics["sparsity"]["materialized"] is True, metrics["sparsity"]
    assert metrics["materialized"] is False  # the artifact itself is a dense tensor with the pattern
    assert metrics["agreement"]["top1_agreement"] >= 0.9
