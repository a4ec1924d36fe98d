"""The CLI's contract with users: --help everywhere, one-line errors, exit codes, no
side effects from read-only commands, and no secrets in output."""

from __future__ import annotations

import pytest

from tests.cli import run_cli as _call

COMMANDS = [[], ["run"], ["plan"], ["status"], ["results"], ["resume"], ["cancel"], ["compare"], ["pareto"],
            ["report"], ["nodes"], ["carbon"], ["carbon", "plan"], ["carbon", "savings"], ["db"], ["db", "upgrade"],
            ["db", "current"]]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "greensweep")
def test_every_command_has_help(cmd, capsys):
    code, out, err = _call([*cmd, "--help"], capsys)
    assert code == 0 and out.startswith("Usage: greensweep") and err == ""


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["frobnicate"], "No such command 'frobnicate'"),
        (["run"], "Missing argument 'SPEC'"),
        (["results", "--format", "xml"], "'xml' is not one of"),
        (["plan", "does-not-exist.yaml"], "spec file not found"),
    ],
)
def test_bad_arguments_get_one_line_and_exit_2(argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _call(argv, capsys)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expect in err
    assert "Traceback" not in err


def test_read_commands_do_not_create_a_store(capsys, tmp_path):
    db = tmp_path / "typo.db"
    for argv in (["status", "--db", f"sqlite:///{db}"], ["results", "--db", f"sqlite:///{db}"]):
        code, _, err = _call(argv, capsys)
        assert code == 2 and f"no store at {db}" in err
    assert not db.exists()


def test_unknown_sweep_is_a_usage_error(capsys, tmp_path):
    db = f"sqlite:///{tmp_path}/s.db"
    assert _call(["db", "upgrade", "--db", db], capsys)[0] == 0
    code, _, err = _call(["results", "sw-missing", "--db", db], capsys)
    assert code == 2 and "no sweep 'sw-missing'" in err
    code, out, _ = _call(["status", "--db", db], capsys)
    assert code == 0 and "no sweeps yet" in out


def test_db_current_and_upgrade(capsys, tmp_path):
    from orchestrator.store import head

    db = f"sqlite:///{tmp_path}/s.db"
    code, out, _ = _call(["db", "upgrade", "--db", db], capsys)
    assert code == 0 and out.strip().endswith(f"empty -> {head()}")
    code, out, _ = _call(["db", "current", "--db", db], capsys)
    assert code == 0 and f"{head()} (up to date)" in out


def test_db_current_on_a_store_from_a_newer_greensweep_says_upgrade_greensweep(capsys, tmp_path):
    import sqlalchemy as sa

    from orchestrator.store import head

    db = f"sqlite:///{tmp_path}/s.db"
    assert _call(["db", "upgrade", "--db", db], capsys)[0] == 0
    engine = sa.create_engine(db)
    with engine.begin() as c:
        c.execute(sa.text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    code, out, _ = _call(["db", "current", "--db", db], capsys)
    assert code == 0 and "9999_future (written by a newer greensweep" in out
    assert f"needs {head()}" in out and "db upgrade" not in out


def test_unreachable_store_masks_the_password(capsys):
    code, out, err = _call(["status", "--db", "postgresql://alice:s3cret-pw@127.0.0.1:1/x"], capsys)
    assert code == 3
    assert "s3cret-pw" not in err + out and "alice:***@" in err
    assert err.count("\n") == 1


def test_env_db_url_is_used(capsys, tmp_path, monkeypatch):
    db = tmp_path / "env.db"
    monkeypatch.setenv("GREENSWEEP_DB_URL", f"sqlite:///{db}")
    code, out, _ = _call(["db", "upgrade"], capsys)
    assert code == 0 and db.exists()


def test_status_shows_progress_of_running_stages(capsys, tmp_path):
    from orchestrator.store import Store

    db = f"sqlite:///{tmp_path}/s.db"
    with Store.open(db) as store:
        store.create_sweep(
            sweep_id="sw-000000000abc", name="p", spec_text="name: p", spec_hash="h", artifact_root=str(tmp_path),
            stages=[{"key": "k-train", "kind": "train", "params": {}, "parent_key": None, "target": None}],
            points=[], naive_stage_count=1,
        )
        store.mark_stage_running("sw-000000000abc", "k-train", "node-a")
        store.record_progress("sw-000000000abc", "k-train", [
            {"epoch": 1, "epochs": 30, "train_loss": 2.1, "val_top1": 0.4},
            {"epoch": 2, "epochs": 30, "train_loss": 1.5, "val_top1": 0.61, "epoch_s": 1.2}])
    code, out, _ = _call(["status", "sw-000000000abc", "--db", db], capsys)
    assert code == 0
    assert "progress: epoch 2/30  loss 1.500  val top1 61.0%  1.2s" in out


def test_unreachable_ray_address_fails_fast_with_one_line(capsys, tmp_path, monkeypatch):
    import time

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: s\nmodel: {arch: resnet18}\ndataset: {name: digits}\ntrain: {epochs: 1}\n")
    start = time.monotonic()
    code, _, err = _call(["run", str(spec), "--address", "127.0.0.1:1", "--db", f"sqlite:///{tmp_path}/s.db"],
                         capsys)
    assert code == 5 and time.monotonic() - start < 30
    assert err.startswith("error: cannot reach Ray at 127.0.0.1:1") and err.count("\n") == 1


def _store_with_sweep(tmp_path, status: str = "succeeded") -> str:
    from orchestrator.store import Store

    url = f"sqlite:///{tmp_path}/s.db"
    with Store.open(url) as store:
        store.create_sweep("sw-aaaaaaaaaaaa", "t", "name: t\n", "h", str(tmp_path), [
            {"key": "k1", "kind": "train", "params": {}, "parent_key": None}], [], naive_stage_count=1)
        store.set_sweep_status("sw-aaaaaaaaaaaa", status)
    return url


def test_resume_cancel_savings_on_unknown_or_ended_sweeps(tmp_path, capsys):
    url = _store_with_sweep(tmp_path)
    code, out, err = _call(["resume", "sw-nope", "--db", url], capsys)
    assert code == 2 and "no sweep 'sw-nope'" in err and err.count("\n") == 1
    code, out, err = _call(["resume", "sw-aaaaaaaaaaaa", "--db", url], capsys)
    assert code == 0 and "already succeeded; nothing to resume" in out
    code, out, err = _call(["cancel", "sw-aaaaaaaaaaaa", "--db", url], capsys)
    assert code == 0 and "already ended (succeeded)" in out
    code, out, err = _call(["carbon", "savings", "sw-aaaaaaaaaaaa", "--db", url], capsys)
    assert code == 2 and "recorded no carbon-aware placement" in err


def test_cancel_of_a_sweep_whose_coordinator_is_gone_marks_it_cancelled(tmp_path, capsys):
    from orchestrator.store import Store

    url = _store_with_sweep(tmp_path, "pending")
    with Store.open(url) as store:
        store.take_sweep("sw-aaaaaaaaaaaa", "some-other-host:1", stale_after_s=60)
        store.mark_stage_running("sw-aaaaaaaaaaaa", "k1", "n")
    # alive on another host: a request the coordinator will see
    code, out, err = _call(["cancel", "sw-aaaaaaaaaaaa", "--db", url], capsys)
    assert code == 0 and "cancel requested" in out
    import socket

    with Store.open(url) as store:  # now "owned" by a process of this host that does not exist
        store.take_sweep("sw-aaaaaaaaaaaa", f"{socket.gethostname()}:999999", stale_after_s=0)
    code, out, err = _call(["cancel", "sw-aaaaaaaaaaaa", "--db", url], capsys)
    assert code == 0 and "cancelled (no coordinator was running it)" in out
    code, out, err = _call(["status", "sw-aaaaaaaaaaaa", "--db", url], capsys)
    assert "cancelled" in out
