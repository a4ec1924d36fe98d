"""``greensweep report``: one self-contained HTML file per sweep.

Everything is inline -- styles, the small script, and the plots as base64 PNG data URIs --
and a Content-Security-Policy forbids any other source, so the file opens from disk in
a browser with no server and no network, and cannot silently depend on one.

The page's script marks ``<body>`` once the page has loaded: ``data-images-total``,
``data-images-ok`` (complete images with a non-zero natural width) and
``data-images-loaded`` (``true`` when every image decoded, else ``false``), so a headless
browser can check that the plots render.

:func:`build_report` is a pure function of what the store returned; the CLI gathers it.
"""

from __future__ import annotations

import base64
import html
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from orchestrator.report.answer import ANSWER_RULE, NO_VERDICTS, answer_lines, noise_floors
from orchestrator.report.compare import (
    BEST_RULE,
    RATIOS_NOTE,
    SOURCES_NOTE,
    Comparison,
    build_comparison,
    model_cell_lines,
    model_top1_text,
)
from orchestrator.report.pareto import EQUATED_NOTE, X_METRICS, Y_METRICS, Pareto, available_x, build_pareto, cost_text
from orchestrator.report.results import _fmt_bytes, _fmt_count, _pairs, deployment, has_runtimes
from orchestrator.store.records import CohortRecord, NodeRecord, ResultRow, StageRecord, SweepRecord

NO_PLACEMENT = "no carbon-aware placement recorded for this sweep"
_SENSORS = frozenset({"nvml-counter", "nvml-power", "rapl"})

_CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'")

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1500px;
padding:0 24px 48px;color:#1f2328}
h1{font-size:22px;margin:24px 0 4px}h2{font-size:18px;margin:32px 0 8px;border-bottom:1px solid #d0d7de;
padding-bottom:4px}h3{font-size:15px;margin:18px 0 6px}
nav a{margin-right:12px}table{border-collapse:collapse;margin:8px 0 4px;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:10px;overflow:auto;font-size:12px}
figure{margin:12px 0}figure img{max-width:100%;border:1px solid #d0d7de}figcaption{font-size:12px;color:#57606a}
.note{background:#fff8c5;border:1px solid #d4a72c;padding:6px 10px;margin:8px 0}
.muted{color:#57606a}.est{color:#9a6700}.sensor{color:#1a7f37}.bad{color:#cf222e}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images-total", String(imgs.length));
  document.body.setAttribute("data-images-ok", String(ok));
  document.body.setAttribute("data-images-loaded", ok === imgs.length ? "true" : "false");
});
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value), quote=True)


def _table(table_id: str, head: Sequence[str], rows: Iterable[Sequence[str]], num: Iterable[int] = ()) -> str:
    """An HTML table; *rows* hold cells that are already HTML; columns in *num* align right."""
    right = set(num)
    out = [f'<table id="{table_id}"><thead><tr>', *(f"<th>{_e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="num">{c}</td>' if i in right else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _when(t: datetime | None) -> str:
    return "-" if t is None else t.isoformat(sep=" ", timespec="seconds")


# ------------------------------------------------------------------ sections


def _answer(rows: Sequence[ResultRow], cohorts: Sequence[CohortRecord]) -> str:
    """What the sweep found, first: per target and runtime the cheapest model whose saving
    is significant (:mod:`orchestrator.report.answer`), and the noise floor each target's
    cohorts measured -- the size of difference the verdicts could not see."""
    lines = answer_lines(rows)
    body = ['<section id="answer"><h2>The answer</h2>']
    if lines:
        body.append('<ul id="answer-lines">' + "".join(f"<li>{_e(line)}</li>" for line in lines) + "</ul>")
        body.append(f'<p class="muted">{_e(ANSWER_RULE[0].upper() + ANSWER_RULE[1:])}.</p>')
    else:
        body.append(f'<p id="answer-lines">{_e(NO_VERDICTS)}</p>')
    floors = noise_floors(cohorts)
    if floors:
        body.append('<ul id="noise-floor">' + "".join(f"<li>{_e(f.line())}</li>" for f in floors) + "</ul>")
    body.append("</section>")
    return "".join(body)


def _summary(sweep: SweepRecord, c: Comparison, counts: Mapping[str, int]) -> str:
    points = sum(len(m.cells) for m in c.models)
    facts = [
        ("sweep", f"{sweep.name} ({sweep.id})"), ("status", sweep.status),
        ("created", _when(sweep.created_at)), ("started", _when(sweep.started_at)),
        ("finished", _when(sweep.finished_at)),
        ("points", f"{points} = {len(c.models)} models x "
                   + (f"{len(c.columns)} target / runtime columns ({', '.join(k.name for k in c.columns)})"
                      if c.has_runtimes else f"{len(c.targets)} targets ({', '.join(c.targets)})")),
        ("stages", f"{sweep.unique_stage_count} unique (a per-point runner would run {sweep.naive_stage_count})"
                   + (": " + ", ".join(f"{n} {k}" for k, n in counts.items()) if counts else "")),
        ("artifacts", sweep.artifact_root),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in c.notes)
    return f'<section id="summary"><table id="summary-table"><tbody>{rows}</tbody></table>{notes}</section>'


def _spec(sweep: SweepRecord) -> str:
    return f'<section id="spec"><h2>Sweep spec</h2><pre>{_e(sweep.spec_text)}</pre></section>'


def _hardware(nodes: Sequence[NodeRecord], stages: Sequence[StageRecord], rows: Sequence[ResultRow],
              c: Comparison) -> str:
    ran = Counter(s.node_id for s in stages if s.node_id)
    used = set(ran) | {r.node_id for r in rows if r.node_id}
    seen = [n for n in nodes if n.node_id in used]
    body = ['<section id="hardware"><h2>Hardware seen</h2>',
            '<p class="muted">As each node described itself (not what the cluster file claims).</p>']
    if not seen:
        body.append("<p>no node facts recorded for this sweep's nodes</p></section>")
        return "".join(body)
    table_rows = []
    for n in seen:
        h = n.hardware
        gpus = ", ".join(str(g.get("name")) for g in h.get("gpus") or []) or "no GPU"
        memory = h.get("memory_total_bytes")
        table_rows.append([
            _e(n.node_id[:12]), _e(n.node_type), _e(n.region), _e(n.hostname or h.get("hostname")),
            _e(h.get("cpu_model")), _e(h.get("cpu_count_logical")), _e(_fmt_bytes(memory) if memory else None),
            _e(gpus), _e(h.get("os")), _e(h.get("torch")), _e(h.get("cuda")), _e(ran.get(n.node_id, 0)),
        ])
    body.append(_table("hardware-table", ["node", "type", "region", "host", "CPU", "logical CPUs", "memory", "GPUs",
                                          "OS", "torch", "CUDA", "stages run"], table_rows, num=(5, 6, 11)))
    body.extend(f'<p class="note">{_e(n)}</p>' for n in c.notes)
    body.append("</section>")
    return "".join(body)


def _runtimes(rows: Sequence[ResultRow]) -> str:
    """What each runtime was, as its evaluations recorded it: version, threads and the
    deployable's size, per target, runtime and precision."""
    seen: dict[tuple[str, str, str], list[ResultRow]] = {}
    for r in rows:
        seen.setdefault((r.target, r.runtime, r.precision), []).append(r)
    table_rows = []
    for (target, runtime, precision), mine in seen.items():
        versions = sorted({r.runtime_version for r in mine if r.runtime_version})
        threads = sorted({_pairs(r.threads) for r in mine if r.threads})
        sizes = [r.deployable_size_bytes for r in mine if r.deployable_size_bytes is not None]
        agreement = [r.top1_agreement for r in mine if r.top1_agreement is not None]
        table_rows.append([_e(target), _e(runtime), _e(precision), _e(", ".join(versions) or None),
                           _e(", ".join(threads) or None), _e(len(mine)),
                           _e(" - ".join(dict.fromkeys(_fmt_bytes(n) for n in (min(sizes), max(sizes))))
                              if sizes else None),
                           _e(f"{100 * min(agreement):.1f} %" if agreement else None)])
    return ("<h3>Runtimes</h3>"
            + _table("runtimes-table", ["target", "runtime", "precision", "version", "threads", "points",
                                        "deployable size", "lowest top-1 agreement"], table_rows, num=(5, 6, 7))
            + '<p class="muted">Threads are equal across runtimes on a node (intra-op = the CPUs a worker holds, one '
            "inter-op thread). Top-1 agreement: the share of the check batch whose top-1 matched the reference "
            "model.</p>")


def _comparison(c: Comparison, points: Sequence[ResultRow]) -> str:
    head = ["model", "top1 %", *(col.name for col in c.columns), "params", "MACs", "size", "compression"]
    rows = []
    for m in c.models:
        cells = ["<br>".join(_e(line) for line in model_cell_lines(c, m, col)) for col in c.columns]
        rows.append([_e(m.label) + (f'<br><span class="muted">also: {_e("; ".join(m.also))}</span>' if m.also else ""),
                     _e(model_top1_text(c, m)), *cells, _e(_fmt_count(m.params)), _e(_fmt_count(m.macs)),
                     _e(_fmt_bytes(m.size_bytes)), _e(m.compression)])
    n = len(c.columns)
    legend = ("Cells: " + ("top-1 (%), " if c.has_runtimes else "")
              + "time / sample (ms), energy / sample (mJ, gross, with where each domain's figure came from)"
              + (", carbon / sample (µg CO2eq)" if c.has_carbon else "") + "; mean ± std over the repeats. "
              + (RATIOS_NOTE + ". " if c.has_ratios else "")
              + (BEST_RULE + ". " if c.has_runtimes else "") + SOURCES_NOTE + ".")
    return ('<section id="comparison"><h2>Cross-hardware comparison</h2>'
            + _table("comparison-table", head, rows, num=(1, *range(2, 2 + n), 2 + n, 3 + n, 4 + n))
            + f'<p class="muted">{_e(legend)}</p>' + (_runtimes(points) if c.has_runtimes else "") + "</section>")


def _frontier_table(p: Pareto) -> str:
    out = []
    several = p.has_runtimes
    head = ["#", "model", *(["runtime"] if several else []), f"{p.y.title} ({p.y.unit})", f"{p.x.title} ({p.x.unit})"]
    for f in p.fronts:
        rows = [[_e(q.row.point_index), _e(q.row.point), *([_e(deployment(q.row))] if several else []),
                 _e(f"{p.y.scale * q.y:.1f} ± {p.y.scale * (q.y_std or 0):.1f}"),
                 _e(cost_text(q, p.x))] for q in f.frontier]
        out.append(f"<h3>{_e(f.target)}: {len(f.frontier)} of {len(f.points)} points non-dominated</h3>")
        out.append(_table(f"frontier-{p.x.name}-{f.target}", head, rows,
                          num=(0, len(head) - 2, len(head) - 1)))
    return "".join(out)


def _pareto(rows: Sequence[ResultRow]) -> str:
    from orchestrator.report.plots import pareto_png

    body = ['<section id="pareto"><h2>Pareto frontiers</h2>',
            '<p class="muted">Per target: minimise the cost, maximise top-1; a point is dominated when another is no '
            "worse on both and better on one (exact ties are both kept).</p>"]
    metrics = available_x(rows)
    if not metrics or not any(r.top1 is not None for r in rows):
        body.append("<p>no evaluation succeeded: nothing to compare</p></section>")
        return "".join(body)
    for name in metrics:
        p = build_pareto(rows, x=name, y="top1")
        body.append(f"<h3>top-1 vs {_e(p.x.title)}</h3>")
        body.append(_img(pareto_png(p.fronts, p.x, p.y), f"Pareto frontier, top-1 vs {p.x.title}",
                         f"Top-1 accuracy vs {p.x.title} per target; green: non-dominated, labelled with the point "
                         "number; bars: one std over repeats"
                         + ("; one marker per runtime and precision, named in the legend." if p.has_runtimes
                            else ".")))
        body.append(_frontier_table(p))
        if any(q.equated for f in p.fronts for q in f.frontier):
            body.append(f'<p class="muted">{_e(EQUATED_NOTE)}.</p>')
    if "carbon" not in metrics and "energy" in metrics:
        body.append('<p class="muted">no carbon figures: add a carbon: section to the spec to account them.</p>')
    body.append("</section>")
    return "".join(body)


def _pruning(rows: Sequence[ResultRow]) -> str:
    from orchestrator.report.plots import prune_curves_png

    body = ['<section id="pruning"><h2>Accuracy and energy vs prune ratio</h2>',
            '<p class="muted">One line per pruning method (and the rest of its chain), one panel per target; '
            "ratio 0 is the same chain without pruning.</p>"]
    drawn = 0
    for metric in (Y_METRICS["top1"], X_METRICS["energy"]):
        png = prune_curves_png(rows, metric)
        if png is not None:
            drawn += 1
            body.append(_img(png, f"{metric.title} vs prune ratio", f"{metric.title} ({metric.unit}) vs prune ratio"))
    if not drawn:
        body.append("<p>no pruned points with measurements in this sweep</p>")
    body.append("</section>")
    return "".join(body)


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def placement_summary(savings: Mapping[str, Any] | None) -> str:
    """One line: what the carbon-aware placement expected to save against ``fifo``."""
    if not savings:
        return NO_PLACEMENT
    measured = savings.get("measured_carbon_g")
    return (f"carbon-aware placement ({savings.get('policy')}): expected {_g(savings.get('expected_carbon_g'))} g "
            f"CO2eq vs {_g(savings.get('fifo_expected_carbon_g'))} g under fifo, saved "
            f"{_g(savings.get('saved_expected_g'))} g ({_g(savings.get('saved_expected_pct'))}%)"
            + (f"; measured {_g(measured)} g" if measured is not None else ""))


def placement_section(savings: Mapping[str, Any] | None) -> str:
    """The placement section from :func:`orchestrator.report.savings.carbon_savings`
    (``Store.carbon_savings(sweep_id)``; None: no decisions)."""
    body = ['<section id="placement"><h2>Carbon-aware placement</h2>']
    if not savings:
        body.append(f"<p>{_e(NO_PLACEMENT)}</p></section>")
        return "".join(body)
    body.append(f'<p id="placement-summary">{_e(placement_summary(savings))}</p>')
    body.append('<p class="muted">Expected carbon is what the scheduler predicted when it decided (expected energy '
                "x the region's intensity over the planned window); fifo is the carbon-agnostic choice it replaced "
                "(first free capable node, now).</p>")
    rows = []
    for s in savings.get("stages") or []:
        moved = s.get("moved")
        if moved is None:  # derived when the store does not say
            moved = (s.get("node_type"), s.get("region"), s.get("start")) != (
                s.get("fifo_node_type"), s.get("fifo_region"), s.get("fifo_start"))
        rows.append([_e(str(s.get("key"))[:12]), _e(s.get("kind")),
                     _e(f"{s.get('node_type')} / {s.get('region')}"), _e(s.get("start")),
                     _e(_g(s.get("expected_carbon_g"))), _e(_g(s.get("measured_carbon_g"))),
                     _e(f"{s.get('fifo_node_type')} / {s.get('fifo_region')}"), _e(s.get("fifo_start")),
                     _e(_g(s.get("fifo_expected_carbon_g"))), "yes" if moved else "no"])
    body.append(_table("placement-table", ["stage", "kind", "chosen type / region", "start", "expected g",
                                           "measured g", "fifo type / region", "fifo start", "fifo expected g",
                                           "moved"], rows, num=(4, 5, 8)))
    body.append("</section>")
    return "".join(body)


def _source_cell(source: str | None) -> str:
    if source is None or source == "none":
        return '<span class="muted">no figure</span>'
    if source in _SENSORS:
        return f'<span class="sensor">sensor: {_e(source)}</span>'
    return f'<span class="est">estimate: {_e(source)}</span>'


def _energy_sources(rows: Sequence[ResultRow]) -> str:
    measured = [r for r in rows if r.energy_source]
    tally = Counter((dom, "sensor" if src in _SENSORS else "estimate")
                    for r in measured for dom, src in r.energy_source.items() if src != "none")
    body = ['<section id="energy-sources"><h2>Where the energy figures came from</h2>']
    if not measured:
        body.append("<p>no energy readings in this sweep</p></section>")
        return "".join(body)
    summary = "; ".join(f"{dom}: {tally[(dom, 'sensor')]} measured by a sensor, {tally[(dom, 'estimate')]} estimated"
                        for dom in sorted({d for d, _ in tally}))
    body.append(f'<p id="energy-sources-summary">{_e(summary)} (of {len(measured)} points with energy).</p>')
    table_rows = []
    several = has_runtimes(rows)
    for r in measured:
        intensity = ("-" if r.intensity_g_per_kwh is None
                     else f"{r.intensity_g_per_kwh:.4g} g/kWh ({r.intensity_source}, {r.intensity_kind})")
        idle = ", ".join(f"{d} {w:.3g} W" for d, w in sorted(r.idle_power_w.items())) or "-"
        table_rows.append([_e(r.point_index), _e(r.point), _e(f"{r.target} ({deployment(r)})" if several else r.target),
                           *(_source_cell(r.energy_source.get(d)) for d in ("gpu", "cpu", "dram")),
                           _e(idle), _e(intensity)])
    body.append(_table("energy-sources-table", ["#", "model", "target", "gpu", "cpu", "dram", "idle power",
                                                "carbon intensity used"], table_rows, num=(0,)))
    body.append("</section>")
    return "".join(body)


def _failures(stages: Sequence[StageRecord]) -> str:
    from workers.stages.registry import stage_label  # pydantic: imported only for a failure table

    from orchestrator.gate import not_needed

    bad = [s for s in stages if s.status in ("failed", "skipped") and not not_needed(s.error)]
    unneeded = [s for s in stages if s.status == "skipped" and not_needed(s.error)]
    body = ['<section id="failures"><h2>Failures</h2>']
    if unneeded:  # a conditional stage's gate said no: an answer, not a failure
        body.append('<p id="not-needed">not needed (a condition said so): '
                    + "; ".join(_e(f"{stage_label(s.kind, s.params)}: {s.error}") for s in unneeded) + "</p>")
    if not bad:
        body.append('<p id="no-failures">no stage failed or was skipped</p></section>')
        return "".join(body)
    rows = [[f'<span class="bad">{_e(s.status)}</span>', _e(stage_label(s.kind, s.params)), _e(s.target),
             _e(s.key[:12]), _e(s.attempts), _e(s.error)] for s in bad]
    body.append(_table("failures-table", ["status", "stage", "target", "key", "attempts", "error"], rows, num=(4,)))
    body.append("</section>")
    return "".join(body)


# ------------------------------------------------------------------ the page


def build_report(
    *,
    sweep: SweepRecord,
    rows: Sequence[ResultRow],
    stages: Sequence[StageRecord],
    nodes: Sequence[NodeRecord],
    savings: Mapping[str, Any] | None,
    stage_counts: Mapping[str, int] | None = None,
    cohorts: Sequence[CohortRecord] = (),
) -> str:
    """The whole report as one HTML document (a str; write it as UTF-8). It opens with
    the answer (before the spec); *cohorts* (``Store.cohorts``) give each target's noise
    floor."""
    c = build_comparison(rows, nodes)
    try:
        from importlib.metadata import version

        made_by = f"greensweep {version('greensweep')}"
    except Exception:  # noqa: BLE001 - an uninstalled checkout still reports
        made_by = "greensweep"
    now = datetime.now(timezone.utc).isoformat(sep=" ", timespec="seconds")
    sections = [
        ("answer", "answer", _answer(rows, cohorts)),
        ("summary", None, _summary(sweep, c, stage_counts or {})),
        ("spec", "spec", _spec(sweep)),
        ("hardware", "hardware", _hardware(nodes, stages, rows, c)),
        ("comparison", "comparison", _comparison(c, rows)),
        ("pareto", "Pareto", _pareto(rows)),
        ("pruning", "pruning curves", _pruning(rows)),
        ("placement", "placement", placement_section(savings)),
        ("energy-sources", "energy sources", _energy_sources(rows)),
        ("failures", "failures", _failures(stages)),
    ]
    nav = "".join(f'<a href="#{anchor}">{_e(title)}</a>' for anchor, title, _ in sections if title)
    title = f"greensweep report: {sweep.name} ({sweep.id})"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n"
        f'<body data-images-loaded="pending" data-sweep-id="{_e(sweep.id)}">'
        f"<h1>{_e(title)}</h1>"
        f'<p class="muted">{_e(made_by)}, {_e(now)}</p><nav>{nav}</nav>\n'
        + "\n".join(body for _, _, body in sections)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )
