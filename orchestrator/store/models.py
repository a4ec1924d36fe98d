"""SQLAlchemy ORM classes: the store's tables.

These rows never leave :mod:`orchestrator.store`: readers get the frozen records of
:mod:`orchestrator.store.records`. The schema is created and changed **only** by the
Alembic scripts in the repository's ``alembic/`` directory; a test asserts that the head
revision matches these classes (``alembic.autogenerate.compare_metadata``), so a change
here needs a new revision there.

Conventions: units live in column names (``duration_s``, ``size_bytes``, ``gpu_energy_j``,
``intensity_g_per_kwh``); timestamps are timezone-aware UTC; JSON columns hold plain
JSON-able values; byte counts and MACs are 64-bit. Constraint names follow
:data:`NAMING_CONVENTION` so that later migrations (batch mode on SQLite) can address them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SWEEP_STATUSES: tuple[str, ...] = ("pending", "running", "succeeded", "partial", "failed", "cancelled")
STAGE_STATUSES: tuple[str, ...] = ("pending", "running", "succeeded", "failed", "skipped", "reused")
ATTEMPT_STATUSES: tuple[str, ...] = ("running", "succeeded", "failed", "lost", "cancelled")

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Lengths are generous upper bounds (SQLite ignores them; PostgreSQL enforces them).
_ID = 64  # sweep ids ("sw-<12 hex>"), Ray node ids (56 hex)
_KEY = 128  # content-addressed stage / artifact keys
_NAME = 255
_SHORT = 32  # kinds, statuses, energy sources


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no time zone type, so values are stored
    as UTC and UTC is re-attached on the way out. Naive datetimes are refused: they are
    ambiguous and always a bug here.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r} given to the store; use an aware UTC datetime")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _status_check(statuses: tuple[str, ...]) -> CheckConstraint:
    allowed = ", ".join(f"'{s}'" for s in statuses)
    return CheckConstraint(f"status IN ({allowed})", name="status")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[str]: JSON()}


class EnergyColumns:
    """What a meter window measured, and the carbon it is accounted for.

    Shared by :class:`StageModel` (the stage's whole run) and :class:`MeasurementModel`
    (one evaluation repeat). Every figure is nullable: a domain without a sensor has
    ``None`` energy and source ``"none"`` -- never a silent 0 J. Carbon columns are
    filled by carbon accounting (grams = kWh x intensity of the node's region over the
    window) and carry the intensity used, its source and its kind
    (``average``/``marginal``/``forecast``).
    """

    gpu_energy_j: Mapped[float | None] = mapped_column(Float)
    cpu_energy_j: Mapped[float | None] = mapped_column(Float)
    dram_energy_j: Mapped[float | None] = mapped_column(Float)
    gpu_energy_source: Mapped[str | None] = mapped_column(String(_SHORT))
    cpu_energy_source: Mapped[str | None] = mapped_column(String(_SHORT))
    dram_energy_source: Mapped[str | None] = mapped_column(String(_SHORT))
    gpu_idle_power_w: Mapped[float | None] = mapped_column(Float)
    cpu_idle_power_w: Mapped[float | None] = mapped_column(Float)
    dram_idle_power_w: Mapped[float | None] = mapped_column(Float)
    carbon_g: Mapped[float | None] = mapped_column(Float)
    intensity_g_per_kwh: Mapped[float | None] = mapped_column(Float)
    intensity_source: Mapped[str | None] = mapped_column(String(_NAME))
    intensity_kind: Mapped[str | None] = mapped_column(String(_SHORT))


class SweepModel(Base):
    """One sweep: the spec as the user gave it, and its lifecycle."""

    __tablename__ = "sweeps"
    __table_args__ = (_status_check(SWEEP_STATUSES),)

    id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    name: Mapped[str] = mapped_column(String(_NAME))
    spec_text: Mapped[str] = mapped_column(Text)  # the YAML, verbatim
    spec_hash: Mapped[str] = mapped_column(String(_KEY))
    status: Mapped[str] = mapped_column(String(_SHORT), default="pending")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    artifact_root: Mapped[str] = mapped_column(Text)
    naive_stage_count: Mapped[int] = mapped_column(Integer)  # stages without prefix sharing
    unique_stage_count: Mapped[int] = mapped_column(Integer)  # stages actually planned
    # 0003: what `resume` needs, and the coordinator's liveness and cancel flag
    spec_dir: Mapped[str | None] = mapped_column(Text)  # relative paths in the spec resolve here
    options: Mapped[dict[str, Any]] = mapped_column(default=dict, server_default=text("'{}'"))  # run options: max_attempts, policy...
    heartbeat_at: Mapped[datetime | None]  # last sign of life of the coordinator running it
    coordinator: Mapped[str | None] = mapped_column(String(_NAME))  # "host:pid" of that coordinator
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class StageModel(EnergyColumns, Base):
    """One node of a sweep's DAG. ``key`` is content-addressed, so the same key appears in
    every sweep that plans the same stage; the row is per (sweep, key)."""

    __tablename__ = "stages"
    __table_args__ = (_status_check(STAGE_STATUSES),)

    sweep_id: Mapped[str] = mapped_column(String(_ID), ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(_KEY), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)  # index in the plan (parents come first)
    kind: Mapped[str] = mapped_column(String(_SHORT))
    params: Mapped[dict[str, Any]]
    parent_key: Mapped[str | None] = mapped_column(String(_KEY))
    target: Mapped[str | None] = mapped_column(String(_NAME))  # evaluate stages only
    status: Mapped[str] = mapped_column(String(_SHORT), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)  # one line
    traceback: Mapped[str | None] = mapped_column(Text)
    node_id: Mapped[str | None] = mapped_column(String(_ID))
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # 0004: how an evaluation runs (evaluate stages only): the runtime and precision it was
    # planned for -- with the chain and the target, a sweep point's identity -- and the
    # version of the runtime that measured it (known once its result is recorded).
    runtime: Mapped[str | None] = mapped_column(String(_SHORT))
    precision: Mapped[str | None] = mapped_column(String(_SHORT))
    runtime_version: Mapped[str | None] = mapped_column(String(_NAME))
    # 0005: the cohort that measured it (evaluate stages measured in one; None before cohorts)
    cohort_id: Mapped[str | None] = mapped_column(String(_ID))


class StageProgressModel(Base):
    """One progress report of a running stage (e.g. one training epoch), written as it
    arrives so ``greensweep status`` can show a long stage's progress. Idempotent on
    (sweep_id, stage_key, step)."""

    __tablename__ = "stage_progress"
    __table_args__ = (
        ForeignKeyConstraint(["sweep_id", "stage_key"], ["stages.sweep_id", "stages.key"], ondelete="CASCADE"),
    )

    sweep_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    stage_key: Mapped[str] = mapped_column(String(_KEY), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)  # e.g. the epoch, from 1
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class StageAttemptModel(Base):
    """One attempt at running a stage: where, when, and how it ended.

    ``status``: ``running`` (dispatched), ``succeeded``, ``failed`` (the stage raised),
    ``lost`` (its worker or node died, or its coordinator was killed, mid-stage),
    ``cancelled``. A stage's result is persisted once, on its stage row, however many
    attempts ran."""

    __tablename__ = "stage_attempts"
    __table_args__ = (
        ForeignKeyConstraint(["sweep_id", "stage_key"], ["stages.sweep_id", "stages.key"], ondelete="CASCADE"),
        _status_check(ATTEMPT_STATUSES),
    )

    sweep_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    stage_key: Mapped[str] = mapped_column(String(_KEY), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)  # from 1
    node_id: Mapped[str | None] = mapped_column(String(_ID))
    status: Mapped[str] = mapped_column(String(_SHORT))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)


class PlacementModel(Base):
    """The scheduler's decision for one stage and the carbon-agnostic (``fifo``) choice it
    replaced, each with its expected carbon: "carbon saved" is a query over these rows.
    The latest decision for a stage wins (a re-plan overwrites)."""

    __tablename__ = "placements"
    __table_args__ = (
        ForeignKeyConstraint(["sweep_id", "stage_key"], ["stages.sweep_id", "stages.key"], ondelete="CASCADE"),
    )

    sweep_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    stage_key: Mapped[str] = mapped_column(String(_KEY), primary_key=True)
    policy: Mapped[str] = mapped_column(String(_SHORT))
    decided_at: Mapped[datetime] = mapped_column(default=utcnow)
    node_id: Mapped[str] = mapped_column(String(_ID))
    node_type: Mapped[str | None] = mapped_column(String(_NAME))
    region: Mapped[str | None] = mapped_column(String(_NAME))
    start_at: Mapped[datetime]  # planned start
    expected_duration_s: Mapped[float] = mapped_column(Float)
    expected_energy_j: Mapped[float] = mapped_column(Float)
    expected_intensity_g_per_kwh: Mapped[float | None] = mapped_column(Float)
    expected_carbon_g: Mapped[float | None] = mapped_column(Float)
    estimate_source: Mapped[str] = mapped_column(String(_SHORT))  # "measured" | "scaled" | "catalog"
    fifo_node_id: Mapped[str] = mapped_column(String(_ID))
    fifo_node_type: Mapped[str | None] = mapped_column(String(_NAME))
    fifo_region: Mapped[str | None] = mapped_column(String(_NAME))
    fifo_start_at: Mapped[datetime]
    fifo_expected_energy_j: Mapped[float] = mapped_column(Float)
    fifo_expected_intensity_g_per_kwh: Mapped[float | None] = mapped_column(Float)
    fifo_expected_carbon_g: Mapped[float | None] = mapped_column(Float)


class ArtifactClaimModel(Base):
    """A sweep building artifact ``key`` right now. Two sweeps needing the same key build it
    once: the first claims it, the other waits and then reuses it. A claim whose
    ``heartbeat_at`` is older than the coordinator timeout is stale and may be taken over."""

    __tablename__ = "artifact_claims"

    key: Mapped[str] = mapped_column(String(_KEY), primary_key=True)
    sweep_id: Mapped[str] = mapped_column(String(_ID))
    claimed_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class PointModel(Base):
    """One sweep point: a compression chain evaluated on one target."""

    __tablename__ = "points"
    __table_args__ = (
        ForeignKeyConstraint(["sweep_id", "eval_key"], ["stages.sweep_id", "stages.key"], ondelete="CASCADE"),
    )

    sweep_id: Mapped[str] = mapped_column(String(_ID), ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    point_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    label: Mapped[str] = mapped_column(Text)  # e.g. "structured(all,0.5) > quantize(w8a8)"
    pipeline: Mapped[str] = mapped_column(String(_NAME))
    stage_keys: Mapped[list[str]]  # root .. last compression stage
    target: Mapped[str] = mapped_column(String(_NAME))
    eval_key: Mapped[str] = mapped_column(String(_KEY))


class ArtifactModel(Base):
    """A saved model, global across sweeps (content-addressed by its stage key)."""

    __tablename__ = "artifacts"

    key: Mapped[str] = mapped_column(String(_KEY), primary_key=True)
    kind: Mapped[str] = mapped_column(String(_SHORT))  # kind of the stage that made it
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    materialized: Mapped[bool] = mapped_column(Boolean)
    params: Mapped[int] = mapped_column(BigInteger)
    macs: Mapped[int] = mapped_column(BigInteger)
    compression: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    created_by_sweep: Mapped[str | None] = mapped_column(String(_ID), ForeignKey("sweeps.id", ondelete="SET NULL"))


class MeasurementModel(EnergyColumns, Base):
    """One measured repeat of an evaluate stage; written idempotently on
    (sweep_id, stage_key, repeat)."""

    __tablename__ = "measurements"
    __table_args__ = (
        ForeignKeyConstraint(["sweep_id", "stage_key"], ["stages.sweep_id", "stages.key"], ondelete="CASCADE"),
    )

    sweep_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)
    stage_key: Mapped[str] = mapped_column(String(_KEY), primary_key=True)
    repeat: Mapped[int] = mapped_column(Integer, primary_key=True)
    samples: Mapped[int] = mapped_column(Integer)
    top1: Mapped[float] = mapped_column(Float)  # fraction in [0, 1]
    top5: Mapped[float] = mapped_column(Float)
    duration_s: Mapped[float] = mapped_column(Float)
    time_per_sample_s: Mapped[float] = mapped_column(Float)
    throughput_samples_per_s: Mapped[float] = mapped_column(Float)
    # 0005: the cohort round this repeat was (``repeat`` is the round index) and its 0-based
    # position in that round's seeded order; None for repeats measured before cohorts.
    cohort_id: Mapped[str | None] = mapped_column(String(_ID))
    position: Mapped[int | None] = mapped_column(Integer)


class CohortModel(Base):
    """One cohort: evaluations of one target node measured together in interleaved rounds,
    with the reference (the uncompressed model on torch fp32) in every one -- the
    protocol that gives each member a paired ratio to the reference.

    Written once, with the first recorded result of a member (a later member or a replay
    finds it there); members' stages and measurements name it by ``cohort_id``.
    ``reference_shown`` is false when the reference was measured only to pair with (the
    spec's ``evaluate.baseline`` is false): it is then no sweep point. ``noise_floor_cv``
    is the round-to-round coefficient of variation of the reference's time per sample
    (None under 2 rounds); ``reference`` its per-round figures and top-1; ``protocol``
    every setting the rounds ran under."""

    __tablename__ = "cohorts"

    sweep_id: Mapped[str] = mapped_column(String(_ID), ForeignKey("sweeps.id", ondelete="CASCADE"), primary_key=True)
    id: Mapped[str] = mapped_column(String(_ID), primary_key=True)  # "c-<hex>"
    node_id: Mapped[str | None] = mapped_column(String(_ID))
    target: Mapped[str] = mapped_column(String(_NAME))
    seed: Mapped[int] = mapped_column(BigInteger)
    rounds: Mapped[int] = mapped_column(Integer)
    size: Mapped[int] = mapped_column(Integer)  # members, the reference included
    reference_key: Mapped[str] = mapped_column(String(_KEY))
    reference_shown: Mapped[bool] = mapped_column(Boolean)
    protocol: Mapped[dict[str, Any]]
    noise_floor_cv: Mapped[float | None] = mapped_column(Float)
    reference: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class NodeModel(Base):
    """A Ray node seen by the coordinator; hardware facts come from the node itself."""

    __tablename__ = "nodes"

    node_id: Mapped[str] = mapped_column(String(_ID), primary_key=True)  # Ray node id
    node_type: Mapped[str | None] = mapped_column(String(_NAME))  # label greensweep/node-type
    region: Mapped[str | None] = mapped_column(String(_NAME))  # label greensweep/region
    hostname: Mapped[str | None] = mapped_column(String(_NAME))
    hardware: Mapped[dict[str, Any]] = mapped_column(default=dict)
    first_seen: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
