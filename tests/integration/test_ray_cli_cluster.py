"""A real two-node cluster started by the ``ray`` CLI itself (two raylets, ``ray start
--head`` then ``ray start --address``), with token authentication on as Ray (>= 2.59)
turns it on: the head finds a token in ``~/.ray/auth_token`` with ``RAY_AUTH_MODE``
unset. ``ray.cluster_utils`` clusters share one process's settings and never exercise
what a joining node or a driver given ``--address`` needs.

The cluster runs under its own ``HOME`` (where the token lives) and temp dir, on free
ports, and is stopped by process id -- never with ``ray stop``, which would stop every
Ray on the machine. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is dropped from the nodes'
environment: set to 0 (as greensweep's local Ray leaves it), ``ray start --address``
refuses to join.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="stops its Ray processes through /proc"),
]

BIN = Path(sys.executable).parent
GREENSWEEP = str(BIN / "greensweep")
RAY = str(BIN / "ray")
HEAD = {"greensweep/node-type": "cpu-head", "greensweep/region": "FR"}
WORKER = {"greensweep/node-type": "cpu-worker", "greensweep/region": "DE"}
# Ray's minimum is ~75 MiB; artifacts of this size need little.
OBJECT_STORE_BYTES = 128 * 1024**2
# Variables of the caller that would change how the nodes or greensweep authenticate.
_DROPPED = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GREENSWEEP_DB_URL")
_MARKER = "GREENSWEEP_TEST_RAY_CLI_CLUSTER"

SPEC = """
name: cli-cluster
seed: 3
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 48, num_heads: 3}
dataset: {name: digits}
train: {epochs: 1, batch_size: 64, lr: 0.003}
evaluate: {targets: [cpu-head, cpu-worker], batch_size: 256, warmup_batches: 1, repeats: 1,
           min_window_s: 0.05, warmup_s: 0.05, idle_s: 0.05}
"""


@dataclass(frozen=True)
class CliCluster:
    address: str
    token: str
    root: Path
    env: dict[str, str]  # what a user on the head has: HOME with the token, RAY_AUTH_MODE unset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([RAY, *args], env=env, capture_output=True, text=True, timeout=180)


def _greensweep(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GREENSWEEP, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=540)


def _stop_marked(marker: str) -> None:
    """SIGTERM, then SIGKILL, every process whose environment carries *marker* (all the
    cluster's processes inherit it from ``ray start``) and their descendants."""
    def marked() -> set[int]:
        parent: dict[int, int] = {}
        found: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
                parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
                if f"{_MARKER}={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.add(pid)
            except (OSError, ValueError, IndexError):
                continue
        grew = True
        while grew:
            kids = {p for p, pp in parent.items() if pp in found} - found
            grew = bool(kids)
            found |= kids
        found.discard(os.getpid())
        return found

    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = marked()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _state(p)}
        if not pids:
            return


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@pytest.fixture(scope="module")
def cli_cluster() -> Iterator[CliCluster]:
    # A short root: Ray's socket paths under the temp dir must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="gsray-", dir="/tmp"))
    marker = uuid.uuid4().hex
    home = root / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env.update(HOME=str(home), GREENSWEEP_NODE_CACHE=str(root / "node-cache"), **{_MARKER: marker})
    port = _free_port()
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
              f"--object-store-memory={OBJECT_STORE_BYTES}"]
    try:
        gen = _ray(["get-auth-token", "--generate"], env)
        assert gen.returncode == 0, gen.stderr
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert token
        head = _ray(["start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={root / 'ray'}",
                     f"--dashboard-agent-listen-port={_free_port()}",
                     f"--labels={json.dumps(HEAD)}", *common], env)
        assert head.returncode == 0, head.stdout + head.stderr
        assert "Token authentication is enabled" in head.stderr + head.stdout
        # A joining node needs the mode said out loud; the token comes from the same HOME.
        worker = _ray(["start", f"--address=127.0.0.1:{port}", f"--dashboard-agent-listen-port={_free_port()}",
                       f"--labels={json.dumps(WORKER)}", *common], {**env, "RAY_AUTH_MODE": "token"})
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield CliCluster(address=f"127.0.0.1:{port}", token=token, root=root, env=env)
    finally:
        _stop_marked(marker)
        shutil.rmtree(root, ignore_errors=True)


def _assert_token_hidden(proc: subprocess.CompletedProcess[str], *tokens: str) -> None:
    for token in tokens:
        assert token not in proc.stdout and token not in proc.stderr


def test_nodes_lists_both_labelled_nodes_with_the_token_from_home_or_env(cli_cluster: CliCluster) -> None:
    elsewhere = cli_cluster.root / "elsewhere"  # a machine without ~/.ray/auth_token
    elsewhere.mkdir(exist_ok=True)
    for env in (cli_cluster.env, {**cli_cluster.env, "HOME": str(elsewhere), "RAY_AUTH_TOKEN": cli_cluster.token}):
        proc = _greensweep(["nodes", "--address", cli_cluster.address], env, cli_cluster.root)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr
        rows = {line.split()[1]: line.split() for line in proc.stdout.splitlines()[1:]}
        assert rows["cpu-head"][2] == "FR" and rows["cpu-worker"][2] == "DE", proc.stdout
        assert "unlabelled" not in proc.stdout
        _assert_token_hidden(proc, cli_cluster.token)


WRONG_TOKEN = "0123456789abcdef" * 4


@pytest.mark.parametrize(("case", "fix"), [
    ("missing", "export RAY_AUTH_TOKEN="),
    ("wrong", "not this cluster's token"),
    ("disabled", "export RAY_AUTH_MODE=token"),
])
def test_missing_wrong_or_disabled_token_is_one_line_and_exit_5(cli_cluster: CliCluster, case: str, fix: str) -> None:
    elsewhere = cli_cluster.root / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    env = {
        "missing": {**cli_cluster.env, "HOME": str(elsewhere)},
        "wrong": {**cli_cluster.env, "HOME": str(elsewhere), "RAY_AUTH_TOKEN": WRONG_TOKEN},
        "disabled": {**cli_cluster.env, "RAY_AUTH_MODE": "disabled"},
    }[case]
    proc = _greensweep(["nodes", "--address", cli_cluster.address], env, cli_cluster.root)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr  # none of Ray's per-attempt warnings or tracebacks
    assert lines[0].startswith(f"error: Ray at {cli_cluster.address} ")
    assert fix in lines[0] and "token" in lines[0]
    _assert_token_hidden(proc, cli_cluster.token, WRONG_TOKEN)


def test_sweep_runs_across_both_nodes(cli_cluster: CliCluster) -> None:
    spec = cli_cluster.root / "spec.yaml"
    spec.write_text(SPEC)
    pg = os.environ.get("GREENSWEEP_TEST_POSTGRES_URL")
    if pg:  # the set-up: PostgreSQL and object-store artifacts
        from tests.pg import fresh_schema_url

        store = fresh_schema_url(pg)
    else:
        from contextlib import nullcontext

        store = nullcontext(f"sqlite:///{cli_cluster.root / 'store.db'}")
    with store as db:
        env = {**cli_cluster.env, "GREENSWEEP_DB_URL": db, "GREENSWEEP_ARTIFACTS": str(cli_cluster.root / "artifacts")}
        up = _greensweep(["db", "upgrade"], env, cli_cluster.root)
        assert up.returncode == 0, up.stdout + up.stderr
        run = _greensweep(["run", str(spec), "--address", cli_cluster.address, "--progress", "plain"], env,
                          cli_cluster.root)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "Traceback" not in run.stderr
        _assert_token_hidden(run, cli_cluster.token)
        sweep_id = run.stdout.split()[1]
        res = _greensweep(["results", sweep_id, "--format", "json"], env, cli_cluster.root)
        assert res.returncode == 0, res.stderr
        rows = json.loads(res.stdout)
    assert sorted(r["target"] for r in rows) == ["cpu-head", "cpu-worker"]
    assert all(r["status"] == "succeeded" and r["time_per_sample_s"] > 0 for r in rows)
