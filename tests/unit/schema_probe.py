"""What a store's schema holds, read straight from the database (for migration tests)."""

from __future__ import annotations

import sqlalchemy as sa

from orchestrator.store import create_engine_for


def columns(url: str, table: str) -> set[str]:
    engine = create_engine_for(url)
    try:
        return {c["name"] for c in sa.inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


def tables(url: str) -> set[str]:
    engine = create_engine_for(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def count(url: str, table: str) -> int:
    engine = create_engine_for(url)
    try:
        with engine.connect() as c:
            return c.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar_one()
    finally:
        engine.dispose()
