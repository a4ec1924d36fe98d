"""Running sweeps: ``plan``, ``run``, ``resume``, ``cancel``.

The lifecycle itself (Ray, nodes, store, ownership, resume state) is
:mod:`orchestrator.runner`; these commands parse, call it, and print what it reports
and the results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.cli._common import _open_store, _resolve_sweep, db_option
from orchestrator.errors import UsageError


@click.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(spec_path: Path, as_json: bool) -> None:
    """Expand SPEC into points and unique stages without running anything."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec

    spec = load_spec(spec_path)
    p = build_plan(spec)
    if as_json:
        click.echo(json.dumps(p.to_json(), indent=2))
        return
    click.echo(f"sweep {spec.name!r}: {len(p.points)} points, {len(p.stages)} unique stages "
               f"(a per-point runner would execute {p.naive_stage_count})")
    by_kind: dict[str, int] = {}
    for s in p.stages:
        by_kind[s.kind] = by_kind.get(s.kind, 0) + 1
    click.echo("stages by kind: " + ", ".join(f"{k} {n}" for k, n in by_kind.items()))
    several = len({(pt.runtime, pt.precision) for pt in p.points}) > 1 or any(
        (pt.runtime, pt.precision) != ("torch", "fp32") for pt in p.points)
    for pt in p.points:
        on = f" on {pt.runtime} {pt.precision}" if several else ""
        click.echo(f"  [{pt.index:3d}] {pt.label}  @ {pt.target}{on}")
    conditional = [s for s in p.stages if s.gate is not None]
    if conditional:
        click.echo(f"conditional stages: {len(conditional)} (and the points after them)")
        for s in conditional:
            click.echo(f"  - {s.label} ({s.key[:12]}) {s.gate.describe()}")
    if p.unpaired:
        by_reason: dict[str, list[str]] = {}
        for u in p.unpaired:
            names = by_reason.setdefault(u.reason, [])
            if u.label.split(":")[0] not in names:
                names.append(u.label.split(":")[0])
        click.echo(f"not points: {len(p.unpaired)} combinations a runtime cannot run (plan --json lists each)")
        for reason, names in by_reason.items():
            click.echo(f"  - {reason}: {', '.join(names)}")


class _Printed:
    """The CLI's :class:`orchestrator.runner.Reporter`: notes are printed lines, stage
    events go to the ``--progress`` display."""

    def __init__(self, progress_mode: str) -> None:
        self.live = {"auto": None, "live": True, "plain": False}[progress_mode]

    def note(self, line: str) -> None:
        click.echo(line)

    def display(self, plan: Any, initial_status: dict[str, str]) -> Any:
        from orchestrator.progress import make_progress

        return make_progress(plan, live=self.live, initial_status=initial_status)


def _report_outcome(outcome: Any, store: Any) -> None:
    """The results table, the answer (per target and runtime, the cheapest model whose
    saving is significant; when any point was measured in a cohort) and the outcome line;
    exit 130 when cancelled, 1 when any stage failed."""
    from orchestrator.report import render_results
    from orchestrator.report.answer import answer_lines

    sweep_id = outcome.sweep_id
    rows = store.results(sweep_id)
    click.echo("")
    click.echo(render_results(rows, "table"))
    answer = answer_lines(rows)
    if answer:
        click.echo("")
        click.echo("answer -- the cheapest model significantly faster than the baseline within 1 point of its "
                   "top-1:")
        for line in answer:
            click.echo(f"  {line}")
    counts = ", ".join(f"{n} {k}" for k, n in sorted(outcome.counts.items()))
    click.echo(f"sweep {sweep_id} {outcome.status} in {outcome.wall_s:.1f}s ({counts})")
    if outcome.carbon_aware:
        saved = store.carbon_savings(sweep_id)
        if saved and saved["saved_expected_g"] is not None:
            click.echo(f"carbon-aware placement ({saved['policy']}): expected {saved['expected_carbon_g']:.4g} g "
                       f"vs {saved['fifo_expected_carbon_g']:.4g} g under fifo -- details: "
                       f"greensweep carbon savings {sweep_id}")
    if outcome.status == "cancelled":
        click.echo(f"finish it later with: greensweep resume {sweep_id}")
        sys.exit(130)
    if outcome.status != "succeeded":
        sys.exit(1)


@click.command()
@click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False, path_type=Path))
@db_option
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster address (e.g. ray://head:10001 or auto). Default: start a local Ray on 127.0.0.1.")
@click.option("--region", default="local", show_default=True,
              help="Region label of the local node (embedded default only); map it to a carbon region "
                   "with the spec's carbon.regions, e.g. {local: FR}.")
@click.option("--cluster", "cluster_file", default=None, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Start the simulated cluster described by FILE (e.g. clusters/local-sim.yaml) "
                   "instead of the plain local Ray; exclusive with --address.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "live", "plain"]), default="auto",
              show_default=True,
              help="Progress display: 'live' (a redrawn table of nodes, counts and time left), 'plain' "
                   "(one line per event, for logs); 'auto' is live on a terminal, plain otherwise.")
@click.option("--max-attempts", type=click.IntRange(1, 100), default=None,
              help="Attempts per stage when its worker dies (default: the spec's scheduling.max_attempts, 3).")
@click.option("--artifacts", "transfer", type=click.Choice(["auto", "shared", "object-store"]), default="auto",
              show_default=True,
              help="How models move between nodes: 'shared' (every node reads and writes GREENSWEEP_ARTIFACTS, "
                   "a shared file system), 'object-store' (through Ray's object store; each node keeps a local "
                   "cache under GREENSWEEP_NODE_CACHE). 'auto': shared on this machine, object-store with --address.")
def run(spec_path: Path, db: str | None, address: str | None, region: str | None,
        cluster_file: Path | None, progress_mode: str, max_attempts: int | None, transfer: str) -> None:
    """Run the sweep in SPEC and print its results."""
    from orchestrator import runner

    outcome, store = runner.start(spec_path, db=db, address=address, cluster=cluster_file, region=region,
                                  max_attempts=max_attempts, transfer=transfer, reporter=_Printed(progress_mode))
    _report_outcome(outcome, store)


@click.command()
@click.argument("sweep_id", metavar="SWEEP")
@db_option
@click.option("--address", default=None, metavar="ADDR", help="Ray cluster address; as for run.")
@click.option("--region", default="local", show_default=True, help="Region label of the local node; as for run.")
@click.option("--cluster", "cluster_file", default=None, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path), help="Start this simulated cluster; as for run.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "live", "plain"]), default="auto",
              show_default=True, help="Progress display; as for run.")
@click.option("--max-attempts", type=click.IntRange(1, 100), default=None,
              help="Attempts per stage when its worker dies (default: as the sweep was started).")
def resume(sweep_id: str, db: str | None, address: str | None, region: str | None, cluster_file: Path | None,
           progress_mode: str, max_attempts: int | None) -> None:
    """Finish SWEEP after its coordinator stopped (killed, cancelled, or stages failed).

    Stages with a result in the store and a verified artifact are not run again;
    interrupted, failed and skipped ones are. A retraining stage continues from its last
    epoch checkpoint. Refused while another coordinator is still running the sweep.
    """
    from orchestrator import runner

    if cluster_file is not None and address is not None:
        raise UsageError("give either --cluster or --address, not both")
    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    outcome = runner.resume(store, sweep_id, db=db, address=address, cluster=cluster_file, region=region,
                            max_attempts=max_attempts, reporter=_Printed(progress_mode))
    if outcome is None:
        click.echo(f"sweep {sweep_id} already succeeded; nothing to resume -- see: greensweep results {sweep_id}")
        return
    _report_outcome(outcome, store)


@click.command()
@click.argument("sweep_id", metavar="SWEEP")
@db_option
def cancel(sweep_id: str, db: str | None) -> None:
    """Stop SWEEP cleanly: its coordinator kills the running stages and marks it cancelled.

    A sweep whose coordinator is gone is marked cancelled at once. Finish it later with
    `greensweep resume SWEEP`.
    """
    from orchestrator.coordinator import RunOptions, coordinator_gone

    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    options = RunOptions.from_json(store.get_sweep(sweep_id).options)
    outcome = store.request_cancel(sweep_id, stale_after_s=options.stale_after_s, gone=coordinator_gone)
    if outcome == "requested":
        click.echo(f"cancel requested: sweep {sweep_id}'s coordinator stops within {options.heartbeat_s:.0f}s "
                   f"(check with: greensweep status {sweep_id})")
    elif outcome == "cancelled":
        click.echo(f"sweep {sweep_id} cancelled (no coordinator was running it); finish it later with: "
                   f"greensweep resume {sweep_id}")
    else:
        click.echo(f"sweep {sweep_id} already ended ({outcome.removeprefix('already-')}); nothing to cancel")
