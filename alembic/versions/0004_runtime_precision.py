"""Runtimes and precisions: ``stages.runtime``, ``stages.precision``, ``stages.runtime_version``.

An evaluation now runs on one runtime (torch eager, onnxruntime, openvino...) at one
precision, and a sweep point is (chain, target, runtime, precision). The three columns are
nullable (only evaluate stages have them). Existing evaluate rows are backfilled: runtime
and precision from their params when present, else ``torch`` / ``fp32`` -- the only way
an evaluation ran before there were runtimes; ``runtime_version`` from the
``metrics["runtime"]["runtime_version"]`` their result recorded, when it did.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

# A snapshot, like 0001: no import of orchestrator.store.models.
revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("runtime", "precision", "runtime_version")

# What an evaluation without these params ran on (the defaults of evaluate's params).
DEFAULT_RUNTIME, DEFAULT_PRECISION = "torch", "fp32"

_stages = sa.table(
    "stages",
    sa.column("sweep_id", sa.String()),
    sa.column("key", sa.String()),
    sa.column("kind", sa.String()),
    sa.column("params", sa.JSON()),
    sa.column("metrics", sa.JSON()),
    sa.column("runtime", sa.String()),
    sa.column("precision", sa.String()),
    sa.column("runtime_version", sa.String()),
)


def upgrade() -> None:
    # A batch that never copies the table (``recreate="never"``: in-place ADD COLUMNs, as in
    # 0003): a batch copy of ``stages`` on SQLite would drop the old table and, with foreign
    # keys on, cascade-delete its measurements, attempts, placements, progress and points.
    with op.batch_alter_table("stages", recreate="never") as batch:
        batch.add_column(sa.Column("runtime", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("precision", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("runtime_version", sa.String(length=255), nullable=True))
    _backfill(op.get_bind())


def _backfill(connection: sa.Connection) -> None:
    """Fill the new columns of every evaluate row, reading its JSON in Python (the same on
    SQLite and PostgreSQL, whose JSON operators differ)."""
    rows = connection.execute(
        sa.select(_stages.c.sweep_id, _stages.c.key, _stages.c.params, _stages.c.metrics)
        .where(_stages.c.kind == "evaluate")
    ).all()
    values = [{"b_sweep_id": sweep_id, "b_key": key, **_filled(params, metrics)}
              for sweep_id, key, params, metrics in rows]
    if values:
        connection.execute(
            _stages.update()
            .where(_stages.c.sweep_id == sa.bindparam("b_sweep_id"), _stages.c.key == sa.bindparam("b_key"))
            .values(runtime=sa.bindparam("runtime"), precision=sa.bindparam("precision"),
                    runtime_version=sa.bindparam("runtime_version")),
            values,
        )


def _filled(params: Any, metrics: Any) -> dict[str, str | None]:
    params = params if isinstance(params, dict) else {}
    described = (metrics if isinstance(metrics, dict) else {}).get("runtime")
    version = described.get("runtime_version") if isinstance(described, dict) else None
    return {
        "runtime": str(params.get("runtime") or DEFAULT_RUNTIME),
        "precision": str(params.get("precision") or DEFAULT_PRECISION),
        "runtime_version": None if version is None else str(version),
    }


def downgrade() -> None:
    for column in reversed(COLUMNS):
        op.drop_column("stages", column)  # SQLite >= 3.35 drops in place (no table copy)
