"""The cross-hardware comparison: one row per compressed model, one column per target --
per target x runtime (and precision) when a sweep measured its models on several.

A *model* is a compression chain (``ResultRow.stage_keys``); the same model evaluated on
several targets, runtimes or precisions shares its chain, so its sweep points fold into
one row whose cells are the columns. Accuracy and the model's facts (params, MACs,
on-disk size, materialized or simulated) belong to the model and are shown once per row;
time, energy and carbon per sample belong to the cell (and, with several runtimes or
precisions, top-1 too: a reduced precision may change it). A 2:4 pattern is the exception:
whether it ran on sparse kernels is each evaluation's own record (a cell's
``materialized`` and ``sparsity``), and the compression column names the columns when
they differ.

Where a target has several columns, a model's **best runtime** there is marked: the
fastest mean time per sample among its cells on that target whose top-1 is at most one
point (:data:`BEST_TOP1_DROP`) below the model's torch fp32 top-1 on that target; no mark
where the model has no torch fp32 result on the target (:data:`BEST_RULE` says so in the
output).

A model measured in a cohort has, per cell, its time and energy as paired ratios to the
baseline (the cohort's reference: the uncompressed model on torch fp32, measured in the
same rounds) with their 95 % intervals, shown as ``0.52x [0.50, 0.55]``, and ``≈`` where
the verdict is ``same``; an energy ratio that only repeats the time ratio (the figure is
an estimate proportional to time, no sensor) says so beside it.

``compare --format json`` has this shape::

    {"sweep_id": ..., "targets": [...], "columns": [{"name", "target", "runtime", "precision"}],
     "notes": [...], "best_rule": BEST_RULE,
     "models": [{"model": label, "also": [other labels of the same chain], "stages": [...],
                 "stage_keys": [...], "top1", "top1_std", "top1_min", "top1_max", "top5",
                 "params", "macs", "size_bytes", "materialized", "compression",
                 "best": {target: column name},
                 "cells": {column name: {CELL_FIELDS..., "best": bool}}}]}

A column's name is its target in a sweep of torch fp32 evaluations only (the shape of
stores from before runtimes), else ``target/runtime``, ``target/precision`` or
``target/runtime/precision`` -- the parts that vary in the sweep. The CSV is the same
table flattened: one line per model, a ``field@column`` column per cell field and
``best@column``.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.report.results import (
    _SOURCE_MARK,
    SAME,
    SPARSITY_NOTE,
    _fmt_bytes,
    _fmt_count,
    _pairs,
    _pct,
    compression_text,
    energy_ratio_text,
    is_default_deployment,
    time_ratio_text,
)
from orchestrator.store.records import DEFAULT_PRECISION, DEFAULT_RUNTIME, NodeRecord, ResultRow

# What a cell (one model in one column) carries in the JSON and CSV.
CELL_FIELDS: tuple[str, ...] = (
    "status", "point_index", "node_id", "repeats", "measured_in_sweep", "top1", "top1_std",
    "time_per_sample_s", "time_per_sample_s_std", "energy_per_sample_j", "energy_per_sample_j_std",
    "energy_source", "carbon_g_per_sample", "carbon_g_per_sample_std", "intensity_g_per_kwh",
    "intensity_source", "intensity_kind",
    "runtime", "precision", "runtime_version", "threads", "deployable_size_bytes", "top1_agreement",
    "time_ratio_vs_baseline", "time_ratio_ci_low", "time_ratio_ci_high", "verdict_time",
    "energy_ratio_vs_baseline", "energy_ratio_ci_low", "energy_ratio_ci_high", "verdict_energy",
    "verdict_top1", "energy_follows_time", "materialized", "sparsity",
)
MODEL_FIELDS: tuple[str, ...] = (
    "model", "stages", "top1", "top1_std", "top1_min", "top1_max", "top5", "params", "macs",
    "size_bytes", "materialized", "compression",
)

SOURCES_NOTE = ("energy sources: est = estimated from TDP x CPU utilisation (no sensor), rapl / nvml = measured; "
                "simulated = masks or fake-quant, same dense FLOPs as the baseline")

RATIOS_NOTE = (f"vs baseline: median paired ratio to the uncompressed model on torch fp32 measured in the same "
               f"rounds, [95 % interval]; {SAME}: not significant (the interval reaches into [0.98, 1.02]); "
               "faster / slower and cheaper / costlier only outside it")
FOLLOWS_TIME = "estimate, follows time"  # beside an energy ratio that an estimate proportional to time repeats

BEST_TOP1_DROP = 0.01  # top-1 (a fraction) a runtime may lose against torch fp32 and still be the best
_ROUNDING = 1e-9  # 0.80 - 0.79 is 0.010000000000000009 in binary: a drop of exactly one point qualifies
BEST_RULE = ("★ best: per target, the model's fastest runtime / precision (mean time / sample) among those whose "
             "top-1 is at most 1 point below the model's torch fp32 top-1 on that target; no mark where the model "
             "has no torch fp32 result on the target")


@dataclass(frozen=True)
class Column:
    """One column of the comparison: a target and the runtime and precision measured there."""

    target: str
    runtime: str
    precision: str
    name: str  # its heading and the key of its cells (see the module docstring)

    @property
    def is_reference(self) -> bool:
        """Torch eager at fp32: what the best runtime's accuracy is held against."""
        return is_default_deployment(self.runtime, self.precision)


@dataclass(frozen=True)
class ModelRow:
    """One compressed model and its cells (column name -> the sweep point measured there).

    ``top1`` is the mean over the cells that measured it (the same model on the same test
    split; cells differ through their kernels, runtime and precision),
    ``top1_min``/``top1_max`` its range over cells and ``top1_std`` the largest per-cell
    std over repeats. ``best`` maps a target to the column of the model's best runtime
    there (:data:`BEST_RULE`); empty where no target has several columns.
    """

    label: str
    also: tuple[str, ...]  # labels of other points with the same chain (another pipeline)
    stage_keys: tuple[str, ...]
    stages: tuple[str, ...]
    cells: dict[str, ResultRow]
    best: dict[str, str] = field(default_factory=dict)

    def _measured(self) -> list[ResultRow]:
        return [r for r in self.cells.values() if r.top1 is not None]

    @property
    def top1(self) -> float | None:
        values = [r.top1 for r in self._measured()]
        return sum(values) / len(values) if values else None

    @property
    def top1_std(self) -> float | None:
        values = [r.top1_std for r in self._measured() if r.top1_std is not None]
        return max(values) if values else None

    @property
    def top1_min(self) -> float | None:
        return min((r.top1 for r in self._measured()), default=None)

    @property
    def top1_max(self) -> float | None:
        return max((r.top1 for r in self._measured()), default=None)

    @property
    def top5(self) -> float | None:
        values = [r.top5 for r in self._measured() if r.top5 is not None]
        return sum(values) / len(values) if values else None

    def _fact(self, name: str) -> Any:
        """A model fact from the first cell that knows it (all cells share the artifact)."""
        return next((getattr(r, name) for r in self.cells.values() if getattr(r, name) is not None), None)

    @property
    def params(self) -> int | None:
        return self._fact("params")

    @property
    def macs(self) -> int | None:
        return self._fact("macs")

    @property
    def size_bytes(self) -> int | None:
        return self._fact("size_bytes")

    def _runs(self) -> list[tuple[str, ResultRow]]:
        """The cells that ran (all of them when none did), with their column names."""
        ran = [(name, r) for name, r in self.cells.items() if r.top1 is not None]
        return ran or list(self.cells.items())

    @property
    def materialized(self) -> bool | None:
        """The artifact's flag; for an n:m pattern, how the cells ran it -- None when they
        differ (sparse kernels in one column, dense in another: see the cells)."""
        values = {r.materialized for _, r in self._runs() if r.materialized is not None}
        return values.pop() if len(values) == 1 else None

    @property
    def compression(self) -> str:
        """``none`` (the baseline), ``materialized``, ``simulated`` (for an n:m pattern as
        each column ran it, :func:`~orchestrator.report.results.compression_text`, and
        ``... on <columns>`` when the columns differ), or ``-`` when unknown."""
        by_text: dict[str, list[str]] = {}
        for name, r in self._runs():
            by_text.setdefault(compression_text(self.label, r.materialized, r.sparsity), []).append(name)
        known = {text: names for text, names in by_text.items() if text != "-"}
        if not known:
            return "-"
        if len(known) == 1:
            return next(iter(known))
        return "; ".join(f"{text} on {', '.join(names)}" for text, names in known.items())


@dataclass(frozen=True)
class Comparison:
    sweep_id: str
    targets: tuple[str, ...]
    columns: tuple[Column, ...]  # grouped by target, in point order
    models: tuple[ModelRow, ...]
    notes: tuple[str, ...]  # e.g. that the node types were simulated on one host

    @property
    def has_carbon(self) -> bool:
        return any(r.carbon_g_per_sample is not None for m in self.models for r in m.cells.values())

    @property
    def has_runtimes(self) -> bool:
        """Whether any column is not torch fp32: only then do the human formats name
        runtimes, show top-1 per cell and mark the best runtime."""
        return not all(c.is_reference for c in self.columns)

    @property
    def has_ratios(self) -> bool:
        """Whether any cell was measured in a cohort (then its ratios are shown)."""
        return any(r.time_ratio_vs_baseline is not None for m in self.models for r in m.cells.values())


def build_comparison(rows: Sequence[ResultRow], nodes: Iterable[NodeRecord] = ()) -> Comparison:
    """Fold sweep points into models x columns, in point order, and mark each model's
    best runtime per target.

    *nodes* (``Store.nodes()``) are used for one check only: when the evaluations of
    several node types ran on nodes that all report one hostname, the comparison is a
    simulated cluster and a note says so.
    """
    columns = _columns(rows)
    by_point = {(c.target, c.runtime, c.precision): c.name for c in columns}
    by_chain: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in rows:
        entry = by_chain.setdefault(r.stage_keys, {"label": r.point, "also": [], "stages": r.stages, "cells": {}})
        if r.point != entry["label"] and r.point not in entry["also"]:
            entry["also"].append(r.point)
        # two pipelines with one chain: the first point
        entry["cells"].setdefault(by_point[(r.target, r.runtime, r.precision)], r)
    models = tuple(
        ModelRow(label=e["label"], also=tuple(e["also"]), stage_keys=keys, stages=tuple(e["stages"]), cells=e["cells"],
                 best=best_runtimes(e["cells"], columns))
        for keys, e in by_chain.items()
    )
    sweep_id = rows[0].sweep_id if rows else ""
    notes = []
    shared = shared_host(nodes, {r.node_id for r in rows if r.node_id})
    if shared is not None:
        host, types = shared
        notes.append(
            f"simulated: node types {', '.join(types)} all ran on one host ({host}), so their time, energy and "
            "carbon are not a hardware comparison"
        )
    targets = tuple(dict.fromkeys(c.target for c in columns))
    return Comparison(sweep_id=sweep_id, targets=targets, columns=columns, models=models, notes=tuple(notes))


def _columns(rows: Sequence[ResultRow]) -> tuple[Column, ...]:
    """One column per (target, runtime, precision) of *rows*, grouped by target (targets
    and, within one, runtimes in point order); named by the parts that vary in the sweep."""
    targets = list(dict.fromkeys(r.target for r in rows))
    seen = sorted(dict.fromkeys((r.target, r.runtime, r.precision) for r in rows), key=lambda d: targets.index(d[0]))
    name_runtime = {runtime for _, runtime, _ in seen} != {DEFAULT_RUNTIME}
    name_precision = {precision for _, _, precision in seen} != {DEFAULT_PRECISION}
    return tuple(
        Column(target, runtime, precision,
               "/".join([target, *([runtime] if name_runtime else []), *([precision] if name_precision else [])]))
        for target, runtime, precision in seen
    )


def best_runtimes(cells: Mapping[str, ResultRow], columns: Sequence[Column]) -> dict[str, str]:
    """Target -> the column of the model's best runtime there (:data:`BEST_RULE`), for
    the targets with several columns where the model has a measured torch fp32 cell."""
    out = {}
    for target in dict.fromkeys(c.target for c in columns):
        mine = [c for c in columns if c.target == target]
        reference = next((cells[c.name] for c in mine if c.is_reference and c.name in cells), None)
        if len(mine) < 2 or reference is None or reference.top1 is None:
            continue
        fit = [c for c in mine if c.name in cells and cells[c.name].top1 is not None
               and cells[c.name].time_per_sample_s is not None
               and reference.top1 - cells[c.name].top1 <= BEST_TOP1_DROP + _ROUNDING]
        if fit:
            out[target] = min(fit, key=lambda c: cells[c.name].time_per_sample_s).name
    return out


def shared_host(nodes: Iterable[NodeRecord], node_ids: set[str]) -> tuple[str, list[str]] | None:
    """``(hostname, node types)`` when the nodes in *node_ids* are of two or more types
    and all report the same hostname (from their own facts); else None."""
    used = [n for n in nodes if n.node_id in node_ids]
    types = sorted({n.node_type for n in used if n.node_type})
    hosts = {n.hostname or n.hardware.get("hostname") for n in used}
    if len(types) < 2 or len(hosts) != 1 or None in hosts:
        return None
    return next(iter(hosts)), types


# ------------------------------------------------------------------ formatting cells


def _pm(value: float | None, std: float | None, scale: float, digits: int) -> str:
    if value is None:
        return "-"
    return f"{scale * value:.{digits}f} ± {scale * (std or 0.0):.{digits}f}"


def source_marks(energy_source: dict[str, str] | None) -> str:
    """``cpu:est`` / ``gpu:nvml,cpu:rapl``: where each domain's energy figure came from."""
    return ",".join(f"{dom}:{_SOURCE_MARK.get(src, src)}" for dom, src in sorted((energy_source or {}).items())
                    if src != "none")


def energy_ratio_cell(r: ResultRow) -> str | None:
    """The energy ratio with its interval, and ``(estimate, follows time)`` when the
    energy figure is an estimate proportional to time; None without a ratio."""
    text = energy_ratio_text(r)
    if text is None:
        return None
    return f"{text} ({FOLLOWS_TIME})" if r.energy_follows_time else text


def cell_lines(r: ResultRow | None, with_carbon: bool, *, with_top1: bool = False, best: bool = False) -> list[str]:
    """A cell as short lines: top-1 (*with_top1*: when runtimes or precisions differ),
    time and its ratio to the baseline, energy (with its sources) and its ratio, carbon,
    and the best-runtime mark (*best*). Ratios appear for cells measured in a cohort."""
    if r is None:
        return ["not evaluated"]
    if r.time_per_sample_s is None:
        return [r.status]
    energy = _pm(r.energy_per_sample_j, r.energy_per_sample_j_std, 1e3, 3)
    marks = source_marks(r.energy_source)
    time_ratio, energy_ratio = time_ratio_text(r), energy_ratio_cell(r)
    lines = [f"top-1 {_pct(r.top1)} %"] if with_top1 else []
    lines += [f"{_pm(r.time_per_sample_s, r.time_per_sample_s_std, 1e3, 4)} ms",
              *([f"time {time_ratio}"] if time_ratio else []),
              f"{energy} mJ" + (f" ({marks})" if marks and r.energy_per_sample_j is not None else ""),
              *([f"energy {energy_ratio}"] if energy_ratio else [])]
    if with_carbon:
        lines.append(f"{_pm(r.carbon_g_per_sample, r.carbon_g_per_sample_std, 1e6, 4)} µg")
    if best:
        lines.append("★ best")
    return lines


def model_cell_lines(c: Comparison, m: ModelRow, column: Column) -> list[str]:
    """:func:`cell_lines` of *m* in *column*, as the table and the HTML report show it."""
    return cell_lines(m.cells.get(column.name), c.has_carbon, with_top1=c.has_runtimes,
                      best=m.best.get(column.target) == column.name)


def top1_text(m: ModelRow, spread: str = "by target") -> str:
    """Mean ± std of the model's top-1, with its range over cells when it varies
    (*spread* names what the cells are)."""
    if m.top1 is None:
        return "-"
    text = f"{_pct(m.top1)} ± {_pct(m.top1_std or 0.0)}"
    lo, hi = m.top1_min, m.top1_max
    if lo is not None and hi is not None and _pct(lo) != _pct(hi):
        text += f" ({_pct(lo)}-{_pct(hi)} {spread})"
    return text


def model_top1_text(c: Comparison, m: ModelRow) -> str:
    return top1_text(m, "by column" if c.has_runtimes else "by target")


def notes_for(c: Comparison) -> list[str]:
    notes = list(c.notes)
    notes.append("cells: " + ("top-1 (%), " if c.has_runtimes else "")
                 + "time / sample (ms), energy / sample (mJ, gross, with its sources)"
                 + (", carbon / sample (µg CO2eq); mean ± std over repeats" if c.has_carbon
                    else "; mean ± std over repeats; no carbon figures (add a carbon: section to the spec to account "
                         "them)"))
    if c.has_ratios:
        notes.append(RATIOS_NOTE)
    if c.has_runtimes:
        notes.append(BEST_RULE)
    notes.append(SOURCES_NOTE)
    if any(r.sparsity for m in c.models for r in m.cells.values()):
        notes.append(SPARSITY_NOTE)
    return notes


# ------------------------------------------------------------------ rendering


def _cell_fields(r: ResultRow, best: bool) -> dict[str, Any]:
    return {**{f: getattr(r, f) for f in CELL_FIELDS}, "best": best}


def comparison_json(c: Comparison) -> dict[str, Any]:
    models = []
    for m in c.models:
        d: dict[str, Any] = {f: getattr(m, f if f != "model" else "label") for f in MODEL_FIELDS}
        d["stages"] = list(m.stages)
        d["also"] = list(m.also)
        d["stage_keys"] = list(m.stage_keys)
        d["best"] = dict(m.best)
        d["cells"] = {col.name: _cell_fields(m.cells[col.name], m.best.get(col.target) == col.name)
                      for col in c.columns if col.name in m.cells}
        models.append(d)
    return {"sweep_id": c.sweep_id, "targets": list(c.targets),
            "columns": [{"name": col.name, "target": col.target, "runtime": col.runtime, "precision": col.precision}
                        for col in c.columns],
            "notes": list(c.notes), "best_rule": BEST_RULE, "models": models}


def render_comparison(c: Comparison, fmt: str) -> str:
    """*fmt*: ``table`` (terminal), ``csv``, ``json`` or ``markdown``."""
    if fmt == "json":
        return json.dumps(comparison_json(c), indent=2)
    if fmt == "csv":
        return _csv(c)
    if fmt == "markdown":
        return _markdown(c)
    if fmt == "table":
        return _table(c)
    raise ValueError(f"unknown format {fmt!r}; one of: table, csv, json, markdown")


def _csv(c: Comparison) -> str:
    fields = [*MODEL_FIELDS, *(f"{f}@{col.name}" for col in c.columns for f in (*CELL_FIELDS, "best"))]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for m in c.models:
        line: dict[str, Any] = {f: getattr(m, f if f != "model" else "label") for f in MODEL_FIELDS}
        line["stages"] = " > ".join(m.stages)
        for col in c.columns:
            r = m.cells.get(col.name)
            if r is None:
                continue
            for f, v in _cell_fields(r, m.best.get(col.target) == col.name).items():
                line[f"{f}@{col.name}"] = (_pairs(v) if f in ("energy_source", "threads")
                                           else json.dumps(v, separators=(",", ":")) if f == "sparsity" and v else v)
        w.writerow(line)
    return buf.getvalue().rstrip("\n")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(c: Comparison) -> str:
    carbon, ratios = c.has_carbon, c.has_ratios
    per_column = [*(["top1 %"] if c.has_runtimes else []), "ms/sample", *(["time vs baseline"] if ratios else []),
                  "mJ/sample", *(["energy vs baseline"] if ratios else []), *(["µg CO2/sample"] if carbon else [])]
    head = ["model", "top1 %", *(f"{col.name} {h}" for col in c.columns for h in per_column), "params", "MACs", "size",
            "compression"]
    lines = ["| " + " | ".join(_md(h) for h in head) + " |",
             "|" + "|".join(":---" if i in (0, len(head) - 1) else "---:" for i in range(len(head))) + "|"]
    for m in c.models:
        cells = []
        for col in c.columns:
            r = m.cells.get(col.name)
            if r is None or r.time_per_sample_s is None:
                cells += [r.status if r is not None else "not evaluated"] + ["-"] * (len(per_column) - 1)
                continue
            figures = cell_lines(r, carbon)  # time, [time ratio], energy, [energy ratio], [carbon]
            if ratios:  # a ratio column for every cell, "-" where a cell has none (no energy figure)
                plain = [line for line in figures if not line.startswith(("time ", "energy "))]
                figures = [plain[0], time_ratio_text(r) or "-", plain[1], energy_ratio_cell(r) or "-", *plain[2:]]
            if m.best.get(col.target) == col.name:
                figures[0] += " ★"
            cells += [*([_pct(r.top1)] if c.has_runtimes else []), *figures]
        row = [m.label, model_top1_text(c, m), *cells, _fmt_count(m.params), _fmt_count(m.macs),
               _fmt_bytes(m.size_bytes), m.compression]
        lines.append("| " + " | ".join(_md(x) for x in row) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {_md(n)}" for n in notes_for(c))


def _table(c: Comparison) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=True, header_style="bold")
    t.add_column("model", justify="left", max_width=64)
    t.add_column("top1 %", justify="right")
    for col in c.columns:
        t.add_column(col.name, justify="right")
    for name in ("params", "MACs", "size", "compression"):
        t.add_column(name, justify="left" if name == "compression" else "right")
    for m in c.models:
        cells = ["\n".join(model_cell_lines(c, m, col)) for col in c.columns]
        t.add_row(m.label, model_top1_text(c, m), *cells, _fmt_count(m.params), _fmt_count(m.macs),
                  _fmt_bytes(m.size_bytes), m.compression)
    console = Console(width=220, record=True, file=io.StringIO(), force_terminal=False)
    console.print(t)
    return console.export_text().rstrip("\n") + "\n" + "\n".join(notes_for(c))
