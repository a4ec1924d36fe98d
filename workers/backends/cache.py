"""Content-addressed storage of deployables (exported ONNX models, OpenVINO IR).

A deployable is keyed by what it is made from: the artifact (its key, or its weights'
sha256 for a model without one), the runtime, the precision and the runtime's version
(plus anything else that changes the output, e.g. a GPU's compute capability), so two
evaluations of the same artifact on the same runtime export once, and an upgraded runtime
exports afresh. Entries appear by atomic rename with a ``deployable.json`` written last,
like artifacts: a reader never sees half an entry, and a builder that loses a race uses
the winner's copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from workers.util import canonical_json, fsync_dir, write_durably

ENTRY_FILE = "deployable.json"
KEY_HEX_CHARS = 24


def deployable_key(material: Mapping[str, Any]) -> str:
    """The cache key of a deployable made from *material*."""
    return hashlib.sha256(canonical_json(dict(material)).encode()).hexdigest()[:KEY_HEX_CHARS]


def cached(cache_dir: Path, material: Mapping[str, Any], build: Callable[[Path], Mapping[str, Any]]) -> tuple[Path, bool]:
    """The directory of the deployable made from *material* under *cache_dir*, and
    whether it was built now (False: reused).

    *build(directory)* writes the deployable's files into an empty temporary directory
    and returns facts to keep with them (recorded in ``deployable.json``)."""
    final = cache_dir / deployable_key(material)
    if (final / ENTRY_FILE).is_file():
        return final, False
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=cache_dir))
    try:
        facts = build(tmp)
        write_durably(tmp / ENTRY_FILE, json.dumps({"material": dict(material), **dict(facts)}, indent=1,
                                                   sort_keys=True, default=str))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / ENTRY_FILE).is_file():  # not another builder's complete copy
                raise
            return final, False
        fsync_dir(cache_dir)
        return final, True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def entry_facts(directory: Path) -> dict[str, Any]:
    """What ``build`` returned for the deployable in *directory*."""
    return json.loads((directory / ENTRY_FILE).read_text())


def files_size(paths: list[Path]) -> int:
    """Bytes the deployable occupies on disk."""
    return sum(p.stat().st_size for p in paths if p.is_file())
