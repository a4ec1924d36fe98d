"""Initial schema: sweeps, stages, points, artifacts, measurements, nodes.

Revision ID: 0001
Revises:
Create Date: 2026-11-22

Energy and carbon columns exist from the start (nullable), so meters and carbon
accounting can fill them without a migration.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# This file is a snapshot: it must not import orchestrator.store.models, whose classes
# move on with later revisions.
UTC_TIMESTAMP = sa.DateTime(timezone=True)


def _energy_columns() -> list[sa.Column]:
    return [
        sa.Column("gpu_energy_j", sa.Float(), nullable=True),
        sa.Column("cpu_energy_j", sa.Float(), nullable=True),
        sa.Column("dram_energy_j", sa.Float(), nullable=True),
        sa.Column("gpu_energy_source", sa.String(length=32), nullable=True),
        sa.Column("cpu_energy_source", sa.String(length=32), nullable=True),
        sa.Column("dram_energy_source", sa.String(length=32), nullable=True),
        sa.Column("gpu_idle_power_w", sa.Float(), nullable=True),
        sa.Column("cpu_idle_power_w", sa.Float(), nullable=True),
        sa.Column("dram_idle_power_w", sa.Float(), nullable=True),
        sa.Column("carbon_g", sa.Float(), nullable=True),
        sa.Column("intensity_g_per_kwh", sa.Float(), nullable=True),
        sa.Column("intensity_source", sa.String(length=255), nullable=True),
        sa.Column("intensity_kind", sa.String(length=32), nullable=True),
    ]


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("node_type", sa.String(length=255), nullable=True),
        sa.Column("region", sa.String(length=255), nullable=True),
        sa.Column("hostname", sa.String(length=255), nullable=True),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("first_seen", UTC_TIMESTAMP, nullable=False),
        sa.Column("last_seen", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_nodes")),
    )
    op.create_table(
        "sweeps",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("spec_text", sa.Text(), nullable=False),
        sa.Column("spec_hash", sa.String(length=128), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("created_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("started_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("finished_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("artifact_root", sa.Text(), nullable=False),
        sa.Column("naive_stage_count", sa.Integer(), nullable=False),
        sa.Column("unique_stage_count", sa.Integer(), nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'partial', 'failed', 'cancelled')",
            name=op.f("ck_sweeps_status"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sweeps")),
    )
    op.create_index(op.f("ix_sweeps_created_at"), "sweeps", ["created_at"], unique=False)
    op.create_table(
        "artifacts",
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("materialized", sa.Boolean(), nullable=False),
        sa.Column("params", sa.BigInteger(), nullable=False),
        sa.Column("macs", sa.BigInteger(), nullable=False),
        sa.Column("compression", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("created_by_sweep", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by_sweep"],
            ["sweeps.id"],
            name=op.f("fk_artifacts_created_by_sweep_sweeps"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_artifacts")),
    )
    op.create_table(
        "stages",
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("parent_key", sa.String(length=128), nullable=True),
        sa.Column("target", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("traceback", sa.Text(), nullable=True),
        sa.Column("node_id", sa.String(length=64), nullable=True),
        sa.Column("started_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("finished_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        *_energy_columns(),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'succeeded', 'failed', 'skipped', 'reused')",
            name=op.f("ck_stages_status"),
        ),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["sweeps.id"], name=op.f("fk_stages_sweep_id_sweeps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("sweep_id", "key", name=op.f("pk_stages")),
    )
    op.create_table(
        "measurements",
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("stage_key", sa.String(length=128), nullable=False),
        sa.Column("repeat", sa.Integer(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("top1", sa.Float(), nullable=False),
        sa.Column("top5", sa.Float(), nullable=False),
        sa.Column("duration_s", sa.Float(), nullable=False),
        sa.Column("time_per_sample_s", sa.Float(), nullable=False),
        sa.Column("throughput_samples_per_s", sa.Float(), nullable=False),
        *_energy_columns(),
        sa.ForeignKeyConstraint(
            ["sweep_id", "stage_key"],
            ["stages.sweep_id", "stages.key"],
            name=op.f("fk_measurements_sweep_id_stage_key_stages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sweep_id", "stage_key", "repeat", name=op.f("pk_measurements")),
    )
    op.create_table(
        "points",
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("point_index", sa.Integer(), nullable=False),
        sa.Column("label", sa.Text(), nullable=False),
        sa.Column("pipeline", sa.String(length=255), nullable=False),
        sa.Column("stage_keys", sa.JSON(), nullable=False),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("eval_key", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["sweep_id", "eval_key"],
            ["stages.sweep_id", "stages.key"],
            name=op.f("fk_points_sweep_id_eval_key_stages"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sweep_id"], ["sweeps.id"], name=op.f("fk_points_sweep_id_sweeps"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("sweep_id", "point_index", name=op.f("pk_points")),
    )


def downgrade() -> None:
    op.drop_table("points")
    op.drop_table("measurements")
    op.drop_table("stages")
    op.drop_table("artifacts")
    op.drop_index(op.f("ix_sweeps_created_at"), table_name="sweeps")
    op.drop_table("sweeps")
    op.drop_table("nodes")
