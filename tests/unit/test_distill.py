"""workers.stages.distill: the KD loss, the teacher contract, and a pruned student that
distillation brings back."""

from __future__ import annotations

import math
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from workers.modelio import load_artifact, save_artifact
from workers.models import ArtifactLoadError, build_model
from workers.stages import distill, finetune, prune, train
from workers.stages.distill import kd_loss, load_teacher
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

ENV = WorkerEnv(device="cpu", num_threads=1)
TINY_VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": 48, "num_heads": 3, "num_classes": 10},
)
BASELINE, STRUCTURED, UNSTRUCTURED = "ba5e11e0", "5717c7", "c0ffee"
RETRAIN = {"epochs": 2, "lr": 1e-3, "batch_size": 32}


def task(root: str, key: str, kind: str, params: dict[str, Any], parent_key: str | None) -> StageTask:
    return StageTask(
        sweep_id="sweep", key=key, kind=kind, params=params, parent_key=parent_key, model=TINY_VIT,
        dataset=DatasetRef("digits"), seed=0, artifact_root=root,
    )


def trained_and_pruned(root: str) -> dict[str, Any]:
    """A digits baseline (about 0.78 validation top-1) and its 50 % structured and
    unstructured prunes (the structured one falls to about 0.39)."""
    baseline = train.run(task(root, BASELINE, "train", {"epochs": 5, "lr": 3e-3, "batch_size": 16}, None), ENV)
    for key, params in ((STRUCTURED, {"method": "structured", "ratio": 0.5, "mode": "all"}),
                        (UNSTRUCTURED, {"method": "unstructured", "ratio": 0.5})):
        prune.run(task(root, key, "prune", params, BASELINE), ENV)
    return {"root": root, "baseline_val_top1": baseline.metrics["best_val_top1"]}


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict[str, Any]:
    return trained_and_pruned(str(tmp_path_factory.mktemp("artifacts")))


# --------------------------------------------------------------------------- the loss


def test_kd_loss_matches_a_hand_computed_value():
    student = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.0, -1.0]])
    teacher = torch.tensor([[3.0, 2.0, 1.0], [2.0, 0.0, 0.0]])
    labels = torch.tensor([2, 0])
    alpha, t = 0.25, 2.0

    def softmax(row, temperature):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    kl = sum(
        sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(softmax(tr, t), softmax(sr, t)))
        for sr, tr in zip(student.tolist(), teacher.tolist())
    ) / 2
    ce = -sum(math.log(softmax(sr, 1.0)[y]) for sr, y in zip(student.tolist(), labels.tolist())) / 2
    expected = alpha * t * t * kl + (1 - alpha) * ce
    assert kd_loss(student, teacher, labels, alpha=alpha, temperature=t).item() == pytest.approx(expected, rel=1e-6)


def test_kd_loss_stays_finite_where_softmax_log_does_not():
    student = torch.tensor([[1000.0, -1000.0]], requires_grad=True)
    teacher = torch.tensor([[-1000.0, 1000.0]])
    labels = torch.tensor([1])
    naive = F.kl_div(F.softmax(student, dim=1).log(), F.softmax(teacher, dim=1), reduction="batchmean")
    assert not torch.isfinite(naive)  # the reference code's form: log(0) = -inf
    loss = kd_loss(student, teacher, labels, alpha=0.25, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert loss.item() == pytest.approx(0.25 * 2000 + 0.75 * 2000, rel=1e-6)


def test_alpha_zero_is_exactly_cross_entropy():
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 10), torch.randn(8, 10) * 50
    labels = torch.randint(0, 10, (8,))
    for smoothing in (0.0, 0.1):
        kd = kd_loss(student, teacher, labels, alpha=0.0, temperature=4.0, label_smoothing=smoothing)
        assert torch.equal(kd, F.cross_entropy(student, labels, label_smoothing=smoothing))


# --------------------------------------------------------------------------- the stage


def test_distillation_brings_back_a_structurally_pruned_student(parents):
    root = parents["root"]
    out = distill.run(task(root, "d1", "distill", {**RETRAIN, "teacher": f"artifact:{BASELINE}"}, STRUCTURED), ENV)
    metrics = out.metrics
    assert metrics["initial_val_top1"] < 0.5 < metrics["best_val_top1"]  # 0.39 -> 0.76 with seed 0
    assert metrics["best_val_top1"] > metrics["initial_val_top1"] + 0.2
    assert metrics["teacher"] == f"artifact:{BASELINE}" and metrics["teacher_logits_cached"] is True
    assert metrics["teacher_val_top1"] == pytest.approx(parents["baseline_val_top1"])

    _, pruned = load_artifact(root, STRUCTURED)
    model, manifest = load_artifact(root, "d1")
    assert out.artifact is not None and out.artifact.materialized is True  # as its parent
    assert manifest["params"] == pruned["params"] < load_artifact(root, BASELINE)[1]["params"]  # still pruned
    chain = manifest["compression"]["chain"]
    assert [step["kind"] for step in chain] == ["prune", "distill"]
    assert chain[-1]["teacher"] == f"artifact:{BASELINE}" and chain[-1]["alpha"] == 0.25


def test_alpha_zero_distillation_trains_exactly_like_finetune(parents):
    root = parents["root"]
    one_epoch = {**RETRAIN, "epochs": 1}
    distill.run(task(root, "d0", "distill", {**one_epoch, "alpha": 0.0, "teacher": f"artifact:{BASELINE}"}, STRUCTURED), ENV)
    finetune.run(task(root, "f0", "finetune", one_epoch, STRUCTURED), ENV)
    a, b = load_artifact(root, "d0")[0].state_dict(), load_artifact(root, "f0")[0].state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_with_augmentation_the_teacher_runs_per_batch(parents):
    params = {**RETRAIN, "epochs": 1, "augment": "flip-crop", "teacher": f"artifact:{BASELINE}"}
    out = distill.run(task(parents["root"], "d2", "distill", params, STRUCTURED), ENV)
    assert out.metrics["teacher_logits_cached"] is False
    assert math.isfinite(out.metrics["history"][0]["train_loss"])


# --------------------------------------------------------------------------- the teacher contract


def _teacher_task(root: str, teacher: str) -> StageTask:
    return task(root, "t", "distill", {"teacher": teacher}, STRUCTURED)


def test_a_checkpoint_teacher_is_the_architecture_with_those_weights(parents, tmp_path):
    root = parents["root"]
    checkpoint = tmp_path / "teacher.safetensors"
    safetensors.torch.save_file(load_artifact(root, BASELINE)[0].state_dict(), str(checkpoint))
    from_artifact = load_teacher(_teacher_task(root, f"artifact:{BASELINE}"), num_classes=10, data_shape=(1, 8, 8))
    from_checkpoint = load_teacher(_teacher_task(root, f"checkpoint:{checkpoint}"), num_classes=10, data_shape=(1, 8, 8))
    assert from_checkpoint.input_shape == from_artifact.input_shape == (1, 8, 8)
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(from_checkpoint.model(images), from_artifact.model(images))


def test_an_unresolved_baseline_teacher_is_refused_by_the_worker(parents):
    params = {**RETRAIN, "teacher": "baseline"}
    with pytest.raises(ValueError, match="planner resolves 'baseline'"):
        distill.run(task(parents["root"], "d3", "distill", params, STRUCTURED), ENV)


def test_a_teacher_of_other_classes_is_refused(parents):
    root = parents["root"]
    torch.manual_seed(0)
    five = ModelRef(TINY_VIT.arch, {**TINY_VIT.kwargs, "num_classes": 5})
    save_artifact(build_model(five, 5), root=root, key="f1e", model_ref=five, num_classes=5, input_shape=(1, 8, 8),
                  materialized=True, compression={"chain": []})
    with pytest.raises(ValueError, match="has 5 classes but the student has 10"):
        load_teacher(_teacher_task(root, "artifact:f1e"), num_classes=10, data_shape=(1, 8, 8))


def test_a_missing_teacher_names_the_problem(parents, tmp_path):
    with pytest.raises(ArtifactLoadError, match="artifact abc not found"):
        load_teacher(_teacher_task(parents["root"], "artifact:abc"), num_classes=10, data_shape=(1, 8, 8))
    with pytest.raises(ArtifactLoadError, match="does not exist"):
        load_teacher(_teacher_task(parents["root"], f"checkpoint:{tmp_path / 'no.pt'}"), num_classes=10, data_shape=(1, 8, 8))


@pytest.mark.parametrize("teacher", ["baseline", "artifact:0a1b2c", "checkpoint:/models/teacher.safetensors"])
def test_param_model_accepts_the_three_teacher_forms(teacher):
    from workers.stages.registry import DistillParams

    assert DistillParams(teacher=teacher).teacher == teacher


@pytest.mark.parametrize("teacher", ["", "vit_base_patch16_224", "artifact:", "artifact:XYZ", "checkpoint:", "Baseline"])
def test_param_model_refuses_other_teacher_forms(teacher):
    from pydantic import ValidationError

    from workers.stages.registry import DistillParams

    with pytest.raises(ValidationError, match="teacher must be 'baseline'"):
        DistillParams(teacher=teacher)


def test_distill_defaults_follow_the_reference_study():
    from workers.stages.registry import STAGE_KINDS, DistillParams

    params = DistillParams()
    assert (params.alpha, params.temperature, params.teacher) == (0.25, 4.0, "baseline")
    kind = STAGE_KINDS["distill"]
    assert kind.produces_artifact and kind.flexible and kind.load_runner() is distill.run


def test_the_reference_study_spec_plans_without_weights_or_data(capsys):
    from pathlib import Path

    from orchestrator.cli import main

    spec = Path(__file__).resolve().parents[2] / "examples" / "paper-vit-cifar100.yaml"
    try:
        main(["plan", str(spec)])
    except SystemExit as e:  # main exits only on an error
        pytest.fail(f"greensweep plan exited with {e.code}: {capsys.readouterr().err}")
    out = capsys.readouterr().out
    # labels leave out the kind's defaults (alpha 0.25, T 4, 10 epochs): what the spec changed shows
    assert "3 points" in out and "distill(lr=3e-05, batch_size=16)" in out
    assert "finetune(lr=3e-05, batch_size=16)" in out
