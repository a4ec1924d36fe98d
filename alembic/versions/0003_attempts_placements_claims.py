"""Attempts, placement decisions, artifact claims, and what resume and cancel need.

- ``stage_attempts``: one row per attempt at a stage (node, times, how it ended);
- ``placements``: the scheduler's decision per stage and the ``fifo`` counterfactual;
- ``artifact_claims``: which sweep is building an artifact key right now;
- ``sweeps``: ``spec_dir``, ``options``, ``heartbeat_at``, ``coordinator``, ``cancel_requested``.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# A snapshot, like 0001: no import of orchestrator.store.models.
UTC_TIMESTAMP = sa.DateTime(timezone=True)

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _stage_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["sweep_id", "stage_key"], ["stages.sweep_id", "stages.key"],
        name=op.f(f"fk_{table}_sweep_id_stage_key_stages"), ondelete="CASCADE",
    )


def upgrade() -> None:
    # Plain ADD COLUMNs, not a batch (table copy): on SQLite a batch copy of ``sweeps`` would drop
    # the old table and, with foreign keys on, cascade-delete every stage and point.
    op.add_column("sweeps", sa.Column("spec_dir", sa.Text(), nullable=True))
    op.add_column("sweeps", sa.Column("options", sa.JSON(), server_default=sa.text("'{}'"), nullable=False))
    op.add_column("sweeps", sa.Column("heartbeat_at", UTC_TIMESTAMP, nullable=True))
    op.add_column("sweeps", sa.Column("coordinator", sa.String(length=255), nullable=True))
    op.add_column("sweeps", sa.Column("cancel_requested", sa.Boolean(), server_default=sa.false(), nullable=False))

    op.create_table(
        "stage_attempts",
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("stage_key", sa.String(length=128), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("started_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("finished_at", UTC_TIMESTAMP, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.CheckConstraint("status IN ('running', 'succeeded', 'failed', 'lost', 'cancelled')",
                           name=op.f("ck_stage_attempts_status")),
        _stage_fk("stage_attempts"),
        sa.PrimaryKeyConstraint("sweep_id", "stage_key", "attempt", name=op.f("pk_stage_attempts")),
    )
    op.create_table(
        "placements",
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("stage_key", sa.String(length=128), nullable=False),
        sa.Column("policy", sa.String(length=32), nullable=False),
        sa.Column("decided_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("node_type", sa.String(length=255), nullable=True),
        sa.Column("region", sa.String(length=255), nullable=True),
        sa.Column("start_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("expected_duration_s", sa.Float(), nullable=False),
        sa.Column("expected_energy_j", sa.Float(), nullable=False),
        sa.Column("expected_intensity_g_per_kwh", sa.Float(), nullable=True),
        sa.Column("expected_carbon_g", sa.Float(), nullable=True),
        sa.Column("estimate_source", sa.String(length=32), nullable=False),
        sa.Column("fifo_node_id", sa.String(length=64), nullable=False),
        sa.Column("fifo_node_type", sa.String(length=255), nullable=True),
        sa.Column("fifo_region", sa.String(length=255), nullable=True),
        sa.Column("fifo_start_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("fifo_expected_energy_j", sa.Float(), nullable=False),
        sa.Column("fifo_expected_intensity_g_per_kwh", sa.Float(), nullable=True),
        sa.Column("fifo_expected_carbon_g", sa.Float(), nullable=True),
        _stage_fk("placements"),
        sa.PrimaryKeyConstraint("sweep_id", "stage_key", name=op.f("pk_placements")),
    )
    op.create_table(
        "artifact_claims",
        sa.Column("key", sa.String(length=128), nullable=False),
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("claimed_at", UTC_TIMESTAMP, nullable=False),
        sa.Column("heartbeat_at", UTC_TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_artifact_claims")),
    )


def downgrade() -> None:
    op.drop_table("artifact_claims")
    op.drop_table("placements")
    op.drop_table("stage_attempts")
    for column in ("cancel_requested", "coordinator", "heartbeat_at", "options", "spec_dir"):
        op.drop_column("sweeps", column)  # SQLite >= 3.35 drops in place (no table copy)
