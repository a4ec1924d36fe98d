"""Coordinator overhead and store throughput: 1,000 no-op stages through the whole
greensweep machinery against 1,000 bare Ray tasks, side by side in one process.

- **bare Ray**: ``@ray.remote def noop()``, all 1,000 submitted at once, one ``ray.get``.
- **greensweep**: a real :class:`~orchestrator.store.Store` (a SQLite file; PostgreSQL
  too with ``--pg URL``), ``Store.create_sweep`` with 1,000 independent ``noop`` stages
  (the hidden stage kind of ``workers/stages/registry.py``), a
  :class:`~orchestrator.coordinator.Coordinator` with a real ``WorkerPool`` on the local
  Ray, ``run()``; every result is persisted. The plan is built directly (1,000 stages,
  no parent), not from a spec: a spec cannot name the hidden kind.

Both sides run on the same local Ray, after a warm-up: bare Ray's worker processes
exist, and greensweep's worker actors are started (their start -- one actor per node,
which imports torch -- is reported apart as ``pool_start_s``, a once-per-sweep cost). So
the timed part is what grows with the number of stages: for greensweep, creating the
sweep in the store, dispatching, collecting and persisting every stage, and closing the
sweep. Each side is timed ``--repeats`` times (median reported); ratio = greensweep /
bare Ray (target: <= 2). ``results_per_s`` = stage results persisted (rows the store
reports ``succeeded`` afterwards) / greensweep wall time.

Finally one more greensweep run (SQLite) under cProfile says where the coordinator's
time goes: the top functions, and the time split into store, Ray calls and the rest.

Usage:  .venv/bin/python benchmarks/overhead.py [--stages 1000] [--repeats 3]
            [--pg postgresql+psycopg://postgres@127.0.0.1:5432/test] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import inspect
import io
import json
import os
import platform
import pstats
import statistics
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
DEFAULT_JSON = REPO / "benchmarks" / "results" / "overhead.json"

# A carrier for the coordinator (model and dataset references travel in each task; the
# noop runner reads neither). check_arch=False: nothing here builds a model.
CARRIER_SPEC = """
name: overhead-benchmark
model: {arch: noop, pretrained: true}
dataset: {name: synthetic}
"""


class SilentProgress:
    """A progress sink that discards every event: the benchmark measures the machinery,
    not a terminal printing 1,000 lines."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def noop_plan(n: int):
    """A plan of *n* independent ``noop`` stages (no parents, no points)."""
    from orchestrator.plan import Plan, PlannedStage, stage_key

    root = stage_key("root", "overhead-benchmark", {"run": uuid.uuid4().hex})
    stages = []
    for i in range(n):
        params = {"index": i}
        stages.append(PlannedStage(stage_key(root, "noop", params), "noop", params, None, f"noop({i})"))
    return Plan(root_key=root, stages=tuple(stages), points=(), naive_stage_count=n,
                _by_key={s.key: s for s in stages})


# -- bare Ray --------------------------------------------------------------------------------


def bare_ray(n: int) -> float:
    import ray

    @ray.remote
    def noop() -> None:
        return None

    ray.get([noop.remote() for _ in range(min(n, 100))])  # warm-up: worker processes exist
    start = time.perf_counter()
    ray.get([noop.remote() for _ in range(n)])
    return time.perf_counter() - start


# -- greensweep ------------------------------------------------------------------------------


def greensweep_run(url: str, n: int, pool: Any, spec: Any, artifact_root: str, options: Any,
                   profile: cProfile.Profile | None = None) -> dict[str, Any]:
    """One sweep of *n* noop stages on *pool*, timed from ``create_sweep`` to the end of
    ``run()``; returns its wall time and what the store holds afterwards."""
    from orchestrator.coordinator import Coordinator
    from orchestrator.store import Store

    plan = noop_plan(n)
    store = Store.open(url)
    try:
        sweep_id = f"sw-{uuid.uuid4().hex[:12]}"
        create_kwargs: dict[str, Any] = {}
        create_params = inspect.signature(store.create_sweep).parameters
        if "options" in create_params and options is not None:
            create_kwargs["options"] = options.to_json()
        coord_kwargs: dict[str, Any] = {}
        if "options" in inspect.signature(Coordinator.__init__).parameters and options is not None:
            coord_kwargs["options"] = options
        if profile is not None:
            profile.enable()
        start = time.perf_counter()
        store.create_sweep(
            sweep_id=sweep_id, name="overhead-benchmark", spec_text=spec.source_text, spec_hash=spec.spec_hash,
            artifact_root=artifact_root,
            stages=[{"key": s.key, "kind": s.kind, "params": dict(s.params), "parent_key": None, "target": None}
                    for s in plan.stages],
            points=[], naive_stage_count=n, **create_kwargs,
        )
        if hasattr(store, "take_sweep"):  # the coordinator's ownership of the sweep, as `greensweep run` does
            from orchestrator.coordinator import coordinator_id

            store.take_sweep(sweep_id, coordinator_id(), stale_after_s=options.stale_after_s)
        coord = Coordinator(store=store, spec=spec, plan=plan, sweep_id=sweep_id, artifact_root=artifact_root,
                            pool=pool, progress=SilentProgress(), **coord_kwargs)
        outcome = coord.run()
        wall_s = time.perf_counter() - start
        if profile is not None:
            profile.disable()
        counts = store.stage_counts(sweep_id)
        persisted = sum(1 for st in store.stages(sweep_id) if st.status == "succeeded" and st.metrics.get("index") is not None)
    finally:
        store.close()
    if outcome.status != "succeeded" or persisted != n:
        raise SystemExit(f"greensweep sweep {sweep_id} ended {outcome.status} with {counts}; {persisted} of {n} "
                         "results persisted -- the benchmark needs every stage to succeed")
    return {"wall_s": wall_s, "persisted": persisted, "results_per_s": persisted / wall_s}


@contextlib.contextmanager
def sqlite_url(workdir: Path) -> Iterator[str]:
    path = workdir / f"store-{uuid.uuid4().hex[:8]}.db"
    yield f"sqlite:///{path}"


@contextlib.contextmanager
def postgres_url(url: str) -> Iterator[str]:
    """A fresh schema in the database at *url* for one sweep, dropped afterwards."""
    import sqlalchemy as sa

    schema = f"gs_bench_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"
    try:
        yield f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


# -- the profile -----------------------------------------------------------------------------

# Where a function's own time is charged, by the file it is defined in (first match wins).
CATEGORIES = (
    ("store: greensweep repository/session", ("orchestrator/store/",)),
    ("store: SQLAlchemy", ("sqlalchemy/",)),
    ("store: database driver", ("sqlite3", "psycopg", "_sqlite3")),
    ("ray: wait/get/submit", ("ray/",)),
    ("coordinator and scheduler", ("orchestrator/coordinator.py", "orchestrator/scheduler/", "orchestrator/plan.py")),
    ("pickling and dataclasses", ("pickle", "dataclasses.py", "copyreg")),
)


def _category(filename: str, funcname: str) -> str:
    probe = f"{filename} {funcname}"
    for name, needles in CATEGORIES:
        if any(n in probe for n in needles):
            return name
    return "other (stdlib, builtins)"


def summarize_profile(profile: cProfile.Profile, wall_s: float, top: int = 25) -> dict[str, Any]:
    stats = pstats.Stats(profile)
    total = stats.total_tt  # type: ignore[attr-defined]
    by_category: dict[str, float] = {}
    for (filename, _line, func), (_cc, _nc, tottime, _cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        cat = _category(filename, func)
        by_category[cat] = by_category.get(cat, 0.0) + tottime

    def rows(sort: str) -> list[dict[str, Any]]:
        out = []
        entries = sorted(stats.stats.items(), key=lambda kv: kv[1][3 if sort == "cumulative" else 2], reverse=True)  # type: ignore[attr-defined]
        for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in entries[:top]:
            short = filename.split("site-packages/")[-1].replace(str(REPO) + "/", "")
            out.append({"function": f"{short}:{line}({func})", "calls": ncalls,
                        "tottime_s": round(tottime, 4), "cumtime_s": round(cumtime, 4)})
        return out

    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
    return {
        "profiled_wall_s": round(wall_s, 3),
        "profiled_cpu_s": round(total, 3),
        "own_time_by_category_s": {k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "top_cumulative": rows("cumulative"),
        "top_own_time": rows("tottime"),
        "_text": text.getvalue(),
    }


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=1000, help="no-op stages (and bare Ray tasks) per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per side; the median is reported")
    ap.add_argument("--pg", default=os.environ.get("GREENSWEEP_BENCH_POSTGRES_URL"), metavar="URL",
                    help="also measure a PostgreSQL store (a fresh schema per run, dropped after)")
    ap.add_argument("--queue-depth", type=int, default=None,
                    help="stages queued per worker (RunOptions.queue_depth; default: greensweep's default)")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile run")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = ap.parse_args()

    # A new local Ray of our own even if another one runs on this host (a greensweep that
    # does not pass address="local" to ray.init would join /tmp/ray/ray_current_cluster).
    os.environ.setdefault("RAY_ADDRESS", "local")
    from orchestrator import cluster
    from orchestrator.pool.ray import RayWorkerPool as WorkerPool
    from orchestrator.errors import mask_url
    from orchestrator.spec import parse_spec

    options = None
    with contextlib.suppress(ImportError):
        from orchestrator.coordinator import RunOptions

        options = RunOptions() if args.queue_depth is None else RunOptions(queue_depth=args.queue_depth)

    spec = parse_spec(CARRIER_SPEC, check_arch=False)
    n = args.stages
    started = datetime.now(timezone.utc)
    cluster.connect(None)
    pool = None
    try:
        import ray

        nodes = cluster.discover_nodes()
        cpus = int(ray.cluster_resources().get("CPU", 0))
        bare = [bare_ray(n) for _ in range(args.repeats)]
        print(f"bare Ray: {n} tasks in {statistics.median(bare):.3f}s (median of {bare})", flush=True)

        t0 = time.perf_counter()
        pool = WorkerPool(nodes)
        pool.hardware()
        pool_start_s = time.perf_counter() - t0
        print(f"worker pool: {len(pool.slots)} actor(s) started in {pool_start_s:.1f}s", flush=True)

        backends: dict[str, Callable[[Path], Any]] = {"sqlite": sqlite_url}
        if args.pg:
            backends["postgresql"] = lambda _workdir: postgres_url(args.pg)
        results: dict[str, Any] = {}
        profile_out = None
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            artifacts = str(workdir / "artifacts")
            for backend, make_url in backends.items():
                runs = []
                for _ in range(args.repeats):
                    with make_url(workdir) as url:
                        runs.append(greensweep_run(url, n, pool, spec, artifacts, options))
                walls = [r["wall_s"] for r in runs]
                median = statistics.median(walls)
                results[backend] = {
                    "wall_s": [round(w, 3) for w in walls],
                    "median_wall_s": round(median, 3),
                    "per_stage_ms": round(1000 * median / n, 3),
                    "results_per_s": round(n / median, 1),
                    "persisted_rows": runs[0]["persisted"],
                    "ratio_vs_bare_ray": round(median / statistics.median(bare), 2),
                }
                print(f"greensweep ({backend}): {n} stages in {median:.3f}s (median of {walls}) = "
                      f"{n / median:.0f} results persisted/s, {results[backend]['ratio_vs_bare_ray']}x bare Ray",
                      flush=True)
            if not args.no_profile:
                profile = cProfile.Profile()
                with sqlite_url(workdir) as url:
                    run = greensweep_run(url, n, pool, spec, artifacts, options, profile=profile)
                profile_out = summarize_profile(profile, run["wall_s"])
                print(profile_out.pop("_text"))
                print("own time by category (s):", json.dumps(profile_out["own_time_by_category_s"], indent=2))
    finally:
        if pool is not None:
            pool.shutdown()
        cluster.shutdown()

    bare_median = statistics.median(bare)
    out = {
        "when": started.isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}",
        "command": "python benchmarks/overhead.py" + (f" --pg {mask_url(args.pg)}" if args.pg else "")
                   + (f" --queue-depth {args.queue_depth}" if args.queue_depth is not None else ""),
        "stages": n,
        "repeats": args.repeats,
        "ray_cpus": cpus,
        "worker_actors": len(nodes),
        "queue_depth": getattr(options, "queue_depth", None),
        "bare_ray": {"wall_s": [round(w, 3) for w in bare], "median_wall_s": round(bare_median, 3),
                     "per_task_ms": round(1000 * bare_median / n, 3)},
        "pool_start_s": round(pool_start_s, 2),
        "greensweep": results,
        "target": "greensweep median wall <= 2x bare Ray's",
        "profile_sqlite": profile_out,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
