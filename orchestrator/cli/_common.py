"""What the command groups share: the ``--db`` option, opening the store, resolving a
sweep id, writing an output file whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from orchestrator.errors import UsageError

db_option = click.option(
    "--db", "db", envvar="GREENSWEEP_DB_URL", default=None, metavar="URL",
    help="Store URL; also GREENSWEEP_DB_URL. Default: the spec's 'store:', "
         "else sqlite:///./.greensweep/greensweep.db.",
)


def _db_url(db: str | None, spec_store: str | None = None) -> str:
    from orchestrator.runner import db_url

    return db_url(db, spec_store)


def _open_store(db: str | None, spec_store: str | None = None, *, must_exist: bool = False) -> Any:
    """Open the store; read-only commands (*must_exist*) refuse to create a new SQLite
    file, so a mistyped --db is an error rather than an empty store."""
    from orchestrator.runner import open_store

    return open_store(db, spec_store, must_exist=must_exist)


def _resolve_sweep(store: Any, sweep_id: str | None) -> str:
    from orchestrator.export import resolve_sweep

    return resolve_sweep(store, sweep_id)


def _write_output(path: Path, data: bytes, option: str) -> None:
    """Write *data* to *path* whole or not at all (a temporary file renamed into place)."""
    if not path.parent.exists():
        raise UsageError(f"{option} {path}: directory {path.parent} does not exist -- create it or choose another path")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"{option} {path}: cannot write ({e.strerror}) -- choose a writable path") from None
