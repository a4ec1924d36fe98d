"""One sweep on the simulated heterogeneous cluster (clusters/local-sim.yaml: cpu-small in
DE, cpu-xeon in FR), carbon-aware, with no shared disk between nodes: evaluations land
on their target node types, the flexible stages land in the cleaner region, every
decision is stored with its fifo counterfactual, and models travel through Ray's object
store into each node's own cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.catalog import CLUSTERS_DIR
from orchestrator.store import Store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
GREENSWEEP = str(Path(sys.executable).parent / "greensweep")

SPEC = """
name: hetero
seed: 5
model:
  arch: vit_tiny_patch16_224
  kwargs: {img_size: 8, patch_size: 2, in_chans: 1, depth: 1, embed_dim: 48, num_heads: 3}
  checkpoint: CHECKPOINT
dataset: {name: digits}
train: {epochs: 2, batch_size: 64, lr: 0.003}
pipelines:
  - name: structured
    stages:
      - prune: {method: structured, mode: all, ratio: 0.5}
evaluate: {targets: [cpu-small, cpu-xeon], batch_size: 256, warmup_batches: 1, repeats: 1,
           min_window_s: 0.05, warmup_s: 0.05, idle_s: 0.05}
carbon: {provider: timeseries, replay: true}
scheduling: {policy: greedy-carbon}
"""


def test_carbon_aware_placement_pinning_and_object_store_transfer(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from workers.models import build_model
    from workers.types import ModelRef

    # the training starts from a checkpoint only the coordinator's disk has: it travels too
    torch.manual_seed(0)
    ckpt = tmp_path / "coordinator-only" / "start.safetensors"
    ckpt.parent.mkdir()
    kwargs = {"img_size": 8, "patch_size": 2, "in_chans": 1, "depth": 1, "embed_dim": 48, "num_heads": 3}
    save_file(build_model(ModelRef("vit_tiny_patch16_224", kwargs), 10).state_dict(), str(ckpt))
    spec = tmp_path / "hetero.yaml"
    spec.write_text(SPEC.replace("CHECKPOINT", str(ckpt)))
    db = f"sqlite:///{tmp_path}/store.db"
    env = {**os.environ, "GREENSWEEP_ARTIFACTS": str(tmp_path / "artifacts"), "GREENSWEEP_DB_URL": db,
           "GREENSWEEP_NODE_CACHE": str(tmp_path / "cache"), "GREENSWEEP_DEBUG": ""}
    proc = subprocess.run([GREENSWEEP, "run", str(spec), "--cluster", str(CLUSTERS_DIR / "local-sim.yaml"),
                           "--artifacts", "object-store", "--progress", "plain"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "carbon-aware placement (greedy-carbon)" in proc.stdout

    with Store.open(db) as store:
        sweep_id = store.latest_sweep_id()
        nodes = {n.node_id: n for n in store.nodes()}
        region_of = {nid: n.region for nid, n in nodes.items()}
        type_of = {nid: n.node_type for nid, n in nodes.items()}
        stages = store.stages(sweep_id)
        for st in stages:
            assert st.status == "succeeded", (st.kind, st.error)
            if st.kind == "evaluate":
                assert type_of[st.node_id] == st.target  # pinned to its target type
            else:
                assert region_of[st.node_id] == "FR"  # flexible: the cleaner grid (FR ~ 1/6 of DE)
        placements = {p.stage_key: p for p in store.placements(sweep_id)}
        assert set(placements) == {st.key for st in stages}
        train = next(st for st in stages if st.kind == "train")
        p = placements[train.key]
        assert p.region == "FR" and p.fifo_region == "DE"  # fifo: the first node, in DE
        assert p.expected_carbon_g < p.fifo_expected_carbon_g
        assert p.measured_carbon_g is not None and p.measured_carbon_g > 0
        # every stage has a measured figure, evaluations the sum of their timed repeats
        assert all(q.measured_carbon_g and q.measured_carbon_g > 0 for q in placements.values())
        rows = store.results(sweep_id)
        assert sorted(r.point_index for r in rows) == [0, 1, 2, 3]
        assert sorted(r.target for r in rows) == ["cpu-small", "cpu-small", "cpu-xeon", "cpu-xeon"]
        assert all(r.top1 is not None and r.carbon_g_per_sample is not None for r in rows)

        # no shared disk: each node read and wrote its own cache; the coordinator's root has all
        model_keys = {st.key for st in stages if st.kind != "evaluate"}
        assert {d.name for d in (tmp_path / "artifacts").iterdir() if not d.name.startswith(".")} >= model_keys
        caches = {d.name: {a.name for a in d.iterdir() if not a.name.startswith(".")}
                  for d in (tmp_path / "cache").iterdir()}
        de_node = next(nid for nid, r in region_of.items() if r == "DE")
        fr_node = next(nid for nid, r in region_of.items() if r == "FR")
        assert caches[fr_node[:16]] == model_keys | {"files"}  # built there, from the shipped checkpoint
        assert [f.name for f in (tmp_path / "cache" / fr_node[:16] / "files").glob("*/*")] == ["start.safetensors"]
        assert caches[de_node[:16]] == model_keys  # shipped there for its evaluations

    saved = subprocess.run([GREENSWEEP, "carbon", "savings", sweep_id, "--json"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert saved.returncode == 0, saved.stderr
    summary = json.loads(saved.stdout)
    assert summary["policy"] == "greedy-carbon" and summary["saved_expected_g"] > 0
    assert 0 < summary["saved_expected_pct"] < 100
