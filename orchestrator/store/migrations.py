"""Schema versions: Alembic, run in-process on the store's own engine.

The repository's ``alembic/`` directory is the only way the schema is created or changed.
It ships with greensweep as package data (``greensweep_data.alembic``, see
:mod:`orchestrator.resources`), so a wheel install migrates stores too. The library runs
it in-process (the MLflow pattern): it builds an Alembic ``Config`` programmatically and
hands ``alembic/env.py`` an open connection through ``config.attributes["connection"]``,
so migrations run on the very engine (SQLite pragmas, ``BEGIN IMMEDIATE``, psycopg) the
store uses. The same scripts also serve the ``alembic`` command line at the repository
root (``alembic.ini``).

Alembic is imported inside the functions: it is slow to import and only needed when the
schema is checked or changed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import SQLAlchemyError

from orchestrator.errors import GreensweepError, SchemaMismatchError, StoreError, mask_url
from orchestrator.resources import shipped_dir
from orchestrator.store.session import create_engine_for, one_line, write_engine

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

VERSION_TABLE = "alembic_version"  # Alembic's default

T = TypeVar("T")

# Alembic keeps the running migration's environment in module globals (alembic.context),
# so two threads of one process must not run migrations at the same time.
_MIGRATION_LOCK = threading.Lock()


def script_location() -> Path:
    """The absolute path of the shipped ``alembic/`` directory (installed package data,
    or the checkout's folder), whatever the CWD."""
    try:
        return shipped_dir("alembic")
    except GreensweepError as e:
        raise StoreError(str(e)) from None


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config pointing at :func:`script_location`, independent of the CWD;
    *connection*, when given, is the one ``env.py`` migrates on."""
    from alembic.config import Config

    location = script_location()
    config = Config()
    config.set_main_option("script_location", str(location).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The schema revision this greensweep needs."""
    revision = _scripts().get_current_head()
    if revision is None:
        raise StoreError(f"no migration script in {script_location() / 'versions'}; the installation is broken")
    return revision


def current_revision(engine: Engine) -> str | None:
    """The revision the database behind *engine* is at; None when it has none."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def current(url: str) -> str | None:
    """The schema revision of the store at *url*; None when it has no greensweep schema."""
    engine = create_engine_for(url)
    try:
        return _translated(url, lambda: current_revision(engine))
    finally:
        engine.dispose()


def upgrade_engine(engine: Engine, url: str, revision: str = "head") -> None:
    """Migrate the database behind *engine* to *revision* in one transaction (on SQLite
    under the write lock, so two processes upgrading at once run the scripts once)."""
    from alembic import command

    def run() -> None:
        with _MIGRATION_LOCK, write_engine(engine).begin() as connection:
            command.upgrade(alembic_config(connection), revision)

    _translated(url, run)


def upgrade(url: str) -> str:
    """Migrate the store at *url* to :func:`head`; returns the revision it is now at.
    Idempotent: a store already at head is left as it is."""
    engine = create_engine_for(url)
    try:
        revision = _translated(url, lambda: current_revision(engine))
        scripts = _scripts()
        if revision is not None and revision not in _known(scripts):
            raise _newer_error(url, revision, scripts)
        upgrade_engine(engine, url)
        return head()
    finally:
        engine.dispose()


def empty_store_error(where: str) -> StoreError:
    """What a read-only command says about a store with no schema yet (never created)."""
    return StoreError(f"the store at {where} is empty (no sweep has run there) -- "
                      "run one first with: greensweep run SPEC --db URL, or point --db at another store")


def is_known(revision: str) -> bool:
    """Whether *revision* is one of this greensweep's migrations (False: a newer one wrote it)."""
    return revision in _known(_scripts())


def ensure_schema(engine: Engine, url: str, *, upgrade: bool = False, create: bool = True) -> None:
    """Check that the store behind *engine* is at :func:`head`.

    An empty database (no tables at all) gets the schema created, unless *create* is false
    (read-only commands): then it raises :class:`StoreError`. A database at an older
    revision, or holding other tables but no greensweep schema, is migrated when
    *upgrade* is true and otherwise raises :class:`SchemaMismatchError` naming the exact
    ``greensweep db upgrade`` command. A revision this greensweep does not know (a newer
    greensweep wrote the store) always raises.
    """
    masked = mask_url(url)
    command = f"greensweep db upgrade --db {masked}"
    scripts = _scripts()
    needed = scripts.get_current_head()
    revision, tables = _translated(url, lambda: _inspect(engine))
    if revision == needed:
        return
    if revision is None:
        if tables <= {VERSION_TABLE} and not create:
            raise empty_store_error(masked)
        if tables <= {VERSION_TABLE} or upgrade:
            upgrade_engine(engine, url)
            return
        raise SchemaMismatchError(f"database at {masked} has no greensweep schema; run: {command}")
    if revision not in _known(scripts):
        raise _newer_error(url, revision, scripts)
    if upgrade:
        upgrade_engine(engine, url)
        return
    raise SchemaMismatchError(
        f"the store at {masked} has schema revision {revision!r}, older than the {needed!r} "
        f"this greensweep needs; run: {command}"
    )


def _known(scripts: ScriptDirectory) -> set[str]:
    return {script.revision for script in scripts.walk_revisions()}


def _newer_error(url: str, revision: str, scripts: ScriptDirectory) -> SchemaMismatchError:
    return SchemaMismatchError(
        f"the store at {mask_url(url)} has schema revision {revision!r}, which this greensweep "
        f"does not know (it needs {scripts.get_current_head()!r}): a newer greensweep wrote it; "
        "upgrade greensweep (pip install -U greensweep) to use this store"
    )


def _inspect(engine: Engine) -> tuple[str | None, set[str]]:
    from alembic.runtime.migration import MigrationContext

    # Tables first, then the revision: a schema created concurrently (tables and stamp
    # commit together) can then look "already at head" but never "tables without a
    # revision", which would be misread as a foreign database.
    with engine.connect() as connection:
        tables = set(inspect(connection).get_table_names())
        revision = MigrationContext.configure(connection).get_current_revision()
        return revision, tables


def _translated(url: str, fn: Callable[[], T]) -> T:
    """Run *fn*, turning SQLAlchemy errors into a one-line :class:`StoreError`."""
    try:
        return fn()
    except SQLAlchemyError as e:
        raise StoreError(f"schema operation failed on {mask_url(url)}: {one_line(e)}") from e
