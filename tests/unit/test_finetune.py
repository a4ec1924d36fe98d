"""workers.stages.finetune: the cross-entropy control retrains a pruned parent and keeps
its structure (smaller matrices) or its sparsity (zeros)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from tests.unit.test_distill import ENV, RETRAIN, STRUCTURED, UNSTRUCTURED, task, trained_and_pruned
from workers.modelio import load_artifact
from workers.stages import finetune


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Any]:
    return trained_and_pruned(str(tmp_path_factory.mktemp("artifacts")))


def _zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight == 0 for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_finetune_brings_back_a_structurally_pruned_student(parents):
    root = parents["root"]
    out = finetune.run(task(root, "f1", "finetune", RETRAIN, STRUCTURED), ENV)
    assert out.metrics["initial_val_top1"] < 0.5 < out.metrics["best_val_top1"]  # 0.39 -> 0.75 with seed 0
    assert "teacher" not in out.metrics
    _, pruned = load_artifact(root, STRUCTURED)
    _, manifest = load_artifact(root, "f1")
    assert out.artifact is not None and out.artifact.materialized is True
    assert manifest["params"] == pruned["params"] and manifest["macs"] == pruned["macs"]
    assert [step["kind"] for step in manifest["compression"]["chain"]] == ["prune", "finetune"]


def test_finetune_keeps_an_unstructured_parent_sparse(parents):
    root = parents["root"]
    out = finetune.run(task(root, "f2", "finetune", {**RETRAIN, "epochs": 1}, UNSTRUCTURED), ENV)
    parent, _ = load_artifact(root, UNSTRUCTURED)
    child, manifest = load_artifact(root, "f2")
    before, after = _zeros(parent), _zeros(child)
    pruned = [name for name, zeros in before.items() if zeros.any()]
    assert pruned  # the fixture's prune did zero weights
    assert all(torch.equal(before[name], after[name]) for name in pruned)  # same zeros, no more, no fewer
    assert out.artifact is not None and out.artifact.materialized is False and manifest["materialized"] is False
    assert not torch.equal(parent.state_dict()["blocks.0.mlp.fc1.weight"], child.state_dict()["blocks.0.mlp.fc1.weight"])


def test_finetune_params_and_registration():
    from workers.stages.registry import STAGE_KINDS, FinetuneParams, pipeline_kinds

    assert set(FinetuneParams.model_fields) >= {
        "epochs", "lr", "weight_decay", "batch_size", "warmup_epochs", "label_smoothing", "augment",
        "accumulate_steps", "patience", "amp",
    }
    assert "finetune" in pipeline_kinds() and "distill" in pipeline_kinds()
    kind = STAGE_KINDS["finetune"]
    assert kind.produces_artifact and kind.flexible and kind.load_runner() is finetune.run
