"""Ray connection and node discovery.

Every node that runs greensweep work carries two labels: ``greensweep/node-type`` (a
name such as ``gpu-a100`` or ``cpu-xeon``; ``local`` on the embedded default) and
``greensweep/region`` (a carbon region). Nodes without a node-type label are not used.
Hardware facts come from the node itself (``workers.hardware``), not from labels.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from orchestrator.errors import ClusterError

NODE_TYPE_LABEL = "greensweep/node-type"
REGION_LABEL = "greensweep/region"
LOCAL_NODE_TYPE = "local"
# The local Ray's object store: artifacts travel through the artifact root, so the
# object store only carries small task/result objects.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    node_type: str
    region: str | None
    num_cpus: int
    num_gpus: int
    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


def connect(address: str | None, *, region: str | None = None, num_cpus: int | None = None) -> None:
    """Start a local single-node Ray (address None) or connect to a running cluster.

    The local Ray binds to 127.0.0.1, runs without the dashboard and labels its only
    node ``greensweep/node-type=local``.
    """
    import ray  # lazy: ~1 s import

    if ray.is_initialized():
        return
    common: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        if address is None:
            labels = {NODE_TYPE_LABEL: LOCAL_NODE_TYPE}
            if region:
                labels[REGION_LABEL] = region
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                labels=labels,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                _node_ip_address="127.0.0.1",
                **common,
            )
        else:
            ray.init(address=address, **common)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        where = address or "a local Ray"
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise ClusterError(
            f"cannot connect to Ray at {where}: {first} -- check that the cluster is up "
            "(`ray status --address ...`) or omit --address to run locally"
        ) from None


def shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


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
                "start such a node or remove the target"
            )
