"""Cohorts: ``cohorts``, ``stages.cohort_id``, ``measurements.cohort_id`` and ``.position``.

Evaluations are now measured in cohorts: the evaluate stages of one target node measured
together in interleaved rounds, with the reference (the uncompressed model on torch fp32)
in every cohort, so each model's time and energy have a paired ratio to the reference.
A ``cohorts`` row keeps what the cohort was -- its seed, rounds, size, reference, every
protocol setting and the round-to-round noise floor measured on the reference -- so a
verdict can be traced to how it was measured; a stage and each of its measured rounds
name the cohort that measured them, and a round its 0-based position in that round's
seeded order. Nothing is backfilled: rows measured before cohorts keep NULL (they were
measured one model after another, not in a cohort).

``cohort_id`` is a plain column, not a foreign key: SQLite cannot add a constraint to a
table in place, and the store writes the cohort row in the same transaction as the
results that name it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-08
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# A snapshot, like 0001: no import of orchestrator.store.models.
UTC_TIMESTAMP = sa.DateTime(timezone=True)

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cohorts",
        sa.Column("sweep_id", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=True),
        sa.Column("target", sa.String(length=255), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("reference_key", sa.String(length=128), nullable=False),
        sa.Column("reference_shown", sa.Boolean(), nullable=False),
        sa.Column("protocol", sa.JSON(), nullable=False),
        sa.Column("noise_floor_cv", sa.Float(), nullable=True),
        sa.Column("reference", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC_TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(["sweep_id"], ["sweeps.id"], name=op.f("fk_cohorts_sweep_id_sweeps"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("sweep_id", "id", name=op.f("pk_cohorts")),
    )
    # In-place ADD COLUMNs (``recreate="never"``, as in 0004): a batch copy of ``stages`` or
    # ``measurements`` on SQLite would drop the old table and, with foreign keys on,
    # cascade-delete the rows that refer to it.
    with op.batch_alter_table("stages", recreate="never") as batch:
        batch.add_column(sa.Column("cohort_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("measurements", recreate="never") as batch:
        batch.add_column(sa.Column("cohort_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("position", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("measurements", "position")  # SQLite >= 3.35 drops in place (no table copy)
    op.drop_column("measurements", "cohort_id")
    op.drop_column("stages", "cohort_id")
    op.drop_table("cohorts")
