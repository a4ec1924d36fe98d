"""``greensweep db``: the store's schema."""

from __future__ import annotations

import click

from orchestrator.cli._common import _db_url, db_option
from orchestrator.errors import mask_url


@click.group()
def db() -> None:
    """Store schema: upgrade and inspect."""


@db.command("upgrade")
@db_option
def db_upgrade(db: str | None) -> None:
    """Migrate the store's schema to this greensweep's version."""
    from orchestrator.store import current, head, upgrade

    url = _db_url(db)
    before = current(url)
    upgrade(url)
    click.echo(f"{mask_url(url)}: {before or 'empty'} -> {head()}")


@db.command("current")
@db_option
def db_current(db: str | None) -> None:
    """Print the store's schema revision and this greensweep's head."""
    from orchestrator.store import current, head
    from orchestrator.store.migrations import is_known

    url = _db_url(db)
    rev = current(url)
    if rev == head():
        state = "up to date"
    elif rev is not None and not is_known(rev):
        state = f"written by a newer greensweep; this one needs {head()} -- upgrade greensweep (pip install -U greensweep)"
    else:
        state = f"greensweep expects {head()} -- run: greensweep db upgrade --db {mask_url(url)}"
    click.echo(f"{mask_url(url)}: {rev or 'no schema'} ({state})")
