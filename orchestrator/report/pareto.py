"""The accuracy-cost Pareto frontier of a sweep, per target.

A point is a sweep point -- a compressed model on one target, run by one runtime at one
precision: (chain, target, runtime, precision) is its identity, so the same model on two
runtimes is two points that compete on the target's frontier -- with a cost ``x`` to
minimise (time, energy or carbon per sample) and an accuracy ``y`` to maximise. A point is
*dominated* when another point of the same target is no worse on both (``x' <= x`` and
``y' >= y``) and strictly better on one; the frontier is the points no other point
dominates. Two points with exactly the same ``x`` and ``y`` do not dominate each other:
both stay on the frontier.

**Costs follow the verdicts.** A point measured in a cohort has a paired verdict on its
cost (``verdict_time``; ``verdict_energy`` for energy and for carbon, which is energy x
the region's intensity). Where the verdict is ``same`` the cost is not the point's own
figure but the reference's -- the target's baseline row when it is a point, else the
cohorts' mean reference figure, else the point's figure / its ratio -- one number for
the whole target, so a model is never "cheaper" on noise. Such a point ties with the
baseline on cost and is dominated by it unless it is more accurate: where the baseline
is as good, the uncompressed model is the answer. Points without verdicts (stores from
before cohorts) keep their own figures.

``pareto --format json`` has this shape (every point, flagged; the table and markdown
list the frontier only)::

    {"sweep_id": ..., "x": field, "y": field,
     "targets": [{"target": ..., "points": [{"point_index", "model", "runtime", "precision",
                  "x", "x_std", "y", "y_std", "energy_source", "on_frontier",
                  "x_measured", "x_verdict"}],
                  "without_metrics": [labels]}]}

``x`` is the cost the frontier used, ``x_measured`` the point's own figure and
``x_verdict`` the verdict that decided between them (None without one). The CSV has a
line per point (``runtime``, ``precision``, the measured figure and the verdict last); the
table and markdown show a ``runtime`` column when any point ran on something other than
torch at fp32, and mark a cost taken as the baseline's with ``≈``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import UsageError
from orchestrator.report.compare import source_marks
from orchestrator.report.results import SAME, deployment, has_runtimes
from orchestrator.store.records import ResultRow


@dataclass(frozen=True)
class Metric:
    name: str  # the CLI's word: energy, time, carbon, top1, top5
    field: str  # the ResultRow field
    std_field: str
    title: str  # axis title
    unit: str  # display unit
    scale: float  # SI value x scale = display value
    missing_hint: str  # how to get the figure when a sweep has none
    # costs only: the paired verdict and ratio that govern the figure, and the reference's
    # own figure as a cohort recorded it (None where cohorts record none)
    verdict_field: str | None = None
    ratio_field: str | None = None
    reference_field: str | None = None


X_METRICS: dict[str, Metric] = {
    "energy": Metric("energy", "energy_per_sample_j", "energy_per_sample_j_std", "energy / sample", "mJ", 1e3,
                     "no meter produced an energy reading for its evaluations -- use --x time",
                     "verdict_energy", "energy_ratio_vs_baseline", "reference_energy_per_sample_j"),
    "time": Metric("time", "time_per_sample_s", "time_per_sample_s_std", "time / sample", "ms", 1e3,
                   "none of its evaluations succeeded -- see: greensweep status SWEEP",
                   "verdict_time", "time_ratio_vs_baseline", "reference_time_per_sample_s"),
    "carbon": Metric("carbon", "carbon_g_per_sample", "carbon_g_per_sample_std", "carbon / sample", "µg CO2eq", 1e6,
                     "its spec has no carbon: section -- add one (e.g. carbon: {provider: static, fallback: world}) "
                     "and rerun the sweep, or use --x energy",
                     "verdict_energy", "energy_ratio_vs_baseline", None),
}
Y_METRICS: dict[str, Metric] = {
    "top1": Metric("top1", "top1", "top1_std", "top-1 accuracy", "%", 100.0,
                   "none of its evaluations succeeded -- see: greensweep status SWEEP"),
    "top5": Metric("top5", "top5", "top5_std", "top-5 accuracy", "%", 100.0,
                   "none of its evaluations succeeded -- see: greensweep status SWEEP"),
}


def pareto_mask(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """For each point, whether it is on the frontier (minimise x, maximise y).

    O(n log n): sorted by x, a point is dominated by a point of the same x with a larger
    y, or by any point of smaller x whose y is at least its own. Exact ties are kept.
    """
    if len(xs) != len(ys):
        raise ValueError(f"{len(xs)} x values but {len(ys)} y values")
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i]))
    on = [False] * len(xs)
    best_y = float("-inf")  # the largest y among points of strictly smaller x
    i = 0
    while i < len(order):
        j = i
        while j < len(order) and xs[order[j]] == xs[order[i]]:
            j += 1
        group_best = ys[order[i]]  # sorted by -y within equal x
        if group_best > best_y:
            for k in order[i:j]:
                on[k] = ys[k] == group_best
        best_y = max(best_y, group_best)
        i = j
    return on


@dataclass(frozen=True)
class ParetoPoint:
    """A point as the frontier saw it: ``x`` is the cost used -- the baseline's when
    ``equated`` (its verdict is ``same``), else ``x_measured``, the point's own figure."""

    row: ResultRow
    x: float
    x_std: float | None
    y: float
    y_std: float | None
    on_frontier: bool
    x_measured: float | None = None
    x_verdict: str | None = None
    equated: bool = False


@dataclass(frozen=True)
class TargetFront:
    target: str
    points: tuple[ParetoPoint, ...]  # sorted by x, then by y descending
    without_metrics: tuple[ResultRow, ...]  # points lacking x or y (failed, or no figure)

    @property
    def frontier(self) -> tuple[ParetoPoint, ...]:
        return tuple(p for p in self.points if p.on_frontier)


@dataclass(frozen=True)
class Pareto:
    sweep_id: str
    x: Metric
    y: Metric
    fronts: tuple[TargetFront, ...]

    @property
    def has_runtimes(self) -> bool:
        """Whether a point ran on something other than torch at fp32 (then shown)."""
        return has_runtimes([*(q.row for f in self.fronts for q in f.points),
                             *(r for f in self.fronts for r in f.without_metrics)])


def available_x(rows: Sequence[ResultRow]) -> list[str]:
    """The x metrics (names of :data:`X_METRICS`) at least one point has a figure for."""
    return [name for name, m in X_METRICS.items() if any(getattr(r, m.field) is not None for r in rows)]


def build_pareto(rows: Sequence[ResultRow], x: str = "energy", y: str = "top1", target: str | None = None) -> Pareto:
    """The frontier of every target (or of *target*) of the sweep in *rows*.

    Raises :class:`UsageError` for a target the sweep does not have, and for a metric no
    point of the sweep has a figure for (naming how to get one).
    """
    if x not in X_METRICS:
        raise UsageError(f"unknown --x {x!r}; one of: {', '.join(X_METRICS)}")
    if y not in Y_METRICS:
        raise UsageError(f"unknown --y {y!r}; one of: {', '.join(Y_METRICS)}")
    xm, ym = X_METRICS[x], Y_METRICS[y]
    sweep_id = rows[0].sweep_id if rows else "?"
    targets = list(dict.fromkeys(r.target for r in rows))
    if target is not None:
        if target not in targets:
            known = ", ".join(targets) or "none"
            raise UsageError(f"sweep {sweep_id} has no target {target!r} -- its targets: {known}")
        targets = [target]
    scoped = [r for r in rows if r.target in targets]
    for m in (xm, ym):
        if not any(getattr(r, m.field) is not None for r in scoped):
            raise UsageError(f"sweep {sweep_id} has no {m.title} figures: {m.missing_hint.replace('SWEEP', sweep_id)}")
    fronts = []
    for t in targets:
        mine = [r for r in scoped if r.target == t]
        usable = [r for r in mine if getattr(r, xm.field) is not None and getattr(r, ym.field) is not None]
        measured = [getattr(r, xm.field) for r in usable]
        reference = _reference_index(usable)
        equated = [_verdict(r, xm) == "same" and i != reference for i, r in enumerate(usable)]
        xs = paired_costs(usable, xm)
        ys = [getattr(r, ym.field) for r in usable]
        mask = pareto_mask(xs, ys)
        if reference is not None:  # a cost equal to the baseline's only on noise: the baseline wins a tie
            mask = [on and not (same and xs[i] == xs[reference] and ys[i] <= ys[reference])
                    for i, (on, same) in enumerate(zip(mask, equated))]
        points = [ParetoPoint(r, xv, getattr(r, xm.std_field), yv, getattr(r, ym.std_field), on, mv,
                              _verdict(r, xm), same)
                  for r, xv, yv, on, mv, same in zip(usable, xs, ys, mask, measured, equated)]
        points.sort(key=lambda p: (p.x, -p.y, p.row.point_index))
        used = {id(r) for r in usable}
        fronts.append(TargetFront(t, tuple(points), tuple(r for r in mine if id(r) not in used)))
    return Pareto(sweep_id, xm, ym, tuple(fronts))


def _verdict(r: ResultRow, m: Metric) -> str | None:
    return getattr(r, m.verdict_field) if m.verdict_field else None


def _reference_index(rows: Sequence[ResultRow]) -> int | None:
    """The index of the cohorts' reference (the baseline on torch fp32) among *rows* of one
    target, when it is a point there."""
    keys = {r.reference_key for r in rows if r.reference_key}
    return next((i for i, r in enumerate(rows) if r.eval_key in keys), None)


def reference_cost(rows: Sequence[ResultRow], m: Metric) -> float | None:
    """The cost *m* of the reference of *rows* (one target): the reference's own row when it
    is a point, else the mean of the reference figure the cohorts recorded (one per
    cohort); None when neither is known."""
    i = _reference_index(rows)
    if i is not None and getattr(rows[i], m.field) is not None:
        return getattr(rows[i], m.field)
    if m.reference_field is None:
        return None
    per_cohort = {r.cohort_id: getattr(r, m.reference_field) for r in rows
                  if r.cohort_id and getattr(r, m.reference_field) is not None}
    return sum(per_cohort.values()) / len(per_cohort) if per_cohort else None


def paired_costs(rows: Sequence[ResultRow], m: Metric) -> list[float]:
    """The cost *m* of each of *rows* (one target, each with a figure) as the frontier
    uses it: the reference's (:func:`reference_cost`) where the paired verdict is
    ``same``, else the row's own figure. Without a reference cost, a ``same`` row's is its
    figure / its ratio (the reference's in that row's cohort)."""
    baseline = reference_cost(rows, m)
    out = []
    for r in rows:
        figure = getattr(r, m.field)
        if _verdict(r, m) != "same":
            out.append(figure)
        elif baseline is not None:
            out.append(baseline)
        else:
            ratio = getattr(r, m.ratio_field) if m.ratio_field else None
            out.append(figure / ratio if ratio else figure)
    return out


# ------------------------------------------------------------------ rendering


def _fmt(value: float | None, std: float | None, m: Metric) -> str:
    if value is None:
        return "-"
    digits = 1 if m.unit == "%" else 4
    return f"{m.scale * value:.{digits}f} ± {m.scale * (std or 0.0):.{digits}f}"


def cost_text(q: ParetoPoint, m: Metric) -> str:
    """The cost the frontier used: ``≈ 0.7570 (baseline's; own 0.7330 ± 0.0100)`` where
    the verdict made it the baseline's, else the point's figure ± its std."""
    if not q.equated:
        return _fmt(q.x, q.x_std, m)
    digits = 1 if m.unit == "%" else 4
    own = _fmt(q.x_measured, q.x_std, m)
    return f"{SAME} {m.scale * q.x:.{digits}f} (baseline's; own {own})" if q.x != q.x_measured else f"{SAME} {own}"


EQUATED_NOTE = (f"{SAME}: the cost is within the noise of the baseline's (paired verdict same), so the frontier "
                "counts it as the baseline's; the baseline wins such a tie unless the point is more accurate")


def _any_equated(p: Pareto) -> bool:
    return any(q.equated for f in p.fronts for q in f.frontier)


def _headline(p: Pareto, f: TargetFront) -> str:
    text = (f"{f.target}: {p.x.title} ({p.x.unit}) vs {p.y.title} -- {len(f.frontier)} of {len(f.points)} "
            "points non-dominated")
    if f.without_metrics:
        text += f"; {len(f.without_metrics)} without figures ({', '.join(_named(p, r) for r in f.without_metrics)})"
    return text


def _named(p: Pareto, r: ResultRow) -> str:
    """The point's label, with its runtime and precision when the sweep has several."""
    return f"{r.point} [{deployment(r)}]" if p.has_runtimes else r.point


def pareto_json(p: Pareto) -> dict[str, Any]:
    return {
        "sweep_id": p.sweep_id, "x": p.x.field, "y": p.y.field,
        "targets": [
            {"target": f.target,
             "points": [{"point_index": q.row.point_index, "model": q.row.point, "runtime": q.row.runtime,
                         "precision": q.row.precision, "x": q.x, "x_std": q.x_std, "y": q.y, "y_std": q.y_std,
                         "energy_source": q.row.energy_source, "on_frontier": q.on_frontier,
                         "x_measured": q.x_measured, "x_verdict": q.x_verdict} for q in f.points],
             "without_metrics": [r.point for r in f.without_metrics]}
            for f in p.fronts
        ],
    }


def render_pareto(p: Pareto, fmt: str) -> str:
    """*fmt*: ``table``, ``markdown`` (the frontier only), ``csv`` or ``json`` (every point)."""
    if fmt == "json":
        return json.dumps(pareto_json(p), indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["target", "point_index", "model", p.x.field, f"{p.x.field}_std", p.y.field, f"{p.y.field}_std",
                    "on_frontier", "runtime", "precision", f"{p.x.field}_measured", p.x.verdict_field])
        for f in p.fronts:
            for q in f.points:
                w.writerow([f.target, q.row.point_index, q.row.point, q.x, q.x_std, q.y, q.y_std, q.on_frontier,
                            q.row.runtime, q.row.precision, q.x_measured, q.x_verdict])
        return buf.getvalue().rstrip("\n")
    if fmt == "markdown":
        blocks = []
        runtime_head, runtime_rule = (" runtime |", ":---|") if p.has_runtimes else ("", "")
        for f in p.fronts:
            lines = [f"**{_headline(p, f)}**", "",
                     f"| # | model |{runtime_head} {p.y.title} ({p.y.unit}) | {p.x.title} ({p.x.unit}) |",
                     f"|---:|:---|{runtime_rule}---:|---:|"]
            for q in f.frontier:
                model = q.row.point.replace("|", "\\|")
                y, x = _fmt(q.y, q.y_std, p.y), cost_text(q, p.x)
                runtime = f" {deployment(q.row)} |" if p.has_runtimes else ""
                lines.append(f"| {q.row.point_index} | {model} |{runtime} {y} | {x} |")
            blocks.append("\n".join(lines))
        if _any_equated(p):
            blocks.append(f"- {EQUATED_NOTE}")
        return "\n\n".join(blocks)
    if fmt == "table":
        return _table(p)
    raise ValueError(f"unknown format {fmt!r}; one of: table, csv, json, markdown")


def _table(p: Pareto) -> str:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200, record=True, file=io.StringIO(), force_terminal=False)
    for n, f in enumerate(p.fronts):
        if n:
            console.print("")
        console.print(_headline(p, f), highlight=False, markup=False)  # labels may hold "[...]"
        t = Table(header_style="bold")
        for col, just in (("#", "right"), ("model", "left"), *((("runtime", "left"),) if p.has_runtimes else ()),
                          (f"{p.y.name} {p.y.unit}", "right"), (f"{p.x.title} ({p.x.unit})", "right"),
                          ("energy source", "left")):
            t.add_column(col, justify=just)
        for q in f.frontier:
            t.add_row(str(q.row.point_index), q.row.point, *((deployment(q.row),) if p.has_runtimes else ()),
                      _fmt(q.y, q.y_std, p.y), cost_text(q, p.x), source_marks(q.row.energy_source) or "-")
        console.print(t)
    if _any_equated(p):
        console.print(EQUATED_NOTE, highlight=False, markup=False)
    return console.export_text().rstrip("\n")
