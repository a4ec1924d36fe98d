"""workers.artifacts.pack / unpack: artifacts through the object store, never trusted blindly."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from workers.artifacts import (
    MANIFEST_FILE,
    STRUCTURE_FILE,
    WEIGHTS_FILE,
    ArtifactTransferError,
    pack,
    sha256_file,
    unpack,
    verified_manifest,
)


def make_artifact(root: Path, key: str = "k1", weights: bytes = b"\x00\x01weights") -> Path:
    d = root / key
    d.mkdir(parents=True)
    (d / WEIGHTS_FILE).write_bytes(weights)
    (d / STRUCTURE_FILE).write_text("{}")
    (d / MANIFEST_FILE).write_text(json.dumps({"sha256": sha256_file(d / WEIGHTS_FILE), "size_bytes": len(weights)}))
    return d


def test_pack_unpack_round_trip_is_verified(tmp_path: Path) -> None:
    make_artifact(tmp_path / "a")
    blob = pack(tmp_path / "a", "k1")
    manifest = unpack(tmp_path / "b", "k1", blob)
    assert manifest == verified_manifest(tmp_path / "a", "k1")
    assert (tmp_path / "b" / "k1" / WEIGHTS_FILE).read_bytes() == b"\x00\x01weights"
    assert unpack(tmp_path / "b", "k1", b"garbage") == manifest  # present and verified: kept, blob unread
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["k1"]  # no temporary left behind


def test_a_damaged_artifact_is_neither_packed_nor_installed(tmp_path: Path) -> None:
    d = make_artifact(tmp_path / "a")
    blob = pack(tmp_path / "a", "k1")
    (d / WEIGHTS_FILE).write_bytes(b"tampered")
    with pytest.raises(ArtifactTransferError, match="checksum"):
        pack(tmp_path / "a", "k1")
    flipped = blob.replace(b"\x00\x01weights", b"\x00\x02weights")
    with pytest.raises(ArtifactTransferError, match="checksum"):
        unpack(tmp_path / "b", "k1", flipped)
    assert not (tmp_path / "b" / "k1").exists()


def test_a_blob_with_other_members_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in ((f"../{WEIGHTS_FILE}", b"x"), (STRUCTURE_FILE, b"{}"), (MANIFEST_FILE, b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ArtifactTransferError, match="not the artifact files"):
        unpack(tmp_path / "b", "k1", buf.getvalue())
    assert not (tmp_path / WEIGHTS_FILE).exists()
