"""The run lifecycle of a sweep, callable from Python as from the CLI.

``greensweep run`` / ``resume`` are thin shells over this module: it connects to Ray (or
starts the local / simulated one), checks the nodes against the spec (node types,
runtimes, the precisions each node's own hardware runs), opens the store only once
those check out (a bad ``--cluster`` or ``--address``, or a precision no node runs,
leaves no new store behind), records the nodes, creates the sweep or takes over an
existing one, builds the resume state, drives the
:class:`~orchestrator.coordinator.Coordinator` and shuts everything it started down
again. No click here: what a user should read goes through
a :class:`Reporter` (the CLI prints it; Python callers get :class:`QuietReporter`, which
logs). Errors are the project's own (:mod:`orchestrator.errors`), which the CLI maps to
exit codes::

    from orchestrator import run_sweep
    outcome = run_sweep("examples/quickstart.yaml", db="sqlite:///sweeps.db")
    outcome.sweep_id, outcome.status      # ('sw-0123456789ab', 'succeeded')
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from orchestrator.errors import UsageError, mask_url

DEFAULT_ARTIFACTS = "./.greensweep/artifacts"

log = logging.getLogger("greensweep")


def node_cache_dir() -> str:
    """Where each node keeps its artifacts when nodes share no disk (``--artifacts
    object-store``): ``GREENSWEEP_NODE_CACHE``, default ``<tmp>/greensweep-node-cache``, on the node."""
    import tempfile

    return os.environ.get("GREENSWEEP_NODE_CACHE") or f"{tempfile.gettempdir()}/greensweep-node-cache"


def artifact_root() -> str:
    """The artifact root of a new sweep: ``GREENSWEEP_ARTIFACTS``, default ``./.greensweep/artifacts``."""
    return str(Path(os.environ.get("GREENSWEEP_ARTIFACTS", DEFAULT_ARTIFACTS)).resolve())


def db_url(db: str | None, spec_store: str | None = None) -> str:
    """The store URL: *db* (``--db`` / ``GREENSWEEP_DB_URL``), else the spec's ``store:``, else the default file."""
    from orchestrator.store import default_db_url

    return db or spec_store or default_db_url()


def open_store(db: str | None, spec_store: str | None = None, *, must_exist: bool = False) -> Any:
    """Open the store; read-only uses (*must_exist*) refuse to create a new SQLite file,
    so a mistyped URL is an error rather than an empty store."""
    from orchestrator.store import Store, sqlite_file

    url = db_url(db, spec_store)
    path = sqlite_file(url)
    if must_exist and path is not None and not path.exists():
        raise UsageError(
            f"no store at {path} -- run a sweep first (greensweep run SPEC) or point --db at an existing store"
        )
    return Store.open(url, create=not must_exist)


class Reporter(Protocol):
    """Where the lifecycle's messages go: the CLI prints them, Python callers log them."""

    def note(self, line: str) -> None:
        """One line for the user (what runs where, warnings about the setup)."""
        ...

    def display(self, plan: Any, initial_status: dict[str, str]) -> Any:
        """The :class:`~orchestrator.coordinator.Progress` that receives the sweep's
        stage events; its ``close()`` is called when the sweep ends."""
        ...


class _LoggedProgress:
    """Stage events as debug log records; warnings as warnings."""

    def warning(self, message: str) -> None:
        log.warning(message)

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., None]:
        def event(stage: Any = None, *args: Any) -> None:
            log.debug("%s %s", name, getattr(stage, "label", stage))
        return event


class QuietReporter:
    """The default for Python callers: nothing printed; notes are ``INFO`` records of
    the ``greensweep`` logger, stage events ``DEBUG`` ones."""

    def note(self, line: str) -> None:
        log.info(line)

    def display(self, plan: Any, initial_status: dict[str, str]) -> Any:
        return _LoggedProgress()


def _carbon_provider(spec: Any) -> Any:
    """The spec's carbon provider (data and credentials read now), or None without a
    ``carbon:`` section."""
    if spec.carbon is None:
        return None
    from orchestrator.carbon import make_provider

    return make_provider(spec.carbon)


def _check_node_regions(provider: Any, nodes: list[Any], reporter: Reporter) -> None:
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
        reporter.note(f"warning: region {r!r} has no intensity data; carbon uses the spec's fallback (labelled)")


def _stop_on_sigterm() -> Callable[[], None]:
    """``kill PID`` (SIGTERM) stops a sweep as Ctrl-C does: running stages are cancelled,
    the sweep is marked cancelled (resumable), the simulated cluster is shut down. A
    second SIGTERM is not caught. Returns what puts the process's own handler back once
    the sweep ended. Only the main thread may set a signal handler; a sweep run from
    another thread keeps the process's own."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def resume_state(store: Any, sweep_id: str, plan: Any, root: str) -> dict[str, str]:
    """What a resumed sweep need not run again: stages whose result is in the store and
    whose artifact is present and passes its checksum. Interrupted stages (left
    ``running`` by a dead coordinator) lose their attempt; failed and skipped ones run again."""
    from workers.artifacts import verified_manifest
    from workers.stages.registry import get_kind

    store.interrupted_stages(sweep_id)
    recorded = {st.key: st.status for st in store.stages(sweep_id)}
    state: dict[str, str] = {}
    for st in plan.stages:
        status = recorded.get(st.key)
        if status not in ("succeeded", "reused"):
            continue
        if get_kind(st.kind).produces_artifact and verified_manifest(root, st.key) is None:
            continue  # missing or tampered: run it again
        state[st.key] = status
    for st in plan.stages:  # a stage whose parent runs again must run again too
        if st.parent_key is not None and st.parent_key not in state:
            state.pop(st.key, None)
    return state


def execute(spec: Any, plan: Any, store: Any, *, db_url: str, address: str | None = None,
            region: str | None = "local", cluster_file: Path | str | None = None, max_attempts: int | None = None,
            reporter: Reporter | None = None, spec_dir: str | None = None, resume_id: str | None = None,
            transfer: str = "auto") -> tuple[Any, Any]:
    """Run a new sweep of *plan* (``resume_id`` None) or finish sweep *resume_id*.

    *store* is an open store, or a callable that opens it (called only once Ray, the
    nodes and the carbon data check out). Returns ``(outcome, store)``: the
    :class:`~orchestrator.coordinator.SweepOutcome` and the open store (the caller
    closes it). Ray, the workers and a simulated cluster this started are shut down.
    """
    from orchestrator import cluster
    from orchestrator.coordinator import Coordinator, RunOptions, coordinator_gone, coordinator_id
    from orchestrator.pool.ray import RayWorkerPool
    from orchestrator.scheduler.online import make_placer, policy_for

    reporter = reporter or QuietReporter()
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
    restore_sigterm = _stop_on_sigterm()  # after connecting: Ray's own would print a stack, leave nodes behind
    pool = None
    display = None
    placer = None
    try:
        nodes = cluster.discover_nodes()
        cluster.require_targets(nodes, spec.evaluate.targets)
        if carbon is not None:
            _check_node_regions(carbon, nodes, reporter)
        pool = RayWorkerPool(nodes, cache_dir=node_cache_dir() if options.transfer == "object-store" else None)
        hardware = pool.hardware()
        cluster.require_runtimes(plan, nodes, hardware)
        pool.learn(hardware)  # what each node's own hardware runs: placement and the check below
        cluster.require_needs(plan, [slot.node for slot in pool.slots])
        if callable(store):  # only once the nodes can run the sweep: a refused one leaves no new store
            store = store()
        for node_id, facts in hardware.items():
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
                         "target": s.target} for s in plan.stages],
                points=[{"point_index": p.index, "label": p.label, "pipeline": p.pipeline,
                         "stage_keys": list(p.stage_keys), "target": p.target, "eval_key": p.eval_key}
                        for p in plan.points],
                naive_stage_count=plan.naive_stage_count, spec_dir=spec_dir,
                options={**options.to_json(), "policy": policy_for(spec)},
            )
            store.take_sweep(sweep_id, coordinator_id(), stale_after_s=options.stale_after_s)
            reporter.note(f"sweep {sweep_id} ({spec.name}): {len(plan.points)} points, {len(plan.stages)} unique "
                          f"stages (naive {plan.naive_stage_count}) on {len(nodes)} node(s); store {mask_url(db_url)}")
        else:
            sweep_id = resume_id
            root = store.get_sweep(sweep_id).artifact_root
            store.take_sweep(sweep_id, coordinator_id(), stale_after_s=options.stale_after_s, gone=coordinator_gone)
            initial = resume_state(store, sweep_id, plan, root)
            done = sum(1 for v in initial.values() if v in ("succeeded", "reused"))
            reporter.note(f"resuming sweep {sweep_id} ({spec.name}): {done} of {len(plan.stages)} stages done, "
                          f"the rest run now on {len(nodes)} node(s); store {mask_url(db_url)}")
        if cluster_file is not None:
            reporter.note("note: a simulated cluster -- its node types share this one host, so their timings "
                          "and energy are not a hardware comparison")
        display = reporter.display(plan, initial)
        # the deadline runs from the sweep's creation, also when it is resumed
        started_at = datetime.now(timezone.utc) if resume_id is None else store.get_sweep(sweep_id).created_at
        placer = make_placer(spec, store, carbon, started_at, display.warning)
        coord = Coordinator(store=store, spec=spec, plan=plan, sweep_id=sweep_id, artifact_root=root,
                            pool=pool, progress=display, carbon=carbon, placer=placer, options=options,
                            initial_status=initial)
        outcome = coord.run()
        outcome.carbon_aware = placer is not None
    finally:
        if placer is not None:
            placer.close()  # stops its intensity refresher
        if display is not None:
            display.close()
        if pool is not None:
            pool.shutdown()
        cluster.shutdown()
        restore_sigterm()
    return outcome, store


def start(spec_path: Path | str, *, db: str | None = None, address: str | None = None,
          cluster: Path | str | None = None, region: str | None = "local", max_attempts: int | None = None,
          transfer: str = "auto", reporter: Reporter | None = None) -> tuple[Any, Any]:
    """Parse and plan the spec at *spec_path*, then :func:`execute` it as a new sweep.
    A bad spec raises :class:`~orchestrator.errors.SpecError` before anything is written."""
    from orchestrator.plan import build_plan
    from orchestrator.spec import load_spec

    if cluster is not None and address is not None:
        raise UsageError("give either --cluster (start a simulated cluster) or --address (join a running one), not both")
    spec_path = Path(spec_path)
    spec = load_spec(spec_path)
    plan = build_plan(spec)
    return execute(spec, plan, lambda: open_store(db, spec.store_url), db_url=db_url(db, spec.store_url),
                   address=address, region=region, cluster_file=cluster, max_attempts=max_attempts,
                   reporter=reporter, spec_dir=str(spec_path.resolve().parent), transfer=transfer)


def resume(store: Any, sweep_id: str, *, db: str | None = None, address: str | None = None,
           cluster: Path | str | None = None, region: str | None = "local", max_attempts: int | None = None,
           reporter: Reporter | None = None) -> Any:
    """Finish *sweep_id* (an id or a unique prefix) in the open *store*; the
    :class:`~orchestrator.coordinator.SweepOutcome`, or None when the sweep had already
    succeeded (nothing ran). Refused when the spec now plans different stages."""
    from orchestrator.export import resolve_sweep
    from orchestrator.plan import build_plan
    from orchestrator.spec import parse_spec

    if cluster is not None and address is not None:
        raise UsageError("give either --cluster or --address, not both")
    sweep_id = resolve_sweep(store, sweep_id)
    record = store.get_sweep(sweep_id)
    if record.status == "succeeded":
        return None
    spec = parse_spec(record.spec_text, base_dir=record.spec_dir or ".", artifact_root=record.artifact_root)
    plan = build_plan(spec)
    if {s.key for s in plan.stages} != {st.key for st in store.stages(sweep_id)}:
        raise UsageError(f"sweep {sweep_id}'s spec now plans different stages (a file it names changed since, "
                         "e.g. its checkpoint) -- start a new sweep with: greensweep run SPEC")
    outcome, _ = execute(spec, plan, store, db_url=db_url(db), address=address, region=region, cluster_file=cluster,
                         max_attempts=max_attempts, reporter=reporter, resume_id=sweep_id)
    return outcome


def run_sweep(spec_path: Path | str, *, db: str | None = None, address: str | None = None,
              cluster: Path | str | None = None, region: str | None = "local", max_attempts: int | None = None,
              transfer: str = "auto", reporter: Reporter | None = None) -> Any:
    """Run the sweep in *spec_path* to its end, quietly by default; its
    :class:`~orchestrator.coordinator.SweepOutcome` (``sweep_id``, ``status``:
    succeeded / partial / failed / cancelled, ``counts``, ``wall_s``).

    *db*: store URL (default: ``GREENSWEEP_DB_URL``, the spec's ``store:``, else
    ``./.greensweep/greensweep.db``). *address*: a Ray cluster to join; *cluster*: a
    simulated cluster file to start (default: a local Ray). Raises the project's errors:
    :class:`~orchestrator.errors.SpecError` for a bad spec, ``ClusterError``,
    ``StoreError``, ``UsageError``... -- a finished sweep with failed stages is an
    outcome, not an error.
    """
    outcome, store = start(spec_path, db=db if db is not None else os.environ.get("GREENSWEEP_DB_URL"),
                           address=address, cluster=cluster, region=region, max_attempts=max_attempts,
                           transfer=transfer, reporter=reporter)
    store.close()
    return outcome


def resume_sweep(sweep_id: str, *, db: str | None = None, address: str | None = None,
                 cluster: Path | str | None = None, region: str | None = "local", max_attempts: int | None = None,
                 reporter: Reporter | None = None) -> Any:
    """:func:`run_sweep` for an existing sweep: finish it; an already succeeded sweep
    comes back as it is (``wall_s`` 0, nothing ran)."""
    from orchestrator.coordinator import SweepOutcome

    if cluster is not None and address is not None:
        raise UsageError("give either --cluster or --address, not both")
    db = db if db is not None else os.environ.get("GREENSWEEP_DB_URL")
    store = open_store(db, must_exist=True)
    try:
        outcome = resume(store, sweep_id, db=db, address=address, cluster=cluster, region=region,
                         max_attempts=max_attempts, reporter=reporter)
        if outcome is None:
            from orchestrator.export import resolve_sweep

            sweep_id = resolve_sweep(store, sweep_id)
            outcome = SweepOutcome(sweep_id, "succeeded", store.stage_counts(sweep_id), 0.0)
        return outcome
    finally:
        store.close()
