"""Reading the store: ``status``, ``results``, ``compare``, ``pareto``, ``report``."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from orchestrator.cli._common import _open_store, _resolve_sweep, _write_output, db_option
from orchestrator.errors import UsageError
from orchestrator.progress import _progress_text
from orchestrator.report.results import is_default_deployment


@click.command()
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
def status(sweep_id: str | None, db: str | None) -> None:
    """Show recent sweeps, or one sweep's stages."""
    store = _open_store(db, must_exist=True)
    if sweep_id is None:
        sweeps = store.list_sweeps()
        if not sweeps:
            click.echo("no sweeps yet -- run one with: greensweep run SPEC")
            return
        for s in sweeps:
            counts = store.stage_counts(s.id)
            c = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
            click.echo(f"{s.id}  {s.status:<10} {s.name:<24} {s.created_at:%Y-%m-%d %H:%M:%S}  {c}")
        return
    sweep_id = _resolve_sweep(store, sweep_id)
    s = store.get_sweep(sweep_id)
    counts = store.stage_counts(sweep_id)
    click.echo(f"{s.id}  {s.name}  status {s.status}  "
               + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    if s.status == "running" and s.heartbeat_at is not None:
        from orchestrator.coordinator import coordinator_gone

        age = (datetime.now(timezone.utc) - s.heartbeat_at).total_seconds()
        state = "gone" if coordinator_gone(s.coordinator) else f"last heartbeat {age:.0f}s ago"
        hint = f" -- finish it with: greensweep resume {sweep_id}" if state == "gone" or age > 60 else ""
        click.echo(f"  coordinator {s.coordinator} ({state}){hint}")
    attempts: dict[str, list[Any]] = {}
    for a in store.attempts(sweep_id):
        attempts.setdefault(a.stage_key, []).append(a)
    for st in store.stages(sweep_id):
        where = f" @ {st.target}" if st.target else ""
        if st.runtime is not None and not is_default_deployment(st.runtime, st.precision):
            where += f" {st.runtime} {st.precision}"
        dur = f"{st.duration_s:7.1f}s" if st.duration_s is not None else " " * 8
        gate = st.metrics.get("gate") if isinstance(st.metrics, dict) else None
        err = f"  {st.error}" if st.error else (f"  {gate['reason']}" if isinstance(gate, dict) and gate.get("reason")
                                                else "")
        click.echo(f"  {st.status:<9} {st.kind:<9}{where:<10} {st.key[:12]} {dur} attempts {st.attempts}{err}")
        tries = attempts.get(st.key, [])
        if len(tries) > 1 or any(a.status in ("lost", "cancelled") for a in tries):
            for a in tries:
                why = f"  {a.error}" if a.error and a.status != "succeeded" else ""
                click.echo(f"            attempt {a.attempt}: {a.status} on {(a.node_id or '-')[:12]}{why}")
        if st.status == "running":
            reports = store.progress(sweep_id, st.key)
            if reports:
                click.echo(f"            progress: {_progress_text(reports[-1])}")


@click.command()
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "emissions"]), default="table",
              show_default=True,
              help="csv/json: one row per point, stable columns (README: Results). emissions: CodeCarbon's "
                   "emissions.csv, one row per metered stage or evaluation repeat (README: Exports).")
def results(sweep_id: str | None, db: str | None, fmt: str) -> None:
    """Per-point results of SWEEP (default: the latest sweep).

    \b
    Save CodeCarbon-compatible emissions for carbon dashboards with:
      greensweep results --format emissions > emissions.csv
    """
    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    if fmt == "emissions":
        from orchestrator.export import emissions_rows, render_emissions

        click.echo(render_emissions(emissions_rows(store, sweep_id)))
        return
    from orchestrator.report import render_results

    click.echo(render_results(store.results(sweep_id), fmt))


@click.command()
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True)
def compare(sweep_id: str | None, db: str | None, fmt: str) -> None:
    """Cross-hardware table of SWEEP (default: the latest): compressed models x targets
    (x runtimes and precisions, when the sweep measured several).

    Cells: time, energy (with its sources) and carbon per sample, mean ± std over the
    repeats; accuracy, params, MACs, size and materialized/simulated once per model. With
    several runtimes, cells show top-1 too and each model's best runtime per target is
    marked: the fastest whose top-1 is at most 1 point below the model's torch fp32 top-1.
    """
    from orchestrator.report import build_comparison, render_comparison

    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    click.echo(render_comparison(build_comparison(store.results(sweep_id), store.nodes()), fmt))


@click.command()
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
@click.option("--target", default=None, metavar="T", help="Only this target (node type). Default: every target.")
@click.option("--x", "x_metric", type=click.Choice(["energy", "time", "carbon"]), default="energy", show_default=True,
              help="Cost to minimise: energy, time or carbon per sample.")
@click.option("--y", "y_metric", type=click.Choice(["top1", "top5"]), default="top1", show_default=True,
              help="Accuracy to maximise.")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True, help="table/markdown list the frontier; csv/json every point, flagged.")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the frontiers (one panel per target) into FILE.png.")
def pareto(sweep_id: str | None, db: str | None, target: str | None, x_metric: str, y_metric: str, fmt: str,
           plot_path: Path | None) -> None:
    """Non-dominated points of SWEEP per target: lowest cost (--x) for the highest accuracy (--y)."""
    from orchestrator.report import build_pareto, render_pareto

    if plot_path is not None and plot_path.suffix.lower() != ".png":
        raise UsageError(f"--plot {plot_path} must name a .png file, e.g. --plot pareto.png")
    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    front = build_pareto(store.results(sweep_id), x=x_metric, y=y_metric, target=target)
    click.echo(render_pareto(front, fmt))
    if plot_path is not None:
        from orchestrator.report.plots import pareto_png

        _write_output(plot_path, pareto_png(front.fronts, front.x, front.y), "--plot")
        click.echo(f"plot: {plot_path}", err=fmt in ("csv", "json"))


@click.command()
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
@click.option("--out", "out_path", default=None, metavar="FILE.html", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the report. Default: report-<sweep id>.html here.")
def report(sweep_id: str | None, db: str | None, out_path: Path | None) -> None:
    """One self-contained HTML report of SWEEP (images embedded; opens from disk, no server).

    The answer first (per target and runtime, the cheapest model whose saving is
    significant, and each target's noise floor), then the spec, hardware seen, comparison
    table, Pareto plots per target, accuracy and energy vs prune ratio, carbon-aware
    placement against fifo, energy sources, failures.
    """
    from orchestrator.report import build_comparison, build_report, placement_summary

    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    out_path = out_path or Path(f"report-{sweep_id}.html")
    savings_of = getattr(store, "carbon_savings", None)  # present once placements are recorded
    savings = savings_of(sweep_id) if callable(savings_of) else None
    rows = store.results(sweep_id)
    nodes_seen = store.nodes()
    page = build_report(sweep=store.get_sweep(sweep_id), rows=rows, stages=store.stages(sweep_id), nodes=nodes_seen,
                        savings=savings, stage_counts=store.stage_counts(sweep_id), cohorts=store.cohorts(sweep_id))
    _write_output(out_path, page.encode("utf-8"), "--out")
    c = build_comparison(rows, nodes_seen)
    shape = f"{len(c.columns)} target x runtime columns" if c.has_runtimes else f"{len(c.targets)} targets"
    click.echo(f"wrote {out_path} ({len(page.encode('utf-8')) / 1024:.0f} KiB): {len(c.models)} models x "
               f"{shape}; open it in a browser, no server needed")
    for note in c.notes:
        click.echo(f"note: {note}")
    click.echo(placement_summary(savings))
