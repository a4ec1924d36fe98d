"""The store contract: what greensweep records about sweeps, stages, artifacts,
measurements and nodes, and who may write it. :class:`~orchestrator.store.repository.Store`
(SQLite or PostgreSQL through SQLAlchemy) is the implementation."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from orchestrator.store.records import (
    ArtifactRecord,
    AttemptRecord,
    CohortRecord,
    MeasurementRecord,
    NodeRecord,
    PlacementRecord,
    PointRecord,
    ResultRow,
    StageRecord,
    SweepRecord,
)
from workers.types import StageResult

if TYPE_CHECKING:
    from orchestrator.carbon.base import Intensity

_Self = TypeVar("_Self", bound="BaseStore")


class BaseStore(ABC):
    """greensweep's record of sweeps.

    **Who writes.** Only the coordinator writes: the lifecycle methods (create a sweep,
    own it, heartbeat, cancel, claim artifacts) and the writes (stage status, attempts,
    results, progress, carbon, placements, nodes). Workers return
    :class:`~workers.types.StageResult` objects and never touch the store. ``greensweep
    cancel`` is the one write from outside the coordinator (:meth:`request_cancel`).

    **Readers** (CLI, reports, export, the coordinator on resume) get frozen records from
    :mod:`orchestrator.store.records`, never ORM rows. The store returns raw records;
    analysis (means, per-sample energy, carbon savings) is :mod:`orchestrator.report`'s --
    :meth:`results` and :meth:`carbon_savings` are conveniences composed from
    :meth:`points` and :meth:`placements` with it.

    **Transactions.** Every method is one transaction: it commits whole or not at all
    (``create_sweep`` writes a sweep with all its stages and points, or nothing). Database
    errors surface as :class:`~orchestrator.errors.StoreError` with a one-line message
    (passwords masked); a sweep or stage id that is not in the store raises
    :class:`~orchestrator.errors.UsageError`.

    **Idempotency.** ``record_stage_result`` may be replayed (a retried or resumed stage):
    the stage row is overwritten, the artifact row is upserted by key, measurements are
    upserted on (sweep, stage key, repeat) and the cohort a result names is inserted once
    per (sweep, cohort id), so replaying never duplicates a row.
    ``mark_stage_reused``, ``mark_stage_skipped``, ``set_sweep_status`` and ``upsert_node``
    are idempotent too; ``mark_stage_running`` counts an attempt each time it is called;
    ``create_sweep`` is done once per sweep id.

    **Threads and processes.** A store may be shared between threads (each call takes
    its own session and pooled connection). Several processes may open the same store:
    on SQLite writers queue on the write lock (WAL, busy timeout, ``BEGIN IMMEDIATE``)
    and readers never block; ownership (:meth:`take_sweep`) and artifact claims
    (:meth:`claim_artifact`) are decided under a lock, so two coordinators never both win.

    Close a store (or use it as a context manager) to release its connections.
    """

    @abstractmethod
    def close(self) -> None:
        """Release the store's connections."""

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------ lifecycle: sweeps, ownership

    @abstractmethod
    def create_sweep(self, sweep_id: str, name: str, spec_text: str, spec_hash: str, artifact_root: str,
                     stages: Sequence[Mapping[str, Any]], points: Sequence[Mapping[str, Any]],
                     naive_stage_count: int, spec_dir: str | None = None,
                     options: Mapping[str, Any] | None = None) -> None:
        """Record a planned sweep (status ``pending``) with its stages and points, in one
        transaction: on any failure nothing is written.

        *stages* are in plan order (parents first), each with ``key``, ``kind``,
        ``params`` and optionally ``parent_key`` and ``target`` (evaluate stages). A stage
        with a target is an evaluation: its record's ``runtime`` and ``precision`` are its
        params' (``torch`` / ``fp32`` when they name none). *points* each have
        ``point_index``, ``label``, ``pipeline``, ``stage_keys`` (root .. last compression
        stage), ``target`` and ``eval_key`` (a key among *stages*); a point is its chain
        and its evaluation, so (chain, target, runtime, precision).
        """

    @abstractmethod
    def set_sweep_status(self, sweep_id: str, status: str) -> None:
        """Move a sweep to *status*. ``running`` stamps ``started_at`` the first time and
        clears ``finished_at`` (a resumed sweep runs again); a terminal status
        (``succeeded``, ``partial``, ``failed``, ``cancelled``) stamps ``finished_at``;
        ``pending`` clears it."""

    @abstractmethod
    def take_sweep(self, sweep_id: str, coordinator: str, *, stale_after_s: float,
                   gone: Callable[[str | None], bool] = lambda owner: False) -> None:
        """Make *coordinator* (``host:pid``) the one running *sweep_id*: status ``running``,
        a fresh heartbeat, the cancel flag cleared.

        Refused (:class:`~orchestrator.errors.UsageError`) while another coordinator's
        heartbeat is younger than *stale_after_s* and *gone* (owner) is false -- two
        coordinators never drive one sweep, even when two ``resume`` calls race.
        """

    @abstractmethod
    def heartbeat(self, sweep_id: str, claimed_keys: Sequence[str] = ()) -> bool:
        """The coordinator is alive: stamp the sweep's heartbeat and those of the artifact
        claims it holds. Returns True when a cancel was requested (``greensweep cancel``)."""

    @abstractmethod
    def request_cancel(self, sweep_id: str, *, stale_after_s: float,
                       gone: Callable[[str | None], bool] = lambda owner: False) -> str:
        """Ask the coordinator running *sweep_id* to stop. Returns what happened:
        ``requested`` (a live coordinator will stop it), ``cancelled`` (nobody was running
        it: it is marked cancelled now, its running stages and attempts closed), or
        ``already-<status>`` when the sweep had already ended (nothing changes)."""

    @abstractmethod
    def release_sweep(self, sweep_id: str, status: str) -> None:
        """The coordinator is done with the sweep (any terminal status): its artifact
        claims are released and the heartbeat cleared."""

    @abstractmethod
    def interrupted_stages(self, sweep_id: str) -> list[str]:
        """For ``resume``: stages left ``running`` by a dead coordinator go back to
        ``pending`` and their open attempts end as ``lost``. Returns their keys."""

    # ------------------------------------------------------ lifecycle: artifact claims

    @abstractmethod
    def claim_artifact(self, key: str, sweep_id: str, *, stale_after_s: float) -> str | None:
        """Claim the right to build artifact *key* for *sweep_id*. Returns None when this
        sweep holds the claim (new, already its own, or taken over from a claim whose
        heartbeat is older than *stale_after_s*), else the id of the sweep building it."""

    @abstractmethod
    def release_artifact(self, key: str, sweep_id: str) -> None:
        """Drop this sweep's claim on *key* (built, failed or abandoned)."""

    # ------------------------------------------------------------------- writes

    def mark_stage_running(self, sweep_id: str, key: str, node_id: str) -> int:
        """A stage was dispatched to *node_id*: one more attempt (status ``running``),
        timestamps restarted, the previous attempt's error cleared. Returns the attempt's
        number (from 1)."""
        return self.mark_stages_running(sweep_id, [(key, node_id)])[key]

    @abstractmethod
    def mark_stages_running(self, sweep_id: str, dispatched: Sequence[tuple[str, str]]) -> dict[str, int]:
        """:meth:`mark_stage_running` for several ``(key, node_id)`` at once, in one
        transaction; returns each key's attempt number."""

    @abstractmethod
    def end_attempt(self, sweep_id: str, key: str, status: str, error: str | None = None,
                    *, back_to_pending: bool = False) -> None:
        """Close the stage's open attempt with *status* (``lost`` when its worker died,
        ``cancelled``...). With *back_to_pending* the stage itself returns to ``pending``
        (it will be retried); its result, if any comes later, is recorded once."""

    @abstractmethod
    def mark_stage_reused(self, sweep_id: str, key: str) -> None:
        """The stage's artifact already exists (an earlier sweep or run made it); the
        stage does not run."""

    @abstractmethod
    def mark_stage_skipped(self, sweep_id: str, key: str, reason: str,
                           metrics: Mapping[str, Any] | None = None) -> None:
        """The stage will not run (its parent failed, or its condition says it is not
        needed); *reason* is kept as its error, *metrics* (a gate's decision) as its metrics."""

    def record_stage_result(self, sweep_id: str, result: StageResult) -> None:
        """Persist what a worker returned for stage ``result.key`` of *sweep_id*.

        Idempotent on (sweep, key): the stage row takes the result's status, metrics,
        error, duration, node and energy, and the ``runtime_version`` its metrics'
        ``runtime`` description names (evaluations); its artifact is upserted by key
        (artifacts are global across sweeps; the first sweep to record one stays its creator); the
        stage's measurements become exactly one row per
        :class:`~workers.types.EvalRepeat`, keyed by (sweep, stage key, repeat). Carbon
        figures already accounted are kept.

        A result whose metrics carry a ``cohort`` description was measured in that cohort:
        the cohort's row is written with it, in the same transaction, unless another member
        (or an earlier replay) already wrote it -- the first description stays -- and the
        stage and each of its measurements name the cohort (``cohort_id``), each
        measurement with its ``position`` in its round. A description lacking a required
        field raises ValueError and nothing is written. A result without one leaves
        ``cohort_id`` None.
        """
        self.record_stage_results(sweep_id, [result])

    @abstractmethod
    def record_stage_results(self, sweep_id: str, results: Sequence[StageResult]) -> None:
        """:meth:`record_stage_result` for several results in one transaction (all or
        none)."""

    @abstractmethod
    def record_progress(self, sweep_id: str, key: str, entries: Sequence[Mapping[str, Any]]) -> None:
        """Persist progress reports of a running stage (e.g. one per training epoch).

        Each entry carries its ``step`` (``epoch`` is accepted as the step of a training
        epoch); idempotent on (sweep, key, step): a report seen twice stays one row.
        """

    @abstractmethod
    def record_carbon(self, sweep_id: str, key: str, intensity: Intensity) -> None:
        """Account the carbon of stage *key* and of each of its measured repeats:
        grams = total energy (kWh) x the grid *intensity* of the node's region during the
        stage, storing the intensity, its source and kind beside every figure. Rows
        without an energy figure get the intensity but no grams (never a made-up 0 g)."""

    @abstractmethod
    def record_placement(self, sweep_id: str, placement: Mapping[str, Any]) -> None:
        """Store the scheduler's decision for one stage (the fields of
        :class:`~orchestrator.store.records.PlacementRecord` except ``sweep_id``,
        ``decided_at``, ``kind``, ``stage_status`` and ``measured_carbon_g``); a later
        decision for the same stage replaces it."""

    @abstractmethod
    def upsert_node(self, node_id: str, node_type: str | None, region: str | None, hostname: str | None,
                    hardware: Mapping[str, Any]) -> None:
        """Record a Ray node as seen now (``first_seen`` stays the first time)."""

    # -------------------------------------------------------------------- reads

    @abstractmethod
    def get_sweep(self, sweep_id: str) -> SweepRecord | None:
        """The sweep, or None when the store has no such id."""

    @abstractmethod
    def list_sweeps(self, limit: int = 20) -> list[SweepRecord]:
        """The *limit* most recently created sweeps, newest first."""

    @abstractmethod
    def latest_sweep_id(self) -> str | None:
        """The id of the most recently created sweep; None when the store has none."""

    @abstractmethod
    def stages(self, sweep_id: str) -> list[StageRecord]:
        """The sweep's stages in plan order (parents before children)."""

    @abstractmethod
    def stage_counts(self, sweep_id: str) -> dict[str, int]:
        """How many of the sweep's stages are in each status: only statuses that occur,
        in :data:`~orchestrator.store.models.STAGE_STATUSES` order (e.g.
        ``{"succeeded": 4, "reused": 5}``)."""

    @abstractmethod
    def attempts(self, sweep_id: str, key: str | None = None) -> list[AttemptRecord]:
        """The attempts at the sweep's stages (or one stage), by stage key then attempt."""

    @abstractmethod
    def progress(self, sweep_id: str, key: str) -> list[dict[str, Any]]:
        """The stage's progress reports in step order (each the dict the stage reported)."""

    @abstractmethod
    def artifact(self, key: str) -> ArtifactRecord | None:
        """The artifact recorded under *key* (by any sweep), or None."""

    @abstractmethod
    def measurements(self, sweep_id: str, stage_key: str | None = None) -> list[MeasurementRecord]:
        """The sweep's measured evaluation repeats (of one stage when *stage_key* is given),
        ordered by stage key and repeat."""

    @abstractmethod
    def cohorts(self, sweep_id: str) -> list[CohortRecord]:
        """The cohorts that measured the sweep's evaluations, oldest first (none for a
        sweep measured before cohorts)."""

    @abstractmethod
    def nodes(self) -> list[NodeRecord]:
        """Every node the coordinator has seen, by node type then id."""

    @abstractmethod
    def placements(self, sweep_id: str) -> list[PlacementRecord]:
        """The sweep's placement decisions, each with the carbon measured for the stage
        (None until accounted), in plan order. An evaluation has no stage-level energy:
        its figure is the sum of its measured repeats (the timed windows, not warm-up)."""

    @abstractmethod
    def stage_durations(self, limit: int = 5000) -> list[tuple[str, str | None, float, float | None]]:
        """``(kind, node_type, duration_s, energy_j)`` of the most recent succeeded stages
        that ran on a known node: what the scheduler expects of a kind on a node type."""

    @abstractmethod
    def points(self, sweep_id: str) -> list[PointRecord]:
        """The sweep's points in point order, each with the raw records its result is
        computed from (see :class:`PointRecord`). A point whose evaluate stage was
        ``reused`` gets the repeats of the latest sweep in which that stage succeeded."""

    # ---------------------------------------------- conveniences (analysis in report/)

    def results(self, sweep_id: str) -> list[ResultRow]:
        """One row per sweep point, in point order: :meth:`points` aggregated by
        :func:`orchestrator.report.aggregate.result_rows` (means and standard deviations
        over the repeats, per-sample energy and carbon)."""
        from orchestrator.report.aggregate import result_rows

        return result_rows(self.points(sweep_id))

    def carbon_savings(self, sweep_id: str) -> dict[str, Any] | None:
        """What carbon-aware placement chose against the ``fifo`` counterfactual
        (:func:`orchestrator.report.savings.carbon_savings` over :meth:`placements`); None
        when the sweep recorded no placement decisions."""
        from orchestrator.report.savings import carbon_savings

        return carbon_savings(sweep_id, self.placements(sweep_id))
