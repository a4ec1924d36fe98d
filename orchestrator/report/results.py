"""Rendering of results: table, CSV and JSON.

``results --format json`` is a stable contract: a list with one object per sweep point --
a compression chain evaluated on one target by one runtime at one precision -- with the
keys in :data:`RESULT_FIELDS` (new keys are appended, never reordered). Accuracy is a
fraction in [0, 1]; times are seconds; sizes are bytes. The CSV has the same columns
(``threads`` as ``inter_op=1;intra_op=2``); the table shows a ``runtime`` column (runtime
and precision) when any point ran on something other than torch at fp32, and a ``time vs
baseline`` column (the paired ratio with its interval, ``≈`` where the verdict is
``same``) when any point was measured in a cohort.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, is_dataclass
from typing import Any, Iterable

from orchestrator.gate import NOT_NEEDED, not_needed
from orchestrator.store.records import DEFAULT_PRECISION, DEFAULT_RUNTIME, ResultRow

RESULT_FIELDS: tuple[str, ...] = (
    "sweep_id", "point_index", "point", "pipeline", "stages", "target", "status",
    "top1", "top1_std", "top5", "time_per_sample_s", "time_per_sample_s_std",
    "throughput_samples_per_s", "repeats", "params", "macs", "size_bytes", "materialized",
    "energy_per_sample_j", "energy_per_sample_j_std", "net_energy_per_sample_j",
    "gpu_energy_per_sample_j", "cpu_energy_per_sample_j", "dram_energy_per_sample_j",
    "energy_source", "idle_power_w", "carbon_g_per_sample", "intensity_g_per_kwh",
    "intensity_source", "intensity_kind",
    "runtime", "precision", "runtime_version", "threads", "deployable_size_bytes", "top1_agreement",
    "time_ratio_vs_baseline", "time_ratio_ci_low", "time_ratio_ci_high", "verdict_time",
    "energy_ratio_vs_baseline", "energy_ratio_ci_low", "energy_ratio_ci_high", "verdict_energy",
    "verdict_top1", "decision", "sparsity",
)

SAME = "≈"  # how a verdict of ``same`` reads: no difference beyond the noise and the 2 % margin
RATIO_NOTE = ("time vs baseline: median ratio of time / sample to the reference's (the uncompressed model on torch "
              "fp32, measured in the same rounds) with its 95 % interval; ≈: not significant (the interval reaches "
              "into [0.98, 1.02])")


def result_dicts(rows: Iterable[Any]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        d = asdict(r) if is_dataclass(r) else dict(r)
        out.append({k: d.get(k) for k in RESULT_FIELDS})
    return out


def deployment(row: ResultRow) -> str:
    """How a point was run, for people: ``onnxruntime fp32``."""
    return f"{row.runtime} {row.precision}"


def is_default_deployment(runtime: str | None, precision: str | None) -> bool:
    """Torch eager at fp32: how every evaluation ran before there were runtimes."""
    return (runtime, precision) == (DEFAULT_RUNTIME, DEFAULT_PRECISION)


def has_runtimes(rows: Iterable[ResultRow]) -> bool:
    """Whether any point ran on something other than torch at fp32: only then do the
    tables and plots name runtimes (a sweep from before runtimes reads as it always did)."""
    return not all(is_default_deployment(r.runtime, r.precision) for r in rows)


def ratio_text(ratio: float | None, low: float | None, high: float | None, verdict: str | None) -> str | None:
    """A paired ratio for people: ``0.52x [0.50, 0.55]``, ``≈ 0.99x [0.97, 1.01]`` when its
    verdict is ``same``; None without a ratio (measured before cohorts)."""
    if ratio is None:
        return None
    text = f"{ratio:.2f}x" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")
    return f"{SAME} {text}" if verdict == "same" else text


def time_ratio_text(row: Any) -> str | None:
    """:func:`ratio_text` of a row's (a :class:`ResultRow` or its dict) time ratio."""
    d = row if isinstance(row, dict) else vars(row)
    return ratio_text(d.get("time_ratio_vs_baseline"), d.get("time_ratio_ci_low"), d.get("time_ratio_ci_high"),
                      d.get("verdict_time"))


def energy_ratio_text(row: Any) -> str | None:
    """:func:`ratio_text` of a row's energy ratio."""
    d = row if isinstance(row, dict) else vars(row)
    return ratio_text(d.get("energy_ratio_vs_baseline"), d.get("energy_ratio_ci_low"), d.get("energy_ratio_ci_high"),
                      d.get("verdict_energy"))


SPARSITY_NOTE = ("2:4: the model's semi-structured zeros; materialized = this evaluation ran them on torch's sparse "
                 "kernels (a CUDA GPU of compute capability 8.0+, fp16 / bf16; the layers that fit), simulated = on "
                 "dense kernels (results --format json: sparsity says why and lists the layers)")


def compression_text(point: str, materialized: bool | None, sparsity: dict[str, Any] | None) -> str:
    """The compression column: ``none`` (the baseline), ``materialized`` / ``simulated``
    (for an n:m pattern as this evaluation ran it: ``simulated 2:4``, ``materialized 2:4
    (8/9 layers)``: 8 of the model's 9 Linear layers ran on sparse kernels), ``-`` when
    unknown."""
    if point == "baseline":
        return "none"
    if materialized is None:
        return "-"
    word = "materialized" if materialized else "simulated"
    if not sparsity:
        return word
    if not materialized:
        return f"{word} {sparsity.get('pattern', '')}".rstrip()
    sparse = len(sparsity.get("sparse_layers") or [])
    linears = sparse + len(sparsity.get("dense_layers") or [])
    return f"{word} {sparsity.get('pattern', '')} ({sparse}/{linears} layers)"


def _pairs(mapping: dict[str, Any] | None) -> str:
    """A per-domain dict as one CSV cell: ``cpu=estimate-tdp;gpu=nvml-counter``."""
    return ";".join(f"{k}={v}" for k, v in sorted((mapping or {}).items()))


def _fmt_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def render_results(rows: Iterable[Any], fmt: str) -> str:
    data = result_dicts(rows)
    if fmt == "json":
        return json.dumps(data, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(RESULT_FIELDS), lineterminator="\n")
        w.writeheader()
        for d in data:
            w.writerow({**d, "stages": " > ".join(d["stages"] or []), "energy_source": _pairs(d["energy_source"]),
                        "idle_power_w": _pairs(d["idle_power_w"]), "threads": _pairs(d["threads"]),
                        "sparsity": "" if d["sparsity"] is None else json.dumps(d["sparsity"], separators=(",", ":"))})
        return buf.getvalue().rstrip("\n")
    return _table(data)


# Short names for energy sources in the table; the JSON/CSV carry the full names.
_SOURCE_MARK = {"nvml-counter": "nvml", "nvml-power": "nvml~", "rapl": "rapl", "estimate-tdp": "est", "none": "-"}


def _energy_cell(d: dict[str, Any]) -> str:
    e = d["energy_per_sample_j"]
    if e is None:
        return "-"
    marks = ",".join(f"{dom}:{_SOURCE_MARK.get(src, src)}" for dom, src in sorted((d["energy_source"] or {}).items())
                     if src != "none")
    return f"{1e3 * e:.3f} ({marks})"


def _table(data: list[dict[str, Any]]) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(show_lines=False, header_style="bold")
    runtimes = not all(is_default_deployment(d["runtime"], d["precision"]) for d in data)
    paired = any(d["time_ratio_vs_baseline"] is not None for d in data)
    columns = (("#", "right"), ("point", "left"), ("target", "left"), *((("runtime", "left"),) if runtimes else ()),
               ("top1 %", "right"), ("top5 %", "right"), ("ms/sample (± std)", "right"),
               *((("time vs baseline", "right"),) if paired else ()),
               ("mJ/sample (source)", "right"), ("µg CO2/sample", "right"), ("params", "right"), ("MACs", "right"),
               ("size", "right"), ("compression", "left"))
    for col, just in columns:
        t.add_column(col, justify=just)
    fallback = False
    for d in data:
        where = (d["target"], *((f"{d['runtime']} {d['precision']}",) if runtimes else ()))
        if d["top1"] is None:  # the evaluation did not succeed (failed, skipped, pending)
            shown = NOT_NEEDED if not_needed(d.get("decision")) else d["status"] or "-"
            t.add_row(str(d["point_index"]), d["point"], *where, "-", "-", shown,
                      *["-"] * (len(columns) - 5 - len(where)))
            continue
        tps = d["time_per_sample_s"]
        std = d["time_per_sample_s_std"] or 0.0
        carbon = d["carbon_g_per_sample"]
        fallback |= "fallback" in (d["intensity_source"] or "")
        t.add_row(
            str(d["point_index"]), d["point"], *where, _pct(d["top1"]), _pct(d["top5"]),
            f"{1e3 * tps:.4f} ± {1e3 * std:.4f}" if tps is not None else "-",
            *((time_ratio_text(d) or "-",) if paired else ()),
            _energy_cell(d),
            "-" if carbon is None else f"{1e6 * carbon:.4f}",
            _fmt_count(d["params"]), _fmt_count(d["macs"]), _fmt_bytes(d["size_bytes"]),
            compression_text(d["point"], d["materialized"], d["sparsity"]),
        )
    console = Console(width=220, record=True, file=io.StringIO(), force_terminal=False)
    console.print(t)
    notes = ["energy sources: est = estimated from TDP x CPU utilisation (no sensor), rapl / nvml = measured; "
             "simulated = masks or fake-quant, same dense FLOPs"]
    if paired:
        notes.append(RATIO_NOTE)
    if any(d["sparsity"] for d in data):
        notes.append(SPARSITY_NOTE)
    sources = sorted({d["intensity_source"] for d in data if d.get("intensity_source")})
    if sources:
        notes.append("carbon intensity: " + "; ".join(sources) + (" -- a fallback, not your grid" if fallback else ""))
    decisions = sorted({d["decision"] for d in data if d.get("decision")})
    if decisions:
        notes.append("conditional stages: " + "; ".join(decisions))
    return console.export_text().rstrip("\n") + "\n" + "\n".join(notes)
