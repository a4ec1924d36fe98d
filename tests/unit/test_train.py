"""workers.stages.train: the baseline trains, deterministically, choosing on validation,
from scratch or from a checkpoint, on data adapted to the model's input."""

from __future__ import annotations

import math

import pytest
import torch

from workers.stages import train
from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

TINY_VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 2, "embed_dim": 48, "num_heads": 3},
)
ENV = WorkerEnv(device="cpu", num_threads=1)  # one thread: robust on a busy 2-core machine


def _task(root, *, key: str = "train-key", seed: int = 0, model: ModelRef = TINY_VIT, **params) -> StageTask:
    return StageTask(
        sweep_id="sweep",
        key=key,
        kind="train",
        params=params,
        parent_key=None,
        model=model,
        dataset=DatasetRef("digits"),
        seed=seed,
        artifact_root=str(root),
    )


def _weights(root, key: str) -> dict[str, torch.Tensor]:
    from workers.modelio import load_artifact

    model, _ = load_artifact(str(root), key)
    return model.state_dict()


@pytest.fixture(scope="module")
def five_epochs(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    task = _task(root, epochs=5, lr=3e-3, batch_size=16)
    return task, train.run(task, ENV)


def test_tiny_vit_beats_chance_on_validation(five_epochs):
    _, out = five_epochs
    assert out.metrics["best_val_top1"] > 0.4  # chance is 0.1; 0.52-0.67 over seeds 0-3


def test_metrics_describe_every_epoch_and_the_best(five_epochs):
    _, out = five_epochs
    history = out.metrics["history"]
    assert out.metrics["epochs"] == 5
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert all(set(h) == {"epoch", "lr", "train_loss", "val_top1", "epoch_s", "energy_j"} for h in history)
    assert all(h["epoch_s"] > 0 and math.isfinite(h["train_loss"]) for h in history)
    best = max(history, key=lambda h: h["val_top1"])
    assert out.metrics["best_val_top1"] == best["val_top1"]
    assert out.metrics["best_epoch"] == best["epoch"]
    assert (out.metrics["epochs_run"], out.metrics["stopped_early"], out.metrics["resumed_from_epoch"]) == (5, False, 0)
    # the stage's energy is its epochs' windows added up
    assert out.energy is not None and out.energy.duration_s == pytest.approx(sum(h["epoch_s"] for h in history))
    if out.energy.total_energy_j is None:
        assert all(h["energy_j"] is None for h in history)
    else:
        assert out.energy.total_energy_j == pytest.approx(sum(h["energy_j"] for h in history))


def test_cosine_schedule_steps_once_per_epoch_over_all_epochs(five_epochs):
    _, out = five_epochs
    lrs = [h["lr"] for h in out.metrics["history"]]
    expected = [3e-3 * (1 + math.cos(math.pi * e / 5)) / 2 for e in range(5)]
    assert lrs == pytest.approx(expected)


def test_artifact_is_the_best_epoch_of_an_uncompressed_model(five_epochs):
    from workers.modelio import load_artifact

    task, out = five_epochs
    assert out.artifact is not None and out.artifact.key == task.key and out.artifact.materialized
    model, manifest = load_artifact(task.artifact_root, task.key)
    assert manifest["materialized"] is True
    assert manifest["compression"] == {"chain": []}
    assert tuple(manifest["input_shape"]) == (1, 8, 8) and manifest["num_classes"] == 10

    # the saved weights reproduce the best epoch's validation accuracy
    from workers.data import load_dataset

    images, labels = load_dataset(task.dataset, seed=task.seed).val.tensors
    model.eval()
    with torch.no_grad():
        top1 = (model(images).argmax(dim=1) == labels).float().mean().item()
    assert top1 == pytest.approx(out.metrics["best_val_top1"])


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    for key, seed in (("a", 0), ("b", 0), ("c", 1)):
        train.run(_task(tmp_path, key=key, seed=seed, epochs=2, batch_size=64), ENV)
    a, b, c = (_weights(tmp_path, key) for key in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], c[name]) for name in a)


def test_data_is_adapted_to_the_shape_the_model_is_built_for(tmp_path):
    # grey 8x8 digits fed to an RGB 16x16 ViT: channels repeated, images resized per batch
    model = ModelRef("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 3})
    out = train.run(_task(tmp_path, model=model, epochs=2, lr=3e-3, batch_size=32), ENV)
    assert out.metrics["best_val_top1"] > 0.2  # chance is 0.1
    from workers.modelio import load_artifact

    assert load_artifact(str(tmp_path), "train-key")[1]["input_shape"] == [3, 16, 16]


def test_model_that_cannot_run_at_the_chosen_shape_is_refused_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "model_input_shape", lambda ref, data_shape: (3, 8, 8))  # the model is grey
    with pytest.raises(ValueError, match=r"model 'vit_tiny_patch16_224' cannot take inputs of shape \(3, 8, 8\)"):
        train.run(_task(tmp_path, epochs=1), ENV)


def test_train_fine_tunes_from_a_checkpoint(tmp_path, five_epochs):
    import safetensors.torch

    from workers.data import load_dataset

    task, out = five_epochs
    checkpoint = tmp_path / "baseline.safetensors"
    safetensors.torch.save_file(_weights(task.artifact_root, task.key), str(checkpoint))
    ref = ModelRef(TINY_VIT.arch, TINY_VIT.kwargs, checkpoint=str(checkpoint))
    # a rate too small to move a prediction: the result is the checkpoint's accuracy, not a fresh model's
    tuned = train.run(_task(tmp_path, model=ref, epochs=1, lr=1e-12, batch_size=128), ENV)
    assert tuned.metrics["best_val_top1"] == pytest.approx(out.metrics["best_val_top1"])
    scratch = train.run(_task(tmp_path, key="scratch", epochs=1, lr=1e-12, batch_size=128), ENV)
    assert scratch.metrics["best_val_top1"] < 0.3
    assert load_dataset(task.dataset, seed=0).num_classes == 10


def test_checkpoints_are_removed_once_the_artifact_is_saved(five_epochs):
    from workers.checkpoints import checkpoint_dir

    task, _ = five_epochs
    assert not checkpoint_dir(task).exists()


def test_too_few_classes_is_refused(tmp_path):
    model = ModelRef(TINY_VIT.arch, {**TINY_VIT.kwargs, "num_classes": 5})
    with pytest.raises(ValueError, match="5 classes but dataset 'digits' has 10"):
        train.run(_task(tmp_path, model=model, epochs=1), ENV)


def test_train_takes_no_parent(tmp_path):
    task = _task(tmp_path, epochs=1)
    task = StageTask(**{**task.__dict__, "parent_key": "some-parent"})
    with pytest.raises(ValueError, match="root stage"):
        train.run(task, ENV)
