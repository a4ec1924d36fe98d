"""Conditional stages (``when:``): the spec's errors, what the planner wires a gated
``qat`` to, the decision from stored evaluations, and the coordinator running or skipping
it -- against the in-process fake pool and a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from orchestrator.cli import main
from orchestrator.errors import SpecError
from orchestrator.gate import Gate, decide, decided_skip, not_needed
from orchestrator.plan import Plan, build_plan
from orchestrator.pool.fake import Fail, FakeWorkerPool, Succeed
from orchestrator.spec import parse_spec
from orchestrator.store import Store
from tests.unit.test_coordinator import Events, fast_ticks, make_coordinator, node, store  # noqa: F401 - fixtures
from workers.stats import pack_correct, unpack_correct

HEAD = """name: gate
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}
dataset: {name: digits, options: {}}
train: {epochs: 2, lr: 0.002}
evaluate: {targets: [local], runtimes: [torch, openvino], repeats: 1}
"""

GATED = HEAD + """pipelines:
  - name: ptq
    stages:
      - prune: {method: structured, ratio: 0.3}
      - quantize: {engine: openvino, weights: int8, activations: int8}
  - name: qat
    stages:
      - prune: {method: structured, ratio: 0.3}
      - qat: {epochs: 2}
        when: {ptq_top1_drop_over: 0.01}
"""


def _plan(text: str) -> Plan:
    return build_plan(parse_spec(text, base_dir=".", check_arch=False))


# -- the spec and the plan -------------------------------------------------------------------


def test_a_gated_stage_waits_for_its_siblings_and_its_float_parents_evaluations():
    plan = _plan(GATED)
    (qat,) = [s for s in plan.stages if s.kind == "qat"]
    (quantize,) = [s for s in plan.stages if s.kind == "quantize"]
    gate = qat.gate
    assert gate is not None and (gate.condition, gate.threshold) == ("ptq_top1_drop_over", 0.01)
    assert gate.sibling_key == quantize.key and gate.where == "local on openvino fp32"
    sibling_eval, parent_eval = plan.stage(gate.sibling_eval), plan.stage(gate.parent_eval)
    assert sibling_eval.parent_key == quantize.key and parent_eval.parent_key == qat.parent_key == quantize.parent_key
    for ev in (sibling_eval, parent_eval):
        assert (ev.target, ev.params["runtime"], ev.params["precision"]) == ("local", "openvino", "fp32")
    assert qat.inputs.evaluations == (gate.parent_eval, gate.sibling_eval)
    # the float parent (the pruned model) is no pipeline's last stage: it is measured for the gate
    assert {p.runtime for p in plan.points if p.stage_keys and p.stage_keys[-1] == qat.parent_key} == {"torch",
                                                                                                      "openvino"}
    assert plan.to_json()["stages"][[s.key for s in plan.stages].index(qat.key)]["when"]["sibling_key"] == quantize.key


def test_the_condition_is_not_part_of_the_stage_key():
    plain = GATED.replace("        when: {ptq_top1_drop_over: 0.01}\n", "")
    gated, ungated = _plan(GATED), _plan(plain)
    assert {s.key for s in ungated.stages} < {s.key for s in gated.stages}  # plus the float parent's evaluations
    assert {s.key for s in gated.stages} - {s.key for s in ungated.stages} == set(
        next(s for s in gated.stages if s.kind == "qat").inputs.evaluations[:1]) | {
        p.eval_key for p in gated.points if p.stage_keys[-1:] == (gated.stages[1].key,)}
    assert all(s.gate is None for s in _plan(plain).stages)
    both = GATED + "  - name: always\n    stages:\n      - prune: {method: structured, ratio: 0.3}\n      - qat: {epochs: 2}\n"
    assert all(s.gate is None for s in _plan(both).stages)  # planned without a condition too: it always runs


def test_plan_shows_the_conditional_stage(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(GATED)
    monkeypatch.chdir(tmp_path)
    main(["plan", str(spec)])
    out = capsys.readouterr().out
    assert "conditional stages: 1" in out
    assert ("qat(epochs=2)" in out and "runs only if quantize(weights=int8, activations=int8, engine=openvino) loses "
            "more than 1 point(s) of top-1 against the float parent, significantly (McNemar), measured @ local on "
            "openvino fp32") in out


@pytest.mark.parametrize("stages, message", [
    ("      - prune: {method: structured, ratio: 0.3}\n        when: {ptq_top1_drop_over: 0.01}\n",
     "this stage kind takes no condition"),
    ("      - qat: {}\n        when: {top1_over: 0.01}\n", "unknown condition -- use one of: ptq_top1_drop_over"),
    ("      - qat: {}\n        when: {ptq_top1_drop_over: 1.5}\n", "give a share of top-1 in [0, 1)"),
    ("      - qat: {}\n        when: {ptq_top1_drop_over: [0.01, 0.02]}\n", "a condition is not a grid axis"),
    ("      - qat: {}\n        when: 0.01\n", "give one condition"),
    ("      - qat: {}\n        when: {ptq_top1_drop_over: 0.01}\n",
     "no post-training sibling to compare with -- add a pipeline that ends in 'quantize: {engine: openvino, "
     "weights: int8, activations: int8}'"),
])
def test_bad_conditions_are_one_line_spec_errors(stages: str, message: str):
    with pytest.raises(SpecError) as e:
        _plan(HEAD + "pipelines:\n  - name: p\n    stages:\n" + stages)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_sibling_on_another_parent_or_with_other_activations_is_not_one():
    text = HEAD + """pipelines:
  - name: ptq
    stages:
      - quantize: {engine: onnxruntime, weights: int8, activations: int8}
  - name: qat
    stages:
      - prune: {method: structured, ratio: 0.3}
      - qat: {}
        when: {ptq_top1_drop_over: 0.01}
"""
    with pytest.raises(SpecError, match="no post-training sibling"):
        _plan(text.replace("runtimes: [torch, openvino]", "runtimes: [torch, onnxruntime, openvino]"))


def test_a_cli_run_with_a_bad_condition_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys):
    spec = tmp_path / "s.yaml"
    spec.write_text(HEAD + "pipelines:\n  - name: p\n    stages:\n      - qat: {}\n        when: {ptq_top1_drop_over: 0.01}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["run", str(spec)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no post-training sibling" in err and "Traceback" not in err
    assert not (tmp_path / ".greensweep").exists()


# -- the decision --------------------------------------------------------------------------


class Rec:
    def __init__(self, correct: list[bool], status: str = "succeeded") -> None:
        self.status = status
        self.metrics = {"top1": sum(correct) / len(correct), "correct_top1": pack_correct(correct)}


GATE = Gate("ptq_top1_drop_over", 0.01, "q", "quantize(...)", "eq", "ep", "local on openvino fp32")


def test_per_sample_correctness_round_trips_and_refuses_what_is_not_it():
    bits = [i % 3 == 0 for i in range(37)]
    assert unpack_correct(pack_correct(bits)) == bits and unpack_correct(pack_correct([])) == []
    with pytest.raises(ValueError, match="no per-sample correctness"):
        unpack_correct(None)
    with pytest.raises(ValueError, match="holds"):
        unpack_correct({"n": 37, "bits": "00"})


def test_the_gate_runs_the_stage_only_on_a_significant_loss_over_the_threshold():
    parent = Rec([True] * 90 + [False] * 10)
    lost_a_lot = decide(GATE, parent, Rec([True] * 75 + [False] * 25))  # 15 discordant, all losses
    assert lost_a_lot.run and lost_a_lot.reason.startswith("needed: PTQ lost 15.0 points > 1.0, significantly")
    assert lost_a_lot.facts["discordant"] == [15, 0] and lost_a_lot.facts["mcnemar_p"] < 0.05
    small = decide(GATE, parent, Rec([True] * 90 + [False] * 10))
    assert not small.run and small.reason == "not needed: PTQ lost 0.0 points <= 1.0" and not_needed(small.reason)
    noisy = decide(GATE, parent, Rec([True] * 88 + [False] * 12))  # 2 points, but 2 samples of 100
    assert not noisy.run and noisy.reason.startswith("not needed: PTQ lost 2.0 points > 1.0 but not significantly")
    gained = decide(GATE, parent, Rec([True] * 95 + [False] * 5))
    assert not gained.run and gained.reason == "not needed: PTQ gained 5.0 points <= 1.0"


def test_an_evaluation_that_did_not_succeed_decides_nothing():
    parent = Rec([True] * 10)
    failed = decide(GATE, parent, Rec([True] * 10, status="failed"))
    assert not failed.run and failed.reason.startswith("not decided: the evaluation of quantize(...)")
    assert decided_skip(failed.reason) and not not_needed(failed.reason)
    assert decide(GATE, None, parent).reason.startswith("not decided: the float parent's evaluation")
    old = Rec([True] * 10)
    old.metrics.pop("correct_top1")
    assert "no per-sample correctness" in decide(GATE, parent, old).reason


# -- the coordinator -----------------------------------------------------------------------------


def _run(store: Store, tmp_path: Path, sibling: list[bool] | None, parent: list[bool]) -> tuple[Any, Plan, str, Events]:
    """A gated sweep whose evaluations report *parent* / *sibling* correctness (the
    sibling's evaluation fails when None); every other stage succeeds at once."""
    plan = _plan(GATED)  # run with the coordinator's carrier spec: cohorts of 8
    (qat,) = [s for s in plan.stages if s.kind == "qat"]
    gate = qat.gate

    def script(task, node_info, attempt):
        if task.key == gate.sibling_eval:
            return Fail("RuntimeError: export failed") if sibling is None else Succeed(Rec(sibling).metrics)
        if task.kind == "evaluate":
            return Succeed(Rec(parent).metrics)
        return None

    pool = FakeWorkerPool([node(1, "local")], script)
    coord, events = make_coordinator(store, tmp_path, plan, pool)
    outcome = coord.run()
    return outcome, plan, coord.sweep_id, events


def _stage(store: Store, sweep_id: str, key: str) -> Any:
    return next(s for s in store.stages(sweep_id) if s.key == key)


def test_a_needed_stage_runs_after_both_evaluations_and_records_why(store, tmp_path):
    outcome, plan, sweep_id, _ = _run(store, tmp_path, [True] * 70 + [False] * 30, [True] * 90 + [False] * 10)
    (qat,) = [s for s in plan.stages if s.kind == "qat"]
    assert outcome.status == "succeeded" and outcome.counts == {"succeeded": len(plan.stages)}
    row = _stage(store, sweep_id, qat.key)
    assert row.metrics["gate"]["run"] is True and row.metrics["gate"]["discordant"] == [20, 0]
    assert row.started_at >= max(_stage(store, sweep_id, k).finished_at for k in qat.inputs.evaluations)


def test_a_stage_that_is_not_needed_is_skipped_with_what_follows_and_the_sweep_succeeds(store, tmp_path):
    same = [True] * 90 + [False] * 10
    outcome, plan, sweep_id, events = _run(store, tmp_path, same, same)
    (qat,) = [s for s in plan.stages if s.kind == "qat"]
    after = plan.descendants(qat.key)
    assert outcome.status == "succeeded" and outcome.counts["skipped"] == 1 + len(after) == 2
    row = _stage(store, sweep_id, qat.key)
    assert (row.status, row.error) == ("skipped", "not needed: PTQ lost 0.0 points <= 1.0")
    assert row.metrics["gate"]["run"] is False and row.metrics["gate"]["drop"] == 0.0
    for key in after:
        assert _stage(store, sweep_id, key).error.startswith("not needed: PTQ lost 0.0 points <= 1.0 (for qat(epochs=2)")
    assert ("qat(epochs=2)", ("not needed: PTQ lost 0.0 points <= 1.0",)) in events.named("stage_skipped")


def test_a_sibling_that_failed_leaves_the_stage_undecided_and_the_sweep_partial(store, tmp_path):
    outcome, plan, sweep_id, _ = _run(store, tmp_path, None, [True] * 10)
    (qat,) = [s for s in plan.stages if s.kind == "qat"]
    assert outcome.status == "partial" and outcome.counts["failed"] == 1
    assert _stage(store, sweep_id, qat.key).error.startswith("not decided: the evaluation of quantize(")
