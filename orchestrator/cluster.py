"""Ray connection and node discovery.

Every node that runs greensweep work carries two labels: ``greensweep/node-type`` (a
name such as ``gpu-a100`` or ``cpu-xeon``; ``local`` on the embedded default) and
``greensweep/region`` (a carbon region). Nodes without a node-type label are not used.
Hardware facts come from the node itself (``workers.hardware``), not from labels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from orchestrator.errors import CapabilityError, ClusterError, UsageError, first_line

if TYPE_CHECKING:
    from ray.cluster_utils import Cluster

NODE_TYPE_LABEL = "greensweep/node-type"
REGION_LABEL = "greensweep/region"
LOCAL_NODE_TYPE = "local"
# The local Ray's object store: artifacts travel through the artifact root, so the
# object store only carries small task/result objects.
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
# Ray runs its worker processes at nice 15 unless told otherwise: every stage would then
# lose the CPU to anything else on the node -- the coordinator, Ray's own daemons -- and a
# 2-thread evaluation on a 2-vCPU node stalls whenever either thread does (measured: the
# paired time ratio's round-to-round CV 7-12 % niced, see docs/BENCHMARKS.md). Clusters
# started by greensweep set 0; `ray start` nodes need RAY_worker_niceness=0 (README).
RAY_SYSTEM_CONFIG: dict[str, Any] = {"worker_niceness": 0}
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
    # What the node's own hardware facts say it runs: runtime -> precision -> why it
    # cannot (None: it can), as its worker read them on its device
    # (workers.hardware.runtime_precisions); None until they are read (with_facts).
    precisions: Mapping[str, Mapping[str, str | None]] | None = None

    def cannot_run(self, runtime: str, precision: str) -> str | None:
        """Why this node cannot run *runtime* at *precision* -- the runtime's declaration
        for the node's device kind, then the node's own answer (CPU features, the GPU);
        None when it can. A node whose facts were not read cannot be shown to, so it is
        refused."""
        from workers.backends import get_backend

        reason = get_backend(runtime).pairing(None, precision, device_kind(self))
        if reason is not None:
            return reason
        if self.precisions is None:
            return "it did not report which precisions it runs"
        answers = self.precisions.get(runtime)
        if answers is None:
            return f"{runtime} is not installed there"
        return answers.get(precision, f"{runtime} did not say whether it runs {precision} there")


def with_facts(node: NodeInfo, facts: Mapping[str, Any] | None) -> NodeInfo:
    """*node* knowing what its hardware *facts* (``WorkerPool.hardware()[node_id]``) say
    it runs."""
    precisions = (facts or {}).get("precisions")
    return dataclasses.replace(node, precisions=precisions if isinstance(precisions, Mapping) else None)


ADDRESS_PROBE_TIMEOUT_S = 5.0


def probe_address(address: str) -> None:
    """Fail fast, with one line, when a ``host:port`` or ``ray://host:port`` address does
    not accept connections, or when the GCS at ``host:port`` refuses this process's auth
    token (see :func:`prepare_token_auth`, which should run first): ``ray.init`` would
    otherwise retry for seconds to minutes and print its own warnings. ``auto`` and
    addresses without a port are left to Ray."""
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
    if address.startswith("ray://"):
        return  # the Ray client server, not a GCS: its auth errors surface from ray.init
    _probe_gcs_auth(address)


# -- token authentication ---------------------------------------------------------------
# Ray >= 2.52 clusters may require a shared token on every RPC (RAY_AUTH_MODE=token).
# `ray start --head` turns it on by itself when the head has a token (~/.ray/auth_token,
# which any local `ray.init()` writes), but a joining node or a driver given an explicit
# address never does: without RAY_AUTH_MODE=token it sends no token and is refused.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
_TOKEN_FIX = (f"export {AUTH_TOKEN_ENV}=<the output of `ray get-auth-token` on the head> "
              f"(or copy the head's {DEFAULT_TOKEN_PATH} here)")


def token_source() -> str | None:
    """Where Ray will read this process's auth token from, named for messages, or None
    when there is none: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` names,
    else ``~/.ray/auth_token`` -- Ray's own order. The token itself is never returned,
    so no message can carry it.

    Raises :class:`ClusterError` when ``RAY_AUTH_TOKEN_PATH`` names a missing or empty
    file (Ray would refuse it too, with a traceback).
    """
    if os.environ.get(AUTH_TOKEN_ENV, "").strip():
        return AUTH_TOKEN_ENV
    named = os.environ.get(AUTH_TOKEN_PATH_ENV)
    if named:
        if not _nonempty_file(Path(named)):
            raise ClusterError(
                f"{AUTH_TOKEN_PATH_ENV}={named} is not a readable, non-empty file -- point it at the file that holds "
                f"the cluster's token, or unset it and {_TOKEN_FIX}"
            )
        return f"{AUTH_TOKEN_PATH_ENV} ({named})"
    if _nonempty_file(DEFAULT_TOKEN_PATH.expanduser()):
        return str(DEFAULT_TOKEN_PATH)
    return None


def _nonempty_file(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return False


def _auth_mode() -> str | None:
    mode = os.environ.get(AUTH_MODE_ENV)
    return mode.strip().lower() if mode is not None else None


def prepare_token_auth() -> None:
    """Send this process's token to the cluster whenever it has one.

    With ``RAY_AUTH_MODE`` unset and a token available, token mode is switched on for
    this process, as Ray itself does for ``address="auto"``: a cluster without token
    auth ignores the token, one with it needs it. An explicit ``RAY_AUTH_MODE`` is
    respected. ``RAY_AUTH_MODE=token`` without any token fails here with the fix, not
    deep inside ``ray.init``.
    """
    mode = _auth_mode()
    if mode not in (None, "token"):
        return  # an explicit opt-out: Ray sends no token and reads none
    source = token_source()
    if mode is None and source is not None:
        _set_auth_mode("token")
    elif mode == "token" and source is None:
        raise ClusterError(f"{AUTH_MODE_ENV}=token but no Ray auth token was found -- {_TOKEN_FIX}")


def _set_auth_mode(mode: str | None) -> None:
    """Set (or, with None, unset) ``RAY_AUTH_MODE`` for this process and its children,
    and make Ray's already-loaded config see it."""
    if mode is None:
        os.environ.pop(AUTH_MODE_ENV, None)
    else:
        os.environ[AUTH_MODE_ENV] = mode
    from ray._raylet import Config

    Config.initialize("")


def _probe_gcs_auth(address: str) -> None:
    """Ask the GCS at *address* for its cluster id with this process's credentials, once,
    within :data:`ADDRESS_PROBE_TIMEOUT_S`, and turn a refused token into one line.

    ``ray.init`` would retry a refused token for ~20 s, print a warning per attempt and
    end with a traceback. Ray's client logs each failed attempt straight to file
    descriptor 2, so the probe runs with it silenced. Errors other than authentication
    are left to ``ray.init``, whose retries cover a head that is still starting.
    """
    try:
        from ray._raylet import InnerGcsClient
        from ray.exceptions import AuthenticationError
    except ImportError:  # a Ray without token auth: nothing to probe
        return
    try:
        with _fd2_silenced():
            InnerGcsClient.standalone(address, None, int(ADDRESS_PROBE_TIMEOUT_S * 1000))
    except AuthenticationError:
        raise ClusterError(auth_failure_message(address)) from None
    except Exception:  # noqa: BLE001 - not an auth problem; ray.init reports it
        return


def auth_failure_message(address: str) -> str:
    """One line for a cluster at *address* that refused this process, naming which of
    token, token source or mode is wrong and the fix; never the token."""
    mode = _auth_mode()
    try:
        source = token_source()
    except ClusterError:  # a RAY_AUTH_TOKEN_PATH Ray ignores in this mode
        source = None
    if mode is not None and mode != "token":
        return (f"Ray at {address} requires token authentication but {AUTH_MODE_ENV}={mode} here -- "
                f"export {AUTH_MODE_ENV}=token" + ("" if source else f" and {_TOKEN_FIX}"))
    if source is None:
        return f"Ray at {address} requires token authentication and no Ray auth token was found here -- {_TOKEN_FIX}"
    return f"Ray at {address} rejected the auth token from {source}: it is not this cluster's token -- {_TOKEN_FIX}"


@contextlib.contextmanager
def _fd2_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _is_auth_failure(exc: BaseException) -> bool:
    """Whether *exc* (from ``ray.init``) is, or wraps as text, a refused token."""
    from ray.exceptions import AuthenticationError

    return isinstance(exc, AuthenticationError) or "InvalidAuthToken" in str(exc) or "AuthenticationError" in str(exc)


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
                _system_config=dict(RAY_SYSTEM_CONFIG),
                **common,
            )
        else:
            _connect_address(address, common)
    except ClusterError:
        raise
    except (ConnectionError, TimeoutError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
        where = address or "a local Ray"
        if address is not None and _is_auth_failure(e):
            raise ClusterError(auth_failure_message(address)) from None
        raise ClusterError(
            f"cannot connect to Ray at {where}: {first_line(e)} -- check that the cluster is up "
            "(`ray status --address ...`) or omit --address to run locally"
        ) from None


def _connect_address(address: str, common: dict[str, Any]) -> None:
    """Connect this process to the running cluster at *address* (``host:port``,
    ``ray://host:port`` or ``auto``), with its auth token when it has one.

    Reachability and the token are checked before ``ray.init``, each failing with one
    line; a mode this function switched on is switched off again if connecting fails.
    """
    import ray

    mode_before = os.environ.get(AUTH_MODE_ENV)
    prepare_token_auth()
    try:
        if address == "auto":
            resolved = _resolve_auto()
            if resolved is not None:
                probe_address(resolved)
        else:
            probe_address(address)
        ray.init(address=address, **common)
    except BaseException:
        if mode_before is None and os.environ.get(AUTH_MODE_ENV) is not None:
            _set_auth_mode(None)
        raise


def _resolve_auto() -> str | None:
    """The GCS address ``auto`` stands for (``RAY_ADDRESS`` or the last ``ray start`` on
    this machine), or None when Ray cannot tell: then ``ray.init`` says why."""
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address("auto")
    except Exception:  # noqa: BLE001 - only a probe; ray.init gives the real error
        return None


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
        cluster.add_node(num_cpus=0, _system_config=dict(RAY_SYSTEM_CONFIG), **node_common)
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


def require_runtimes(plan: Any, nodes: list[NodeInfo], facts: Mapping[str, Mapping[str, Any]]) -> None:
    """Fail before any work starts when an evaluation's runtime is not installed on a
    live node of its target, or cannot run its precision on that node's device kind
    (*facts*: :meth:`~orchestrator.pool.WorkerPool.hardware`, read on each node)."""
    from workers.backends import get_backend

    asked = sorted({(s.target, s.params.get("runtime", "torch"), s.params.get("precision", "fp32"))
                    for s in plan.stages if s.target is not None})
    for target, runtime, precision in asked:
        spec = get_backend(runtime)
        for node in (n for n in nodes if n.node_type == target):
            if device_kind(node) not in spec.devices:  # installing it would not help
                raise CapabilityError(
                    f"evaluate.runtimes: {runtime} does not run on {device_kind(node)} nodes ({target} node "
                    f"{node.node_id[:12]}) -- evaluate it on a target with {spec.hardware_for(precision)}, or "
                    "remove the runtime")
            installed = (facts.get(node.node_id, {}).get("runtimes") or {}).get(runtime)
            if installed is None:
                raise ClusterError(
                    f"evaluate.runtimes: {runtime} is not installed on node {node.node_id[:12]} ({target}) -- "
                    f"pip install {spec.install_hint(device_kind(node))} on that node, or remove the runtime"
                )
            reason = spec.pairing(None, precision, device_kind(node))
            if reason is None:  # the node's own answer: CPU features, providers, capabilities
                checked = (facts.get(node.node_id, {}).get("precisions") or {}).get(runtime) or {}
                reason = checked.get(precision)
            if reason is not None:
                raise CapabilityError(f"evaluate.precision: {reason} ({target} node {node.node_id[:12]}) -- remove "
                                      f"{precision} or the target")


def require_needs(plan: Any, nodes: list[NodeInfo]) -> None:
    """Fail before any work starts when a stage needs what no live node it may run on
    can give (its kind's ``needs``: a training stage at bf16 needs a node whose CPU has
    AVX512-BF16 or AMX or whose GPU has bf16), with one line naming the stage, what it
    needs, why the nodes cannot and the fix. *nodes* carry their facts (:func:`with_facts`);
    for a local run that is this machine."""
    from workers.backends import get_backend
    from workers.stages.registry import get_kind, stage_label

    unmet: dict[tuple[str, str], list[Any]] = {}  # (runtime, precision) -> stages needing it, in plan order
    why: dict[tuple[str, str], dict[str, list[NodeInfo]]] = {}
    for stage in plan.stages:
        kind = get_kind(stage.kind)
        places = nodes if kind.flexible else [n for n in nodes if n.node_type == stage.target]
        for need in kind.needs(stage.params):
            reasons = {n.node_id: n.cannot_run(*need) for n in places}
            if places and any(r is None for r in reasons.values()):
                continue
            unmet.setdefault(need, []).append(stage)
            for n in places:
                why.setdefault(need, {}).setdefault(str(reasons[n.node_id]), []).append(n)
    if not unmet:
        return
    (runtime, precision), stages = next(iter(unmet.items()))
    more = f" (and {len(stages) - 1} more stage(s))" if len(stages) > 1 else ""
    because = "; ".join(f"{reason} ({_node_names(group)})"
                        for reason, group in why.get((runtime, precision), {}).items()) or "no node may run it"
    raise CapabilityError(
        f"{stage_label(stages[0].kind, stages[0].params)}{more}: precision {precision} runs on no live node -- "
        f"{because}; use precision: fp32, or add a node with {get_backend(runtime).hardware_for(precision)}"
    )


def _node_names(nodes: list[NodeInfo], shown: int = 3) -> str:
    names = [f"{n.node_type} node {n.node_id[:12]}" for n in nodes[:shown]]
    return ", ".join(names) + (f" and {len(nodes) - shown} more" if len(nodes) > shown else "")


def device_kind(node: NodeInfo) -> str:
    """The device kind an evaluation on *node* runs on: ``cuda`` where it has a GPU."""
    return "cuda" if node.num_gpus > 0 else "cpu"


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
