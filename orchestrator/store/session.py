"""Store URLs, engines and the one session scope.

Two backends are supported:

* **SQLite** (the embedded default): a file in WAL mode so readers never block the
  writer, a busy timeout so writers queue instead of failing, foreign keys on, and write
  transactions opened with ``BEGIN IMMEDIATE``. Taking the write lock at the start of a
  write transaction (instead of at its first write) means two writers can never deadlock
  on a lock upgrade, which SQLite would report at once as ``database is locked`` without
  waiting for the busy timeout.
* **PostgreSQL** through psycopg 3 (``postgresql+psycopg://``; ``postgresql://`` and
  ``postgres://`` are rewritten to it).

Every SQLAlchemy error leaving this package is a :class:`~orchestrator.errors.StoreError`
with a one-line message in which passwords are masked.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.errors import StoreError, mask_url
from workers.util import first_line

ENV_DB_URL = "GREENSWEEP_DB_URL"
DEFAULT_DB_URL = "sqlite:///./.greensweep/greensweep.db"

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10

# Execution option that marks an engine whose transactions write (see _begin_sqlite).
_WRITE_OPTION = "greensweep_write"

_URL_FIX = f"give --db or set {ENV_DB_URL} to sqlite:///path/to/file.db or postgresql://user:password@host:5432/dbname"


def default_db_url() -> str:
    """The store URL to use when none is given: ``$GREENSWEEP_DB_URL`` or a SQLite file
    under ``./.greensweep/`` (its directory is created when the engine is made)."""
    return os.environ.get(ENV_DB_URL) or DEFAULT_DB_URL


def one_line(error: BaseException) -> str:
    """The first line of a (DBAPI) error message, with passwords masked."""
    orig = getattr(error, "orig", None)  # SQLAlchemy wraps the driver's exception
    return mask_url(first_line(orig if orig is not None else error))


def _parse(url: str) -> URL:
    userinfo = url.split("://", 1)[1].rpartition("@")[0] if "://" in url else ""
    if not url.lower().startswith("sqlite") and any(c.isspace() for c in userinfo):
        # "user:pa ss@host": masking cannot tell where such a password ends, so no part
        # of the URL is echoed (a SQLite file path may hold spaces)
        raise StoreError("the store URL contains whitespace -- percent-encode it in the password or user name "
                         "(a space is %20)")
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StoreError(f"invalid store URL {mask_url(url)!r}; {_URL_FIX}") from None
    backend = parsed.get_backend_name()
    if parsed.host and "@" in parsed.host:
        # "user:p@ss@host" parses as host "ss@host": the driver would then print the
        # password's tail in its "cannot resolve host" error
        raise StoreError("the store URL has an '@' in its password or user name -- percent-encode it as %40, "
                         "e.g. postgresql+psycopg://user:p%40ss@host/db")
    if backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        if "connect_timeout" not in parsed.query:
            parsed = parsed.update_query_dict({"connect_timeout": str(POSTGRES_CONNECT_TIMEOUT_S)})
    elif backend != "sqlite":
        raise StoreError(f"unsupported store URL {mask_url(url)!r} (backend {backend!r}); {_URL_FIX}")
    return parsed


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite *url*; None for other backends and in-memory stores."""
    parsed = _parse(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def create_engine_for(url: str) -> Engine:
    """An engine for *url*, configured for the store and checked by one connection.

    Raises :class:`StoreError` (one line, password masked, with the fix) for a malformed
    or unsupported URL and for a database that cannot be reached.
    """
    parsed = _parse(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = _sqlite_engine(parsed)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError, ImportError) as e:
        raise StoreError(f"cannot use store URL {mask_url(url)!r}: {one_line(e)}; {_URL_FIX}") from e
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as e:
        engine.dispose()
        raise StoreError(
            f"cannot connect to the store at {mask_url(url)}: {one_line(e)}; "
            f"check that the database server is running and the URL is right ({_URL_FIX})"
        ) from e
    return engine


def _sqlite_engine(url: URL) -> Engine:
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        try:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the directory for the store file {database!r}: {e.strerror}") from e
    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Disable pysqlite's own transaction handling (it BEGINs lazily, before the first
        # write, and commits before DDL); _begin_sqlite emits BEGIN itself. This is the
        # recipe of SQLAlchemy's SQLite dialect documentation.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # first: the statements below take locks, and a new file's switch to WAL
            # fails at once ("database is locked") without a timeout when another
            # process opens it at the same moment
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            _retry_locked(lambda: _enable_wal(cursor))
            cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; safe in WAL
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_sqlite(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _enable_wal(cursor: Any) -> None:
    # WAL is a property of the file: switch it on only for an empty file or one that is a
    # store (has alembic_version), never for another application's database that the
    # schema check is about to refuse
    tables = {row[0] for row in cursor.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables or "alembic_version" in tables:
        cursor.execute("PRAGMA journal_mode=WAL")


def _retry_locked(step: Callable[[], None]) -> None:
    """Run *step*, again while SQLite answers ``database is locked`` at once, up to the
    busy timeout. A new file's first connections race to switch it to WAL while another
    may already be creating the schema in it; SQLite reports the lock upgrade that would
    deadlock at once, without calling the busy handler, so waiting is done here."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def write_engine(engine: Engine) -> Engine:
    """*engine* (sharing its pool) for transactions that write: on SQLite they take the
    write lock at BEGIN; on PostgreSQL nothing changes."""
    return engine.execution_options(**{_WRITE_OPTION: True})


class SessionScope:
    """The one way the store talks to its database.

    ``with scope(write=True) as session:`` yields a session in a fresh transaction that
    commits when the block succeeds and rolls back when it raises; any
    ``SQLAlchemyError`` becomes a :class:`StoreError` (``from`` the original) whose one-line
    message names the masked URL. Safe to share between threads: each block gets its own
    session and pooled connection.
    """

    def __init__(self, engine: Engine, url: str) -> None:
        self.engine = engine
        self.masked_url = mask_url(url)
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        self._write = sessionmaker(bind=write_engine(engine), expire_on_commit=False)

    @contextmanager
    def __call__(self, *, write: bool) -> Iterator[Session]:
        session = (self._write if write else self._read)()
        try:
            yield session
            session.commit()
        except SQLAlchemyError as e:
            _rollback(session)
            raise StoreError(f"store operation failed on {self.masked_url}: {one_line(e)}") from e
        except BaseException:
            _rollback(session)
            raise
        finally:
            session.close()


def _rollback(session: Session) -> None:
    # A failed rollback (e.g. the server went away) must not hide the error being raised.
    try:
        session.rollback()
    except SQLAlchemyError:
        pass
