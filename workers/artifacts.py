"""Torch-free view of the artifact directory layout.

``<artifact_root>/<key>/`` holds ``weights.safetensors``, ``structure.json`` and
``manifest.json``; the manifest records the weights file's sha256. The coordinator uses
this module to decide whether a stage's artifact can be reused without importing torch;
``workers.models`` builds and loads the models themselves.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

WEIGHTS_FILE = "weights.safetensors"
STRUCTURE_FILE = "structure.json"
MANIFEST_FILE = "manifest.json"


def artifact_dir(root: str | Path, key: str) -> Path:
    return Path(root) / key


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(root: str | Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete artifact, or None when the directory is absent/incomplete."""
    d = artifact_dir(root, key)
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if not (d / WEIGHTS_FILE).is_file() or not (d / STRUCTURE_FILE).is_file():
        return None
    return manifest


def verified_manifest(root: str | Path, key: str) -> dict[str, Any] | None:
    """Like :func:`read_manifest`, but also None when the weights fail their checksum."""
    manifest = read_manifest(root, key)
    if manifest is None:
        return None
    if sha256_file(artifact_dir(root, key) / WEIGHTS_FILE) != manifest.get("sha256"):
        return None
    return manifest
