"""workers.stages.evaluate: the evaluation protocol on a small saved model."""

from __future__ import annotations

import math

import pytest
import torch

from workers.meters import NullMeter
from workers.stages import evaluate
from workers.types import DatasetRef, EvalRepeat, ModelRef, StageTask, WorkerEnv

TINY_VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3},
)
ENV = WorkerEnv(device="cpu", num_threads=1)  # one thread: robust on a busy 2-core machine
DIGITS_TEST_SIZE = 360


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory):
    """An untrained tiny ViT saved as artifact ``parent``: evaluation needs no training."""
    from workers.models import build_model, save_artifact

    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    save_artifact(
        build_model(TINY_VIT, 10),
        root=str(root),
        key="parent",
        model_ref=TINY_VIT,
        num_classes=10,
        input_shape=(1, 8, 8),
        materialized=True,
        compression={"chain": []},
    )
    return str(root)


def _task(
    root: str, dataset: DatasetRef = DatasetRef("digits"), parent_key: str = "parent", **params
) -> StageTask:
    params.setdefault("min_window_s", 0.0)  # one pass per window unless a test asks for more
    return StageTask(
        sweep_id="sweep",
        key="evaluate-key",
        kind="evaluate",
        params=params,
        parent_key=parent_key,
        model=TINY_VIT,
        dataset=dataset,
        seed=0,
        artifact_root=root,
    )


def test_repeats_cover_the_whole_test_split(artifact_root):
    out = evaluate.run(_task(artifact_root, repeats=3, warmup_batches=2, batch_size=50), ENV)
    assert len(out.repeats) == 3
    assert [r.repeat for r in out.repeats] == [0, 1, 2]
    for r in out.repeats:
        assert isinstance(r, EvalRepeat)
        assert r.samples == DIGITS_TEST_SIZE  # 7 full batches and a partial one
        assert 0 <= r.top1 <= r.top5 <= 1
        assert r.duration_s > 0
        assert r.time_per_sample_s == pytest.approx(r.duration_s / r.samples)
        assert r.throughput_samples_per_s == pytest.approx(r.samples / r.duration_s)
        assert r.energy is not None and r.energy.duration_s == r.duration_s
        assert r.energy.total_energy_j is None and r.energy.cpu_source == "none"


def test_summary_metrics(artifact_root):
    from workers.models import load_artifact

    out = evaluate.run(_task(artifact_root, repeats=3, warmup_batches=0), ENV)
    _, manifest = load_artifact(artifact_root, "parent")
    m = out.metrics
    for name in ("params", "macs", "size_bytes", "materialized", "compression"):
        assert m[name] == manifest[name]
    assert (m["samples"], m["repeats"], m["batch_size"], m["warmup_batches"]) == (DIGITS_TEST_SIZE, 3, 64, 0)
    times = [r.time_per_sample_s for r in out.repeats]
    assert m["time_per_sample_s"] == pytest.approx(sum(times) / 3)
    mean = sum(times) / 3
    assert m["time_per_sample_s_std"] == pytest.approx(math.sqrt(sum((t - mean) ** 2 for t in times) / 2))
    # a deterministic model scores the same on every pass
    assert m["top1"] == out.repeats[0].top1 and m["top1_std"] == 0.0
    assert m["top5"] >= m["top1"]
    assert m["throughput_samples_per_s"] > 0 and m["throughput_samples_per_s_std"] >= 0


def test_single_repeat_has_no_std(artifact_root):
    out = evaluate.run(_task(artifact_root, repeats=1, warmup_batches=1), ENV)
    assert len(out.repeats) == 1
    assert out.metrics["time_per_sample_s_std"] is None and out.metrics["top1_std"] is None


def test_only_inference_inside_meter_windows(artifact_root, monkeypatch):
    """Warm-up runs outside the windows; each window holds exactly one pass, under no_grad."""
    events: list[str] = []

    class RecordingMeter(NullMeter):
        def begin(self) -> None:
            events.append("begin")
            super().begin()

        def end(self):
            events.append("end")
            return super().end()

    def on_forward(module, args):
        if module.__class__.__name__ == "VisionTransformer":
            assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            events.append("forward")

    monkeypatch.setattr(evaluate, "make_meter", lambda device: RecordingMeter(device))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    try:
        evaluate.run(_task(artifact_root, repeats=2, warmup_batches=3, batch_size=100), ENV)
    finally:
        handle.remove()
    one_pass = ["begin", *["forward"] * 4, "end"]  # 360 samples in batches of 100
    assert events == ["forward"] * 3 + one_pass * 2


def test_accuracy_on_synthetic_data_is_refused(artifact_root):
    synthetic = DatasetRef("synthetic", options={"input_shape": [1, 8, 8], "num_classes": 10, "num_samples": 16})
    with pytest.raises(ValueError, match="synthetic"):
        evaluate.run(_task(artifact_root, dataset=synthetic), ENV)


def test_model_saved_for_other_inputs_is_refused(artifact_root):
    from workers.models import build_model, save_artifact

    rgb = ModelRef(TINY_VIT.arch, {**TINY_VIT.kwargs, "in_chans": 3})
    save_artifact(
        build_model(rgb, 10),
        root=artifact_root,
        key="rgb",
        model_ref=rgb,
        num_classes=10,
        input_shape=(3, 8, 8),
        materialized=True,
        compression={"chain": []},
    )
    with pytest.raises(ValueError, match=r"\(1, 8, 8\).*expects \(3, 8, 8\)"):
        evaluate.run(_task(artifact_root, parent_key="rgb"), ENV)


def test_window_covers_whole_passes_until_min_window(artifact_root):
    out = evaluate.run(_task(artifact_root, repeats=2, warmup_batches=0, min_window_s=0.3), ENV)
    for r in out.repeats:
        assert r.duration_s >= 0.3
        assert r.samples % DIGITS_TEST_SIZE == 0 and r.samples > DIGITS_TEST_SIZE
        assert r.time_per_sample_s == pytest.approx(r.duration_s / r.samples)
    assert out.metrics["min_window_s"] == 0.3


def test_root_model_is_evaluated_as_given(tmp_path):
    """A checkpoint or pretrained model with no stage before evaluate: built from the ref."""
    ref = ModelRef(TINY_VIT.arch, {**TINY_VIT.kwargs, "num_classes": 10})
    task = StageTask(
        sweep_id="sweep", key="ev", kind="evaluate", params={"repeats": 1, "min_window_s": 0.0},
        parent_key=None, model=ref, dataset=DatasetRef("digits"), seed=0, artifact_root=str(tmp_path),
    )
    out = evaluate.run(task, ENV)
    assert out.repeats[0].samples == DIGITS_TEST_SIZE
    assert out.metrics["compression"] == {"chain": []} and out.metrics["materialized"] is True
    assert out.metrics["params"] > 0 and out.metrics["macs"] > 0 and out.metrics["size_bytes"] > 0
