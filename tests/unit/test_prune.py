"""workers.stages.prune: every method and mode on a ViT, a ResNet and a ConvNeXt, and
pruned artifacts that rebuild in another process."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import nn

from tests.unit.test_models import capturing_saves, reference_outputs, reload_in_subprocess
from workers.modelio import load_artifact, save_artifact
from workers.models import build_model
from workers.stages import prune
from workers.types import DatasetRef, ModelRef, StageOutput, StageTask, WorkerEnv

ENV = WorkerEnv(device="cpu", num_threads=2)
VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 10},
)
# CNNs take any input size; their parents are saved for 32x32 so pruning traces a small input.
CNNS = {"resnet": ModelRef("resnet18", {}), "convnext": ModelRef("convnext_atto", {})}
CNN_CLASSES, CNN_SHAPE = 5, (3, 32, 32)
SHAPES = {"vit": (1, 8, 8), "resnet": CNN_SHAPE, "convnext": CNN_SHAPE}
REFS = {"vit": VIT, **CNNS}

PARAMS: dict[str, dict[str, Any]] = {
    "unstructured": {"method": "unstructured", "ratio": 0.5},
    "all": {"method": "structured", "ratio": 0.5, "mode": "all"},
    "keep-attention": {"method": "structured", "ratio": 0.5, "mode": "keep-attention", "importance": "l2"},
    "heads": {"method": "structured", "ratio": 0.5, "mode": "heads"},
}
CASES = [(m, p) for m in REFS for p in PARAMS if not (p == "heads" and m != "vit")]
ROUND_TRIPS = [("vit", "all"), ("vit", "heads"), ("vit", "keep-attention"), ("vit", "unstructured"),
               ("resnet", "all"), ("convnext", "all")]


def _task(root: str, model: str, params: dict[str, Any], parent_key: str | None) -> StageTask:
    return StageTask(
        sweep_id="sweep",
        key=f"{model}-{params.get('mode', params['method'])}",
        kind="prune",
        params=params,
        parent_key=parent_key,
        model=REFS[model],
        dataset=DatasetRef("digits"),
        seed=0,
        artifact_root=root,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    """Parents for the CNNs (saved at 32x32); the ViT is pruned as a root stage from its ModelRef."""
    root = str(tmp_path_factory.mktemp("artifacts"))
    for name, ref in CNNS.items():
        torch.manual_seed(0)
        save_artifact(
            build_model(ref, CNN_CLASSES),
            root=root,
            key=f"{name}-parent",
            model_ref=ref,
            num_classes=CNN_CLASSES,
            input_shape=CNN_SHAPE,
            materialized=True,
            compression={"chain": []},
        )
    return root


@pytest.fixture(scope="module")
def pruned(root) -> dict[tuple[str, str], tuple[StageOutput, nn.Module, dict[str, Any]]]:
    """Every (model, mode) case pruned once: its output, reloaded model and manifest."""
    out = {}
    for model, mode in CASES:
        torch.manual_seed(0)
        parent = None if model == "vit" else f"{model}-parent"
        result = prune.run(_task(root, model, PARAMS[mode], parent), ENV)
        loaded, manifest = load_artifact(root, result.artifact.key)
        out[(model, mode)] = (result, loaded, manifest)
    return out


@pytest.fixture(scope="module")
def saved_models(root) -> dict[str, nn.Module]:
    """The models exactly as the stage handed them to ``save_artifact``, by key."""
    with capturing_saves() as saved:
        for model, mode in ROUND_TRIPS:
            parent = None if model == "vit" else f"{model}-parent"
            prune.run(replace(_task(root, model, PARAMS[mode], parent), key=f"{model}-{mode}-rt"), ENV)
    return saved


@pytest.mark.parametrize("model,mode", CASES)
def test_pruned_model_runs_and_records_its_chain(pruned, model, mode):
    result, loaded, manifest = pruned[(model, mode)]
    logits = loaded(torch.randn(2, *SHAPES[model]))
    assert logits.shape == (2, 10 if model == "vit" else CNN_CLASSES) and torch.isfinite(logits).all()
    step = {"kind": "prune", "importance": "l1", "mode": None, "n": None, "m": None, **PARAMS[mode]}
    assert manifest["compression"] == {"chain": [step]}
    assert manifest["input_shape"] == list(SHAPES[model])
    assert result.artifact.materialized is (mode != "unstructured")
    assert result.energy is not None


@pytest.mark.parametrize("model", list(REFS))
def test_unstructured_reaches_the_ratio_and_spares_the_classifier(pruned, model):
    result, loaded, manifest = pruned[(model, "unstructured")]
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    head = loaded.get_classifier()
    assert (head.weight != 0).all()
    assert manifest["materialized"] is False
    weights = [m.weight for m in loaded.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not head]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("model,mode", [c for c in CASES if c[1] != "unstructured"])
def test_structured_really_removes_parameters(pruned, model, mode):
    result, loaded, manifest = pruned[(model, mode)]
    m = result.metrics
    assert m["params_after"] < m["params_before"] and m["macs_after"] < m["macs_before"]
    assert manifest["params"] == m["params_after"] == sum(p.numel() for p in loaded.parameters())
    assert manifest["macs"] == m["macs_after"]
    assert loaded.get_classifier().out_features == (10 if model == "vit" else CNN_CLASSES)


def test_cnn_keep_attention_equals_all(pruned):
    for model in CNNS:
        keep_attention, all_layers = pruned[(model, "keep-attention")][0], pruned[(model, "all")][0]
        assert keep_attention.metrics["params_after"] == all_layers.metrics["params_after"]


def test_vit_all_shrinks_head_dims_and_keeps_heads(pruned):
    _, vit, _ = pruned[("vit", "all")]
    for block in vit.blocks:
        attn = block.attn
        assert attn.num_heads == 3 and attn.head_dim == 8 and attn.attn_dim == 24
        assert attn.scale == pytest.approx(8**-0.5)
        assert attn.qkv.out_features == 3 * 24
    assert vit.embed_dim == vit.patch_embed.proj.out_channels == vit.num_features == vit.head.in_features < 48


def test_vit_keep_attention_leaves_attention_alone(pruned):
    _, vit, _ = pruned[("vit", "keep-attention")]
    for block in vit.blocks:
        assert (block.attn.num_heads, block.attn.head_dim) == (3, 16)
        assert block.attn.qkv.weight.shape == (144, 48) and block.attn.proj.weight.shape == (48, 48)
        assert block.mlp.fc1.out_features < 4 * 48


def test_vit_heads_removes_whole_heads_only(pruned):
    result, vit, _ = pruned[("vit", "heads")]
    assert result.metrics["heads_before"] == 6 and result.metrics["heads_after"] == 2  # round(0.5 * 3) = 2 per block
    for block in vit.blocks:
        attn = block.attn
        assert (attn.num_heads, attn.head_dim) == (1, 16)
        assert attn.qkv.weight.shape == (48, 48) and attn.proj.weight.shape == (48, 16)
        assert block.mlp.fc1.out_features == 4 * 48  # nothing but heads was touched
    assert vit.patch_embed.proj.out_channels == 48


@pytest.mark.parametrize("ratio,expected_heads", [(0.1, 2), (0.9, 1)])
def test_heads_removes_at_least_one_and_never_all(root, ratio, expected_heads):
    params = {"method": "structured", "ratio": ratio, "mode": "heads"}
    result = prune.run(replace(_task(root, "vit", params, None), key=f"vit-heads-{ratio}"), ENV)
    assert result.metrics["heads_after"] == 2 * expected_heads


@pytest.mark.parametrize("model", list(CNNS))
def test_heads_on_a_cnn_is_a_clear_error(root, model):
    with pytest.raises(ValueError, match="'heads' needs a model with multi-head attention"):
        prune.run(_task(root, model, PARAMS["heads"], f"{model}-parent"), ENV)


def test_a_root_stage_needs_num_classes(root):
    task = _task(root, "resnet", PARAMS["all"], None)
    with pytest.raises(ValueError, match="add num_classes to the model kwargs"):
        prune.run(task, ENV)


def test_unstructured_mode_is_rejected_by_params(root):
    with pytest.raises(ValueError, match="'mode' applies to structured and semi-structured pruning only"):
        prune.run(_task(root, "vit", {"method": "unstructured", "ratio": 0.5, "mode": "all"}, None), ENV)


def test_prune_chain_extends_the_parent_chain(root, pruned):
    parent_key = pruned[("vit", "all")][0].artifact.key
    result = prune.run(replace(_task(root, "vit", PARAMS["unstructured"], parent_key), key="vit-all-then-u"), ENV)
    _, manifest = load_artifact(root, result.artifact.key)
    assert [s["method"] for s in manifest["compression"]["chain"]] == ["structured", "unstructured"]
    assert manifest["materialized"] is False


def test_pruned_artifacts_rebuild_in_another_process(root, saved_models, tmp_path):
    cases = []
    for model, mode in ROUND_TRIPS:
        key = f"{model}-{mode}-rt"
        torch.manual_seed(1)
        inputs = torch.randn(2, *SHAPES[model])
        cases.append((root, key, inputs, reference_outputs(saved_models[key], inputs)))
    reload_in_subprocess(tmp_path, cases)
