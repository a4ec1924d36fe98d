"""Cohorts: evaluations of a node measured together with the reference.

The coordinator side against the in-process fake pool (which evaluations form a cohort,
when, how a cohort larger than ``cohort_size`` splits), and the worker side on a real
small model (every member one window per round in a seeded order, the reference in every
cohort, the paired figures)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestrator.plan import PlannedStage, build_plan, stage_key
from orchestrator.pool.fake import Block, FakeWorkerPool
from orchestrator.spec import parse_spec
from tests.unit.test_coordinator import fast_ticks, make_coordinator, make_plan, node, store  # noqa: F401
from workers.stages import evaluate
from workers.types import Cohort, DatasetRef, ModelRef, StageTask, WorkerEnv


def _with_reference(plan, shown: bool, size: int):
    """*plan* with a reference for ``cpu-a``: its first evaluation (shown) or one outside it."""
    if shown:
        ref = next(s for s in plan.stages if s.kind == "evaluate")
    else:
        ref = PlannedStage(stage_key(plan.root_key, "evaluate", {"reference": True}), "evaluate",
                           {"index": 99, "target": "cpu-a"}, plan.stages[0].key, "evaluate(ref)", "cpu-a")
    return dataclasses.replace(plan, references={"cpu-a": ref})


def _cohort_coordinator(store, tmp_path, plan, pool, size: int):
    coord, events = make_coordinator(store, tmp_path, plan, pool)
    coord.spec = dataclasses.replace(coord.spec, evaluate=dataclasses.replace(coord.spec.evaluate, cohort_size=size))
    return coord, events


@pytest.mark.parametrize("shown", [True, False])
def test_ready_evaluations_of_a_node_form_cohorts_of_at_most_cohort_size_each_with_the_reference(
        store, tmp_path, shown):
    plan = make_plan([("train", None, None)] + [("evaluate", 0, "cpu-a")] * 5)
    plan = _with_reference(plan, shown, 2)
    seen: list[Cohort] = []

    def script(task: StageTask, n, attempt):
        if task.kind == "evaluate":
            seen.append(task.cohort)
        return None

    pool = FakeWorkerPool([node(1)], script)
    coord, _ = _cohort_coordinator(store, tmp_path, plan, pool, 2)
    assert coord.run().status == "succeeded"
    evals = [s.key for s in plan.stages[1:]]
    calls = [keys for _, keys in pool.calls if set(keys) <= set(evals)]
    assert [len(c) for c in calls] == [2, 2, 1]  # plan order, at most cohort_size per call
    assert sorted(k for c in calls for k in c) == sorted(evals)
    cohorts = {c.id: c for c in seen}
    assert len(cohorts) == 3  # one per call, each with the reference
    reference = plan.references["cpu-a"].key
    assert all(c.reference.key == reference for c in cohorts.values())
    # the reference is one of the first cohort's tasks only when it is a point of the sweep
    assert [c.reference_shown for c in cohorts.values()] == [shown, False, False]
    assert len({c.seed for c in cohorts.values()}) == 3


def test_a_cohort_waits_for_evaluations_whose_parent_is_still_being_built(store, tmp_path):
    """train -> eval A (ready early) and train -> prune (held) -> eval B: A is not measured
    alone while B can still join; once the prune is done, both go in one call."""
    plan = make_plan([("train", None, None), ("evaluate", 0, "cpu-a"), ("prune", 0, None), ("evaluate", 2, "cpu-a")])
    plan = _with_reference(plan, True, 8)
    pool = FakeWorkerPool([node(1), node(2)], lambda task, n, attempt: Block() if task.kind == "prune" else None)
    coord, _ = _cohort_coordinator(store, tmp_path, plan, pool, 8)
    for _ in range(20):
        coord.step()
    assert coord.status[plan.stages[2].key] == "running"
    assert coord.status[plan.stages[1].key] == "pending"  # ready, but waiting for its cohort
    pool.release(plan.stages[2].key)
    assert coord.run().status == "succeeded"
    evals = {plan.stages[1].key, plan.stages[3].key}
    assert [set(keys) for _, keys in pool.calls if set(keys) & evals] == [evals]


def test_a_real_plan_has_a_reference_per_target_even_without_the_baseline_point():
    text = """
name: refs
model: {arch: vit_tiny_patch16_224, kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}}
dataset: {name: digits}
train: {epochs: 1}
pipelines:
  - name: q
    stages: [{quantize: {weights: int8}}]
evaluate: {targets: [a, b], baseline: BASELINE, runtimes: [torch, onnxruntime]}
"""
    with_point = build_plan(parse_spec(text.replace("BASELINE", "true"), check_arch=False))
    without = build_plan(parse_spec(text.replace("BASELINE", "false"), check_arch=False))
    assert set(with_point.references) == set(without.references) == {"a", "b"}
    for target in ("a", "b"):
        ref = with_point.references[target]
        assert ref.key == without.references[target].key  # the same measurement either way
        assert (ref.params["runtime"], ref.params["precision"], ref.target) == ("torch", "fp32", target)
        assert with_point.has_stage(ref.key) and not without.has_stage(ref.key)
        assert ref.parent_key == with_point.stages[0].key  # the trained baseline


# -- the worker side ---------------------------------------------------------------------------

TINY_VIT = ModelRef("vit_tiny_patch16_224",
                    {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3})
ENV = WorkerEnv(device="cpu", num_threads=1)


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory) -> str:
    from workers.modelio import save_artifact
    from workers.models import build_model

    root = tmp_path_factory.mktemp("artifacts")
    for key, seed in (("parent", 0), ("other", 1)):
        torch.manual_seed(seed)
        save_artifact(build_model(TINY_VIT, 10), root=str(root), key=key, model_ref=TINY_VIT, num_classes=10,
                      input_shape=(1, 8, 8), materialized=True, compression={"chain": []})
    return str(root)


def _task(root: str, key: str, parent: str, **params: Any) -> StageTask:
    params = {"min_window_s": 0.0, "idle_s": 0.0, "warmup_s": 0.0, "warmup_batches": 1, "repeats": 4,
              "batch_size": 120, **params}
    return StageTask(sweep_id="sw", key=key, kind="evaluate", params=params, parent_key=parent, model=TINY_VIT,
                     dataset=DatasetRef("digits"), seed=0, artifact_root=root)


def _cohort(root: str, shown: bool, seed: int = 7) -> list[StageTask]:
    reference = _task(root, "ref", "parent")
    cohort = Cohort(id="c-test", seed=seed, reference=reference, reference_shown=shown)
    members = [_task(root, "other", "other"), _task(root, "same", "parent", batch_size=120)]
    if shown:
        members.insert(1, reference)
    return [dataclasses.replace(t, cohort=cohort) for t in members]


@pytest.mark.parametrize("interleave", ["windows", "slices"])
def test_every_member_gets_one_window_per_round_in_a_seeded_order(artifact_root, interleave):
    tasks = _cohort(artifact_root, shown=False)
    reference = dataclasses.replace(tasks[0].cohort.reference,
                                    params={**tasks[0].cohort.reference.params, "interleave": interleave})
    cohort = dataclasses.replace(tasks[0].cohort, reference=reference)
    outs = evaluate.run_cohort([dataclasses.replace(t, cohort=cohort) for t in tasks], ENV)
    assert outs[0].metrics["cohort"]["protocol"]["interleave"] == interleave
    assert outs[0].metrics["paired"]["pairing"] == ("rounds" if interleave == "windows" else "turns")
    assert len(outs) == 2 and not any(isinstance(o, BaseException) for o in outs)
    for out in outs:
        assert [r.repeat for r in out.repeats] == [0, 1, 2, 3]
    cohort = outs[0].metrics["cohort"]
    assert cohort["size"] == 3 and cohort["reference_key"] == "ref" and cohort["reference_shown"] is False
    assert len(cohort["reference"]["time_per_sample_s"]) == 4
    # per round, the three members' windows take positions 0, 1, 2 -- in an order that varies
    positions = [[out.repeats[r].position for out in outs] for r in range(4)]
    assert all(len(set(p)) == 2 and set(p) <= {0, 1, 2} for p in positions)
    # the order is drawn from the cohort's seed: the same seed, the same orders
    assert [[m.task.key for m in r] for r in evaluate._rounds(_members(), 4, 7)] == \
        [[m.task.key for m in r] for r in evaluate._rounds(_members(), 4, 7)]
    orders = {tuple(tuple(m.task.key for m in r) for r in evaluate._rounds(_members(), 4, seed)) for seed in range(5)}
    assert len(orders) > 1
    assert cohort["protocol"]["timer"] == "time.perf_counter_ns" and cohort["protocol"]["gc_disabled_in_windows"]


def _members() -> list[Any]:
    return [evaluate._Member(_task("/nowhere", key, "parent"), True) for key in ("a", "b", "c")]


def test_paired_figures_against_the_reference(artifact_root):
    outs = evaluate.run_cohort(_cohort(artifact_root, shown=True), ENV)
    other, reference, same = outs
    assert reference.metrics["paired"]["time_ratio_vs_baseline"] == 1.0
    assert (reference.metrics["paired"]["verdict_time"], reference.metrics["paired"]["verdict_top1"]) == ("same",
                                                                                                          "same")
    # the same weights as the reference: identical predictions, so McNemar has nothing to test
    assert same.metrics["paired"]["top1_discordant"] == [0, 0] and same.metrics["paired"]["verdict_top1"] == "same"
    paired = other.metrics["paired"]
    for name in ("time_ratio_vs_baseline", "time_ratio_ci_low", "time_ratio_ci_high"):
        assert paired[name] > 0
    assert paired["time_ratio_ci_low"] <= paired["time_ratio_ci_high"]
    assert paired["verdict_time"] in ("faster", "slower", "same")
    assert paired["energy_ratio_vs_baseline"] is not None and paired["verdict_energy"] in ("cheaper", "costlier", "same")
    # another untrained model disagrees with the reference on some digits
    assert sum(paired["top1_discordant"]) > 0 and 0 < paired["top1_mcnemar_p"] <= 1
    assert other.metrics["cohort"] == reference.metrics["cohort"]


def test_a_member_that_fails_to_prepare_fails_alone(artifact_root):
    tasks = _cohort(artifact_root, shown=False)
    broken = dataclasses.replace(tasks[0], parent_key="no-such-artifact")  # its model cannot be loaded
    outs = evaluate.run_cohort([broken, tasks[1]], ENV)
    assert isinstance(outs[0], BaseException)
    assert not isinstance(outs[1], BaseException) and outs[1].metrics["paired"]["rounds"] == 4


def test_a_failing_reference_fails_the_whole_cohort(artifact_root):
    tasks = _cohort(artifact_root, shown=False)
    bad_ref = dataclasses.replace(tasks[0].cohort.reference, parent_key="missing")
    cohort = dataclasses.replace(tasks[0].cohort, reference=bad_ref)
    outs = evaluate.run_cohort([dataclasses.replace(t, cohort=cohort) for t in tasks], ENV)
    assert len(outs) == 2 and all(isinstance(o, BaseException) for o in outs)


def test_the_ray_worker_runs_a_cohort_through_its_kind(artifact_root):
    from workers.actor import StageWorker

    results = StageWorker("node01", {}, 1).run_many(_cohort(artifact_root, shown=False))
    assert [r.status for r in results] == ["succeeded", "succeeded"]
    assert results[0].metrics["cohort"]["id"] == results[1].metrics["cohort"]["id"] == "c-test"
    assert all(r.duration_s > 0 for r in results)


def test_a_cohort_whose_worker_dies_is_measured_again_whole_in_a_new_cohort(store, tmp_path):
    from orchestrator.pool.fake import Die

    plan = make_plan([("train", None, None)] + [("evaluate", 0, "cpu-a")] * 3)
    plan = _with_reference(plan, True, 8)
    evals = [s.key for s in plan.stages[1:]]
    seen: list[tuple[str, str]] = []

    def script(task: StageTask, n, attempt):
        if task.kind != "evaluate":
            return None
        seen.append((task.cohort.id, task.key))
        return Die("killed mid-cohort") if task.key == evals[1] and attempt == 1 else None

    pool = FakeWorkerPool([node(1)], script)
    coord, _ = _cohort_coordinator(store, tmp_path, plan, pool, 8)
    outcome = coord.run()
    assert outcome.status == "succeeded"
    first, second = dict.fromkeys(c for c, _ in seen)
    # the first cohort got as far as its second member; all three were measured again together
    assert [k for c, k in seen if c == first] == evals[:2]
    assert [k for c, k in seen if c == second] == evals
    attempts = {k: [a.status for a in store.attempts(outcome.sweep_id, k)] for k in evals}
    assert all(a == ["lost", "succeeded"] for a in attempts.values()), attempts


def test_sliced_rounds_interleave_the_members_and_sum_each_window_from_its_slices(artifact_root, monkeypatch):
    """``interleave: slices``: each meter window (a slice) runs one model, the models take
    turns slice by slice within a round, and each round's window of a model is the sum of
    its slices, at least ``min_window_s`` long."""
    from tests.unit.test_evaluate import RecordingMeter

    events: list[Any] = []

    class TimedMeter(RecordingMeter):
        def end(self):
            reading = super().end()
            self.events[-1] = ("end", reading.duration_s)
            return reading

    def on_forward(module, args):
        if module.__class__.__name__ == "VisionTransformer":
            events.append(id(module))

    monkeypatch.setattr(evaluate, "make_meter", lambda device: TimedMeter(events, device))
    tasks = [dataclasses.replace(t, params={**t.params, "interleave": "slices", "slice_s": 0.001,
                                            "min_window_s": 0.3, "repeats": 2})
             for t in _cohort(artifact_root, shown=True)]
    cohort = dataclasses.replace(tasks[0].cohort, reference=tasks[1])
    handle = torch.nn.modules.module.register_module_forward_pre_hook(on_forward)
    try:
        outs = evaluate.run_cohort([dataclasses.replace(t, cohort=cohort) for t in tasks], ENV)
    finally:
        handle.remove()
    begin = events.index("begin")
    slices: list[tuple[set[int], float]] = []  # (the models that ran in it, its duration)
    for e in events[begin:]:
        if e == "begin":
            slices.append((set(), 0.0))
        elif isinstance(e, tuple):
            slices[-1] = (slices[-1][0], e[1])
        else:
            slices[-1][0].add(e)
    assert all(len(models) == 1 for models, _ in slices)  # a slice runs one model
    owners = [next(iter(models)) for models, _ in slices]
    turns = 1 + sum(a != b for a, b in zip(owners, owners[1:]))
    assert len(set(owners)) == 3 and turns > 3 * 2  # more turns than one window per model per round
    protocol = outs[0].metrics["cohort"]["protocol"]
    assert protocol["interleave"] == "slices" and protocol["slice_s"] == 0.001
    assert protocol["rewarm_batches_per_window"] == 0
    counts = protocol["slices_per_window"]
    assert sum(sum(c) for c in counts.values()) == len(slices) and all(len(c) == 2 for c in counts.values())
    for out in outs:
        assert [r.repeat for r in out.repeats] == [0, 1]
        assert all(r.duration_s >= 0.3 and r.samples % 360 == 0 for r in out.repeats)
    # the ratios pair the slices turn by turn (workers.stats.turn_ratio)
    assert all(out.metrics["paired"]["pairing"] == "turns" for out in outs)
    # every slice is counted in exactly one window
    assert sum(r.duration_s for out in outs for r in out.repeats) == pytest.approx(sum(d for _, d in slices))


def test_auto_interleaves_slices_on_cpu_and_keeps_windows_on_cuda():
    params = evaluate.EvaluateParams()
    assert params.interleave == "auto"
    assert evaluate.interleave_mode(params, "cpu") == "slices"
    assert evaluate.interleave_mode(params, "cuda:0") == "windows"
    assert evaluate.interleave_mode(evaluate.EvaluateParams(interleave="windows"), "cpu") == "windows"
