"""The simulated heterogeneous cluster (clusters/local-sim.yaml) on a real local Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from orchestrator import cluster
from orchestrator.catalog import CLUSTERS_DIR, load_simulated_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
SIM_FILE = CLUSTERS_DIR / "local-sim.yaml"


@pytest.fixture
def simulated() -> Iterator[None]:
    cluster.start_simulated(SIM_FILE)
    try:
        yield
    finally:
        cluster.shutdown()


def _own_labels() -> dict[str, str]:
    import ray

    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    return {"node_id": node_id, **node["Labels"]}


def test_simulated_cluster_nodes_labels_and_pinned_tasks(simulated: None) -> None:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    expected = sorted(
        (n.node_type, n.region, n.num_cpus) for n in load_simulated_cluster(SIM_FILE).nodes for _ in range(n.count)
    )
    nodes = cluster.discover_nodes()
    assert sorted((n.node_type, n.region, n.num_cpus) for n in nodes) == expected
    assert len(cluster.unlabelled_nodes()) == 1  # the head: 0 CPUs, no greensweep label

    probe = ray.remote(num_cpus=0)(_own_labels)
    for n in nodes:
        seen = ray.get(probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False)).remote())
        assert seen["node_id"] == n.node_id
        assert seen[cluster.NODE_TYPE_LABEL] == n.node_type and seen[cluster.REGION_LABEL] == n.region

    facts = cluster.describe_nodes(nodes)
    assert set(facts) == {n.node_id for n in nodes}
    assert all(f["cpu_count_logical"] for f in facts.values())


def test_shutdown_stops_the_simulated_cluster() -> None:
    import ray

    cluster.start_simulated(SIM_FILE)
    cluster.shutdown()
    assert not ray.is_initialized() and cluster._simulated is None


def test_nodes_command_lists_the_simulated_node_types() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "nodes", "--cluster", str(SIM_FILE)],
        capture_output=True, text=True, timeout=90, env={**os.environ, "GREENSWEEP_DEBUG": ""},
    )
    assert proc.returncode == 0, proc.stderr
    assert "cpu-small" in proc.stdout and "cpu-xeon" in proc.stdout
    assert "FR" in proc.stdout and "DE" in proc.stdout
    assert "unlabelled, not used" in proc.stdout


def test_cluster_and_address_are_exclusive() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "nodes", "--cluster", str(SIM_FILE), "--address", "auto"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "mutually exclusive" in proc.stderr
