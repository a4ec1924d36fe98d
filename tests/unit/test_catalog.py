"""Node-type catalog, simulated-cluster file and real-cluster templates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.catalog import CLUSTERS_DIR, known_regions, load_catalog, load_simulated_cluster
from orchestrator.cluster import NODE_TYPE_LABEL, REGION_LABEL
from orchestrator.errors import SpecError

LABELS = {NODE_TYPE_LABEL, REGION_LABEL}


def test_shipped_catalog_loads_with_the_issue_node_types() -> None:
    catalog = load_catalog()
    assert {"gpu-a100", "gpu-t4", "cpu-xeon", "cpu-small", "local"} <= set(catalog.names)
    a100 = catalog.get("gpu-a100")
    assert a100.accelerator == "nvidia-a100-40gb" and a100.num_gpus == 8 and a100.gpu_power_w > 0
    assert catalog.get("cpu-xeon").accelerator is None
    for nt in catalog.node_types:
        assert nt.default_region is None or nt.default_region in known_regions(), nt.name


def test_unknown_node_type_lists_the_known_ones() -> None:
    with pytest.raises(SpecError, match=r"unknown node type 'tpu'.*gpu-a100, gpu-t4"):
        load_catalog().get("tpu")


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "x.yaml"
    p.write_text(yaml.safe_dump(data), encoding="utf-8")
    return p


GOOD = {"name": "cpu-x", "cpu": "some CPU", "cpu_tdp_w": 10, "num_cpus": 2}


@pytest.mark.parametrize(("entry", "message"), [
    ({**GOOD, "cpu_tdp_w": 0}, r"node_types\[0\]\.cpu_tdp_w"),
    ({**GOOD, "cores": 2}, r"node_types\[0\]\.cores: unknown key"),
    ({**GOOD, "accelerator": "nvidia-t4"}, r"accelerator and num_gpus must agree"),
    ({**GOOD, "accelerator": "nvidia-t4", "num_gpus": 1}, r"gpu_power_w must be > 0"),
    ({k: v for k, v in GOOD.items() if k != "cpu"}, r"node_types\[0\]\.cpu: required field is missing"),
    ({**GOOD, "name": "Bad Name"}, r"node_types\[0\]\.name"),
])
def test_bad_catalog_is_one_line_naming_the_field(tmp_path: Path, entry: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message) as e:
        load_catalog(_write(tmp_path, {"node_types": [entry]}))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_duplicate_node_type_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="defined twice"):
        load_catalog(_write(tmp_path, {"node_types": [GOOD, GOOD]}))
    bad = tmp_path / "bad.yaml"
    bad.write_text("node_types: [\n", encoding="utf-8")
    with pytest.raises(SpecError, match="not valid YAML at line"):
        load_catalog(bad)


def test_local_sim_is_heterogeneous_and_fits_a_two_core_machine() -> None:
    sim = load_simulated_cluster(CLUSTERS_DIR / "local-sim.yaml")
    assert sim.simulated is True
    assert len({n.node_type for n in sim.nodes}) >= 2 and len({n.region for n in sim.nodes}) >= 2
    assert sum(n.count for n in sim.nodes) >= 2 and sim.total_cpus <= 2


@pytest.mark.parametrize(("change", "message"), [
    ({"node_type": "gpu-h100"}, r"nodes\[0\]\.node_type: unknown node type 'gpu-h100'"),
    ({"region": "atlantis"}, r"nodes\[0\]\.region: 'atlantis' has no carbon data"),
    ({"num_cpus": 0}, r"nodes\[0\]\.num_cpus"),
])
def test_bad_simulated_cluster(tmp_path: Path, change: dict, message: str) -> None:
    node = {"node_type": "cpu-small", "region": "FR", "num_cpus": 1, **change}
    with pytest.raises(SpecError, match=message):
        load_simulated_cluster(_write(tmp_path, {"name": "s", "simulated": True, "nodes": [node]}))


def test_simulated_must_be_declared(tmp_path: Path) -> None:
    node = {"node_type": "cpu-small", "region": "FR", "num_cpus": 1}
    with pytest.raises(SpecError, match=r"simulated"):
        load_simulated_cluster(_write(tmp_path, {"name": "s", "nodes": [node]}))


def _check_labels(where: str, labels: dict[str, str]) -> None:
    assert set(labels) == LABELS, where
    load_catalog().get(labels[NODE_TYPE_LABEL])
    assert labels[REGION_LABEL] in known_regions(), where


def test_aws_launcher_template_passes_rays_own_validation() -> None:
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTERS_DIR / "aws-launcher.yaml").read_text(encoding="utf-8"))
    config = prepare_config(raw)  # merges the AWS defaults, as `ray up` does
    validate_config(config)  # ray-schema.json, which has a per-node-type `labels` field
    assert config["provider"]["type"] == "aws"
    head = config["head_node_type"]
    workers = {k: v for k, v in config["available_node_types"].items() if k != head}
    assert NODE_TYPE_LABEL not in config["available_node_types"][head].get("labels", {})
    assert any(v["resources"].get("GPU", 0) > 0 for v in workers.values())
    assert any(v["resources"].get("GPU", 0) == 0 for v in workers.values())
    for name, node_type in workers.items():
        _check_labels(name, node_type["labels"])
        assert node_type["labels"][NODE_TYPE_LABEL] == name
    # Ray's workers run at nice 15 unless every node is started with 0 (orchestrator.cluster.RAY_SYSTEM_CONFIG)
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert starts and all(c.startswith("RAY_worker_niceness=0 ray start") for c in starts)


def test_kuberay_manifest_structure_and_autoscaler_view() -> None:
    cr = yaml.safe_load((CLUSTERS_DIR / "kuberay-raycluster.yaml").read_text(encoding="utf-8"))
    assert cr["apiVersion"] == "ray.io/v1" and cr["kind"] == "RayCluster"
    assert cr["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = cr["spec"]["workerGroupSpecs"]
    assert len(groups) >= 2
    for g in groups:
        _check_labels(g["groupName"], g["labels"])
        assert "labels" not in g["rayStartParams"]  # ignored there by Ray's autoscaler
    containers = [c for spec in [cr["spec"]["headGroupSpec"], *groups] for c in spec["template"]["spec"]["containers"]]
    assert all({"name": "RAY_worker_niceness", "value": "0"} in c.get("env", []) for c in containers)
    gpu_limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups]
    assert any(gpu_limits) and not all(gpu_limits)

    # Ray's KubeRay autoscaler derives its node types (resources, labels) from this
    # manifest and validates them against ray-schema.json.
    pytest.importorskip("jsonschema")
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    derived = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    for g in groups:
        assert derived[g["groupName"]]["labels"] == g["labels"]
    assert derived["gpu-t4"]["resources"]["GPU"] == 1


def test_a_missing_target_type_names_the_simulated_cluster_when_it_has_that_type() -> None:
    from orchestrator.cluster import NodeInfo, require_targets
    from orchestrator.errors import ClusterError

    local = [NodeInfo(node_id="n1", node_type="local", region=None, num_cpus=2, num_gpus=0, address="127.0.0.1")]
    with pytest.raises(ClusterError) as e:
        require_targets(local, ("cpu-xeon",))
    assert "no live node of type 'cpu-xeon' (live node types: local)" in str(e.value)
    assert f"--cluster {CLUSTERS_DIR / 'local-sim.yaml'} (cpu-small, cpu-xeon on one host)" in str(e.value)
    with pytest.raises(ClusterError) as e:
        require_targets(local, ("gpu-a100",))
    assert "--cluster" not in str(e.value)  # the simulated cluster has no such type
