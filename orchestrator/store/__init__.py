"""greensweep's SQL store: SQLite by default, PostgreSQL for clusters.

Public API::

    store = Store.open(url)              # url defaults to default_db_url()
    store.create_sweep(...); store.record_stage_result(sweep_id, result); ...
    store.points(sweep_id) -> list[PointRecord]     # raw records ...
    store.results(sweep_id) -> list[ResultRow]      # ... aggregated by orchestrator.report.aggregate

    upgrade(url) -> str                  # what `greensweep db upgrade --db URL` runs
    current(url) -> str | None           # the store's schema revision
    head() -> str                        # the revision this greensweep needs

The contract -- only the coordinator writes, readers get frozen records, what is
thread-safe -- is :class:`~orchestrator.store.base.BaseStore`; :class:`Store` is its SQL
implementation (one module per concern, see :mod:`orchestrator.store.repository`).
Names are loaded on first use, so ``import orchestrator.store`` does not import
SQLAlchemy or Alembic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from orchestrator.store.records import (
    ArtifactRecord,
    CohortRecord,
    EnergyRecord,
    MeasurementRecord,
    NodeRecord,
    PointRecord,
    ResultRow,
    StageRecord,
    SweepRecord,
)

if TYPE_CHECKING:
    from orchestrator.store.base import BaseStore
    from orchestrator.store.migrations import current, head, upgrade
    from orchestrator.store.models import STAGE_STATUSES, SWEEP_STATUSES
    from orchestrator.store.repository import Store
    from orchestrator.store.session import create_engine_for, default_db_url, sqlite_file
    from workers.stages.registry import stage_label

_LAZY = {
    "BaseStore": "orchestrator.store.base",
    "Store": "orchestrator.store.repository",
    "stage_label": "workers.stages.registry",  # kept here for callers of the old location
    "create_engine_for": "orchestrator.store.session",
    "default_db_url": "orchestrator.store.session",
    "sqlite_file": "orchestrator.store.session",
    "upgrade": "orchestrator.store.migrations",
    "current": "orchestrator.store.migrations",
    "head": "orchestrator.store.migrations",
    "STAGE_STATUSES": "orchestrator.store.models",
    "SWEEP_STATUSES": "orchestrator.store.models",
}

__all__ = [
    "STAGE_STATUSES",
    "SWEEP_STATUSES",
    "ArtifactRecord",
    "BaseStore",
    "CohortRecord",
    "EnergyRecord",
    "MeasurementRecord",
    "NodeRecord",
    "PointRecord",
    "ResultRow",
    "StageRecord",
    "Store",
    "SweepRecord",
    "create_engine_for",
    "current",
    "default_db_url",
    "head",
    "sqlite_file",
    "stage_label",
    "upgrade",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
