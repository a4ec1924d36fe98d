"""The cross-hardware comparison: one row per compressed model, one column per target.

A *model* is a compression chain (``ResultRow.stage_keys``); the same model evaluated on
several targets shares its chain, so its sweep points fold into one row whose cells are
the targets. Accuracy and the model's facts (params, MACs, on-disk size, materialized or
simulated) belong to the model and are shown once per row; time, energy and carbon per
sample belong to the cell.

``compare --format json`` has this shape::

    {"sweep_id": ..., "targets": [...], "notes": [...],
     "models": [{"model": label, "also": [other labels of the same chain], "stages": [...],
                 "stage_keys": [...], "top1", "top1_std", "top1_min", "top1_max", "top5",
                 "params", "macs", "size_bytes", "materialized", "compression",
                 "cells": {target: {CELL_FIELDS...}}}]}

The CSV is the same table flattened: one line per model, a ``field@target`` column per
cell field.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.report.results import _SOURCE_MARK, _fmt_bytes, _fmt_count, _pairs, _pct
from orchestrator.store.records import NodeRecord, ResultRow

# What a cell (one model on one target) carries in the JSON and CSV.
CELL_FIELDS: tuple[str, ...] = (
    "status", "point_index", "node_id", "repeats", "measured_in_sweep", "top1", "top1_std",
    "time_per_sample_s", "time_per_sample_s_std", "energy_per_sample_j", "energy_per_sample_j_std",
    "energy_source", "carbon_g_per_sample", "carbon_g_per_sample_std", "intensity_g_per_kwh",
    "intensity_source", "intensity_kind",
)
MODEL_FIELDS: tuple[str, ...] = (
    "model", "stages", "top1", "top1_std", "top1_min", "top1_max", "top5", "params", "macs",
    "size_bytes", "materialized", "compression",
)

SOURCES_NOTE = ("energy sources: est = estimated from TDP x CPU utilisation (no sensor), rapl / nvml = measured; "
                "simulated = masks or fake-quant, same dense FLOPs as the baseline")


@dataclass(frozen=True)
class ModelRow:
    """One compressed model and its cells (target -> the sweep point evaluated there).

    ``top1`` is the mean over the targets that measured it (the same model on the same
    test split; targets differ only through their kernels), ``top1_min``/``top1_max`` its
    range over targets and ``top1_std`` the largest per-target std over repeats.
    """

    label: str
    also: tuple[str, ...]  # labels of other points with the same chain (another pipeline)
    stage_keys: tuple[str, ...]
    stages: tuple[str, ...]
    cells: dict[str, ResultRow]

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

    @property
    def materialized(self) -> bool | None:
        return self._fact("materialized")

    @property
    def compression(self) -> str:
        """``none`` (the baseline), ``materialized``, ``simulated``, or ``-`` when unknown."""
        if self.label == "baseline":
            return "none"
        m = self.materialized
        return "-" if m is None else ("materialized" if m else "simulated")


@dataclass(frozen=True)
class Comparison:
    sweep_id: str
    targets: tuple[str, ...]
    models: tuple[ModelRow, ...]
    notes: tuple[str, ...]  # e.g. that the node types were simulated on one host

    @property
    def has_carbon(self) -> bool:
        return any(r.carbon_g_per_sample is not None for m in self.models for r in m.cells.values())


def build_comparison(rows: Sequence[ResultRow], nodes: Iterable[NodeRecord] = ()) -> Comparison:
    """Fold sweep points into models x targets, in point order.

    *nodes* (``Store.nodes()``) are used for one check only: when the evaluations of
    several node types ran on nodes that all report one hostname, the comparison is a
    simulated cluster and a note says so.
    """
    targets: list[str] = []
    by_chain: dict[tuple[str, ...], dict[str, Any]] = {}
    for r in rows:
        if r.target not in targets:
            targets.append(r.target)
        entry = by_chain.setdefault(r.stage_keys, {"label": r.point, "also": [], "stages": r.stages, "cells": {}})
        if r.point != entry["label"] and r.point not in entry["also"]:
            entry["also"].append(r.point)
        entry["cells"].setdefault(r.target, r)  # two pipelines with one chain: the first point
    models = tuple(
        ModelRow(label=e["label"], also=tuple(e["also"]), stage_keys=keys, stages=tuple(e["stages"]), cells=e["cells"])
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
    return Comparison(sweep_id=sweep_id, targets=tuple(targets), models=models, notes=tuple(notes))


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


def cell_lines(r: ResultRow | None, with_carbon: bool) -> list[str]:
    """A cell as short lines: time, energy (with its sources), carbon."""
    if r is None:
        return ["not evaluated"]
    if r.time_per_sample_s is None:
        return [r.status]
    energy = _pm(r.energy_per_sample_j, r.energy_per_sample_j_std, 1e3, 3)
    marks = source_marks(r.energy_source)
    lines = [f"{_pm(r.time_per_sample_s, r.time_per_sample_s_std, 1e3, 4)} ms",
             f"{energy} mJ" + (f" ({marks})" if marks and r.energy_per_sample_j is not None else "")]
    if with_carbon:
        lines.append(f"{_pm(r.carbon_g_per_sample, r.carbon_g_per_sample_std, 1e6, 4)} µg")
    return lines


def top1_text(m: ModelRow) -> str:
    if m.top1 is None:
        return "-"
    text = f"{_pct(m.top1)} ± {_pct(m.top1_std or 0.0)}"
    lo, hi = m.top1_min, m.top1_max
    if lo is not None and hi is not None and _pct(lo) != _pct(hi):
        text += f" ({_pct(lo)}-{_pct(hi)} by target)"
    return text


def notes_for(c: Comparison) -> list[str]:
    notes = list(c.notes)
    notes.append("cells: time / sample (ms), energy / sample (mJ, gross, with its sources)"
                 + (", carbon / sample (µg CO2eq); mean ± std over repeats" if c.has_carbon
                    else "; mean ± std over repeats; no carbon figures (add a carbon: section to the spec to account "
                         "them)"))
    notes.append(SOURCES_NOTE)
    return notes


# ------------------------------------------------------------------ rendering


def comparison_json(c: Comparison) -> dict[str, Any]:
    models = []
    for m in c.models:
        d: dict[str, Any] = {f: getattr(m, f if f != "model" else "label") for f in MODEL_FIELDS}
        d["stages"] = list(m.stages)
        d["also"] = list(m.also)
        d["stage_keys"] = list(m.stage_keys)
        d["cells"] = {t: {f: getattr(r, f) for f in CELL_FIELDS} for t, r in m.cells.items()}
        models.append(d)
    return {"sweep_id": c.sweep_id, "targets": list(c.targets), "notes": list(c.notes), "models": models}


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
    fields = [*MODEL_FIELDS, *(f"{f}@{t}" for t in c.targets for f in CELL_FIELDS)]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for m in c.models:
        line: dict[str, Any] = {f: getattr(m, f if f != "model" else "label") for f in MODEL_FIELDS}
        line["stages"] = " > ".join(m.stages)
        for t, r in m.cells.items():
            for f in CELL_FIELDS:
                v = getattr(r, f)
                line[f"{f}@{t}"] = _pairs(v) if f == "energy_source" else v
        w.writerow(line)
    return buf.getvalue().rstrip("\n")


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _markdown(c: Comparison) -> str:
    carbon = c.has_carbon
    per_target = ["ms/sample", "mJ/sample", *(["µg CO2/sample"] if carbon else [])]
    head = ["model", "top1 %", *(f"{t} {h}" for t in c.targets for h in per_target), "params", "MACs", "size",
            "compression"]
    lines = ["| " + " | ".join(_md(h) for h in head) + " |",
             "|" + "|".join(":---" if i in (0, len(head) - 1) else "---:" for i in range(len(head))) + "|"]
    for m in c.models:
        cells = []
        for t in c.targets:
            r = m.cells.get(t)
            if r is None or r.time_per_sample_s is None:
                cells += [r.status if r is not None else "not evaluated"] + ["-"] * (len(per_target) - 1)
                continue
            cells += cell_lines(r, carbon)
        row = [m.label, top1_text(m), *cells, _fmt_count(m.params), _fmt_count(m.macs), _fmt_bytes(m.size_bytes),
               m.compression]
        lines.append("| " + " | ".join(_md(x) for x in row) + " |")
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {_md(n)}" for n in notes_for(c))


def _table(c: Comparison) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=True, header_style="bold")
    t.add_column("model", justify="left", max_width=64)
    t.add_column("top1 %", justify="right")
    for target in c.targets:
        t.add_column(target, justify="right")
    for col in ("params", "MACs", "size", "compression"):
        t.add_column(col, justify="left" if col == "compression" else "right")
    for m in c.models:
        cells = ["\n".join(cell_lines(m.cells.get(target), c.has_carbon)) for target in c.targets]
        t.add_row(m.label, top1_text(m), *cells, _fmt_count(m.params), _fmt_count(m.macs), _fmt_bytes(m.size_bytes),
                  m.compression)
    console = Console(width=220, record=True, file=io.StringIO(), force_terminal=False)
    console.print(t)
    return console.export_text().rstrip("\n") + "\n" + "\n".join(notes_for(c))
