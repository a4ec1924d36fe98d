"""PostgreSQL helpers for tests: each test gets its own schema in the test database.

``GREENSWEEP_TEST_POSTGRES_URL`` names the server (``.ci/run`` sets it to
``postgresql+psycopg://postgres@127.0.0.1:5432/test``). A fresh schema per test keeps
tests independent and leaves the database as it was.
"""

from __future__ import annotations

import contextlib
import uuid
from typing import Iterator
from urllib.parse import quote


@contextlib.contextmanager
def fresh_schema_url(url: str) -> Iterator[str]:
    """Create schema ``gs_<random>``, yield a URL whose connections use it, drop it after."""
    import sqlalchemy as sa

    schema = f"gs_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in url else "?"
    scoped = f"{url}{sep}options={quote(f'-csearch_path={schema}')}"
    try:
        yield scoped
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
