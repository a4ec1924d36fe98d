"""Plots for the report and ``pareto --plot``: PNG bytes from matplotlib.

Figures are built on :class:`matplotlib.figure.Figure` directly (the Agg renderer, no
pyplot and its global state), so plotting needs no display and is safe in threads.
matplotlib is imported only when a plot is drawn.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.report.results import deployment, has_runtimes
from orchestrator.store.records import ResultRow

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from orchestrator.report.pareto import Metric, TargetFront

_FRONT_COLOR = "#1a7f37"
_OTHER_COLOR = "#9aa0a6"
_RUNTIME_COLOR = "#424a53"  # legend entries naming a runtime's marker
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")  # one per (runtime, precision), in point order


def short_label(row: ResultRow) -> str:
    """The point's compression chain without its pipeline name and parameter names:
    ``prune(method=structured, mode=all, ratio=0.5)`` -> ``prune structured,all,0.5``."""
    label = row.point.removeprefix(f"{row.pipeline}: ")
    parts = []
    for stage in label.split(" > "):
        kind, _, rest = stage.partition("(")
        values = [kv.partition("=")[2] or kv for kv in rest.rstrip(")").split(", ") if kv]
        parts.append(f"{kind} {','.join(values)}" if values else kind)
    return " > ".join(parts)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()


def _figure(n: int, height: float = 4.2) -> tuple[Figure, list[Any]]:
    from matplotlib.figure import Figure

    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    width_in, height_in = 5.6 * cols, height * rows
    fig = Figure(figsize=(width_in, height_in))
    # Fixed margins in inches: a third of the time of matplotlib's layout engines.
    fig.subplots_adjust(left=0.75 / width_in, right=1 - 0.2 / width_in, bottom=0.6 / height_in,
                        top=1 - 0.4 / height_in, wspace=0.3, hspace=0.45)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[n:]:
        extra.set_visible(False)
    return fig, axes[:n]


def pareto_png(fronts: Sequence[TargetFront], x: Metric, y: Metric) -> bytes:
    """One panel per target: every point (grey), the frontier (green, joined as a staircase
    and labelled), error bars of one std over repeats. When points ran on several runtimes
    or precisions, each (runtime, precision) has its own marker, named in the legend."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = sorted((p.row for f in fronts for p in f.points), key=lambda r: r.point_index)
    several = has_runtimes(rows)
    markers = {name: _MARKERS[i % len(_MARKERS)] for i, name in enumerate(dict.fromkeys(map(deployment, rows)))}
    fig, axes = _figure(len(fronts))
    for ax, f in zip(axes, fronts):
        handles = []
        for on, color, name in ((False, _OTHER_COLOR, "dominated"), (True, _FRONT_COLOR, "non-dominated")):
            state = [p for p in f.points if p.on_frontier == on]
            if not state:
                continue
            for run, marker in markers.items():
                pts = [p for p in state if deployment(p.row) == run]
                if not pts:
                    continue
                ax.errorbar([x.scale * p.x for p in pts], [y.scale * p.y for p in pts],
                            xerr=[x.scale * (p.x_std or 0.0) for p in pts],
                            yerr=[y.scale * (p.y_std or 0.0) for p in pts], fmt=marker, color=color, ecolor=color,
                            elinewidth=0.8, capsize=2, markersize=6, zorder=3 if on else 2)
            # with runtimes, markers name them and a colour patch names the frontier state
            handles.append(Patch(color=color, label=name) if several
                           else Line2D([], [], linestyle="none", marker="o", color=color, label=name))
        if several:
            present = {deployment(p.row) for p in f.points}
            handles += [Line2D([], [], linestyle="none", marker=marker, color=_RUNTIME_COLOR, label=run)
                        for run, marker in markers.items() if run in present]
        front = f.frontier
        if len(front) > 1:
            ax.step([x.scale * p.x for p in front], [y.scale * p.y for p in front], where="post",
                    color=_FRONT_COLOR, linewidth=1, alpha=0.6, zorder=1)
        mid = (min(p.x for p in f.points) + max(p.x for p in f.points)) / 2 if f.points else 0.0
        for p in front:  # labels point inwards, so none runs off the panel
            right_half = p.x > mid
            text = f"#{p.row.point_index} {short_label(p.row)}" + (f" [{deployment(p.row)}]" if several else "")
            ax.annotate(textwrap.shorten(text, 48 if several else 40, placeholder="..."),
                        (x.scale * p.x, y.scale * p.y), textcoords="offset points", xytext=(-5 if right_half else 5, 4),
                        ha="right" if right_half else "left", fontsize=7)
        ax.margins(0.08)
        ax.set_title(f"{f.target}: {len(front)} of {len(f.points)} points non-dominated", fontsize=10)
        ax.set_xlabel(f"{x.title} ({x.unit}), lower is better")
        ax.set_ylabel(f"{y.title} ({y.unit})")
        ax.grid(alpha=0.3)
        if f.points:
            ax.legend(handles=handles, fontsize=8, loc="lower right")
        else:
            ax.text(0.5, 0.5, "no points with both figures", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


# ------------------------------------------------------------------ pruning curves

def _curve_param(kind: str) -> str | None:
    """The parameter a kind declares as the x axis of compression curves (prune: ratio)."""
    from workers.stages.registry import find_kind

    known = find_kind(kind)
    return known.curve_param if known is not None else None


def _is_root(kind: str) -> bool:
    """The sweep's baseline training: shared by every chain, not part of a series name."""
    from workers.stages.registry import find_kind

    known = find_kind(kind)
    return known is not None and known.role == "baseline"


@dataclass(frozen=True)
class CurvePoint:
    ratio: float
    row: ResultRow


def _series_name(row: ResultRow, prune_at: int | None) -> str:
    parts = []
    for i, (label, kind) in enumerate(zip(row.stages, row.stage_kinds)):
        if _is_root(kind):
            continue
        if i == prune_at:
            p = row.stage_params[i]
            parts.append("/".join(str(v) for v in (p.get("method"), p.get("mode")) if v))
        else:
            parts.append(label)
    return " > ".join(parts)


def prune_series(rows: Sequence[ResultRow]) -> dict[str, dict[str, list[CurvePoint]]]:
    """``{target: {series: [points by ratio]}}`` for the reference paper's Fig. 3.

    A series is one pruning method (method/mode) together with the rest of its chain
    (``structured/all`` and ``structured/all > quantize(weights=int8)`` are two
    series); its points are the prune ratios. A point without a prune stage whose chain
    is a series' chain without the prune (the baseline for ``structured/all``) is that
    series' ratio 0. Chains with two prune stages are left out (no single ratio). When
    points ran on several runtimes or precisions, each (runtime, precision) is a series of
    its own (``structured/all [onnxruntime fp32]``).
    """
    several = has_runtimes(rows)
    out: dict[str, dict[str, list[CurvePoint]]] = {}
    unpruned: dict[tuple[str, tuple[str, ...], str], ResultRow] = {}
    series_base: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}
    for r in rows:
        prunes = [(i, axis) for i, k in enumerate(r.stage_kinds) if (axis := _curve_param(k)) is not None]
        if not prunes:
            unpruned.setdefault((r.target, r.stages, deployment(r)), r)
            continue
        if len(prunes) > 1 or r.stage_params[prunes[0][0]].get(prunes[0][1]) is None:
            continue  # two prunes, or one without the axis (semi-structured: its n:m is not a ratio)
        at, axis = prunes[0]
        name = _series_name(r, at) + (f" [{deployment(r)}]" if several else "")
        out.setdefault(r.target, {}).setdefault(name, []).append(CurvePoint(float(r.stage_params[at][axis]), r))
        series_base[(r.target, name)] = (r.stages[:at] + r.stages[at + 1:], deployment(r))
    for (target, name), (base, run) in series_base.items():
        anchor = unpruned.get((target, base, run))
        if anchor is not None:
            out[target][name].append(CurvePoint(0.0, anchor))
    for series in out.values():
        for points in series.values():
            points.sort(key=lambda p: (p.ratio, p.row.point_index))
    return out


def prune_curves_png(rows: Sequence[ResultRow], metric: Metric) -> bytes | None:
    """*metric* (top-1, energy / sample, ...) against the prune ratio, one line per
    series of :func:`prune_series`, one panel per target; None without pruned points
    that have the metric."""
    per_target = {
        t: {name: [p for p in pts if getattr(p.row, metric.field) is not None] for name, pts in series.items()}
        for t, series in prune_series(rows).items()
    }
    per_target = {t: {n: pts for n, pts in s.items() if pts} for t, s in per_target.items()}
    per_target = {t: s for t, s in per_target.items() if s}
    if not per_target:
        return None
    fig, axes = _figure(len(per_target))
    for ax, (target, series) in zip(axes, per_target.items()):
        for name, pts in series.items():
            ax.errorbar([p.ratio for p in pts], [metric.scale * getattr(p.row, metric.field) for p in pts],
                        yerr=[metric.scale * (getattr(p.row, metric.std_field) or 0.0) for p in pts],
                        marker="o", markersize=4, capsize=2, linewidth=1.2, label=textwrap.shorten(name, 48))
        ax.set_title(target, fontsize=10)
        ax.set_xlabel("prune ratio")
        ax.set_ylabel(f"{metric.title} ({metric.unit})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)
