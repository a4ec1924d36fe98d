"""``greensweep nodes``: the Ray nodes a sweep would use."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
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
