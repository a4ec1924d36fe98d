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

from workers.util import sha256_file

WEIGHTS_FILE = "weights.safetensors"
STRUCTURE_FILE = "structure.json"
MANIFEST_FILE = "manifest.json"


def artifact_dir(root: str | Path, key: str) -> Path:
    return Path(root) / key


def read_manifest(root: str | Path, key: str) -> dict[str, Any] | None:
    """The manifest of a complete artifact, or None when the directory is absent/incomplete."""
    d = artifact_dir(root, key)
    try:
        manifest = json.loads((d / MANIFEST_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    if not (d / WEIGHTS_FILE).is_file() or not (d / STRUCTURE_FILE).is_file():
        return None
    if not all((d / name).is_file() for name in deploy_files(manifest)):
        return None
    return manifest


def deploy_files(manifest: dict[str, Any]) -> dict[str, str]:
    """The artifact's runtime payload (a model a runtime's quantizer made, next to its
    float parent's torch files): file name -> sha256; empty for a torch artifact."""
    deploy = manifest.get("deploy") or {}
    files = dict(deploy.get("files") or {})
    for name in files:
        if not _plain_name(name) or name in ARTIFACT_FILES:
            raise ArtifactTransferError(f"artifact payload file name {name!r} is not a plain file name")
    return files


def _plain_name(name: str) -> bool:
    return bool(name) and not name.startswith(".") and "/" not in name and "\\" not in name


def verified_manifest(root: str | Path, key: str) -> dict[str, Any] | None:
    """Like :func:`read_manifest`, but also None when the weights fail their checksum."""
    manifest = read_manifest(root, key)
    if manifest is None:
        return None
    if sha256_file(artifact_dir(root, key) / WEIGHTS_FILE) != manifest.get("sha256"):
        return None
    if any(sha256_file(artifact_dir(root, key) / name) != digest for name, digest in deploy_files(manifest).items()):
        return None
    return manifest


# -- moving artifacts between nodes without a shared disk ---------------------------------

ARTIFACT_FILES = (WEIGHTS_FILE, STRUCTURE_FILE, MANIFEST_FILE)


class ArtifactTransferError(Exception):
    """A shipped artifact is incomplete, malformed, or fails its checksum."""


def pack(root: str | Path, key: str) -> bytes:
    """The artifact *key* under *root* as one uncompressed tar (its three files and its
    runtime payload, if any), for the Ray object store. Refuses an artifact that fails
    its checksum."""
    import io
    import tarfile

    manifest = verified_manifest(root, key)
    if manifest is None:
        raise ArtifactTransferError(f"artifact {key} under {root} is missing or fails its checksum")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in (*ARTIFACT_FILES, *deploy_files(manifest)):
            tar.add(str(artifact_dir(root, key) / name), arcname=name, recursive=False)
    return buf.getvalue()


def unpack(root: str | Path, key: str, blob: bytes) -> dict[str, Any]:
    """Install a :func:`pack`-ed artifact as ``<root>/<key>`` and return its manifest.

    Only the three artifact files and the payload files its manifest names, as regular
    files without paths, are accepted; every file must match the manifest's sha256; the directory appears by atomic rename, so
    a reader never sees half of it. An artifact already present and verified is kept.
    """
    import io
    import os
    import shutil
    import tarfile
    import tempfile

    present = verified_manifest(root, key)
    if present is not None:
        return present
    Path(root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.", dir=root))
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            members = tar.getmembers()
            names = sorted(m.name for m in members)
            payload: dict[str, str] = {}
            if MANIFEST_FILE in names:
                shipped = tar.extractfile(tar.getmember(MANIFEST_FILE))
                try:
                    payload = deploy_files(json.loads(shipped.read())) if shipped is not None else {}
                except (json.JSONDecodeError, AttributeError, TypeError) as e:
                    raise ArtifactTransferError(f"shipped artifact {key} has an unreadable manifest ({e})") from None
            if names != sorted((*ARTIFACT_FILES, *payload)) or not all(m.isfile() for m in members):
                raise ArtifactTransferError(f"shipped artifact {key} holds {names}, not the artifact files")
            for m in members:
                src = tar.extractfile(m)
                assert src is not None
                with open(tmp / m.name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if verified_manifest(tmp.parent, tmp.name) is None:
            raise ArtifactTransferError(f"shipped artifact {key} fails its checksum")
        try:
            os.rename(tmp, artifact_dir(root, key))
        except OSError:
            if verified_manifest(root, key) is None:  # not someone else's identical copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    manifest = verified_manifest(root, key)
    if manifest is None:
        raise ArtifactTransferError(f"artifact {key} could not be installed under {root}")
    return manifest


# -- files a spec names (model checkpoints, teacher checkpoints) ---------------------------

FILES_DIR = "files"
FILE_PREFIX = "file:"  # a shipped file's entry among a task's shipped keys: "file:<sha256>:<path>"


def file_entry(sha256: str, path: str) -> str:
    """The shipped-keys entry of the file at *path* (as the spec names it) whose content
    has digest *sha256*."""
    return f"{FILE_PREFIX}{sha256}:{path}"


def parse_file_entry(entry: str) -> tuple[str, str]:
    """``(sha256, path)`` of a :func:`file_entry`."""
    sha, _, path = entry.removeprefix(FILE_PREFIX).partition(":")
    if not sha or not path:
        raise ArtifactTransferError(f"malformed shipped-file entry {entry!r}")
    return sha, path


def install_file(root: str | Path, entry: str, blob: bytes) -> Path:
    """Install a shipped file under ``<root>/files/<sha256>/<name>`` and return its path.

    The content must match the digest the spec recorded; the file appears by atomic
    rename, and one already there with the right digest is kept.
    """
    import hashlib
    import os
    import tempfile

    sha, path = parse_file_entry(entry)
    dest_dir = Path(root) / FILES_DIR / sha
    dest = dest_dir / (Path(path).name or "file")
    if dest.is_file() and sha256_file(dest) == sha:
        return dest
    if hashlib.sha256(blob).hexdigest() != sha:
        raise ArtifactTransferError(f"shipped file {path} does not match the sha256 the spec recorded for it")
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".", dir=dest_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest
