"""``greensweep carbon``: offline carbon-aware plans, and what a sweep's placement saved."""

from __future__ import annotations

import json
from pathlib import Path

import click

from orchestrator.cli._common import _open_store, _resolve_sweep, db_option
from orchestrator.errors import UsageError


@click.group()
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
