"""Ray connection and node discovery.

Every node that runs greensweep work carries two labels: ``greensweep/node-type`` (a
name such as ``gpu-a100`` or ``cpu-xeon``; ``local`` on the embedded default) and
``greensweep/region`` (a carbon region). Nodes without a node-type label are not used.
Hardware facts come from the node itself (``workers.hardware``), not from labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from orchestrator.errors import ClusterError, UsageError, first_line

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

NODE_TYPE_LABEL = "greensweep/node-type"
REGION_LABEL = "greensweep/region"
LOCAL_NODE_TYPE = "local"
# The local Ray's object store: artifacts travel through the artifact root, so the
# object store only carries small task/result objects.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
# Each simulated node's object store (Ray's minimum is ~75 MiB); small for the same reason.
SIM_OBJECT_STORE_BYTES = 128 * 1024**2
_LOOPBACK = "127.0.0.1"

# The simulated cluster this process started, torn down by shutdown().
_simulated: Cluster | None = None


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    node_type: str
    region: str | None
    num_cpus: int
    num_gpus: int
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


ADDRESS_PROBE_TIMEOUT_S = 5.0


def probe_address(address: str) -> None:
    """Fail fast, with one line, when a ``host:port`` or ``ray://host:port`` address does
    not accept connections: ``ray.init`` would otherwise retry for minutes and print
    its own warnings. ``auto`` and addresses without a port are left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host, int(port)), timeout=ADDRESS_PROBE_TIMEOUT_S).close()
    except OSError as e:
        reason = e.strerror or e.__class__.__name__
        raise ClusterError(
            f"cannot reach Ray at {address}: {reason} -- check that the cluster is up and the address "
            "is the head's GCS (host:6379) or Ray client (ray://host:10001) address, or omit --address to run locally"
        ) from None


def connect(
    address: str | None,
    *,
    region: str | None = None,
    num_cpus: int | None = None,
    cluster_file: Path | str | None = None,
) -> None:
    """Start a local single-node Ray (address None), start the simulated cluster in
    *cluster_file*, or connect to a running cluster at *address*.

    The local Ray binds to 127.0.0.1, runs without the dashboard and labels its only
    node ``greensweep/node-type=local``. *address* and *cluster_file* are exclusive.
    """
    if cluster_file is not None:
        if address is not None:
            raise UsageError("--cluster and --address are mutually exclusive -- give one of them")
        start_simulated(cluster_file)
        return
    import ray  # lazy: ~1 s import

    if ray.is_initialized():
        return
    common: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        if address is None:
            _loopback_only()
            labels = {NODE_TYPE_LABEL: LOCAL_NODE_TYPE}
            if region:
                labels[REGION_LABEL] = region
            ray.init(
                address="local",  # a new Ray of our own, even when another runs on this machine
                num_cpus=num_cpus or os.cpu_count() or 1,
                labels=labels,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                _node_ip_address="127.0.0.1",
                **common,
            )
        else:
            probe_address(address)
            ray.init(address=address, **common)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        where = address or "a local Ray"
        raise ClusterError(
            f"cannot connect to Ray at {where}: {first_line(e)} -- check that the cluster is up "
            "(`ray status --address ...`) or omit --address to run locally"
        ) from None


def _loopback_only() -> None:
    """Make the Ray this process starts bind and advertise 127.0.0.1 only.

    Without this, Ray ignores ``_node_ip_address`` for its listeners: the GCS, raylet and
    workers listen on every interface (``::``) and the node advertises the outbound
    address -- a local sweep reachable from the network. The environment variable is
    inherited by every raylet and worker started afterwards; the constant is read once,
    at import, so a process that imported Ray earlier needs it patched too.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_simulated(path: Path | str) -> None:
    """Start the simulated heterogeneous cluster described by *path* on this host and
    connect this process to it.

    The head node has 0 CPUs and no greensweep label, so all work lands on the labelled
    worker nodes. Every node binds to 127.0.0.1 without the dashboard. The file is fully
    validated (node types, regions) before any Ray process starts; if a node fails to
    start, the nodes already started are torn down. :func:`shutdown` stops the cluster.
    """
    global _simulated
    from orchestrator.catalog import load_simulated_cluster

    sim = load_simulated_cluster(path)
    _loopback_only()
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized() or _simulated is not None:
        raise ClusterError("Ray is already running in this process -- shut it down before starting a simulated cluster")
    node_common: dict[str, Any] = dict(
        node_ip_address=_LOOPBACK, include_dashboard=False, object_store_memory=SIM_OBJECT_STORE_BYTES,
    )
    cluster = Cluster()
    try:
        cluster.add_node(num_cpus=0, **node_common)
        for node in sim.nodes:
            labels = {NODE_TYPE_LABEL: node.node_type, REGION_LABEL: node.region}
            for _ in range(node.count):
                cluster.add_node(num_cpus=node.num_cpus, labels=labels, **node_common)
        ray.init(address=cluster.address, _node_ip_address=_LOOPBACK, logging_level="ERROR", log_to_driver=False)
    except Exception as e:
        cluster.shutdown()
        raise ClusterError(f"cannot start the simulated cluster {sim.name!r} from {path}: {first_line(e)}") from None
    _simulated = cluster


def shutdown() -> None:
    """Disconnect from Ray, and stop the simulated cluster if this process started one."""
    global _simulated
    import ray

    if ray.is_initialized():
        ray.shutdown()
    if _simulated is not None:
        _simulated.shutdown()
        _simulated = None


def discover_nodes() -> list[NodeInfo]:
    """Live Ray nodes that carry a greensweep node-type label, sorted by node type."""
    import ray

    out = []
    for n in ray.nodes():
        if not n.get("Alive"):
            continue
        labels = dict(n.get("Labels") or {})
        node_type = labels.get(NODE_TYPE_LABEL)
        if not node_type:
            continue
        res = n.get("Resources") or {}
        out.append(NodeInfo(
            node_id=n["NodeID"],
            node_type=node_type,
            region=labels.get(REGION_LABEL),
            num_cpus=int(res.get("CPU", 0)),
            num_gpus=int(res.get("GPU", 0)),
            address=n.get("NodeManagerAddress", ""),
            labels=labels,
        ))
    return sorted(out, key=lambda x: (x.node_type, x.node_id))


def unlabelled_nodes() -> list[str]:
    """Ids of live Ray nodes without a greensweep node-type label; greensweep never
    places work on them (e.g. a simulated cluster's head, or a node started without
    ``--labels``), and says so rather than ignoring them silently."""
    import ray

    return sorted(
        n["NodeID"] for n in ray.nodes()
        if n.get("Alive") and not (n.get("Labels") or {}).get(NODE_TYPE_LABEL)
    )


def describe_nodes(nodes: list[NodeInfo], timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
    """Hardware facts per node id, each read *on that node* by a task pinned to it
    (``NodeAffinitySchedulingStrategy``, hard), so they describe the machine, not the
    coordinator. The task asks for 0 CPUs, so busy nodes still answer.

    Raises :class:`ClusterError` when a node does not answer within *timeout_s*.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from workers.hardware import describe_node

    probe = ray.remote(num_cpus=0, max_retries=0)(describe_node)
    refs = {
        n.node_id: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=n.node_id, soft=False)
        ).remote()
        for n in nodes
    }
    try:
        facts = ray.get(list(refs.values()), timeout=timeout_s)
    except ray.exceptions.RayError as e:  # includes GetTimeoutError
        raise ClusterError(f"cannot read hardware facts from every node: {first_line(e)} -- check `ray status`") from None
    return dict(zip(refs, facts))


def require_targets(nodes: list[NodeInfo], targets: tuple[str, ...]) -> None:
    """Fail before any work starts when an evaluation target has no live node."""
    if not nodes:
        raise ClusterError(
            f"no Ray node carries the label {NODE_TYPE_LABEL} -- start nodes with "
            f"--labels='{{\"{NODE_TYPE_LABEL}\": \"<type>\", \"{REGION_LABEL}\": \"<region>\"}}'"
        )
    have = {n.node_type for n in nodes}
    for t in targets:
        if t not in have:
            raise ClusterError(
                f"evaluate.targets: no live node of type {t!r} (live node types: {', '.join(sorted(have))}) -- "
                f"start such a node or remove the target{_simulated_hint(t)}"
            )


def _simulated_hint(node_type: str) -> str:
    """How to try *node_type* on one machine, when the shipped simulated cluster has it."""
    from orchestrator.catalog import CLUSTERS_DIR, load_simulated_cluster

    path = CLUSTERS_DIR / "local-sim.yaml"
    try:
        types = sorted({n.node_type for n in load_simulated_cluster(path).nodes})
    except Exception:  # noqa: BLE001 - a hint only; a broken or missing file gives none
        return ""
    if node_type not in types:
        return ""
    return f", or simulate it on this machine with --cluster {path} ({', '.join(types)} on one host)"
