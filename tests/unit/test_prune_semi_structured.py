"""2:4 semi-structured sparsity on the CPU: the parameters, the mask pattern, the prune
stage's artifact and metrics, fine-tuning that keeps the pattern, the per-evaluation
record (simulated here), and which layers fit the sparse kernels' shape multiples.

The sparse kernels themselves need an Ampere-or-newer GPU: ``tests/gpu/test_semi_structured_gpu.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from workers import sparsity
from workers.modelio import load_artifact
from workers.models import build_model
from workers.sparsity import (
    SparsityPlan,
    eligible_layers,
    holds_pattern,
    kernel_block,
    kernel_misfit,
    materialize,
    plan_for,
    semi_structured_keep,
)
from workers.stages import evaluate, finetune, prune
from workers.stages.registry import PruneParams, get_kind
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

ENV = WorkerEnv(device="cpu", num_threads=1)
# depth 1, embed 48, 3 heads: qkv (144, 48), proj (48, 48), fc1 (192, 48), fc2 (48, 192), head (10, 48)
VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3, "num_classes": 10},
)
ALL = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
MLP = ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
SEMI = {"method": "semi-structured"}


def _task(root: str, key: str, kind: str, params: dict[str, Any], parent_key: str | None = None) -> StageTask:
    return StageTask(sweep_id="sweep", key=key, kind=kind, params=params, parent_key=parent_key, model=VIT,
                     dataset=DatasetRef("digits"), seed=0, artifact_root=root)


def _groups(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1, 4)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """Artifacts ``all`` and ``keep`` (2:4 of the untrained tiny ViT in each mode) and
    ``tuned`` (``all`` fine-tuned for one epoch on digits)."""
    root = str(tmp_path_factory.mktemp("artifacts"))
    torch.manual_seed(0)
    prune.run(_task(root, "a11", "prune", SEMI), ENV)
    torch.manual_seed(0)
    prune.run(_task(root, "cee9", "prune", {**SEMI, "mode": "keep-attention"}), ENV)
    finetune.run(_task(root, "f1e", "finetune", {"epochs": 1, "lr": 1e-3, "batch_size": 32}, "a11"), ENV)
    return root


# --------------------------------------------------------------------------- parameters


def test_params_default_to_2_4_in_mode_all_without_a_ratio():
    p = PruneParams(method="semi-structured")
    assert (p.n, p.m, p.mode, p.ratio) == (2, 4, "all", None)
    assert PruneParams(method="semi-structured", n=2, m=4, mode="keep-attention").mode == "keep-attention"


@pytest.mark.parametrize("params,message", [
    ({**SEMI, "n": 1}, "unsupported pattern n:m 1:4; use n: 2, m: 4"),
    ({**SEMI, "n": 4, "m": 8}, "unsupported pattern n:m 4:8; use n: 2, m: 4"),
    ({**SEMI, "ratio": 0.5}, "'ratio' does not apply to method semi-structured"),
    ({**SEMI, "mode": "heads"}, "mode 'heads' applies to structured pruning"),
    ({"method": "unstructured", "ratio": 0.5, "m": 4}, "'n' and 'm' apply to method semi-structured only"),
    ({"method": "structured", "ratio": 0.5, "n": 2}, "'n' and 'm' apply to method semi-structured only"),
    ({"method": "unstructured"}, "'ratio' is required for method unstructured"),
])
def test_params_refuse_what_does_not_apply(params, message):
    with pytest.raises(ValidationError, match=message):
        PruneParams(**params)


def test_keys_of_earlier_prune_stages_are_unchanged_and_zeros_are_kept():
    kind = get_kind("prune")
    from workers.stages.registry import StageInputs

    for old in ({"method": "unstructured", "ratio": 0.5}, {"method": "structured", "ratio": 0.5, "mode": "all"}):
        full = PruneParams(**old).model_dump(mode="json")
        assert full["n"] is None and full["m"] is None
        assert kind.key_material(full, StageInputs()) == {"importance": "l1", "mode": None, **old}
    semi = PruneParams(**SEMI).model_dump(mode="json")
    assert kind.key_material(semi, StageInputs()) == {**SEMI, "mode": "all", "importance": "l1", "n": 2, "m": 4}
    assert kind.keeps_zeros(semi) and kind.keeps_zeros({"method": "unstructured"})
    assert not kind.keeps_zeros({"method": "structured"})


# --------------------------------------------------------------------------- the pattern


def test_each_group_of_4_keeps_its_2_largest_magnitudes():
    torch.manual_seed(0)
    weight = torch.randn(16, 32)
    keep = semi_structured_keep(weight, 2, 4)
    groups, kept = _groups(weight.abs()), _groups(keep)
    assert (kept.sum(dim=-1) == 2).all()
    smallest_kept = torch.where(kept, groups, torch.inf).amin(dim=-1)
    largest_dropped = torch.where(kept, -torch.inf, groups).amax(dim=-1)
    assert (smallest_kept >= largest_dropped).all()


def test_ties_drop_the_earlier_positions():
    weight = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.0, 3.0, 0.0, -2.0]])
    keep = semi_structured_keep(weight, 2, 4)
    assert keep.tolist() == [[False, False, True, True, False, True, False, True]]


def test_holds_pattern_counts_non_zeros_per_group_along_the_input_dimension():
    ok = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 5.0]])
    assert holds_pattern(ok, 2, 4)
    assert not holds_pattern(torch.tensor([[1.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 5.0]]), 2, 4)
    # 2 of 4 along the *output* dimension would not do: the groups run along the input dimension
    along_outputs = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert not holds_pattern(along_outputs, 2, 4) and holds_pattern(along_outputs.t(), 2, 4)


def test_eligible_layers_by_mode_and_on_the_meta_device():
    with torch.device("meta"):
        vit = build_model(VIT, 10)
    eligible, dense = eligible_layers(vit, 4, "all")
    assert [name for name, _ in eligible] == ALL
    assert dense == [{"name": "head", "why": "the classifier (always dense)"}]
    eligible, dense = eligible_layers(vit, 4, "keep-attention")
    assert [name for name, _ in eligible] == MLP
    assert {d["name"]: d["why"] for d in dense} == {
        "blocks.0.attn.qkv": "attention (mode keep-attention)", "blocks.0.attn.proj": "attention (mode keep-attention)",
        "head": "the classifier (always dense)"}
    odd = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    eligible, dense = eligible_layers(odd, 4, "all")
    assert [name for name, _ in eligible] == ["1"]
    assert dense == [{"name": "0", "why": "in_features 6 is not a multiple of 4"}]


def test_a_model_without_an_eligible_layer_is_refused_by_the_stage():
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="no Linear layer outside the classifier whose in_features is a multiple of 4"):
        sparsity.prune_semi_structured(model, 2, 4, "all")


# --------------------------------------------------------------------------- the stage


def test_prune_stage_makes_the_pattern_and_records_it(root):
    model, manifest = load_artifact(root, "a11")
    assert manifest["materialized"] is False
    assert manifest["compression"]["chain"] == [{"kind": "prune", **SEMI, "ratio": None, "mode": "all",
                                                 "importance": "l1", "n": 2, "m": 4}]
    layers = dict(model.named_modules())
    for name in ALL:
        zeros = _groups(layers[name].weight) == 0
        assert (zeros.sum(dim=-1) == 2).all(), name
    assert (model.get_classifier().weight != 0).all()
    assert (model.patch_embed.proj.weight != 0).all()  # a Conv: not a 2:4 layer


def test_prune_stage_metrics(tmp_path):
    out = prune.run(_task(str(tmp_path), "beef", "prune", {**SEMI, "mode": "keep-attention"}), ENV)
    assert out.artifact is not None and out.artifact.materialized is False
    assert out.metrics["pattern"] == "2:4" and out.metrics["sparsity"] == 0.5
    assert out.metrics["sparse_layers"] == MLP
    assert [d["name"] for d in out.metrics["dense_layers"]] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "head"]


def test_keep_attention_leaves_attention_and_the_classifier_dense(root):
    model, _ = load_artifact(root, "cee9")
    layers = dict(model.named_modules())
    for name in ("blocks.0.attn.qkv", "blocks.0.attn.proj", "head"):
        assert (layers[name].weight != 0).all(), name
    for name in MLP:
        assert holds_pattern(layers[name].weight, 2, 4) and (layers[name].weight == 0).float().mean() == 0.5


def test_fine_tuning_keeps_the_2_4_pattern(root):
    parent, _ = load_artifact(root, "a11")
    child, manifest = load_artifact(root, "f1e")
    assert [s["kind"] for s in manifest["compression"]["chain"]] == ["prune", "finetune"]
    assert manifest["materialized"] is False
    before, after = dict(parent.named_modules()), dict(child.named_modules())
    for name in ALL:
        assert torch.equal(before[name].weight == 0, after[name].weight == 0), name  # the same zeros
        assert holds_pattern(after[name].weight, 2, 4)
    assert not torch.equal(before["blocks.0.mlp.fc1"].weight, after["blocks.0.mlp.fc1"].weight)  # it did train


# --------------------------------------------------------------------------- per evaluation


def test_cpu_evaluation_records_the_pattern_as_simulated(root):
    params = {"repeats": 1, "min_window_s": 0.0, "idle_s": 0.0, "warmup_s": 0.0, "warmup_batches": 1}
    task = StageTask(sweep_id="sweep", key="e1", kind="evaluate", params=params, parent_key="f1e", model=VIT,
                     dataset=DatasetRef("digits"), seed=0, artifact_root=root)
    record = evaluate.run(task, ENV).metrics["sparsity"]
    assert record["pattern"] == "2:4" and record["materialized"] is False
    assert record["reason"].startswith("CPU: dense kernels")
    assert record["sparse_layers"] == ALL
    assert record["dense_layers"] == [{"name": "head", "why": "the classifier (always dense)"}]


def test_an_evaluation_of_a_model_without_the_pattern_records_none(root, tmp_path):
    out = prune.run(_task(str(tmp_path), "0ace", "prune", {"method": "unstructured", "ratio": 0.5}), ENV)
    model, manifest = load_artifact(str(tmp_path), out.artifact.key)
    assert plan_for(model, manifest) is None


def test_a_layer_that_lost_the_pattern_is_listed_dense(root):
    model, manifest = load_artifact(root, "a11")
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight[0, :4] = 1.0
    plan = plan_for(model, manifest)
    assert plan is not None and list(plan.sparse) == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1"]
    assert {"name": "blocks.0.mlp.fc2", "why": "its weights no longer hold the 2:4 pattern (a later stage changed "
                                               "them)"} in plan.dense


def test_a_runtime_without_sparse_kernels_is_recorded_as_dense(root):
    model, manifest = load_artifact(root, "a11")

    class Exported:  # what onnxruntime / openvino hand back: no sparsity record of their own
        runtime, sparsity = "onnxruntime", None

    record = evaluate._sparsity(model, manifest, Exported())  # type: ignore[arg-type]
    assert record is not None and record["materialized"] is False and record["reason"] == "onnxruntime: dense kernels"
    assert record["sparse_layers"] == ALL


@pytest.mark.parametrize("device,precision,quantized,reason", [
    ("cpu", "fp32", False, "CPU: dense kernels"),
    ("cpu", "bf16", False, "CPU: dense kernels"),
])
def test_why_simulated_off_gpu(device, precision, quantized, reason):
    assert sparsity.why_simulated(device, precision, quantized=quantized).startswith(reason)


def test_why_simulated_on_gpus_by_capability_precision_and_quantization(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "need Ampere (sm_80) or newer" in sparsity.why_simulated("cuda", "fp16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert sparsity.why_simulated("cuda:0", "fp16") is None and sparsity.why_simulated("cuda", "bf16") is None
    assert sparsity.why_simulated("cuda", "fp32").startswith("fp32: the 2:4 kernels run fp16 / bf16")
    assert sparsity.why_simulated("cuda", "fp16", quantized=True).startswith("quanto int8 weights")


# --------------------------------------------------------------------------- kernel shapes


def test_kernel_blocks_are_torchs_per_dtype_multiples():
    assert kernel_block("fp16", "cusparselt") == kernel_block("bf16", "cusparselt") == (16, 16)
    assert kernel_block("fp16", "cutlass") == kernel_block("bf16", "cutlass") == (32, 64)


@pytest.mark.parametrize("shape,backend,fits", [
    ((144, 48), "cusparselt", True), ((48, 48), "cusparselt", True), ((192, 48), "cusparselt", True),
    ((10, 48), "cusparselt", False), ((48, 24), "cusparselt", False), ((8, 16), "cusparselt", False),
    ((64, 64), "cutlass", True), ((64, 32), "cutlass", False), ((48, 64), "cutlass", False),
])
def test_which_weight_shapes_fit_the_kernels(shape, backend, fits):
    misfit = kernel_misfit(shape, "fp16", backend)
    assert (misfit is None) is fits
    if not fits:
        assert f"shape {shape} is not a multiple of" in misfit


def test_materialize_converts_the_fitting_layers_of_a_copy(monkeypatch):
    """The layer selection without a GPU: the checks that need one report "runs here",
    and the conversion is replaced by a marker (what it was given, in its dtype)."""
    converted: list[tuple[tuple[int, ...], torch.dtype]] = []

    def fake_to_sparse(weight: torch.Tensor) -> torch.Tensor:
        converted.append((tuple(weight.shape), weight.dtype))
        return weight.clone()

    monkeypatch.setattr(sparsity, "why_simulated", lambda device, precision, quantized=False: None)
    monkeypatch.setattr(sparsity, "kernel_backend", lambda: "cusparselt")
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", fake_to_sparse)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    model = nn.Sequential(nn.Linear(48, 144), nn.Linear(144, 40), nn.Linear(40, 10))
    plan = SparsityPlan(2, 4, ("0", "1"), ({"name": "2", "why": "the classifier (always dense)"},))
    run, record = materialize(model, plan, device="cuda", precision="bf16")
    assert run is not model and all(p.dtype == torch.float32 for p in model.parameters())  # the reference stays
    assert converted == [((144, 48), torch.bfloat16)]
    assert run[0].weight.dtype == torch.bfloat16 and not run[0].weight.requires_grad
    assert run[1].weight.dtype == torch.float32
    assert record["materialized"] is True and record["kernels"] == "cusparselt"
    assert record["reason"] == "cusparselt bf16 sparse kernels on NVIDIA A100"
    assert record["sparse_layers"] == ["0"]
    assert record["dense_layers"] == [
        {"name": "2", "why": "the classifier (always dense)"},
        {"name": "1", "why": "shape (40, 144) is not a multiple of (16, 16), what the cusparselt bf16 kernels take"}]


def test_materialize_with_no_fitting_layer_runs_the_dense_model(monkeypatch):
    monkeypatch.setattr(sparsity, "why_simulated", lambda device, precision, quantized=False: None)
    monkeypatch.setattr(sparsity, "kernel_backend", lambda: "cutlass")
    model = nn.Sequential(nn.Linear(48, 144))
    run, record = materialize(model, SparsityPlan(2, 4, ("0",)), device="cuda", precision="fp16")
    assert run is model and record["materialized"] is False
    assert record["reason"].startswith("no 2:4 layer fits the cutlass fp16 kernels' shape multiples")
    assert record["sparse_layers"] == [] and record["dense_layers"][0]["name"] == "0"


def test_materialize_off_gpu_returns_the_model_itself():
    model = nn.Sequential(nn.Linear(8, 8))
    run, record = materialize(model, SparsityPlan(2, 4, ("0",)), device="cpu", precision="fp32")
    assert run is model and record == {"pattern": "2:4", "materialized": False, "kernels": None,
                                       "reason": "CPU: dense kernels (torch's 2:4 kernels are CUDA-only)",
                                       "sparse_layers": ["0"], "dense_layers": []}


def test_materialize_asks_for_cutlass_by_name_where_there_is_no_cusparselt(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(sparsity, "why_simulated", lambda device, precision, quantized=False: None)
    monkeypatch.setattr(sparsity, "kernel_backend", lambda: "cutlass")
    monkeypatch.setattr(torch.sparse, "to_sparse_semi_structured", lambda w: calls.append("default") or w.clone())
    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensorCUTLASS, "from_dense",
                        classmethod(lambda cls, w: calls.append("cutlass") or w.clone()))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    _, record = materialize(nn.Sequential(nn.Linear(64, 64)), SparsityPlan(2, 4, ("0",)), device="cuda",
                            precision="fp16")
    assert calls == ["cutlass"] and record["materialized"] is True and record["kernels"] == "cutlass"
