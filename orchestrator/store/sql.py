"""What every part of the SQL store shares: the engine and its one session scope, the
lookups that turn a missing sweep or stage into a one-line error, and the statements
that more than one concern issues (dialect upserts, closing attempts, dropping claims).

The concerns themselves are mixins over :class:`SQLCore`:
:mod:`~orchestrator.store.lifecycle`, :mod:`~orchestrator.store.writes` and
:mod:`~orchestrator.store.reads`, composed into
:class:`~orchestrator.store.repository.Store`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from orchestrator.errors import UsageError
from orchestrator.store.base import BaseStore
from orchestrator.store.models import ArtifactClaimModel, StageAttemptModel, StageModel, SweepModel, utcnow
from orchestrator.store.rows import first_line
from orchestrator.store.session import SessionScope, create_engine_for, default_db_url, sqlite_file

TERMINAL_SWEEP_STATUSES = frozenset({"succeeded", "partial", "failed", "cancelled"})

_Self = TypeVar("_Self", bound="SQLCore")


class SQLCore(BaseStore):
    """The engine, session scope and row lookups of a SQL store (no public operation of
    its own besides opening and closing). The mixins derive from it, so each method
    inherits its contract docstring from :class:`BaseStore` (``help(Store.take_sweep)``)."""

    def __init__(self, engine: Engine, url: str) -> None:
        """Wrap an engine made by :func:`create_engine_for`; use :meth:`open` instead,
        which also checks the schema."""
        self._session = SessionScope(engine, url)

    @classmethod
    def open(cls: type[_Self], url: str | None = None, *, upgrade: bool = False, create: bool = True) -> _Self:
        """Connect to the store at *url* (default :func:`default_db_url`) and check its
        schema.

        An empty database gets the schema created. A store at an older schema revision is
        migrated when *upgrade* is true and otherwise raises
        :class:`~orchestrator.errors.SchemaMismatchError` naming the exact
        ``greensweep db upgrade`` command; a store written by a newer greensweep always
        raises it. With *create* false (read-only use) an empty database is an error and
        is left untouched.
        """
        from orchestrator.store.migrations import empty_store_error, ensure_schema

        url = url or default_db_url()
        path = sqlite_file(url)
        if not create and path is not None and path.is_file() and path.stat().st_size == 0:
            raise empty_store_error(str(path))  # before connecting: even that writes a SQLite header
        engine = create_engine_for(url)
        try:
            ensure_schema(engine, url, upgrade=upgrade, create=create)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, url)

    @property
    def masked_url(self) -> str:
        """The store's URL with its password masked, for messages."""
        return self._session.masked_url

    def close(self) -> None:
        """Release the store's connections."""
        self._session.engine.dispose()

    def _sweep_row(self, session: Session, sweep_id: str) -> SweepModel:
        row = session.get(SweepModel, sweep_id)
        if row is None:
            raise UsageError(f"no sweep {sweep_id!r} in the store at {self.masked_url}")
        return row

    def _stage_row(self, session: Session, sweep_id: str, key: str) -> StageModel:
        row = session.get(StageModel, (sweep_id, key))
        if row is None:
            self._sweep_row(session, sweep_id)
            raise UsageError(f"sweep {sweep_id!r} has no stage {key!r} in the store at {self.masked_url}")
        return row


def dialect_insert(session: Session, model: type) -> Any:
    """``INSERT`` with ``ON CONFLICT`` support: the backend's own insert construct (the
    engine factory admits only SQLite and PostgreSQL)."""
    if session.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(model)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(model)


def upsert(
    session: Session,
    model: type,
    rows: list[dict[str, Any]],
    key: tuple[str, ...],
    exclude: Iterable[str] = (),
) -> None:
    """INSERT *rows*, or on a conflict of *key* UPDATE the given columns (except *key*
    and *exclude*): ``ON CONFLICT DO UPDATE`` on both SQLite and PostgreSQL. The rows of
    one call must share their keys (one multi-VALUES statement)."""
    if not rows:
        return
    statement = dialect_insert(session, model).values(rows)
    keep = set(key) | set(exclude)
    statement = statement.on_conflict_do_update(
        index_elements=list(key),
        set_={column: statement.excluded[column] for column in rows[0] if column not in keep},
    )
    session.execute(statement)


def close_attempts(session: Session, sweep_id: str, keys: Sequence[str], status: str, error: str | None) -> None:
    """End the open (``running``) attempts of the stages *keys* with *status*."""
    if not keys:
        return
    for a in session.scalars(select(StageAttemptModel).where(
            StageAttemptModel.sweep_id == sweep_id, StageAttemptModel.stage_key.in_(list(keys)),
            StageAttemptModel.status == "running")):
        a.status = status
        a.finished_at = utcnow()
        a.error = first_line(error)


def release_claims(session: Session, sweep_id: str) -> None:
    """Drop every artifact claim *sweep_id* holds."""
    session.execute(delete(ArtifactClaimModel).where(ArtifactClaimModel.sweep_id == sweep_id))
