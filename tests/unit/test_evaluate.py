"""workers.stages.evaluate: the evaluation protocol on a small saved model."""

from __future__ import annotations

import json
import math
import statistics
from typing import Any

import pytest
import torch

from workers.meters import DOMAINS, Meter, NullMeter, nvml
from workers.stages import evaluate
from workers.types import DatasetRef, EnergyReading, EvalRepeat, ModelRef, StageTask, WorkerEnv

TINY_VIT = ModelRef(
    "vit_tiny_patch16_224",
    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3},
)
ENV = WorkerEnv(device="cpu", num_threads=1)  # one thread: robust on a busy 2-core machine
DIGITS_TEST_SIZE = 360


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory):
    """An untrained tiny ViT saved as artifact ``parent``: evaluation needs no training."""
    from workers.modelio import save_artifact
    from workers.models import build_model

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


@pytest.fixture(autouse=True)
def reset_meter_singletons(monkeypatch):
    """Each test probes NVML afresh (the module caches its init outcome)."""
    monkeypatch.setattr(nvml, "_init_outcome", None)


class RecordingMeter(NullMeter):
    """A time-only meter that appends ``"begin"``, ``"end"`` and ``"idle <s>"`` to *events*
    as the stage calls it."""

    def __init__(self, events: list[Any], device: str = "cpu") -> None:
        super().__init__(device)
        self.events = events

    def begin(self) -> None:
        self.events.append("begin")
        super().begin()

    def end(self) -> EnergyReading:
        self.events.append("end")
        return super().end()

    def measure_idle(self, idle_s: float):
        self.events.append(f"idle {idle_s}")
        return super().measure_idle(idle_s)


def _task(
    root: str, dataset: DatasetRef = DatasetRef("digits"), parent_key: str = "parent", **params
) -> StageTask:
    params.setdefault("min_window_s", 0.0)  # one pass per window unless a test asks for more
    params.setdefault("idle_s", 0.0)  # no idle sampling unless a test asks for it
    params.setdefault("warmup_s", 0.0)  # warm-up by batch count only unless a test asks
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
        # a CPU stage: no GPU figure; the CPU has a sensor or, failing that, the TDP estimate
        assert r.energy.gpu_energy_j is None and r.energy.gpu_source == "none"
        assert r.energy.cpu_source in ("rapl", "estimate-tdp") and r.energy.cpu_energy_j > 0
        assert r.energy.cpu_idle_power_w is None  # idle_s=0: not sampled


def test_summary_metrics(artifact_root):
    from workers.modelio import load_artifact

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


@pytest.mark.parametrize("interleave", ["windows", "slices"])
def test_only_inference_inside_meter_windows(artifact_root, monkeypatch, interleave):
    """Idle power is sampled first, with nothing running; warm-up runs outside the
    windows; each window holds exactly one pass, under no_grad; one meter for all.
    Contiguous windows are each re-warmed first; slices (which take turns with other
    models') are not."""
    events: list[Any] = []
    meters: list[Meter] = []

    def make_recording_meter(device: str) -> Meter:
        meters.append(RecordingMeter(events, device))
        return meters[-1]

    def on_forward(module, args):
        if module.__class__.__name__ == "VisionTransformer":
            assert not torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
            events.append("forward")

    monkeypatch.setattr(evaluate, "make_meter", make_recording_meter)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    try:
        evaluate.run(_task(artifact_root, repeats=2, warmup_batches=3, batch_size=100, idle_s=0.05,
                           interleave=interleave), ENV)
    finally:
        handle.remove()
    one_pass = ["begin", *["forward"] * 4, "end"]  # 360 samples in batches of 100
    # first the agreement check (the torch model and the deployable on the first batch),
    # then idle, the warm-up, one unmeasured pass recording which samples are right (for the
    # paired accuracy test), and per round a short re-warm before a contiguous window
    rewarm = ["forward"] * 3 if interleave == "windows" else []
    assert events == ["forward", "forward", "idle 0.05", "begin", "end", *["forward"] * 3, *["forward"] * 4,
                      *(rewarm + one_pass) * 2]
    assert len(meters) == 1


def test_accuracy_on_synthetic_data_is_refused(artifact_root):
    synthetic = DatasetRef("synthetic", options={"input_shape": [1, 8, 8], "num_classes": 10, "num_samples": 16})
    with pytest.raises(ValueError, match="synthetic"):
        evaluate.run(_task(artifact_root, dataset=synthetic), ENV)


def test_test_split_is_adapted_to_the_models_input(artifact_root):
    """Grey 8x8 digits evaluated by an RGB 16x16 model: converted before timing."""
    from workers.modelio import save_artifact
    from workers.models import build_model

    rgb = ModelRef(TINY_VIT.arch, {**TINY_VIT.kwargs, "in_chans": 3, "img_size": 16})
    save_artifact(
        build_model(rgb, 10),
        root=artifact_root,
        key="rgb",
        model_ref=rgb,
        num_classes=10,
        input_shape=(3, 16, 16),
        materialized=True,
        compression={"chain": []},
    )
    out = evaluate.run(_task(artifact_root, parent_key="rgb", repeats=1), ENV)
    assert out.repeats[0].samples == DIGITS_TEST_SIZE and 0 <= out.repeats[0].top1 <= 1


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


class ScriptedMeter(Meter):
    """Returns the given readings in turn, with the idle power it was told to report."""

    def __init__(self, windows: list[tuple[float, float]], idle_power_w: dict[str, float | None]) -> None:
        self.windows = list(windows)  # (duration_s, cpu_energy_j) per window
        self.idle_power_w = idle_power_w
        self.calls: list[str] = []
        self._idle: dict[str, float | None] = {}

    def begin(self) -> None:
        self.calls.append("begin")

    def end(self) -> EnergyReading:
        self.calls.append("end")
        duration_s, cpu_energy_j = self.windows.pop(0)
        return EnergyReading(
            duration_s=duration_s, cpu_energy_j=cpu_energy_j, cpu_source="rapl",
            **{f"{d}_idle_power_w": self._idle.get(d) for d in DOMAINS},
        )

    def measure_idle(self, idle_s: float) -> dict[str, float | None]:
        self.calls.append("idle")
        self._idle = dict(self.idle_power_w)
        return self._idle

    def describe(self) -> dict[str, Any]:
        return {"domains": {"cpu": {"source": "rapl", "skipped": []}}, "scripted": True}


def test_energy_metrics_gross_net_and_spread(artifact_root, monkeypatch):
    windows = [(1.0, 10.0), (2.0, 14.0), (1.5, 9.0)]
    meter = ScriptedMeter(windows, {"gpu": None, "cpu": 3.0, "dram": None})
    monkeypatch.setattr(evaluate, "make_meter", lambda device: meter)
    out = evaluate.run(_task(artifact_root, repeats=3, warmup_batches=0, idle_s=0.5), ENV)
    assert meter.calls == ["idle", "begin", "end", "begin", "end", "begin", "end"]

    m, n = out.metrics, DIGITS_TEST_SIZE
    gross = [e / n for _, e in windows]
    net = [(e - 3.0 * d) / n for d, e in windows]
    assert m["energy_per_sample_j"] == pytest.approx(statistics.fmean(gross))
    assert m["energy_per_sample_j_std"] == pytest.approx(statistics.stdev(gross))
    assert m["energy_per_sample_j_cv"] == pytest.approx(statistics.stdev(gross) / statistics.fmean(gross))
    assert m["cpu_energy_per_sample_j"] == pytest.approx(statistics.fmean(gross))
    assert m["net_energy_per_sample_j"] == pytest.approx(statistics.fmean(net))
    assert m["cpu_net_energy_per_sample_j"] == pytest.approx(statistics.fmean(net))
    assert m["net_energy_per_sample_j_cv"] == pytest.approx(statistics.stdev(net) / statistics.fmean(net))
    for d in ("gpu", "dram"):  # no figure: None, never 0
        assert m[f"{d}_energy_per_sample_j"] is None and m[f"{d}_net_energy_per_sample_j"] is None
        assert m[f"{d}_energy_per_sample_j_std"] is None and m[f"{d}_energy_per_sample_j_cv"] is None
    times = [d / n for d, _ in windows]
    assert m["time_per_sample_s"] == pytest.approx(statistics.fmean(times))
    assert m["time_per_sample_s_cv"] == pytest.approx(statistics.stdev(times) / statistics.fmean(times))
    assert m["idle_power_w"] == {"gpu": None, "cpu": 3.0, "dram": None} and m["idle_s"] == 0.5
    assert m["energy_source"] == {"gpu": "none", "cpu": "rapl", "dram": "none"}
    assert m["meter"] == meter.describe()
    # each repeat keeps its gross reading and the idle power, for the store
    for r, (d, e) in zip(out.repeats, windows):
        assert (r.duration_s, r.energy.cpu_energy_j, r.energy.cpu_idle_power_w) == (d, e, 3.0)


def test_no_idle_sampling_leaves_net_unknown(artifact_root, monkeypatch):
    meter = ScriptedMeter([(1.0, 10.0)], {"gpu": None, "cpu": 3.0, "dram": None})
    monkeypatch.setattr(evaluate, "make_meter", lambda device: meter)
    m = evaluate.run(_task(artifact_root, repeats=1, warmup_batches=0, idle_s=0.0), ENV).metrics
    assert "idle" not in meter.calls
    assert m["idle_power_w"] == {"gpu": None, "cpu": None, "dram": None}
    assert m["net_energy_per_sample_j"] is None and m["cpu_net_energy_per_sample_j"] is None
    assert m["energy_per_sample_j"] == pytest.approx(10.0 / DIGITS_TEST_SIZE)
    # one repeat: a mean but no spread
    assert m["energy_per_sample_j_std"] is None and m["energy_per_sample_j_cv"] is None
    assert m["time_per_sample_s_cv"] is None


def test_real_meter_reports_its_sources_and_skips(artifact_root):
    """On any machine: every domain has a source, and a domain without a figure says why."""
    m = evaluate.run(_task(artifact_root, repeats=2, warmup_batches=0, idle_s=0.05), ENV).metrics
    assert m["energy_source"]["gpu"] == "none" and m["gpu_energy_per_sample_j"] is None
    assert m["energy_source"]["cpu"] in ("rapl", "estimate-tdp")
    assert m["energy_per_sample_j"] > 0 and m["idle_power_w"]["cpu"] > 0
    assert m["net_energy_per_sample_j"] is not None
    assert m["meter"]["domains"]["gpu"]["skipped"][0]["reason"] == "not-applicable"
    for d in DOMAINS:
        assert m["meter"]["domains"][d]["source"] == m["energy_source"][d]
    assert json.loads(json.dumps(m)) == m  # JSON-able as it is, for the store
