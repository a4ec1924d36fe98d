"""Hostile and broken input beyond spec content: the corpus in ``tests/bad_inputs/``.

Each case of ``tests/bad_inputs/cases.yaml`` runs ``orchestrator.cli.main(argv)``
in-process in a scratch working directory and must give one ``error:`` line with the
case's message and exit code, no traceback, no secret, and leave the directory
byte-identical (no store created or changed). Cases marked ``known_gap`` fail today for
the reason they give and run as strict xfails, so a fix shows up as an XPASS.

Three inputs need more than a command line: a pickle checkpoint with a payload (the
worker's loader must refuse it without running it), an artifact tampered with after its
manifest was written (the checksum must catch it), and a carbon API that echoes its
token in an error. Finally, the local Ray the CLI starts must listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cli import run_cli

REPO = Path(__file__).resolve().parents[2]
CASES_FILE = REPO / "tests" / "bad_inputs" / "cases.yaml"
OLD_STORE = REPO / "tests" / "data" / "stores" / "store-0001.db"
EXIT_CODES = {2, 3, 4, 5, 6}  # input, store, schema, Ray, artifact (orchestrator/errors.py)
FUTURE_REVISION = "9999_from_the_future"
# Environment that could point a case at a real store, cluster or account.
HERMETIC_UNSET = ("GREENSWEEP_DB_URL", "GREENSWEEP_ARTIFACTS", "GREENSWEEP_DEBUG", "ELECTRICITYMAPS_TOKEN",
                  "WATTTIME_USERNAME", "WATTTIME_PASSWORD", "RAY_ADDRESS")
INTERNALS = ("Traceback", "pydantic", "errors.pydantic.dev", "sqlalchemy.exc", "psycopg.")

VALID_SPEC = """\
name: bad-input-case
model: {arch: resnet18}
dataset: {name: digits}
train: {epochs: 1}
"""

CHECKPOINT_SPEC = """\
name: bad-checkpoint
model: {{arch: resnet18, checkpoint: {checkpoint}, kwargs: {{num_classes: 10}}}}
dataset: {{name: digits}}
"""

CLUSTER_FILE = "name: sim\nsimulated: true\nnodes: [{node_type: cpu-xeon, region: FR, num_cpus: 1}]\n"

# A valid PNG: one transparent pixel.
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
)


def _load_cases() -> list[dict[str, Any]]:
    return yaml.safe_load(CASES_FILE.read_text())


CASES = _load_cases()


def _params() -> list[Any]:
    out = []
    for case in CASES:
        marks = []
        if case.get("known_gap"):
            marks.append(pytest.mark.xfail(strict=True, reason=" ".join(case["known_gap"].split())))
        out.append(pytest.param(case, id=case["id"], marks=marks))
    return out


# -- making the inputs ----------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``os.system("touch <marker>")``: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _sqlite_to_wal(path: Path) -> None:
    """greensweep writes its stores in WAL mode, so a store it left behind is in WAL mode;
    the old-schema fixture file is not (it was written with the rollback journal)."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def _make_store(path: Path, *, with_sweep: bool = False) -> None:
    from orchestrator.store import Store

    with Store.open(f"sqlite:///{path}") as store:
        if with_sweep:
            store.create_sweep(
                sweep_id="sw-000000000abc", name="old-sweep", spec_text="name: old-sweep", spec_hash="h",
                artifact_root=str(path.parent / "artifacts"),
                stages=[{"key": "k-train", "kind": "train", "params": {}, "parent_key": None, "target": None}],
                points=[], naive_stage_count=1,
            )


def _alias_bomb(depth: int) -> str:
    names = "abcdefghijklmnop"
    lines = ["name: bomb", "model:", "  arch: resnet18", "  kwargs:",
             '    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, depth):
        lines.append(f"    {names[i]}: &{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]")
    lines += ["dataset: {name: digits}", "train: {epochs: 1}"]
    return "\n".join(lines) + "\n"


def make_file(path: Path, how: dict[str, Any], tmp: Path) -> None:
    """Create *path* as the case's ``files`` entry *how* says."""
    if "text" in how:
        path.write_text(how["text"].replace("{tmp}", str(tmp)))
        return
    make = how["make"]
    if make == "dir":
        path.mkdir()
    elif make == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif make == "png":
        path.write_bytes(PNG)
    elif make == "spec":
        path.write_text(VALID_SPEC + how.get("extra", ""))
    elif make == "checkpoint-spec":
        path.write_text(CHECKPOINT_SPEC.format(checkpoint=how["checkpoint"]))
    elif make == "cluster-file":
        path.write_text(CLUSTER_FILE)
    elif make == "alias-bomb":
        path.write_text(_alias_bomb(int(how["depth"])))
    elif make == "deep-yaml":
        depth = int(how["depth"])
        path.write_text(VALID_SPEC.replace("model: {arch: resnet18}",
                                           "model: {arch: resnet18, kwargs: {a: " + "[" * depth + "]" * depth + "}}"))
    elif make == "pickle-payload":
        with path.open("wb") as f:
            pickle.dump({"state_dict": _Payload(tmp / how["marker"])}, f)
    elif make == "store":
        _make_store(path)
    elif make == "store-with-sweep":
        _make_store(path, with_sweep=True)
    elif make == "store-old":
        shutil.copyfile(OLD_STORE, path)
        _sqlite_to_wal(path)
    elif make == "store-future":
        _make_store(path)
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE alembic_version SET version_num = ?", (FUTURE_REVISION,))
        conn.close()
    elif make == "store-foreign":
        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA journal_mode={how.get('journal', 'wal')}")
            conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
            conn.execute("INSERT INTO invoices (amount) VALUES (12.5)")
        conn.close()
    else:
        raise AssertionError(f"cases.yaml: unknown maker {make!r}")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under *root* -> its bytes (None for a directory).

    An empty ``-wal`` file and its ``-shm`` index are what a SQLite reader leaves while
    its connection is still open (an in-process command's store may not be garbage yet);
    they hold no change and are left out. A ``-wal`` file with frames in it is a write
    and stays in; once its connection closes, the frames land in the database file.
    """
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = None
            continue
        if rel.endswith("-shm"):
            continue
        data = path.read_bytes()
        if rel.endswith("-wal") and not data:
            continue
        out[rel] = data
    return out


# -- the corpus -----------------------------------------------------------------------------


def test_corpus_is_large_and_well_formed() -> None:
    ids = [c["id"] for c in CASES]
    assert len(CASES) >= 30
    assert len(set(ids)) == len(ids), "case ids must be unique"
    for case in CASES:
        assert set(case) <= {"id", "why", "files", "env", "argv", "exit", "expect", "secrets", "known_gap"}, case["id"]
        assert case.get("why") and case.get("argv") and case.get("expect"), case["id"]
        assert case["exit"] in EXIT_CODES, case["id"]
        assert len(case["expect"]) >= 5, f"{case['id']}: expectations must be specific"
    assert {c["exit"] for c in CASES} == EXIT_CODES, "every error exit code has a case"
    passing = [c for c in CASES if not c.get("known_gap")]
    assert len(passing) >= 30, "at least 30 cases pass today"


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in HERMETIC_UNSET:
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("case", _params())
def test_bad_input(case: dict[str, Any], scratch: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    tmp = scratch
    for name, how in (case.get("files") or {}).items():
        make_file(tmp / name, how, tmp)
    for name, value in (case.get("env") or {}).items():
        monkeypatch.setenv(name, value.replace("{tmp}", str(tmp)))
    before = snapshot(tmp)
    argv = [a.replace("{tmp}", str(tmp)) for a in case["argv"]]

    caplog.set_level(logging.DEBUG)
    code, out, err = run_cli(argv, capsys)

    assert code == case["exit"], f"exit {code}, expected {case['exit']}; stderr: {err!r}"
    assert err.startswith("error: "), f"stderr must be one 'error:' line: {err!r}"
    assert err.endswith("\n") and err.count("\n") == 1, f"stderr must be exactly one line: {err!r}"
    assert case["expect"].replace("{tmp}", str(tmp)) in err
    assert out == "", f"nothing on stdout: {out!r}"
    for internal in INTERNALS:
        assert internal not in err, f"{internal!r} leaked into the message: {err!r}"
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for secret in case.get("secrets") or []:
        for where, text in (("stderr", err), ("stdout", out), ("logs", logs)):
            assert secret not in text, f"secret {secret!r} in {where}: {text!r}"
    after = snapshot(tmp)
    assert sorted(set(after) - set(before)) == [], "files were created"
    assert sorted(set(before) - set(after)) == [], "files were removed"
    changed = [name for name in before if before[name] != after[name]]
    assert changed == [], f"files were changed: {changed}"


@pytest.mark.parametrize("text, secret, kept", [
    ("postgresql://u:s3cret@h:5432/db", "s3cret", "postgresql://u:***@h:5432/db"),
    ("at postgresql://u:p@ss@h/db: refused", "p@ss", "postgresql://u:***@h/db: refused"),
    ("postgresql://u:top/secret@h/db", "top/secret", "postgresql://u:***@h/db"),
    ("'mysql://bob:pw-1@h/x' (backend 'mysql')", "pw-1", "'mysql://bob:***@h/x' (backend 'mysql')"),
    ("postgresql://u@h/db?sslmode=require&password=pw-2", "pw-2", "?sslmode=require&password=***"),
    ("https://api.example/v3?zone=DE&token=tok-3", "tok-3", "?zone=DE&token=***"),
    ("postgresql://a:pw-4@h1/x and postgresql://b:pw-5@h2/y", "pw-4", "postgresql://b:***@h2/y"),
])
def test_mask_url_hides_every_form_of_password(text: str, secret: str, kept: str) -> None:
    from orchestrator.errors import mask_url

    masked = mask_url(text)
    assert secret not in masked and kept in masked
    assert mask_url(masked) == masked


@pytest.mark.parametrize("text", [
    "sqlite:////tmp/store.db", "postgresql://u@h:5432/db?sslmode=require", "ray://head:10001",
    "http://127.0.0.1:8080/v3/carbon-intensity/latest?zone=DE",
])
def test_mask_url_leaves_urls_without_secrets_alone(text: str) -> None:
    from orchestrator.errors import mask_url

    assert mask_url(text) == text


def test_noop_kind_is_registered_but_hidden_from_specs() -> None:
    """The benchmark's ``noop`` kind runs like any kind (coordinator and worker look it
    up in the registry) but is no pipeline kind, and errors do not advertise it."""
    from workers.stages.noop import run
    from workers.stages.registry import get_kind, pipeline_kinds
    from workers.types import DatasetRef, ModelRef, StageTask, WorkerEnv

    kind = get_kind("noop")
    assert kind.hidden and kind.flexible and not kind.produces_artifact
    assert "noop" not in pipeline_kinds() and not any(get_kind(k).hidden for k in pipeline_kinds())
    with pytest.raises(KeyError) as info:
        get_kind("nope")
    assert "noop" not in str(info.value)
    params = kind.params(index=7).model_dump()
    task = StageTask("sw", "k", "noop", params, None, ModelRef("none", {}), DatasetRef("synthetic"), 0, "/nowhere")
    out = kind.load_runner()(task, WorkerEnv())
    assert kind.load_runner() is run
    assert out.artifact is None and out.repeats == () and dict(out.metrics) == {"index": 7}


# -- a pickle checkpoint with a payload ----------------------------------------------------

TINY_VIT = {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 24, "num_heads": 2}


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_checkpoint_payload_is_refused_never_run(tmp_path: Path, writer: str) -> None:
    """The worker builds the root model from ``model.checkpoint``; a checkpoint that
    unpickles into a code call is refused with one line naming the fix, and the code
    never runs (no marker file), whichever way the file was written."""
    import torch

    from workers.models import ArtifactLoadError, build_model
    from workers.types import ModelRef

    marker = tmp_path / "PWNED"
    checkpoint = tmp_path / "evil.pt"
    payload = {"state_dict": _Payload(marker)}
    if writer == "pickle":
        checkpoint.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, checkpoint)
    ref = ModelRef("vit_tiny_patch16_224", {**TINY_VIT, "num_classes": 10}, checkpoint=str(checkpoint))
    with pytest.raises(ArtifactLoadError) as info:
        build_model(ref, 10)
    message = str(info.value)
    assert "is not weights-only" in message and "was refused" in message and "\n" not in message
    assert "torch.save(model.state_dict(), path)" in message  # the fix
    assert not marker.exists(), "the checkpoint's payload ran"


# -- an artifact tampered with -------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from workers.modelio import save_artifact
    from workers.models import build_model
    from workers.types import ModelRef

    root = tmp_path_factory.mktemp("artifacts")
    ref = ModelRef("vit_tiny_patch16_224", dict(TINY_VIT))
    torch.manual_seed(0)
    save_artifact(build_model(ref, 10), root=str(root), key="pristine", model_ref=ref, num_classes=10,
                  input_shape=(1, 8, 8), materialized=True, compression={"chain": []})
    return root


def _tamper_weights(d: Path) -> None:
    data = bytearray((d / "weights.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit of one weight
    (d / "weights.safetensors").write_bytes(bytes(data))


def _tamper_manifest(d: Path) -> None:
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["sha256"] = "0" * 64
    (d / "manifest.json").write_text(json.dumps(manifest))


def _truncate_weights(d: Path) -> None:
    data = (d / "weights.safetensors").read_bytes()
    (d / "weights.safetensors").write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("tamper", [_tamper_weights, _tamper_manifest, _truncate_weights],
                         ids=["weights-bit-flipped", "manifest-hash-replaced", "weights-truncated"])
def test_tampered_artifact_is_detected(artifact_root: Path, tmp_path: Path, tamper) -> None:
    """Weights modified after the manifest was written: the coordinator's reuse check
    (torch-free) does not reuse it, and loading it fails with one line naming the
    directory to delete."""
    from workers.artifacts import read_manifest, verified_manifest
    from workers.modelio import artifact_info, load_artifact
    from workers.models import ArtifactLoadError

    root = tmp_path / "root"
    shutil.copytree(artifact_root, root)
    assert verified_manifest(root, "pristine") is not None and artifact_info(str(root), "pristine") is not None
    tamper(root / "pristine")

    assert verified_manifest(root, "pristine") is None, "a tampered artifact must not be reused"
    # ...while it still reads as complete: what makes the coordinator warn before rebuilding
    assert read_manifest(root, "pristine") is not None
    assert artifact_info(str(root), "pristine") is None
    with pytest.raises(ArtifactLoadError) as info:
        load_artifact(str(root), "pristine")
    message = str(info.value)
    assert "failed its checksum" in message and f"delete {root / 'pristine'}" in message and "\n" not in message


# -- a carbon API that echoes its token ---------------------------------------------------


@dataclass
class _EchoAPI:
    url: str
    seen_tokens: list[str]


@pytest.fixture
def echo_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[_EchoAPI]:
    """An API that answers every request with an error whose body repeats the request's
    credentials, as misconfigured proxies and some APIs do."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    api = _EchoAPI(url="", seen_tokens=[])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            creds = f"{self.headers.get('auth-token')} {self.headers.get('Authorization')}"
            api.seen_tokens.append(creds)
            status = 401 if "login" in self.path else 500
            body = f"upstream rejected credentials {creds} for {self.path}".encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    api.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("provider, env", [
    ("electricitymaps", {"ELECTRICITYMAPS_TOKEN": "em-tok-8c1f2e"}),
    ("watttime", {"WATTTIME_USERNAME": "wt-user", "WATTTIME_PASSWORD": "wt-pw-77d0a1"}),
])
def test_carbon_api_error_never_shows_the_token(echo_api: _EchoAPI, caplog: pytest.LogCaptureFixture,
                                                provider: str, env: dict[str, str]) -> None:
    """The provider is built from the spec's section and the environment, as ``run``
    builds it; its error (which the coordinator prints as a warning) and every log record
    are free of the credential although the server's answer repeats it."""
    import base64
    from datetime import datetime, timedelta, timezone

    from orchestrator.carbon import CarbonProviderError, make_provider, parse_carbon_config

    secret = env.get("ELECTRICITYMAPS_TOKEN") or env["WATTTIME_PASSWORD"]
    config = parse_carbon_config({"provider": provider, "base_url": echo_api.url, "timeout_s": 5})
    caplog.set_level(logging.DEBUG)
    carbon = make_provider(config, env=env)
    end = datetime.now(timezone.utc)
    with pytest.raises(CarbonProviderError) as info:
        carbon.intensity("DE", end - timedelta(minutes=5), end)
    assert echo_api.seen_tokens, "the request reached the server"
    message = str(info.value)
    basic = base64.b64encode(f"{env.get('WATTTIME_USERNAME', '')}:{secret}".encode()).decode()
    logs = "\n".join(r.getMessage() for r in caplog.records)
    for text in (message, logs):
        assert secret not in text and basic not in text, text
    assert "\n" not in message and message.startswith(f"{provider}:")


# -- the local Ray listens on loopback only ------------------------------------------------

_LISTEN_PROBE = textwrap.dedent("""
    import json
    from orchestrator import cluster

    cluster.connect(None)
    try:
        import psutil  # shipped with Ray (ray/thirdparty_files), importable once ray is
        import ray

        node = ray._private.worker.global_worker.node
        me = psutil.Process()
        listening = []
        for proc in [me, *me.children(recursive=True)]:
            try:
                conns = (getattr(proc, "net_connections", None) or proc.connections)(kind="inet")
                name = proc.name()
            except psutil.Error:
                continue
            listening += [[name, c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]
        print(json.dumps({"node_ip": node.node_ip_address, "gcs": node.gcs_address, "listening": listening}))
    finally:
        cluster.shutdown()
""")
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def test_local_ray_listens_on_loopback_only(tmp_path: Path) -> None:
    """``cluster.connect(None)`` (what ``run`` and ``nodes`` do without --address) starts
    a Ray whose node address is 127.0.0.1 and whose every listening socket (GCS, raylet,
    workers, the driver's) is bound to loopback. Run in a fresh interpreter: a process
    that started a simulated cluster earlier has already switched Ray to loopback."""
    env = {k: v for k, v in os.environ.items() if k not in HERMETIC_UNSET}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _LISTEN_PROBE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    gcs_host, _, gcs_port = seen["gcs"].rpartition(":")
    assert seen["node_ip"] == "127.0.0.1", seen
    assert gcs_host == "127.0.0.1", seen
    ports = {port for _, ip, port in seen["listening"]}
    assert int(gcs_port) in ports, f"the GCS port is among the sockets seen: {seen}"
    exposed = [entry for entry in seen["listening"] if entry[1] not in LOOPBACK]
    assert exposed == [], f"sockets listening beyond loopback: {exposed}"
