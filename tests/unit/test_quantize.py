"""workers.stages.quantize: every weights x activations mode on a tiny ViT, calibration on
train data only, measured kernel facts, and quantized artifacts (plain and pruned first)
that rebuild in another process with identical outputs."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from tests.unit.test_models import capturing_saves, reference_outputs, reload_in_subprocess
from workers import data, models
from workers.artifacts import STRUCTURE_FILE, artifact_dir
from workers.modelio import load_artifact, save_artifact
from workers.models import build_model
from workers.stages import prune, quantize
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

ENV = WorkerEnv(device="cpu", num_threads=2)
VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 10},
)
SHAPE = (1, 8, 8)
DATA = DatasetRef("synthetic", options={"input_shape": list(SHAPE), "num_classes": 10, "num_samples": 64})
MODES = [(w, a) for w in ("int8", "float8", "int4") for a in ("none", "int8")]


def _task(
    root: str, key: str, parent_key: str | None, model: ModelRef = VIT, dataset: DatasetRef = DATA, **params: Any
) -> StageTask:
    return StageTask(
        sweep_id="sweep",
        key=key,
        kind="quantize",
        params={"calibration_batches": 2, "batch_size": 16, **params},
        parent_key=parent_key,
        model=model,
        dataset=dataset,
        seed=0,
        artifact_root=root,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """A trained-looking float ViT parent ("vit") and a structurally pruned one ("vit-pruned")."""
    root = str(tmp_path_factory.mktemp("artifacts"))
    torch.manual_seed(0)
    save_artifact(
        build_model(VIT, 10), root=root, key="vit", model_ref=VIT, num_classes=10, input_shape=SHAPE,
        materialized=True, compression={"chain": []},
    )
    prune_task = StageTask("sweep", "vit-pruned", "prune", {"method": "structured", "ratio": 0.5, "mode": "all"},
                           "vit", VIT, DATA, 0, root)
    prune.run(prune_task, ENV)
    return root


@pytest.fixture(scope="module")
def quantized(root) -> dict[str, tuple[Any, nn.Module, nn.Module]]:
    """Every mode quantized once from "vit" (plus w8a8 from "vit-pruned"), by key:
    (stage output, the model as handed to save_artifact, the float parent)."""
    out = {}
    with capturing_saves() as saved:
        jobs = [(f"vit-w{w}-a{a}", "vit", w, a) for w, a in MODES] + [("vit-pruned-w8a8", "vit-pruned", "int8", "int8")]
        for key, parent, w, a in jobs:
            result = quantize.run(_task(root, key, parent, weights=w, activations=a), ENV)
            out[key] = (result, saved[key], load_artifact(root, parent)[0])
    return out


@pytest.mark.parametrize("weights,activations", MODES)
def test_every_mode_quantizes_and_shrinks_the_weights(root, quantized, weights, activations):
    key = f"vit-w{weights}-a{activations}"
    result, model, parent = quantized[key]
    m = result.metrics
    assert m["size_bytes_after"] < m["size_bytes_before"] / (2.5 if weights != "int4" else 3.5)
    assert m["calibration_samples"] == (0 if activations == "none" else 32)
    assert m["float_modules"] == 0
    assert result.artifact.materialized is True and result.energy is not None
    assert models.is_quantized(model)

    loaded, manifest = load_artifact(root, key)
    assert manifest["quantized"] is True
    assert manifest["params"] == sum(p.numel() for p in parent.parameters())  # logical elements, not bytes
    assert manifest["macs"] == models.count_macs(parent, SHAPE)
    assert manifest["compression"]["chain"][-1] == {
        "kind": "quantize", "weights": weights, "activations": activations, "calibration_batches": 2, "batch_size": 16,
        "engine": "quanto", "mode": "static", "per_channel": False
    }
    inputs = torch.randn(8, *SHAPE)
    with torch.no_grad():
        out, ref = loaded(inputs), parent(inputs)
    assert torch.isfinite(out).all()
    # Low-bit, untrained: the logits still follow the float model's.
    assert nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > (0.9 if weights != "int4" else 0.7)


@pytest.mark.parametrize("weights,activations", MODES)
def test_kernel_facts_are_measured(root, quantized, weights, activations):
    _, manifest = load_artifact(root, f"vit-w{weights}-a{activations}")
    kernels = manifest["extra"]["kernels"]
    assert kernels["device"] == "cpu"
    # On CPU, quanto sends only int8 weights x int8 activations to an integer GEMM (from torch 2.6 on).
    torch_26 = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)
    assert kernels["int_gemm"] is (weights == "int8" and activations == "int8" and torch_26)
    assert kernels["ops"].get("aten::_int_mm", 0) == (9 if kernels["int_gemm"] else 0)  # 4 linears/block x 2 + head


def test_calibration_switches_off_some_output_quantization(root, quantized):
    structure = json.loads((artifact_dir(root, "vit-wint8-aint8") / STRUCTURE_FILE).read_text())
    assert structure["quantization"]["output_quantization_disabled"]
    assert set(structure["quantization"]["map"]) >= {"blocks.0.attn.qkv", "head"}


def test_calibration_reads_train_data_only(root, monkeypatch):
    """Validation and test images are NaN: any use of them would poison the scales."""
    real = data.load_dataset(DATA, seed=0)
    nan = TensorDataset(torch.full_like(real.test.tensors[0], float("nan")), real.test.tensors[1])
    monkeypatch.setattr(data, "load_dataset", lambda ref, *, seed, **_: replace(real, val=nan, test=nan))
    result = quantize.run(_task(root, "vit-train-only", "vit", weights="int8", activations="int8"), ENV)
    loaded, _ = load_artifact(root, result.artifact.key)
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.randn(4, *SHAPE))).all()


def test_calibration_data_is_adapted_to_the_model(root):
    """RGB 16x16 calibration images for a grey 8x8 model: converted batch by batch."""
    other = DatasetRef("synthetic", options={"input_shape": [3, 16, 16], "num_classes": 10, "num_samples": 8})
    out = quantize.run(_task(root, "vit-other-data", "vit", dataset=other, weights="int8", activations="int8"), ENV)
    assert out.metrics["calibration_samples"] == 8


def test_a_quantized_parent_is_refused(root, quantized):
    with pytest.raises(ValueError, match="cannot take a quantized model"):
        quantize.run(_task(root, "vit-twice", "vit-wint8-anone", weights="int8"), ENV)
    with pytest.raises(ValueError, match="cannot take a quantized model"):
        prune.run(StageTask("sweep", "q-then-p", "prune", {"method": "unstructured", "ratio": 0.5},
                            "vit-wint8-anone", VIT, DATA, 0, root), ENV)


def test_pruned_then_quantized_keeps_the_pruned_shapes(root, quantized):
    result, _, parent = quantized["vit-pruned-w8a8"]
    loaded, manifest = load_artifact(root, "vit-pruned-w8a8")
    assert [s["kind"] for s in manifest["compression"]["chain"]] == ["prune", "quantize"]
    assert loaded.blocks[0].attn.head_dim == 8 and loaded.blocks[0].attn.qkv.weight.shape == (72, 24)
    assert manifest["params"] == sum(p.numel() for p in parent.parameters())


def test_convnext_channels_first_norms_stay_float(tmp_path):
    """quanto would swap timm's LayerNorm2d for a plain (channels-last) layer norm."""
    ref = ModelRef("convnext_atto", {"num_classes": 5})
    model = build_model(ref, 5).eval()
    names = quantize.modules_quanto_would_break(model)
    assert names and all(type(model.get_submodule(n)).__name__ == "LayerNorm2d" for n in names)
    assert not quantize.modules_quanto_would_break(build_model(VIT, 10))

    shape = [3, 32, 32]
    cnn_data = DatasetRef("synthetic", options={"input_shape": shape, "num_classes": 5, "num_samples": 8})
    save_artifact(model, root=str(tmp_path), key="cnx", model_ref=ref, num_classes=5, input_shape=tuple(shape),
                  materialized=True, compression={"chain": []})
    result = quantize.run(_task(str(tmp_path), "cnx-w8a8", "cnx", model=ref, dataset=cnn_data,
                                weights="int8", activations="int8", batch_size=4), ENV)
    assert result.metrics["float_modules"] == len(names)
    loaded, manifest = load_artifact(str(tmp_path), "cnx-w8a8")
    assert manifest["extra"]["float_modules"] == names
    inputs = torch.randn(2, *shape)
    with torch.no_grad():
        out, ref_out = loaded(inputs), model(inputs)
    assert nn.functional.cosine_similarity(out.flatten(), ref_out.flatten(), dim=0) > 0.9


def test_quantized_artifacts_rebuild_in_another_process(root, quantized, tmp_path):
    cases = []
    for key in ("vit-wint8-aint8", "vit-wint4-anone", "vit-wint4-aint8", "vit-wfloat8-anone", "vit-pruned-w8a8"):
        _, model, _ = quantized[key]
        torch.manual_seed(2)
        inputs = torch.randn(4, *SHAPE)
        cases.append((root, key, inputs, reference_outputs(model, inputs)))
    reload_in_subprocess(tmp_path, cases)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_and_reload_on_cuda(root):
    cuda_env = WorkerEnv(device="cuda", num_threads=2)
    with capturing_saves() as saved:
        result = quantize.run(_task(root, "vit-cuda-w8a8", "vit", weights="int8", activations="int8"), cuda_env)
    assert result.artifact is not None
    loaded, manifest = load_artifact(root, "vit-cuda-w8a8", device="cuda")
    assert manifest["extra"]["kernels"]["device"].startswith("cuda")
    inputs = torch.randn(4, *SHAPE)
    with torch.no_grad():
        expected = saved["vit-cuda-w8a8"].to("cuda")(inputs.to("cuda"))
        assert torch.allclose(loaded(inputs.to("cuda")), expected, atol=1e-5)
