"""The store: :class:`Store`, the SQL implementation of the
:class:`~orchestrator.store.base.BaseStore` contract, composed of one mixin per concern.

==========================================  ============================================
:mod:`~orchestrator.store.lifecycle`        sweeps, ownership, heartbeat, cancel, claims
:mod:`~orchestrator.store.writes`           stage status, attempts, results, progress,
                                            carbon, placements, nodes
:mod:`~orchestrator.store.reads`            queries returning frozen records
:mod:`~orchestrator.store.rows`             ORM row <-> record mapping
:mod:`~orchestrator.store.sql`              engine, session scope, shared statements
==========================================  ============================================
"""

from __future__ import annotations

from orchestrator.store.lifecycle import LifecycleMixin
from orchestrator.store.reads import ReadsMixin
from orchestrator.store.writes import WritesMixin


class Store(LifecycleMixin, WritesMixin, ReadsMixin):
    """greensweep's record of sweeps: SQLite (embedded default) or PostgreSQL.

    The contract -- only the coordinator writes, readers get frozen records, every method
    is one transaction, which writes are idempotent, what is thread-safe -- is
    :class:`~orchestrator.store.base.BaseStore`'s. Here it is kept with SQLAlchemy: each
    call opens its own session from one :class:`~orchestrator.store.session.SessionScope`
    (``SQLAlchemyError`` becomes :class:`~orchestrator.errors.StoreError`); on SQLite a
    write transaction takes the write lock at ``BEGIN IMMEDIATE`` (WAL, busy timeout), so
    writers from several processes queue and readers never block.

    Open one with :meth:`Store.open`, which checks the schema; close it (or use it as a
    context manager) to release its connections.
    """
