"""Stage progress: per-epoch (per-step) reports of long stages.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stage_progress",
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("stage_key", sa.String(length=128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["sweep_id", "stage_key"],
            ["stages.sweep_id", "stages.key"],
            name=op.f("fk_stage_progress_sweep_id_stage_key_stages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sweep_id", "stage_key", "step", name=op.f("pk_stage_progress")),
    )


def downgrade() -> None:
    op.drop_table("stage_progress")
