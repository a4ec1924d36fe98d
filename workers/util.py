"""Small stdlib-only helpers shared by the workers and the orchestrator.

The orchestrator imports :mod:`workers` (never the other way round), so a helper both
sides need lives here, free of torch and of any third-party import: ``import
workers.util`` costs nothing on the coordinator.

- :func:`first_line` -- the one rule for showing an exception (or an error text) on
  one line;
- :func:`write_durably` / :func:`fsync_dir` -- a file whose bytes are on disk before it
  is renamed into place, and a rename that survives a power cut;
- :func:`sha256_file` -- the digest that artifacts and shipped files are checked by;
- :func:`canonical_json` -- the exact bytes stage keys and spec fingerprints hash;
- :data:`J_PER_KWH` -- the one joules-per-kilowatt-hour constant.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = ["J_PER_KWH", "canonical_json", "first_line", "fsync_dir", "sha256_file", "write_durably"]

J_PER_KWH = 3.6e6  # joules in a kilowatt-hour: every energy-to-carbon conversion divides by it


def first_line(error: BaseException | str, *, limit: int | None = None) -> str:
    """The first non-blank line of ``error``'s message, stripped, at most ``limit``
    characters.

    An exception with an empty message gives its class name (so a bare ``KeyError()``
    still says something); an empty text gives ``""``.
    """
    text = error if isinstance(error, str) else str(error)
    lines = [line.strip() for line in text.strip().splitlines()]
    line = lines[0] if lines else ("" if isinstance(error, str) else type(error).__name__)
    return line if limit is None else line[:limit]


def write_durably(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` (a ``str`` as UTF-8) to ``path`` and fsync it, so a later rename
    never exposes a file whose bytes are still only in the page cache."""
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical_json(value: Any) -> str:
    """``value`` as compact JSON with sorted keys (non-JSON values by ``str``).

    Stage keys are hashes of these bytes: changing anything here changes every key, and
    every stored artifact stops being reused.
    """
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
