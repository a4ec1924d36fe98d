"""The answer first: per target and runtime, the cheapest model whose saving is real.

What a sweep's user asked is "which compressed model should I deploy where?". The answer
is read from the paired verdicts alone, never from raw means: per (target, runtime), the
model with the lowest time ratio to the baseline (the cohort's reference: the
uncompressed model on torch fp32) among those

- whose ``verdict_time`` is ``faster`` (the 95 % interval of the ratio lies wholly below
  0.98), and
- whose accuracy is acceptable: top-1 at most one point (:data:`TOP1_DROP`) below the
  reference's on the same samples, or ``verdict_top1`` ``same`` or ``better`` (McNemar: a
  1.1-point drop that is not significant is noise; a significant drop of more than a
  point is not acceptable);

or, plainly, that no model is. The HTML report opens with it, beside the noise floor
measured on each target (:func:`noise_floors`), and ``greensweep run`` ends with it.
Pure: rows (and cohort records) in, lines out.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from orchestrator.report.results import SAME, _pct
from orchestrator.store.records import DEFAULT_PRECISION, CohortRecord, ResultRow

TOP1_DROP = 0.01  # top-1 (a fraction) a model may lose against the reference and still be acceptable
_ROUNDING = 1e-9  # 0.80 - 0.79 is 0.010000000000000009 in binary: a drop of exactly one point qualifies

ANSWER_RULE = ("per target and runtime: the model with the lowest time ratio to the baseline (the uncompressed "
               "model on torch fp32, measured in the same rounds) among those significantly faster (95 % interval "
               "wholly below 0.98) whose top-1 is within 1 point of the baseline's or not significantly worse "
               "(McNemar, 5 %)")
NO_VERDICTS = ("no model was measured in a cohort (the sweep predates paired measurement, or no evaluation "
               "succeeded): there are no verdicts to answer from")


@dataclass(frozen=True)
class Answer:
    """The answer for one (target, runtime): ``best`` is None when no model qualifies."""

    target: str
    runtime: str
    best: ResultRow | None
    reference_top1: float | None  # the baseline's top-1 ``best`` is judged against

    def line(self) -> str:
        where = f"{self.target} / {self.runtime}"
        r = self.best
        if r is None:
            return f"{where}: no model is significantly faster than the baseline within 1 point of its top-1"
        ratio = f"{r.time_ratio_vs_baseline:.2f}x time"
        if r.time_ratio_ci_low is not None and r.time_ratio_ci_high is not None:
            ratio += f" [{r.time_ratio_ci_low:.2f}, {r.time_ratio_ci_high:.2f}]"
        name = r.point if r.precision == DEFAULT_PRECISION else f"{r.point} ({r.precision})"
        versus = "" if self.reference_top1 is None else f"baseline {_pct(self.reference_top1)}%, "
        return f"{where}: {name} — {ratio}, top-1 {_pct(r.top1)}% ({versus}{_top1_mark(r.verdict_top1)})"


def _top1_mark(verdict: str | None) -> str:
    if verdict == "same":
        return SAME
    if verdict in ("better", "worse"):
        return f"significantly {verdict}"
    return "not tested"


def reference_top1(row: ResultRow, rows: Sequence[ResultRow]) -> float | None:
    """The top-1 of *row*'s reference on the same samples: what its cohort recorded, else
    the reference's own row among *rows*."""
    if row.reference_top1 is not None:
        return row.reference_top1
    return next((r.top1 for r in rows if row.reference_key and r.eval_key == row.reference_key
                 and r.target == row.target), None)


def acceptable(row: ResultRow, reference: float | None) -> bool:
    """Whether *row*'s accuracy may stand in for the reference's (*reference*: its top-1)."""
    if row.top1 is None:
        return False
    if row.verdict_top1 in ("same", "better"):
        return True
    return reference is not None and reference - row.top1 <= TOP1_DROP + _ROUNDING


def answers(rows: Sequence[ResultRow]) -> list[Answer]:
    """One :class:`Answer` per (target, runtime) of *rows* that has a paired verdict, in
    point order; empty when no row was measured in a cohort."""
    groups: dict[tuple[str, str], list[ResultRow]] = {}
    for r in rows:
        if r.verdict_time is not None:
            groups.setdefault((r.target, r.runtime), []).append(r)
    out = []
    for (target, runtime), mine in groups.items():
        fit = [r for r in mine if r.verdict_time == "faster" and r.time_ratio_vs_baseline is not None
               and acceptable(r, reference_top1(r, rows))]
        best = min(fit, key=lambda r: (r.time_ratio_vs_baseline, -(r.top1 or 0.0), r.point_index), default=None)
        shown = best if best is not None else mine[0]
        out.append(Answer(target, runtime, best, reference_top1(shown, rows)))
    return out


def answer_lines(rows: Sequence[ResultRow]) -> list[str]:
    """:meth:`Answer.line` of each of :func:`answers`; empty when there are no verdicts."""
    return [a.line() for a in answers(rows)]


@dataclass(frozen=True)
class NoiseFloor:
    """The round-to-round noise measured on one target: the median over its cohorts of the
    reference's coefficient of variation of time per sample (None when no cohort had two
    rounds)."""

    target: str
    median_cv: float | None
    cohorts: int  # cohorts measured on the target
    measured: int  # of which had a CV (two rounds or more)

    def line(self) -> str:
        if self.median_cv is None:
            return (f"{self.target}: noise floor not measured ({self.cohorts} cohort(s) of a single round; "
                    "a ratio needs two rounds for an interval)")
        return (f"{self.target}: noise floor {100 * self.median_cv:.1f} % -- round-to-round CV of the baseline's "
                f"time / sample, median over {self.measured} cohort(s)")


def noise_floors(cohorts: Sequence[CohortRecord]) -> list[NoiseFloor]:
    """One :class:`NoiseFloor` per target of *cohorts* (``Store.cohorts``), in order seen."""
    by_target: dict[str, list[CohortRecord]] = {}
    for c in cohorts:
        by_target.setdefault(c.target, []).append(c)
    out = []
    for target, mine in by_target.items():
        cvs = [c.noise_floor_cv for c in mine if c.noise_floor_cv is not None]
        out.append(NoiseFloor(target, statistics.median(cvs) if cvs else None, len(mine), len(cvs)))
    return out
