"""Conditional stages: ``when:`` in a spec, decided from stored evaluations.

A stage whose kind declares ``conditions`` (``qat``) may carry
``when: {ptq_top1_drop_over: 0.01}``: it runs only if its *sibling* -- the post-training
stage on the same parent that its kind names (``quantize`` with the same engine, weights
and activations) -- lost more than the threshold of top-1 (absolute: 0.01 = 1 point)
against the float parent, **and** the loss is significant by the exact McNemar test on the
same test samples (:func:`workers.stats.mcnemar`). Both are measured by evaluations of the
plan -- the sibling's and the float parent's, on the first target, at fp32, on the first
of ``evaluate.runtimes`` that runs the sibling's model -- so the planner names them
(:class:`Gate`) and the coordinator decides (:func:`decide`) when both are stored.

A stage that is not needed is ``skipped`` with the reason, and so is everything after it;
those skips are the answer, not failures: the sweep still succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from orchestrator.errors import SpecError

# condition name -> what it means, for errors and for `plan`
CONDITIONS: dict[str, str] = {
    "ptq_top1_drop_over": "the post-training sibling loses more than this share of top-1 (0.01 = 1 point), "
                          "significantly",
}
NOT_NEEDED = "not needed"  # how a gated stage's skip reason begins
NOT_DECIDED = "not decided"  # ... when an evaluation it reads did not succeed


@dataclass(frozen=True)
class Gate:
    """A planned stage's condition and the two evaluations that decide it."""

    condition: str  # a key of CONDITIONS
    threshold: float
    sibling_key: str  # the post-training stage it is compared with
    sibling_label: str
    sibling_eval: str  # the sibling's evaluation (first target, fp32, on the runtime that runs it)
    parent_eval: str  # the float parent's, on the same target, runtime and precision
    where: str  # "local on openvino fp32": where both are measured

    def describe(self) -> str:
        points = 100 * self.threshold
        return (f"runs only if {self.sibling_label} loses more than {points:g} point(s) of top-1 against the float "
                f"parent, significantly (McNemar), measured @ {self.where}")

    def to_json(self) -> dict[str, Any]:
        return {"condition": self.condition, "threshold": self.threshold, "sibling_key": self.sibling_key,
                "sibling": self.sibling_label, "sibling_eval": self.sibling_eval, "parent_eval": self.parent_eval,
                "where": self.where}


def parse_when(raw: Any, path: str, conditions: tuple[str, ...]) -> dict[str, float]:
    """The ``when:`` mapping of a spec stage, checked: one line naming the fix otherwise."""
    if not conditions:
        raise SpecError(f"{path}.when: this stage kind takes no condition -- remove 'when:' (qat takes "
                        "'when: {ptq_top1_drop_over: 0.01}')")
    if not isinstance(raw, dict) or len(raw) != 1:
        raise SpecError(f"{path}.when: give one condition, e.g. 'when: {{{conditions[0]}: 0.01}}'")
    (name, value), = raw.items()
    if name not in conditions:
        raise SpecError(f"{path}.when.{name}: unknown condition -- use one of: {', '.join(conditions)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise SpecError(f"{path}.when.{name}: give a share of top-1 in [0, 1), e.g. 0.01 for one point "
                        f"(got {value!r}); a condition is not a grid axis")
    return {name: float(value)}


@dataclass(frozen=True)
class Decision:
    """What the gate decided: ``run`` or not, why (one line), and the figures behind it."""

    run: bool
    reason: str
    facts: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "reason": self.reason, **self.facts}


def decide(gate: Gate, parent: Any, sibling: Any) -> Decision:
    """Decide *gate* from the stored evaluations *parent* (the float parent's) and
    *sibling* (records with ``status`` and ``metrics``; None: not in the store).

    An evaluation that did not succeed decides nothing: the stage is skipped, saying which
    (that skip is a failure of the sweep, unlike ``not needed``)."""
    from workers.stats import ALPHA, mcnemar, unpack_correct

    for what, rec in (("the float parent's evaluation", parent), (f"the evaluation of {gate.sibling_label}", sibling)):
        if rec is None or rec.status not in ("succeeded", "reused"):
            status = "missing" if rec is None else rec.status
            return Decision(False, f"{NOT_DECIDED}: {what} @ {gate.where} did not succeed ({status})", {})
    try:
        test = mcnemar(unpack_correct(parent.metrics.get("correct_top1")),
                       unpack_correct(sibling.metrics.get("correct_top1")))
    except ValueError as e:
        return Decision(False, f"{NOT_DECIDED}: {e} (measured by an older greensweep? run the sweep again)", {})
    top1_parent, top1_sibling = float(parent.metrics["top1"]), float(sibling.metrics["top1"])
    drop = top1_parent - top1_sibling
    facts = {"parent_top1": top1_parent, "sibling_top1": top1_sibling, "drop": drop, "threshold": gate.threshold,
             "mcnemar_p": test.p, "discordant": [test.b, test.c], "alpha": ALPHA}
    lost = f"PTQ lost {100 * drop:.1f} points" if drop >= 0 else f"PTQ gained {-100 * drop:.1f} points"
    limit = f"{100 * gate.threshold:.1f}"
    if drop <= gate.threshold:
        return Decision(False, f"{NOT_NEEDED}: {lost} <= {limit}", facts)
    if test.verdict != "worse":
        return Decision(False, f"{NOT_NEEDED}: {lost} > {limit} but not significantly (McNemar p {test.p:.3g} "
                               f">= {ALPHA})", facts)
    return Decision(True, f"needed: {lost} > {limit}, significantly (McNemar p {test.p:.3g})", facts)


def decided_skip(reason: str | None) -> bool:
    """Was a stage skipped by a condition (not needed, or not decidable)?"""
    return not_needed(reason) or str(reason or "").startswith(NOT_DECIDED)


def not_needed(reason: str | None) -> bool:
    """Was a stage skipped because its condition said it is not needed (not a failure)?"""
    return bool(reason) and str(reason).startswith(NOT_NEEDED)
