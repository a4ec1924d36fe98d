"""Exports: the results DataFrame (``orchestrator.results``) and CodeCarbon's
``emissions.csv`` (``greensweep results --format emissions``), from a store filled
through the Store API."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import pytest

from orchestrator.carbon import Intensity
from orchestrator.errors import UsageError
from orchestrator.export import EMISSIONS_FIELDS, emissions_rows, render_emissions, results_dataframe
from orchestrator.report import RESULT_FIELDS
from orchestrator.store import Store
from workers.types import ArtifactInfo, EnergyReading, EvalRepeat, StageResult

SWEEP = "sw-00000000e001"
J_PER_KWH = 3.6e6

# CodeCarbon 3.3's emissions.csv header (codecarbon/output_methods/emissions_data.py).
CODECARBON_HEADER = (
    "timestamp,project_name,run_id,experiment_id,duration,emissions,emissions_rate,cpu_power,gpu_power,"
    "ram_power,cpu_energy,gpu_energy,ram_energy,energy_consumed,water_consumed,country_name,country_iso_code,"
    "region,cloud_provider,cloud_region,os,python_version,codecarbon_version,cpu_count,cpu_model,gpu_count,"
    "gpu_model,longitude,latitude,ram_total_size,tracking_mode,cpu_utilization_percent,gpu_utilization_percent,"
    "ram_utilization_percent,ram_used_gb,on_cloud,pue,wue"
)

# train -> prune -> quantize; the baseline and the pruned model evaluated on a GPU node,
# the quantized one not evaluated yet.
STAGES = [
    {"key": "k-train", "kind": "train", "params": {"epochs": 3}, "parent_key": None},
    {"key": "k-prune", "kind": "prune", "params": {"method": "structured", "ratio": 0.5}, "parent_key": "k-train"},
    {"key": "k-quant", "kind": "quantize", "params": {"weights": "int8"}, "parent_key": "k-prune"},
    {"key": "k-eval0", "kind": "evaluate", "params": {"target": "gpu"}, "parent_key": "k-train", "target": "gpu"},
    {"key": "k-eval1", "kind": "evaluate", "params": {"target": "gpu"}, "parent_key": "k-prune", "target": "gpu"},
    {"key": "k-eval2", "kind": "evaluate", "params": {"target": "gpu"}, "parent_key": "k-quant", "target": "gpu"},
]
POINTS = [
    {"point_index": 0, "label": "baseline", "pipeline": "baseline", "stage_keys": ["k-train"], "target": "gpu",
     "eval_key": "k-eval0"},
    {"point_index": 1, "label": "structured(0.5)", "pipeline": "structured", "stage_keys": ["k-train", "k-prune"],
     "target": "gpu", "eval_key": "k-eval1"},
    {"point_index": 2, "label": "structured(0.5) > int8", "pipeline": "structured-int8",
     "stage_keys": ["k-train", "k-prune", "k-quant"], "target": "gpu", "eval_key": "k-eval2"},
]
CPU_NODE = "node-cpu-0001"
GPU_NODE = "node-gpu-0002"
HARDWARE_CPU = {"cpu_model": "Xeon Test 1234", "cpu_count_logical": 8, "memory_total_bytes": 16 * 1024**3,
                "os": "Linux-6.1-x86_64-with-glibc2.36", "python": "3.11.9", "gpus": []}
HARDWARE_GPU = {"cpu_model": "EPYC Test 7000", "cpu_count_logical": 32, "memory_total_bytes": 64 * 1024**3,
                "os": "Linux-6.8-x86_64-with-glibc2.39", "python": "3.11.9",
                "gpus": [{"index": 0, "name": "NVIDIA H100"}, {"index": 1, "name": "NVIDIA H100"}]}
FR = Intensity(g_co2_per_kwh=50.0, source="static:test-2024", kind="average", region="FR")
DE = Intensity(g_co2_per_kwh=400.0, source="static:test-2024", kind="average", region="DE")


def artifact(key: str, params: int) -> ArtifactInfo:
    return ArtifactInfo(key=key, path=f"/artifacts/{key}", size_bytes=4 * params, sha256="ab" * 32,
                        materialized=True, params=params, macs=10 * params)


def evaluation(key: str, top1: list[float]) -> StageResult:
    """Repeats of 100 samples, window i lasting 2 + i s, GPU 90 J x (i + 1) by NVML and
    CPU 18 J by RAPL."""
    return StageResult(
        key=key, kind="evaluate", status="succeeded", duration_s=9.0, node_id=GPU_NODE,
        repeats=tuple(
            EvalRepeat(repeat=i, samples=100, top1=t, top5=min(1.0, t + 0.05), duration_s=2.0 + i,
                       time_per_sample_s=(2.0 + i) / 100, throughput_samples_per_s=100 / (2.0 + i),
                       energy=EnergyReading(duration_s=2.0 + i, gpu_energy_j=90.0 * (i + 1), cpu_energy_j=18.0,
                                            gpu_source="nvml-counter", cpu_source="rapl"))
            for i, t in enumerate(top1)
        ),
        metrics={"params": 1000, "macs": 10000, "size_bytes": 4000, "materialized": True},
    )



@pytest.fixture
def filled(db_url: str) -> str:
    """A sweep with: a train on the CPU node (estimated energy, no carbon accounted), a
    prune on the CPU node (RAPL, carbon at FR), a quantize with no meter reading, two
    evaluations on the GPU node (carbon at DE), one evaluation never run."""
    with Store.open(db_url) as store:
        store.upsert_node(CPU_NODE, "cpu-xeon", "FR", "cpu-host", HARDWARE_CPU)
        store.upsert_node(GPU_NODE, "gpu-h100", "DE", "gpu-host", HARDWARE_GPU)
        store.create_sweep(SWEEP, "export-test", "name: export-test\n", "hash", "/artifacts", STAGES, POINTS,
                           naive_stage_count=7)
        store.record_stage_result(SWEEP, StageResult(
            key="k-train", kind="train", status="succeeded", duration_s=10.0, node_id=CPU_NODE,
            artifact=artifact("k-train", 1000),
            energy=EnergyReading(duration_s=10.0, cpu_energy_j=360.0, cpu_source="estimate-tdp")))
        store.record_stage_result(SWEEP, StageResult(
            key="k-prune", kind="prune", status="succeeded", duration_s=4.0, node_id=CPU_NODE,
            artifact=artifact("k-prune", 500),
            energy=EnergyReading(duration_s=4.0, cpu_energy_j=7200.0, dram_energy_j=360.0,
                                 cpu_source="rapl", dram_source="rapl")))
        store.record_carbon(SWEEP, "k-prune", FR)
        store.record_stage_result(SWEEP, StageResult(
            key="k-quant", kind="quantize", status="succeeded", duration_s=1.0, node_id=CPU_NODE,
            artifact=artifact("k-quant", 500)))
        store.record_stage_result(SWEEP, evaluation("k-eval0", [0.90, 0.92]))
        store.record_carbon(SWEEP, "k-eval0", DE)
        store.record_stage_result(SWEEP, evaluation("k-eval1", [0.80, 0.81, 0.79]))
        store.record_carbon(SWEEP, "k-eval1", DE)
    return db_url


# -- the DataFrame -------------------------------------------------------------------------


def test_dataframe_has_the_result_fields_and_one_row_per_point(filled):
    df = results_dataframe(SWEEP, db=filled)
    assert list(df.columns) == list(RESULT_FIELDS)
    assert list(df["point_index"]) == [0, 1, 2] and list(df["point"]) == [p["label"] for p in POINTS]
    assert df.loc[0, "top1"] == pytest.approx(0.91) and df.loc[1, "top1"] == pytest.approx(0.80)
    assert df.loc[1, "repeats"] == 3 and df.loc[1, "params"] == 500
    # energy per sample: gross over every domain, mean of the repeats
    per_sample = [(90.0 * (i + 1) + 18.0) / 100 for i in range(3)]
    assert df.loc[1, "energy_per_sample_j"] == pytest.approx(sum(per_sample) / 3)
    assert df.loc[1, "carbon_g_per_sample"] == pytest.approx(sum(per_sample) / 3 / J_PER_KWH * 400.0)
    assert df.loc[0, "energy_source"] == {"cpu": "rapl", "gpu": "nvml-counter", "dram": "none"}
    assert df.loc[1, "stages"] == ["train(epochs=3)", "prune(method=structured, ratio=0.5)"]
    # the point never evaluated: its figures are missing, not zero
    assert df.loc[2, "status"] == "pending" and df[["top1", "energy_per_sample_j"]].iloc[2].isna().all()
    assert str(df["params"].dtype) == "Int64" and str(df["materialized"].dtype) == "boolean"
    assert str(df["top1"].dtype) == "float64"


def test_dataframe_defaults_to_the_latest_sweep_in_the_default_store(filled, monkeypatch):
    monkeypatch.setenv("GREENSWEEP_DB_URL", filled)
    import orchestrator

    df = orchestrator.results()
    assert set(df["sweep_id"]) == {SWEEP} and len(df) == 3


def test_dataframe_errors_are_usage_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GREENSWEEP_DB_URL", raising=False)
    with pytest.raises(UsageError, match=r"no store at .*greensweep\.db -- run a sweep first"):
        results_dataframe()
    assert not (tmp_path / ".greensweep").exists()  # reading never creates a store
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    Store.open(url).close()
    with pytest.raises(UsageError, match="no sweeps in this store yet"):
        results_dataframe(db=url)
    with pytest.raises(UsageError, match="no sweep 'sw-missing'"):
        results_dataframe("sw-missing", db=url)


def test_import_orchestrator_stays_light():
    code = "import sys, orchestrator; print(sorted(m for m in ('pandas', 'torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- emissions.csv -------------------------------------------------------------------------


def test_emissions_rows_are_metered_windows_in_codecarbon_units(filled):
    with Store.open(filled) as store:
        rows = emissions_rows(store, SWEEP)
        stages = {s.key: s for s in store.stages(SWEEP)}
    # train, prune and 2 + 3 evaluation repeats; the quantize had no meter reading and
    # the third evaluation never ran
    assert [r["run_id"] for r in rows] == [
        f"{SWEEP}/train/k-train", f"{SWEEP}/prune/k-prune",
        *(f"{SWEEP}/evaluate/k-eval0/repeat-{i}" for i in range(2)),
        *(f"{SWEEP}/evaluate/k-eval1/repeat-{i}" for i in range(3)),
    ]
    assert all(set(r) == set(EMISSIONS_FIELDS) for r in rows)
    assert {r["project_name"] for r in rows} == {"export-test"} and {r["experiment_id"] for r in rows} == {SWEEP}

    train, prune = rows[0], rows[1]
    assert train["cpu_energy"] == pytest.approx(360.0 / J_PER_KWH)
    assert train["energy_consumed"] == pytest.approx(1e-4)
    assert train["cpu_power"] == pytest.approx(36.0) and train["duration"] == 10.0
    assert train["emissions"] is None and train["emissions_rate"] is None  # carbon never accounted
    assert train["tracking_mode"] == "process"  # TDP x this process's utilisation
    assert train["gpu_energy"] is None and train["gpu_power"] is None  # no GPU figure: empty, not 0

    kwh = (7200.0 + 360.0) / J_PER_KWH
    assert prune["energy_consumed"] == pytest.approx(kwh)
    assert prune["ram_energy"] == pytest.approx(1e-4) and prune["ram_power"] == pytest.approx(90.0)
    assert prune["cpu_power"] == pytest.approx(1800.0)
    assert prune["emissions"] == pytest.approx(kwh * 50.0 / 1000)  # kg
    assert prune["emissions_rate"] == pytest.approx(kwh * 50.0 / 1000 / 4.0)  # kg/s
    assert prune["tracking_mode"] == "machine" and prune["region"] == "FR"
    assert prune["cpu_model"] == "Xeon Test 1234" and prune["cpu_count"] == 8
    assert prune["ram_total_size"] == pytest.approx(16.0) and prune["gpu_count"] == 0
    assert prune["gpu_model"] is None and prune["os"] == HARDWARE_CPU["os"] and prune["python_version"] == "3.11.9"
    assert prune["timestamp"] == stages["k-prune"].finished_at.strftime("%Y-%m-%dT%H:%M:%S")
    for unknown in ("country_name", "country_iso_code", "cloud_provider", "cloud_region", "codecarbon_version",
                    "longitude", "latitude", "water_consumed", "on_cloud", "wue", "cpu_utilization_percent"):
        assert prune[unknown] is None, unknown

    last = rows[-1]  # k-eval1 repeat 2: a 4 s window, GPU 270 J, CPU 18 J
    assert last["duration"] == 4.0 and last["gpu_power"] == pytest.approx(67.5)
    assert last["energy_consumed"] == pytest.approx(288.0 / J_PER_KWH)
    assert last["emissions"] == pytest.approx(288.0 / J_PER_KWH * 400.0 / 1000)
    assert last["gpu_model"] == "2 x NVIDIA H100" and last["gpu_count"] == 2 and last["region"] == "DE"


def test_emissions_csv_from_the_cli_has_codecarbons_header(filled, capsys):
    from orchestrator.cli import main

    main(["results", SWEEP, "--db", filled, "--format", "emissions"])  # returns on success
    text = capsys.readouterr().out
    assert text.splitlines()[0] == CODECARBON_HEADER == ",".join(EMISSIONS_FIELDS)
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert len(parsed) == 7
    prune = parsed[1]
    assert float(prune["energy_consumed"]) == pytest.approx(7560.0 / J_PER_KWH)
    assert prune["country_name"] == "" and prune["gpu_energy"] == "" and prune["pue"] == "1"
    import pandas as pd

    df = pd.read_csv(io.StringIO(text))  # what a CodeCarbon dashboard does with the file
    assert df["emissions"].iloc[2:].notna().all() and pd.isna(df["emissions"].iloc[0])
    assert df["energy_consumed"].sum() == pytest.approx(
        (360.0 + 7560.0 + sum(90.0 * (i + 1) + 18.0 for i in range(2)) + sum(90.0 * (i + 1) + 18.0 for i in range(3)))
        / J_PER_KWH)


def test_emissions_of_an_unknown_sweep_is_a_usage_error(filled):
    with Store.open(filled) as store, pytest.raises(UsageError, match="no sweep 'sw-nope'"):
        emissions_rows(store, "sw-nope")
    assert render_emissions([]) == ",".join(EMISSIONS_FIELDS)
