"""A real install: the wheel, installed into a fresh virtualenv, works outside the repository.

Builds the wheel offline (no build isolation: the running interpreter's setuptools, which
must be >= 77 for the SPDX ``license`` string), installs it with ``--no-deps`` into a new
virtualenv, and from a directory outside the checkout runs ``greensweep db upgrade``,
``plan`` and a one-epoch ``run`` on a real local Ray. That proves the migrations, the node
catalog and the carbon data come from the installed package data, not the source tree.

The new virtualenv reuses the dependencies the tests run with (so nothing is downloaded
again) through a ``.pth`` file naming this interpreter's site-packages. ``venv
--system-site-packages`` would not do: it exposes the *base* interpreter's packages, not
those of the virtualenv the tests run in. The venv's own site-packages comes first on
``sys.path``, so its ``orchestrator`` and ``greensweep`` metadata win over an editable
install that the ``.pth`` also makes visible.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DATA_FOLDERS = {"alembic": "greensweep_data/alembic", "clusters": "greensweep_data/clusters"}
CODE_PACKAGES = ("orchestrator", "workers")
MIN_SETUPTOOLS_MAJOR = 77  # the SPDX `license` string

SPEC = """
name: wheel-smoke
seed: 0
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 24, num_heads: 2}
dataset: {name: digits}
train: {epochs: 1, batch_size: 128, lr: 0.003}
pipelines:
  - name: unstructured
    stages:
      - prune: {method: unstructured, ratio: 0.5}
evaluate: {targets: [local], batch_size: 256, warmup_batches: 1, repeats: 1, min_window_s: 0.05, idle_s: 0.1, warmup_s: 0.1}
carbon: {provider: static, regions: {local: FR}}
"""

# Run inside the new venv: where the code and the shipped data were imported from.
PROBE = """
import importlib.metadata, json, orchestrator
from orchestrator.catalog import CLUSTERS_DIR, load_simulated_cluster
from orchestrator.carbon.static import DATA_DIR
from orchestrator.store.migrations import script_location
sim = load_simulated_cluster(CLUSTERS_DIR / "local-sim.yaml")  # validates catalog and carbon regions too
print(json.dumps({
    "orchestrator": orchestrator.__file__,
    "alembic": str(script_location()),
    "clusters": str(CLUSTERS_DIR),
    "carbon": str(DATA_DIR),
    "sim_nodes": len(sim.nodes),
    "dist": str(importlib.metadata.distribution("greensweep").locate_file("")),
}))
"""


def _source_files(root: Path) -> set[str]:
    """Files under *root* relative to it, without bytecode caches."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)
    assert out.returncode == 0, f"{' '.join(cmd)} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return out


def _require_setuptools() -> None:
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        version = "none"
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_SETUPTOOLS_MAJOR:
        pytest.fail(f"building the wheel offline needs setuptools>=77 in {sys.prefix} (found {version}); "
                    f"run: {sys.executable} -m pip install 'setuptools>=77'")


# Top-level entries of the checkout that the wheel is not built from (local state, other
# people's outputs, folders that do not ship).
_SKIP_TOP = {".git", ".venv", ".greensweep", ".pytest_cache", "build", "dist", "tests", "docs", "benchmarks"}


def _not_built(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == REPO
    return {n for n in names if (top and n in _SKIP_TOP) or n == "__pycache__" or n.endswith(".egg-info")}


def _build_wheel(tmp_path: Path, env: dict[str, str]) -> Path:
    """Build from a copy of the tree, so setuptools' build/ and egg-info never land in the checkout."""
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=_not_built)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(dist), str(src)], cwd=tmp_path, env=env)
    wheels = list(dist.glob("greensweep-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _check_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        metadata = z.read(f"{dist_info}/METADATA").decode()
    for top in CODE_PACKAGES:
        missing = sorted(f"{top}/{f}" for f in _source_files(REPO / top) if f.endswith(".py") and f"{top}/{f}" not in names)
        assert not missing, f"wheel lacks code: {missing}"
    for folder, packaged in DATA_FOLDERS.items():
        missing = sorted(f"{packaged}/{f}" for f in _source_files(REPO / folder) if f"{packaged}/{f}" not in names)
        assert not missing, f"wheel lacks shipped data from {folder}/: {missing}"
    assert f"{dist_info}/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in metadata
    requires = {re.match(r"[A-Za-z0-9_.-]+", line.removeprefix("Requires-Dist:").strip())[0].lower()
                for line in metadata.splitlines() if line.startswith("Requires-Dist:")}
    assert {"numpy", "pillow", "alembic", "torch"} <= requires, requires


def _make_venv(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A fresh virtualenv that sees this interpreter's installed packages; returns
    (its python, its site-packages)."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path, env=env)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        cwd=tmp_path, env=env).stdout.strip())
    ours = dict.fromkeys([*site.getsitepackages(), sysconfig.get_path("purelib"), sysconfig.get_path("platlib")])
    (purelib / "_greensweep_test_deps.pth").write_text("".join(f"{p}\n" for p in ours), encoding="utf-8")
    return python, purelib


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    _require_setuptools()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "GREENSWEEP_DB_URL")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    wheel = _build_wheel(tmp_path, env)
    _check_wheel_contents(wheel)

    python, purelib = _make_venv(tmp_path, env)
    # --ignore-installed: the editable greensweep the .pth makes visible must not count as installed.
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         cwd=tmp_path, env=env)

    work = tmp_path / "outside"
    work.mkdir()
    assert REPO not in work.resolve().parents
    probe = json.loads(_run([str(python), "-c", PROBE], cwd=work, env=env).stdout)
    site_dir = purelib.resolve()
    for key in ("orchestrator", "alembic", "clusters", "carbon", "dist"):
        assert site_dir in Path(probe[key]).resolve().parents or Path(probe[key]).resolve() == site_dir, \
            f"{key} comes from {probe[key]}, not from the installed wheel in {site_dir}"
    assert probe["sim_nodes"] >= 2

    greensweep = python.parent / ("greensweep.exe" if os.name == "nt" else "greensweep")
    assert greensweep.is_file(), "the wheel did not install the greensweep console script"
    env["GREENSWEEP_ARTIFACTS"] = str(work / "artifacts")
    db = f"sqlite:///{work / 'store.db'}"
    (work / "smoke.yaml").write_text(SPEC, encoding="utf-8")

    upgraded = _run([str(greensweep), "db", "upgrade", "--db", db], cwd=work, env=env)
    assert "empty ->" in upgraded.stdout

    planned = _run([str(greensweep), "plan", "smoke.yaml"], cwd=work, env=env)
    assert "2 points" in planned.stdout

    ran = _run([str(greensweep), "run", "smoke.yaml", "--db", db], cwd=work, env=env, timeout_s=420)
    assert "done    train" in ran.stdout, ran.stdout
    rows = json.loads(_run([str(greensweep), "results", "--db", db, "--format", "json"], cwd=work, env=env).stdout)
    assert len(rows) == 2 and all(r["status"] == "succeeded" for r in rows), rows
    assert all(r["intensity_g_per_kwh"] and r["intensity_g_per_kwh"] > 0 for r in rows), rows


def test_missing_shipped_data_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A broken installation names the reinstall command; a folder without the expected
    file (site-packages' own ``alembic/`` library, say) is never taken for the data."""
    from orchestrator import resources
    from orchestrator.errors import GreensweepError, StoreError
    from orchestrator.store import migrations

    (tmp_path / "alembic").mkdir()  # like the Alembic library's folder: no env.py
    monkeypatch.setattr(resources, "_installed", lambda name: [tmp_path / "nowhere"])
    monkeypatch.setattr(resources, "_checkout", lambda name: tmp_path / name)
    with pytest.raises(GreensweepError, match=r"shipped alembic/ folder is missing .* pip install --force-reinstall"):
        resources.shipped_dir("alembic")
    with pytest.raises(StoreError, match="installation is broken"):
        migrations.script_location()


def test_shipped_folders_resolve_to_the_checkout_here() -> None:
    """In the test environment (editable install or plain checkout) the data is this repository's."""
    from orchestrator.resources import SHIPPED, shipped_dir

    for name, marker in SHIPPED.items():
        assert shipped_dir(name) == (REPO / name).resolve()
        assert (shipped_dir(name) / marker).is_file()
