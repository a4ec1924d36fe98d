"""The ``greensweep`` command line.

Exit codes: 0 success; 1 some stages failed; 2 bad input (spec, arguments); 3 store
unreachable or failing; 4 store schema mismatch; 5 Ray/cluster problem; 6 artifact
integrity; 130 interrupted. Every error is one line on stderr, never a traceback.
Heavy modules (torch, ray, alembic) are imported only by the commands that need them.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click

from orchestrator.errors import GreensweepError, UsageError, mask_url
from orchestrator.progress import _progress_text, make_progress

DEFAULT_ARTIFACTS = "./.greensweep/artifacts"


def node_cache_dir() -> str:
    """Where each node keeps its artifacts when nodes share no disk (``--artifacts
    object-store``): ``GREENSWEEP_NODE_CACHE``, default ``<tmp>/greensweep-node-cache``, on the node."""
    import tempfile

    return os.environ.get("GREENSWEEP_NODE_CACHE") or f"{tempfile.gettempdir()}/greensweep-node-cache"


def artifact_root() -> str:
    return str(Path(os.environ.get("GREENSWEEP_ARTIFACTS", DEFAULT_ARTIFACTS)).resolve())


def _db_url(db: str | None, spec_store: str | None = None) -> str:
    from orchestrator.store import default_db_url

    return db or spec_store or default_db_url()


def _open_store(db: str | None, spec_store: str | None = None, *, must_exist: bool = False):
    """Open the store; read-only commands (*must_exist*) refuse to create a new SQLite
    file, so a mistyped --db is an error rather than an empty store."""
    from orchestrator.store import Store, sqlite_file

    url = _db_url(db, spec_store)
    path = sqlite_file(url)
    if must_exist and path is not None and not path.exists():
        raise UsageError(
            f"no store at {path} -- run a sweep first (greensweep run SPEC) or point --db at an existing store"
        )
    return Store.open(url, create=not must_exist)


db_option = click.option(
    "--db", "db", envvar="GREENSWEEP_DB_URL", default=None, metavar="URL",
    help="Store URL; also GREENSWEEP_DB_URL. Default: the spec's 'store:', "
         "else sqlite:///./.greensweep/greensweep.db.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="greensweep")
def cli() -> None:
    """greensweep: model-compression sweeps across hardware, with measured time, energy and carbon.

    \b
    Typical use:
      greensweep plan examples/quickstart.yaml     # what would run, nothing written
      greensweep run examples/quickstart.yaml      # run it, print the results table
      greensweep results --format json             # the latest sweep's results
    """


# -- plan ----------------------------------------------------------------------------------


@cli.command()
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
    for pt in p.points:
        click.echo(f"  [{pt.index:3d}] {pt.label}  @ {pt.target}")


# -- run -----------------------------------------------------------------------------------


def _carbon_provider(spec):
    """The spec's carbon provider (data and credentials read now), or None without a
    ``carbon:`` section."""
    if spec.carbon is None:
        return None
    from orchestrator.carbon import make_provider

    return make_provider(spec.carbon)


def _check_node_regions(provider, nodes) -> None:
    """Every node's region must have intensity data (or an explicit fallback) before
    any work starts; nodes served by the fallback are named."""
    from orchestrator.carbon import check_regions
    from orchestrator.cluster import REGION_LABEL
    from orchestrator.errors import ClusterError

    for n in nodes:
        if not n.region:
            raise ClusterError(
                f"node {n.node_id[:12]} ({n.node_type}) has no {REGION_LABEL} label, so its carbon cannot be "
                f"accounted -- start it with the label, or remove the spec's carbon section"
            )
    for r in check_regions(provider, sorted({n.region for n in nodes})):
        click.echo(f"warning: region {r!r} has no intensity data; carbon uses the spec's fallback (labelled)")


@cli.command()
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
    if cluster_file is not None and address is not None:
        raise UsageError("give either --cluster (start a simulated cluster) or --address (join a running one), not both")
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec

    spec = load_spec(spec_path)
    plan_ = build_plan(spec)
    # the store is opened (and created) only once Ray, the nodes and the carbon data check
    # out, so a bad --cluster, --address or token leaves no new store behind
    _execute(spec, plan_, lambda: _open_store(db, spec.store_url), db_url=_db_url(db, spec.store_url), address=address, region=region,
             cluster_file=cluster_file, progress_mode=progress_mode, max_attempts=max_attempts,
             spec_dir=str(spec_path.resolve().parent), transfer=transfer)


def _execute(spec, plan_, store, *, db_url: str, address: str | None, region: str | None,
             cluster_file: Path | None, progress_mode: str, max_attempts: int | None,
             spec_dir: str | None = None, resume_id: str | None = None, transfer: str = "auto") -> None:
    """Run a new sweep (``resume_id`` None) or finish an existing one, then print results."""
    from orchestrator import cluster
    from orchestrator.coordinator import Coordinator, RunOptions, WorkerPool, coordinator_gone, coordinator_id
    from orchestrator.report import render_results
    from orchestrator.scheduler.online import make_placer, policy_for

    carbon = _carbon_provider(spec)
    if resume_id is not None:
        options = RunOptions.from_json(store.get_sweep(resume_id).options)
        if max_attempts is not None:
            options = RunOptions.from_json({**options.to_json(), "max_attempts": max_attempts})
    else:
        if transfer == "auto":  # one host shares its disk; a real cluster may not
            transfer = "object-store" if address is not None else "shared"
        options = RunOptions(max_attempts=max_attempts or spec.scheduling.max_attempts,
                             stage_timeout_s=3600.0 * spec.scheduling.stage_timeout_h, transfer=transfer)
    cluster.connect(address, region=region, cluster_file=cluster_file)
    _stop_on_sigterm()  # after connecting: Ray's own handler would print a stack and leave nodes behind
    pool = None
    display = None
    try:
        nodes = cluster.discover_nodes()
        cluster.require_targets(nodes, spec.evaluate.targets)
        if carbon is not None:
            _check_node_regions(carbon, nodes)
        if callable(store):
            store = store()
        pool = WorkerPool(nodes, cache_dir=node_cache_dir() if options.transfer == "object-store" else None)
        for node_id, facts in pool.hardware().items():
            node = next(n for n in nodes if n.node_id == node_id)
            store.upsert_node(node_id, node.node_type, node.region, facts.get("hostname"), facts)
        initial: dict[str, str] = {}
        if resume_id is None:
            sweep_id = f"sw-{uuid.uuid4().hex[:12]}"
            root = artifact_root()
            store.create_sweep(
                sweep_id=sweep_id, name=spec.name, spec_text=spec.source_text, spec_hash=spec.spec_hash,
                artifact_root=root,
                stages=[{"key": s.key, "kind": s.kind, "params": dict(s.params), "parent_key": s.parent_key,
                         "target": s.target} for s in plan_.stages],
                points=[{"point_index": p.index, "label": p.label, "pipeline": p.pipeline,
                         "stage_keys": list(p.stage_keys), "target": p.target, "eval_key": p.eval_key}
                        for p in plan_.points],
                naive_stage_count=plan_.naive_stage_count, spec_dir=spec_dir,
                options={**options.to_json(), "policy": policy_for(spec)},
            )
            store.take_sweep(sweep_id, coordinator_id(), stale_after_s=options.stale_after_s)
            click.echo(f"sweep {sweep_id} ({spec.name}): {len(plan_.points)} points, {len(plan_.stages)} unique "
                       f"stages (naive {plan_.naive_stage_count}) on {len(nodes)} node(s); store {mask_url(db_url)}")
        else:
            sweep_id = resume_id
            root = store.get_sweep(sweep_id).artifact_root
            store.take_sweep(sweep_id, coordinator_id(), stale_after_s=options.stale_after_s, gone=coordinator_gone)
            initial = _resume_state(store, sweep_id, plan_, root)
            done = sum(1 for v in initial.values() if v in ("succeeded", "reused"))
            click.echo(f"resuming sweep {sweep_id} ({spec.name}): {done} of {len(plan_.stages)} stages done, "
                       f"the rest run now on {len(nodes)} node(s); store {mask_url(db_url)}")
        if cluster_file is not None:
            click.echo("note: a simulated cluster -- its node types share this one host, so their timings "
                       "and energy are not a hardware comparison")
        display = make_progress(plan_, live={"auto": None, "live": True, "plain": False}[progress_mode],
                                initial_status=initial)
        # the deadline runs from the sweep's creation, also when it is resumed
        started_at = datetime.now(timezone.utc) if resume_id is None else store.get_sweep(sweep_id).created_at
        placer = make_placer(spec, store, carbon, started_at, display.warning)
        coord = Coordinator(store=store, spec=spec, plan=plan_, sweep_id=sweep_id, artifact_root=root,
                            pool=pool, progress=display, carbon=carbon, placer=placer, options=options,
                            initial_status=initial)
        outcome = coord.run()
    finally:
        if display is not None:
            display.close()
        if pool is not None:
            pool.shutdown()
        cluster.shutdown()
    click.echo("")
    click.echo(render_results(store.results(sweep_id), "table"))
    counts = ", ".join(f"{n} {k}" for k, n in sorted(outcome.counts.items()))
    click.echo(f"sweep {sweep_id} {outcome.status} in {outcome.wall_s:.1f}s ({counts})")
    if placer is not None:
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


def _stop_on_sigterm() -> None:
    """``kill PID`` (SIGTERM) stops a sweep as Ctrl-C does: running stages are cancelled,
    the sweep is marked cancelled (resumable), the simulated cluster is shut down. A
    second SIGTERM is not caught."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _resume_state(store, sweep_id: str, plan_, root: str) -> dict[str, str]:
    """What a resumed sweep need not run again: stages whose result is in the store and
    whose artifact is present and passes its checksum. Interrupted stages (left
    ``running`` by a dead coordinator) lose their attempt; failed and skipped ones run again."""
    from workers.artifacts import verified_manifest
    from workers.stages.registry import get_kind

    store.interrupted_stages(sweep_id)
    recorded = {st.key: st.status for st in store.stages(sweep_id)}
    state: dict[str, str] = {}
    for st in plan_.stages:
        status = recorded.get(st.key)
        if status not in ("succeeded", "reused"):
            continue
        if get_kind(st.kind).produces_artifact and verified_manifest(root, st.key) is None:
            continue  # missing or tampered: run it again
        state[st.key] = status
    for st in plan_.stages:  # a stage whose parent runs again must run again too
        if st.parent_key is not None and st.parent_key not in state:
            state.pop(st.key, None)
    return state


@cli.command()
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
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec

    if cluster_file is not None and address is not None:
        raise UsageError("give either --cluster or --address, not both")
    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    record = store.get_sweep(sweep_id)
    if record.status == "succeeded":
        click.echo(f"sweep {sweep_id} already succeeded; nothing to resume -- see: greensweep results {sweep_id}")
        return
    spec = parse_spec(record.spec_text, base_dir=record.spec_dir or ".")
    plan_ = build_plan(spec)
    planned = {s.key for s in plan_.stages}
    stored = {st.key for st in store.stages(sweep_id)}
    if planned != stored:
        raise UsageError(f"sweep {sweep_id}'s spec now plans different stages (a file it names changed since, "
                         "e.g. its checkpoint) -- start a new sweep with: greensweep run SPEC")
    _execute(spec, plan_, store, db_url=_db_url(db), address=address, region=region, cluster_file=cluster_file,
             progress_mode=progress_mode, max_attempts=max_attempts, resume_id=sweep_id)


@cli.command()
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


# -- status / results ----------------------------------------------------------------------


def _resolve_sweep(store, sweep_id: str | None) -> str:
    from orchestrator.export import resolve_sweep

    return resolve_sweep(store, sweep_id)


@cli.command()
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
        dur = f"{st.duration_s:7.1f}s" if st.duration_s is not None else " " * 8
        err = f"  {st.error}" if st.error else ""
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


@cli.command()
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


# -- compare / pareto / report -------------------------------------------------------------


@cli.command()
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json", "markdown"]), default="table",
              show_default=True)
def compare(sweep_id: str | None, db: str | None, fmt: str) -> None:
    """Cross-hardware table of SWEEP (default: the latest): compressed models x targets.

    Cells: time, energy (with its sources) and carbon per sample, mean ± std over the
    repeats; accuracy, params, MACs, size and materialized/simulated once per model.
    """
    from orchestrator.report import build_comparison, render_comparison

    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    click.echo(render_comparison(build_comparison(store.results(sweep_id), store.nodes()), fmt))


@cli.command()
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


@cli.command()
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
@click.option("--out", "out_path", default=None, metavar="FILE.html", type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the report. Default: report-<sweep id>.html here.")
def report(sweep_id: str | None, db: str | None, out_path: Path | None) -> None:
    """One self-contained HTML report of SWEEP (images embedded; opens from disk, no server).

    Spec, hardware seen, comparison table, Pareto plots per target, accuracy and energy
    vs prune ratio, carbon-aware placement against fifo, energy sources, failures.
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
                        savings=savings, stage_counts=store.stage_counts(sweep_id))
    _write_output(out_path, page.encode("utf-8"), "--out")
    c = build_comparison(rows, nodes_seen)
    click.echo(f"wrote {out_path} ({len(page.encode('utf-8')) / 1024:.0f} KiB): {len(c.models)} models x "
               f"{len(c.targets)} targets; open it in a browser, no server needed")
    for note in c.notes:
        click.echo(f"note: {note}")
    click.echo(placement_summary(savings))


def _write_output(path: Path, data: bytes, option: str) -> None:
    """Write *data* to *path* whole or not at all (a temporary file renamed into place)."""
    if not path.parent.exists():
        raise UsageError(f"{option} {path}: directory {path.parent} does not exist -- create it or choose another path")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"{option} {path}: cannot write ({e.strerror}) -- choose a writable path") from None


# -- nodes ---------------------------------------------------------------------------------


@cli.command()
@click.option("--address", default=None, metavar="ADDR",
              help="Ray cluster address. Default: start a local Ray on 127.0.0.1, as `run` does.")
@click.option("--cluster", "cluster_file", default=None, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Start the simulated cluster described by FILE; exclusive with --address.")
def nodes(address: str | None, cluster_file: Path | None) -> None:
    """List the Ray nodes greensweep would use: type, region, CPUs, GPUs and hardware.

    Hardware is read on each node by a task pinned to it. Live nodes without a
    greensweep/node-type label are listed as unused. A Ray this command starts
    (local or simulated) is shut down before it returns.
    """
    from orchestrator import cluster

    cluster.connect(address, cluster_file=cluster_file)
    try:
        found = cluster.discover_nodes()
        facts = cluster.describe_nodes(found)
        unlabelled = cluster.unlabelled_nodes()
    finally:
        cluster.shutdown()
    click.echo(f"{'NODE':<10} {'TYPE':<12} {'REGION':<14} {'CPUS':>4} {'GPUS':>4}  HARDWARE")
    for n in found:
        f = facts.get(n.node_id, {})
        gpus = ", ".join(g["name"] for g in f.get("gpus") or []) or "no GPU"
        hw = f"{f.get('cpu_model') or 'unknown CPU'}; {gpus}"
        click.echo(f"{n.node_id[:8]:<10} {n.node_type:<12} {n.region or '-':<14} {n.num_cpus:>4} {n.num_gpus:>4}  {hw}")
    for node_id in unlabelled:
        click.echo(f"{node_id[:8]:<10} {'-':<12} {'-':<14} {'':>4} {'':>4}  unlabelled, not used")
    if not found:
        click.echo(f"no node carries the label {cluster.NODE_TYPE_LABEL}; greensweep has nowhere to run")


# -- db ------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """Store schema: upgrade and inspect."""


@db.command("upgrade")
@db_option
def db_upgrade(db: str | None) -> None:
    """Migrate the store's schema to this greensweep's version."""
    from orchestrator.store import current, head, upgrade

    url = _db_url(db)
    before = current(url)
    upgrade(url)
    click.echo(f"{mask_url(url)}: {before or 'empty'} -> {head()}")


@db.command("current")
@db_option
def db_current(db: str | None) -> None:
    """Print the store's schema revision and this greensweep's head."""
    from orchestrator.store import current, head
    from orchestrator.store.migrations import is_known

    url = _db_url(db)
    rev = current(url)
    if rev == head():
        state = "up to date"
    elif rev is not None and not is_known(rev):
        state = f"written by a newer greensweep; this one needs {head()} -- upgrade greensweep (pip install -U greensweep)"
    else:
        state = f"greensweep expects {head()} -- run: greensweep db upgrade --db {mask_url(url)}"
    click.echo(f"{mask_url(url)}: {rev or 'no schema'} ({state})")


# -- carbon --------------------------------------------------------------------------------


@cli.group()
def carbon() -> None:
    """Carbon-aware planning: offline plans, and what a sweep's placement saved."""


@carbon.command("plan")
@click.option("--instance", "instance_path", required=True, metavar="FILE.json",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Scheduling instance (format: docs/scheduler-instance.md).")
@click.option("--policy", type=click.Choice(["fifo", "greedy-carbon", "carbon-deadline"]),
              default="carbon-deadline", show_default=True, help="Scheduling policy.")
@click.option("--effort", type=click.IntRange(min=0), default=None, metavar="N",
              help="carbon-deadline's search budget in work units (default 3000, about 0.2 s for "
                   "8 tasks; 0: its first list schedule only).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of carbon-deadline's search: same instance, effort and seed, same plan.")
def carbon_plan(instance_path: Path, policy: str, effort: int | None, seed: int) -> None:
    """Print the JSON plan POLICY makes for the instance in FILE.json."""
    from orchestrator.scheduler.instance import load_instance
    from orchestrator.scheduler.planner import DEFAULT_EFFORT
    from orchestrator.scheduler.planner import plan as make_plan

    instance = load_instance(instance_path)
    chosen = make_plan(instance, policy, effort=DEFAULT_EFFORT if effort is None else effort, seed=seed)
    click.echo(json.dumps(chosen.to_json(), indent=2))


@carbon.command("savings")
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
@click.option("--json", "as_json", is_flag=True, help="Print the whole comparison as JSON.")
def carbon_savings(sweep_id: str | None, db: str | None, as_json: bool) -> None:
    """Expected and measured carbon of SWEEP's placements against the fifo counterfactual.

    For every stage the carbon-aware scheduler placed: where and when it ran, where and
    when a carbon-agnostic (fifo) scheduler would have run it, the expected grams of both,
    and the grams measured for the stage that ran. The fifo figures are expectations from
    the same estimates -- that placement did not run.
    """
    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    summary = store.carbon_savings(sweep_id)
    if summary is None:
        raise UsageError(f"sweep {sweep_id} recorded no carbon-aware placement (its policy was fifo or it had no "
                         "carbon: section) -- set scheduling.policy (greedy-carbon or carbon-deadline) in the spec")
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return

    def g(x: float | None) -> str:
        return "-" if x is None else f"{x:.4g}"

    click.echo(f"sweep {sweep_id}: policy {summary['policy']}, {len(summary['stages'])} placed stage(s)")
    click.echo(f"  {'STAGE':<14}{'KIND':<10}{'PLACED ON':<26}{'START':<10}{'EXP g':>10}{'MEAS g':>10}  "
               f"{'FIFO WOULD USE':<26}{'START':<10}{'EXP g':>10}")
    for st in summary["stages"]:
        here = f"{st['node_type']}/{st['region'] or '-'}"
        there = f"{st['fifo_node_type']}/{st['fifo_region'] or '-'}"
        click.echo(f"  {st['key'][:12]:<14}{st['kind']:<10}{here:<26}{st['start'][11:19]:<10}"
                   f"{g(st['expected_carbon_g']):>10}{g(st['measured_carbon_g']):>10}  {there:<26}"
                   f"{st['fifo_start'][11:19]:<10}{g(st['fifo_expected_carbon_g']):>10}")
    pct = summary["saved_expected_pct"]
    click.echo(f"expected: {g(summary['expected_carbon_g'])} g vs {g(summary['fifo_expected_carbon_g'])} g under fifo"
               + (f" ({pct:.1f} % saved)" if pct is not None else "")
               + f"; measured for the placed stages: {g(summary['measured_carbon_g'])} g")


# -- entry point ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors and meaningful exit codes, never a traceback."""
    try:
        cli.main(args=argv, prog_name="greensweep", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.UsageError as e:
        hint = f" -- see: {e.ctx.command_path} --help" if e.ctx is not None else ""
        click.echo(f"error: {e.format_message()}{hint}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except GreensweepError as e:
        click.echo(f"error: {mask_url(str(e))}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - a bug must still not dump a traceback on users
        if os.environ.get("GREENSWEEP_DEBUG"):
            raise
        first = " ".join(str(e).split())[:300]
        click.echo(f"error: internal error {e.__class__.__name__}: {mask_url(first)} -- "
                   "rerun with GREENSWEEP_DEBUG=1 for the traceback and report it", err=True)
        sys.exit(70)


if __name__ == "__main__":
    main()
