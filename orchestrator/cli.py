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
from pathlib import Path
from typing import Any

import click

from orchestrator.errors import GreensweepError, SpecError, UsageError, mask_url

DEFAULT_ARTIFACTS = "./.greensweep/artifacts"


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
    return Store.open(url)


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


class LineProgress:
    """Plain progress lines (one per event), fit for terminals, pipes and CI logs.

    Each stage is named by its chain, e.g. ``evaluate(local) of prune(...) > quantize(...)``,
    so a line says which sweep point it belongs to.
    """

    def __init__(self, plan) -> None:
        self.names: dict[str, str] = {}
        for st in plan.stages:  # parents come first
            parent = self.names.get(st.parent_key, "") if st.parent_key else ""
            if st.kind == "train":
                self.names[st.key] = ""  # the baseline: chains are named from the first compression
            elif st.kind == "evaluate":
                self.names[st.key] = f"{st.label} of {parent or 'the baseline'}"
            else:
                self.names[st.key] = f"{parent} > {st.label}" if parent else st.label

    def _name(self, stage) -> str:
        return self.names.get(stage.key) or stage.label

    def stage_started(self, stage, node) -> None:
        click.echo(f"           start   {self._name(stage)}  [on {node.node_type} {node.node_id[:8]}]")

    def stage_finished(self, stage, result, done: int, total: int) -> None:
        if result.status == "succeeded":
            extra = _summary(stage.kind, result.metrics)
            click.echo(f"[{done:3d}/{total:3d}] done    {self._name(stage)}  {result.duration_s:.1f}s  {extra}")
        else:
            click.echo(f"[{done:3d}/{total:3d}] FAILED  {self._name(stage)}  {result.error}")

    def stage_reused(self, stage, done: int, total: int) -> None:
        click.echo(f"[{done:3d}/{total:3d}] reused  {self._name(stage)}  (artifact {stage.key[:12]} exists)")

    def stage_skipped(self, stage, reason: str) -> None:
        click.echo(f"           skipped {self._name(stage)}  (a parent stage failed)")

    def stage_progress(self, stage, report: dict[str, Any]) -> None:
        click.echo(f"           ...     {self._name(stage)}  {_progress_text(report)}")

    def warning(self, message: str) -> None:
        click.echo(f"warning: {message}")


def _progress_text(report: dict[str, Any]) -> str:
    """One progress report (e.g. a training epoch) as a short phrase."""
    parts = []
    if "epoch" in report:
        total = report.get("epochs")
        parts.append(f"epoch {report['epoch']}" + (f"/{total}" if total else ""))
    for key, fmt in (("train_loss", "loss {:.3f}"), ("val_top1", "val top1 {:.1%}"), ("epoch_s", "{:.1f}s")):
        if report.get(key) is not None:
            parts.append(fmt.format(report[key]))
    return "  ".join(parts) or str(report)


def _summary(kind: str, m: dict[str, Any]) -> str:
    if kind == "evaluate" and m.get("top1") is not None:
        return f"top1 {100 * m['top1']:.1f}%  {1e3 * m.get('time_per_sample_s', 0):.3f} ms/sample"
    if m.get("best_val_top1") is not None:
        before = f"{100 * m['initial_val_top1']:.1f}% -> " if m.get("initial_val_top1") is not None else ""
        return f"val top1 {before}{100 * m['best_val_top1']:.1f}% (best epoch {m.get('best_epoch')})"
    if "params_after" in m:
        return f"params {m['params_before']:,} -> {m['params_after']:,}"
    if "sparsity" in m:
        return f"sparsity {100 * m['sparsity']:.1f}%"
    return ""


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
def run(spec_path: Path, db: str | None, address: str | None, region: str | None,
        cluster_file: Path | None) -> None:
    """Run the sweep in SPEC and print its results."""
    if cluster_file is not None and address is not None:
        raise UsageError("give either --cluster (start a simulated cluster) or --address (join a running one), not both")
    from orchestrator import cluster
    from orchestrator.coordinator import Coordinator, WorkerPool
    from orchestrator.plan import build_plan
    from orchestrator.report import render_results
    from orchestrator.spec import load_spec

    spec = load_spec(spec_path)
    plan_ = build_plan(spec)
    carbon = _carbon_provider(spec)
    store = _open_store(db, spec.store_url)
    cluster.connect(address, region=region, cluster_file=cluster_file)
    pool = None
    try:
        nodes = cluster.discover_nodes()
        cluster.require_targets(nodes, spec.evaluate.targets)
        if carbon is not None:
            _check_node_regions(carbon, nodes)
        pool = WorkerPool(nodes)
        for node_id, facts in pool.hardware().items():
            node = next(n for n in nodes if n.node_id == node_id)
            store.upsert_node(node_id, node.node_type, node.region, facts.get("hostname"), facts)
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
            naive_stage_count=plan_.naive_stage_count,
        )
        click.echo(f"sweep {sweep_id} ({spec.name}): {len(plan_.points)} points, {len(plan_.stages)} unique "
                   f"stages (naive {plan_.naive_stage_count}) on {len(nodes)} node(s); store "
                   f"{mask_url(_db_url(db, spec.store_url))}")
        if cluster_file is not None:
            click.echo("note: a simulated cluster -- its node types share this one host, so their timings "
                       "and energy are not a hardware comparison")
        coord = Coordinator(store=store, spec=spec, plan=plan_, sweep_id=sweep_id, artifact_root=root,
                            pool=pool, progress=LineProgress(plan_), carbon=carbon)
        outcome = coord.run()
    finally:
        if pool is not None:
            pool.shutdown()
        cluster.shutdown()
    click.echo("")
    click.echo(render_results(store.results(sweep_id), "table"))
    counts = ", ".join(f"{n} {k}" for k, n in sorted(outcome.counts.items()))
    click.echo(f"sweep {sweep_id} {outcome.status} in {outcome.wall_s:.1f}s ({counts})")
    if outcome.status == "cancelled":
        sys.exit(130)
    if outcome.status != "succeeded":
        sys.exit(1)


# -- status / results ----------------------------------------------------------------------


def _resolve_sweep(store, sweep_id: str | None) -> str:
    if sweep_id is None:
        sweep_id = store.latest_sweep_id()
        if sweep_id is None:
            raise UsageError("no sweeps in this store yet -- run one with: greensweep run SPEC")
        return sweep_id
    if store.get_sweep(sweep_id) is None:
        raise UsageError(f"no sweep {sweep_id!r} in this store -- list sweeps with: greensweep status")
    return sweep_id


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
    for st in store.stages(sweep_id):
        where = f" @ {st.target}" if st.target else ""
        dur = f"{st.duration_s:7.1f}s" if st.duration_s is not None else " " * 8
        err = f"  {st.error}" if st.error else ""
        click.echo(f"  {st.status:<9} {st.kind:<9}{where:<10} {st.key[:12]} {dur} attempts {st.attempts}{err}")
        if st.status == "running":
            reports = store.progress(sweep_id, st.key)
            if reports:
                click.echo(f"            progress: {_progress_text(reports[-1])}")


@cli.command()
@click.argument("sweep_id", metavar="[SWEEP]", required=False)
@db_option
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def results(sweep_id: str | None, db: str | None, fmt: str) -> None:
    """Per-point results of SWEEP (default: the latest sweep)."""
    from orchestrator.report import render_results

    store = _open_store(db, must_exist=True)
    sweep_id = _resolve_sweep(store, sweep_id)
    click.echo(render_results(store.results(sweep_id), fmt))


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

    url = _db_url(db)
    rev = current(url)
    state = "up to date" if rev == head() else f"greensweep expects {head()} -- run: greensweep db upgrade --db {mask_url(url)}"
    click.echo(f"{mask_url(url)}: {rev or 'no schema'} ({state})")


# -- carbon --------------------------------------------------------------------------------


@cli.group()
def carbon() -> None:
    """Carbon-aware planning without a cluster."""


@carbon.command("plan")
@click.option("--instance", "instance_path", required=True, metavar="FILE.json",
              type=click.Path(dir_okay=False, path_type=Path),
              help="Scheduling instance (format: docs/scheduler-instance.md).")
@click.option("--policy", type=click.Choice(["fifo", "greedy-carbon", "carbon-deadline"]),
              default="carbon-deadline", show_default=True, help="Scheduling policy.")
def carbon_plan(instance_path: Path, policy: str) -> None:
    """Print the JSON plan POLICY makes for the instance in FILE.json."""
    from orchestrator.scheduler.instance import load_instance
    from orchestrator.scheduler.planner import plan as make_plan

    click.echo(json.dumps(make_plan(load_instance(instance_path), policy).to_json(), indent=2))


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
