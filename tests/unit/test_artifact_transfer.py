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


# -- files a spec names ---------------------------------------------------------------------


def test_a_shipped_file_is_installed_by_digest_and_checked(tmp_path: Path) -> None:
    import hashlib

    from workers.artifacts import file_entry, install_file

    data = b"checkpoint bytes"
    sha = hashlib.sha256(data).hexdigest()
    entry = file_entry(sha, "/data/models/teacher.safetensors")
    local = install_file(tmp_path / "cache", entry, data)
    assert local == tmp_path / "cache" / "files" / sha / "teacher.safetensors" and local.read_bytes() == data
    assert install_file(tmp_path / "cache", entry, b"") == local  # already there: kept, blob unused
    with pytest.raises(ArtifactTransferError, match="does not match the sha256 the spec recorded"):
        install_file(tmp_path / "other", entry, b"changed since the spec was read")
    assert not (tmp_path / "other" / "files" / sha / "teacher.safetensors").exists()
    with pytest.raises(ArtifactTransferError, match="malformed"):
        install_file(tmp_path / "cache", "file:nocolon", data)


def test_a_root_stage_reads_its_shipped_checkpoint_on_a_node_without_the_file(tmp_path: Path) -> None:
    """No shared disk: the model's checkpoint travels with the task and the stage uses the
    node-local copy -- the path the spec named does not exist on the node."""
    import hashlib

    import torch
    from safetensors.torch import save_file

    from workers.actor import StageWorker
    from workers.artifacts import file_entry, verified_manifest
    from workers.models import build_model
    from workers.types import DatasetRef, ModelRef, StageTask

    kwargs = {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3,
              "num_classes": 10}
    torch.manual_seed(0)
    ckpt = tmp_path / "coordinator-only" / "vit.safetensors"
    ckpt.parent.mkdir()
    save_file(build_model(ModelRef("vit_tiny_patch16_224", kwargs), 10).state_dict(), str(ckpt))
    blob = ckpt.read_bytes()
    sha = hashlib.sha256(blob).hexdigest()
    ckpt.unlink()  # the node cannot read the coordinator's file

    task = StageTask("sw", "k-prune", "prune", {"method": "unstructured", "ratio": 0.5}, None,
                     ModelRef("vit_tiny_patch16_224", kwargs, checkpoint=str(ckpt)), DatasetRef("digits"), 0,
                     str(tmp_path / "coordinator-root"))
    worker = StageWorker("node-1", {}, num_threads=1, cache_root=str(tmp_path / "node-cache"))
    result = worker.run(task, (file_entry(sha, str(ckpt)),), blob)
    assert result.status == "succeeded", result.error
    assert (tmp_path / "node-cache" / "files" / sha / "vit.safetensors").read_bytes() == blob
    assert verified_manifest(tmp_path / "node-cache", "k-prune") is not None and result.artifact_blob

    fresh = StageWorker("node-2", {}, num_threads=1, cache_root=str(tmp_path / "other-cache"))
    bad = fresh.run(task, (file_entry(sha, str(ckpt)),), b"not the checkpoint")
    assert bad.status == "failed" and "receiving its input" in bad.error


def test_a_shipped_teacher_checkpoint_replaces_the_path_the_spec_named(tmp_path: Path) -> None:
    from workers.actor import _with_local_file
    from workers.artifacts import file_entry
    from workers.types import DatasetRef, ModelRef, StageTask

    task = StageTask("sw", "k", "distill", {"teacher": "checkpoint:/data/t.pt", "teacher_sha256": "ab"}, "parent",
                     ModelRef("resnet18", {}, checkpoint="/data/start.pt"), DatasetRef("digits"), 0, "/root")
    out = _with_local_file(task, file_entry("ab", "/data/t.pt"), tmp_path / "t.pt")
    assert out.params == {"teacher": f"checkpoint:{tmp_path / 't.pt'}", "teacher_sha256": "ab"}
    assert out.model.checkpoint == "/data/start.pt"  # another file: untouched
