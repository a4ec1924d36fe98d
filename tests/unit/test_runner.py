"""``orchestrator.run_sweep`` from Python: the project's errors, raised before anything
is written, and a light ``import orchestrator``. (A real tiny sweep through it runs in
tests/integration/test_cli_sweep.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.errors import SpecError, UsageError


def test_run_sweep_raises_spec_error_on_a_bad_spec_and_writes_nothing(tmp_path: Path, monkeypatch) -> None:
    import orchestrator

    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nmodel: {arch: vit_tiny_patch16_224}\ndataset: {name: digits}\ntrain: {epochs: 1}\n"
                    "pipelines:\n  - name: p\n    stages:\n      - prune: {method: unstructured, ratio: 1.5}\n")
    db = tmp_path / "store.db"
    with pytest.raises(SpecError, match=r"pipelines\[0\]\.stages\[0\]\.prune\.ratio"):
        orchestrator.run_sweep(spec, db=f"sqlite:///{db}")
    assert not db.exists() and not (tmp_path / ".greensweep").exists()


def test_run_sweep_refuses_cluster_and_address_together(tmp_path: Path) -> None:
    from orchestrator import run_sweep

    with pytest.raises(UsageError, match="either --cluster"):
        run_sweep(tmp_path / "any.yaml", cluster="clusters/local-sim.yaml", address="auto")


def test_resume_sweep_of_an_absent_store_is_a_usage_error(tmp_path: Path) -> None:
    from orchestrator import resume_sweep

    with pytest.raises(UsageError, match="no store at"):
        resume_sweep("sw-0", db=f"sqlite:///{tmp_path / 'none.db'}")


def test_importing_orchestrator_and_the_cli_loads_no_ray_or_torch() -> None:
    code = ("import sys, orchestrator, orchestrator.cli; orchestrator.run_sweep; "
            "print(sorted(m for m in ('ray', 'torch', 'pandas', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
