"""workers.training: the schedule, gradient accumulation, early stopping, augmentation,
energy sums, the progress callback, and checkpoints that resume bit for bit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from workers.checkpoints import checkpoint_dir
from workers.data import load_dataset
from workers.stages import train
from workers.stages.registry import FinetuneParams, TrainParams
from workers.training import (
    CrossEntropy,
    fit,
    flip_crop,
    lr_at_epoch,
    model_input_shape,
    sum_readings,
)
from workers.types import DatasetRef, EnergyReading, ModelRef, StageTask, WorkerEnv

ENV = WorkerEnv(device="cpu", num_threads=1)
DIGITS = DatasetRef("digits")
# Dropout and augmentation on, so a resume must restore the global RNG and the loop's generator.
TINY_VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3, "drop_rate": 0.1},
)
RESUME_PARAMS = {"epochs": 3, "lr": 3e-3, "batch_size": 64, "augment": "flip-crop", "warmup_epochs": 1}


class Crash(RuntimeError):
    pass


def _task(root: Path, *, key: str = "ab12", kind: str = "train", params: dict[str, Any] | None = None) -> StageTask:
    return StageTask(
        sweep_id="sweep", key=key, kind=kind, params=params or {}, parent_key=None, model=TINY_VIT,
        dataset=DIGITS, seed=0, artifact_root=str(root),
    )


def _linear() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _fit_linear(root: Path, key: str = "cd34", **params: Any):
    torch.set_num_threads(ENV.num_threads)
    model = _linear()
    loop = FinetuneParams(**params)
    result = fit(
        model, load_dataset(DIGITS, seed=0), loop, objective=CrossEntropy(), input_shape=(1, 8, 8),
        task=_task(root, key=key, kind="finetune", params=loop.model_dump(mode="json")), env=ENV,
    )
    return model, result


# --------------------------------------------------------------------------- schedule


def test_cosine_without_warmup_spans_all_epochs():
    lrs = [lr_at_epoch(e, base_lr=1.0, epochs=4) for e in range(4)]
    assert lrs == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])


def test_warmup_ramps_linearly_then_cosine_spans_the_remaining_epochs():
    lrs = [lr_at_epoch(e, base_lr=0.3, epochs=6, warmup_epochs=2) for e in range(6)]
    cosine = [0.3 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert lrs == pytest.approx([0.1, 0.2, *cosine])
    assert max(lrs) == pytest.approx(0.3) and lrs[-1] == min(lrs[2:])  # decays until the last epoch


@pytest.mark.parametrize("epoch, warmup", [(4, 0), (-1, 0), (0, 4)])
def test_schedule_refuses_epochs_outside_the_horizon(epoch, warmup):
    with pytest.raises(ValueError):
        lr_at_epoch(epoch, base_lr=1.0, epochs=4, warmup_epochs=warmup)


def test_warmup_must_leave_epochs_to_train():
    with pytest.raises(ValueError, match="warmup_epochs"):
        TrainParams(epochs=3, warmup_epochs=3)


def test_train_defaults_keep_the_first_release_behaviour():
    defaults = TrainParams()
    assert (defaults.warmup_epochs, defaults.augment, defaults.accumulate_steps, defaults.patience) == (0, "none", 1, None)
    assert (defaults.epochs, defaults.lr, defaults.batch_size, defaults.val_fraction) == (30, 2e-3, 64, 0.1)


# --------------------------------------------------------------------------- loop mechanics


def test_two_accumulated_batches_of_16_step_like_one_batch_of_32(tmp_path):
    one, _ = _fit_linear(tmp_path, key="aa01", epochs=1, lr=1e-2, batch_size=32)
    accumulated, _ = _fit_linear(tmp_path, key="aa02", epochs=1, lr=1e-2, batch_size=16, accumulate_steps=2)
    for (name, a), (_, b) in zip(one.state_dict().items(), accumulated.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    plain, _ = _fit_linear(tmp_path, key="aa03", epochs=1, lr=1e-2, batch_size=16)
    assert not torch.allclose(plain[1].weight, one[1].weight, atol=1e-4)  # the comparison can tell


def test_batch_norm_never_trains_on_a_last_batch_of_one_sample(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    splits = load_dataset(DIGITS, seed=0)
    loop = FinetuneParams(epochs=1, lr=1e-3, batch_size=len(splits.train.tensors[1]) - 1)  # leaves one sample
    result = fit(model, splits, loop, objective=CrossEntropy(), input_shape=(1, 8, 8),
                 task=_task(tmp_path, key="bn01", kind="finetune", params=loop.model_dump(mode="json")), env=ENV)
    assert result.history[0]["train_loss"] > 0  # torch refuses batch norm training on one sample


def test_patience_stops_after_epochs_without_a_better_validation(tmp_path):
    _, result = _fit_linear(tmp_path, epochs=6, lr=1e-12, batch_size=64, patience=2)
    # a rate of 1e-12 cannot change a prediction: epoch 1 stays the best
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.best_epoch == 1 and result.stopped_early
    assert result.metrics()["epochs_run"] == 3 and result.metrics()["epochs"] == 6


def test_flip_crop_keeps_shape_and_is_seeded():
    images = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    first = flip_crop(images, torch.Generator().manual_seed(0))
    again = flip_crop(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and torch.equal(first, again)
    # every value comes from the sample itself or the zero padding
    for sample, out in zip(images, first):
        assert set(out.unique().tolist()) <= set(sample.unique().tolist()) | {0.0}


def test_model_input_shape_follows_kwargs_then_fixed_size_then_data():
    assert model_input_shape(TINY_VIT, (1, 8, 8)) == (1, 8, 8)
    assert model_input_shape(ModelRef("vit_base_patch16_224", {"num_classes": 100}), (3, 32, 32)) == (3, 224, 224)
    assert model_input_shape(ModelRef("resnet18", {}), (1, 8, 8)) == (3, 8, 8)  # any size; RGB by default
    assert model_input_shape(ModelRef("vit_tiny_patch16_224", {"dynamic_img_size": True}), (3, 32, 32)) == (3, 32, 32)


def test_sum_readings_adds_windows_and_keeps_the_weakest_source():
    a = EnergyReading(duration_s=1.0, cpu_energy_j=2.0, cpu_source="rapl", gpu_energy_j=None, cpu_idle_power_w=5.0)
    b = EnergyReading(duration_s=2.0, cpu_energy_j=3.0, cpu_source="estimate-tdp", cpu_idle_power_w=6.0)
    total = sum_readings([a, b])
    assert total is not None
    assert (total.duration_s, total.cpu_energy_j, total.cpu_source) == (3.0, 5.0, "estimate-tdp")
    assert (total.gpu_energy_j, total.gpu_source, total.cpu_idle_power_w) == (None, "none", 5.0)
    assert sum_readings([]) is None


# --------------------------------------------------------------------------- progress and resume


def _weights(root: Path, key: str) -> dict[str, torch.Tensor]:
    from workers.modelio import load_artifact

    return load_artifact(str(root), key)[0].state_dict()


def test_progress_reports_one_dict_per_epoch(tmp_path):
    reports: list[dict[str, Any]] = []
    out = train.run(_task(tmp_path, params=RESUME_PARAMS), dataclasses.replace(ENV, report_progress=reports.append))
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    expected = {"stage_key", "kind", "epoch", "epochs", "lr", "train_loss", "val_top1", "epoch_s", "energy_j",
                "best_epoch", "best_val_top1"}
    assert all(set(r) == expected for r in reports)
    assert {(r["stage_key"], r["kind"], r["epochs"]) for r in reports} == {("ab12", "train", 3)}
    assert [{k: r[k] for k in out.metrics["history"][0]} for r in reports] == out.metrics["history"]


def test_a_killed_run_resumes_after_its_last_epoch_and_ends_bitwise_equal(tmp_path):
    clean_root, crash_root = tmp_path / "clean", tmp_path / "crash"
    clean = train.run(_task(clean_root, params=RESUME_PARAMS), ENV)

    def crash_after_first_epoch(report: dict[str, Any]) -> None:
        if report["epoch"] == 1:
            raise Crash("killed")

    task = _task(crash_root, params=RESUME_PARAMS)
    with pytest.raises(Crash):
        train.run(task, dataclasses.replace(ENV, report_progress=crash_after_first_epoch))
    assert [p.name for p in checkpoint_dir(task).iterdir()] == ["epoch-00001"]

    resumed_reports: list[dict[str, Any]] = []
    resumed = train.run(task, dataclasses.replace(ENV, report_progress=resumed_reports.append))
    assert resumed.metrics["resumed_from_epoch"] == 1 and clean.metrics["resumed_from_epoch"] == 0
    assert [r["epoch"] for r in resumed_reports] == [2, 3]
    a, b = _weights(clean_root, task.key), _weights(crash_root, task.key)
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)

    def comparable(history):
        return [{k: v for k, v in h.items() if k not in ("epoch_s", "energy_j")} for h in history]

    assert comparable(resumed.metrics["history"]) == comparable(clean.metrics["history"])
    assert resumed.metrics["best_epoch"] == clean.metrics["best_epoch"]
    assert resumed.energy is not None and resumed.energy.duration_s == pytest.approx(
        sum(h["epoch_s"] for h in resumed.metrics["history"])
    )
    assert not checkpoint_dir(task).exists()  # removed once the artifact is saved


def test_a_checkpoint_of_other_parameters_is_not_resumed(tmp_path):
    def crash(report: dict[str, Any]) -> None:
        raise Crash("killed")

    params = {"epochs": 2, "lr": 1e-3, "batch_size": 128}
    with pytest.raises(Crash):
        train.run(_task(tmp_path, params=params), dataclasses.replace(ENV, report_progress=crash))
    out = train.run(_task(tmp_path, params={**params, "lr": 2e-3}), ENV)
    assert out.metrics["resumed_from_epoch"] == 0 and len(out.metrics["history"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_training_on_cuda_checkpoints_the_cuda_rng_and_resumes(tmp_path):
    import safetensors.torch

    env = dataclasses.replace(ENV, device="cuda:0")
    task = _task(tmp_path, params={**RESUME_PARAMS, "amp": True})

    def crash(report: dict[str, Any]) -> None:
        if report["epoch"] == 1:
            raise Crash("killed")

    with pytest.raises(Crash):
        train.run(task, dataclasses.replace(env, report_progress=crash))
    rng = safetensors.torch.load_file(checkpoint_dir(task) / "epoch-00001" / "rng.safetensors")
    assert "cuda.0" in rng
    out = train.run(task, env)
    assert out.metrics["resumed_from_epoch"] == 1 and len(out.metrics["history"]) == 3
    assert all(math.isfinite(h["train_loss"]) for h in out.metrics["history"])
    assert out.metrics["best_val_top1"] > 0.2
