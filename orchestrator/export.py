"""greensweep's measurements for other tools: a pandas DataFrame and CodeCarbon's
``emissions.csv``.

* :func:`results_dataframe` (also ``orchestrator.results``) -- one row per (sweep point,
  evaluation target) with exactly the columns of :data:`RESULT_FIELDS`, the same stable
  contract as ``greensweep results --format csv|json``.
* :func:`emissions_rows` / :func:`render_emissions` -- one row per metered window in the
  columns, order and units of CodeCarbon's ``emissions.csv`` (``EmissionsData`` of
  CodeCarbon 3.x): energy in kWh, emissions in kg CO2eq, power in W, RAM in GB
  (2**30 bytes), durations in s. ``greensweep results --format emissions`` prints it.

A column greensweep does not know is left empty, never filled with a made-up value: the
country, cloud, coordinates, water and utilisation columns are always empty; emissions
are empty until carbon has been accounted (a spec without a ``carbon:`` section).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from orchestrator.carbon.base import J_PER_KWH
from orchestrator.errors import UsageError

if TYPE_CHECKING:
    import pandas as pd

    from orchestrator.store import NodeRecord, Store
    from orchestrator.store.records import EnergyRecord

# -- the results DataFrame -----------------------------------------------------------------

# pandas dtypes per RESULT_FIELDS column; nullable where a figure may be missing. Columns
# not listed (labels, lists, dicts) stay ``object``.
_INT_COLUMNS = ("point_index", "repeats", "params", "macs", "size_bytes", "deployable_size_bytes")
_FLOAT_COLUMNS = (
    "top1", "top1_std", "top5", "time_per_sample_s", "time_per_sample_s_std", "throughput_samples_per_s",
    "energy_per_sample_j", "energy_per_sample_j_std", "net_energy_per_sample_j", "gpu_energy_per_sample_j",
    "cpu_energy_per_sample_j", "dram_energy_per_sample_j", "carbon_g_per_sample", "intensity_g_per_kwh", "top1_agreement",
    "time_ratio_vs_baseline", "time_ratio_ci_low", "time_ratio_ci_high",
    "energy_ratio_vs_baseline", "energy_ratio_ci_low", "energy_ratio_ci_high",
)
_BOOL_COLUMNS = ("materialized",)


def open_existing_store(db: str | None = None) -> Store:
    """The store at *db* (default: ``$GREENSWEEP_DB_URL``, else
    ``sqlite:///./.greensweep/greensweep.db``); a SQLite file that does not exist is an
    error, not a new empty store."""
    from orchestrator.store import Store, default_db_url, sqlite_file

    url = db or default_db_url()
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise UsageError(
            f"no store at {path} -- run a sweep first (greensweep run SPEC) or pass db= the URL of an existing store"
        )
    return Store.open(url)


def resolve_sweep(store: Store, sweep_id: str | None) -> str:
    """*sweep_id*, checked to exist; the most recent sweep when None."""
    if sweep_id is None:
        latest = store.latest_sweep_id()
        if latest is None:
            raise UsageError("no sweeps in this store yet -- run one with: greensweep run SPEC")
        return latest
    if store.get_sweep(sweep_id) is None:
        raise UsageError(f"no sweep {sweep_id!r} in this store -- list sweeps with: greensweep status")
    return sweep_id


def results_dataframe(sweep_id: str | None = None, db: str | None = None) -> pd.DataFrame:
    """The results of *sweep_id* (default: the latest sweep) in the store at *db*, as a
    pandas DataFrame.

    One row per (sweep point, evaluation target), in point order, with exactly the
    columns of :data:`orchestrator.report.RESULT_FIELDS` in that order (see the
    README's results table for each field's meaning and unit). Missing figures are
    ``NaN``/``<NA>``: integer columns are pandas ``Int64``, ``materialized`` is
    ``boolean``, metrics are ``float64``; ``stages`` is a list, ``energy_source`` and
    ``idle_power_w`` are per-domain dicts and ``sparsity`` a dict (or None), as in the JSON output.

    Raises :class:`~orchestrator.errors.UsageError` for a missing SQLite store, an
    empty store or an unknown sweep id, and :class:`~orchestrator.errors.StoreError`
    for an unreachable database.
    """
    import pandas as pd

    from orchestrator.report import RESULT_FIELDS, result_dicts

    with open_existing_store(db) as store:
        sweep_id = resolve_sweep(store, sweep_id)
        rows = result_dicts(store.results(sweep_id))
    for row in rows:
        row["stages"] = list(row["stages"] or [])
    frame = pd.DataFrame.from_records(rows, columns=list(RESULT_FIELDS))
    for column in _INT_COLUMNS:
        frame[column] = frame[column].astype("Int64")
    for column in _FLOAT_COLUMNS:
        frame[column] = pd.to_numeric(frame[column], errors="raise").astype("float64")
    for column in _BOOL_COLUMNS:
        frame[column] = frame[column].astype("boolean")
    return frame


# -- CodeCarbon's emissions.csv ------------------------------------------------------------

#: The header of CodeCarbon's ``emissions.csv``, in its order (CodeCarbon 3.3,
#: ``codecarbon/output_methods/emissions_data.py``: ``EmissionsData``).
EMISSIONS_FIELDS: tuple[str, ...] = (
    "timestamp", "project_name", "run_id", "experiment_id", "duration", "emissions", "emissions_rate",
    "cpu_power", "gpu_power", "ram_power", "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed",
    "water_consumed", "country_name", "country_iso_code", "region", "cloud_provider", "cloud_region", "os",
    "python_version", "codecarbon_version", "cpu_count", "cpu_model", "gpu_count", "gpu_model", "longitude",
    "latitude", "ram_total_size", "tracking_mode", "cpu_utilization_percent", "gpu_utilization_percent",
    "ram_utilization_percent", "ram_used_gb", "on_cloud", "pue", "wue",
)

BYTES_PER_GB = 1024**3  # CodeCarbon's "GB" of RAM is 2**30 bytes
TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S"  # CodeCarbon's; greensweep writes UTC
_DEVICE_SOURCES = frozenset({"nvml-counter", "nvml-power", "rapl"})  # whole-device counters


def emissions_rows(store: Store, sweep_id: str) -> list[dict[str, Any]]:
    """CodeCarbon ``emissions.csv`` rows for the metered windows of *sweep_id*.

    A stage's windows are its evaluation repeats when it has measured repeats (each
    repeat is one window), else the stage's own run; only windows with an energy figure
    give a row, so nothing is counted twice and a reused stage (no work in this sweep)
    gives none. Per row:

    * ``project_name`` the sweep's name, ``experiment_id`` the sweep id, ``run_id``
      ``<sweep>/<kind>/<stage key>`` (``/repeat-<n>`` for an evaluation repeat);
    * ``timestamp`` when the stage finished (UTC, CodeCarbon's ``%Y-%m-%dT%H:%M:%S``);
    * ``duration`` the stage's run time, or the repeat's window, in s;
    * ``cpu/gpu/ram_energy`` and their sum ``energy_consumed`` in kWh (``ram`` is
      greensweep's ``dram`` domain), gross (idle included, as CodeCarbon's machine mode);
      ``*_power`` the mean power over ``duration`` in W; a domain without a figure is empty;
    * ``emissions`` in kg CO2eq and ``emissions_rate`` in kg/s, empty until carbon was
      accounted; ``region`` the node's ``greensweep/region`` label;
    * ``os``, ``python_version``, ``cpu_count`` (logical), ``cpu_model``, ``gpu_count``,
      ``gpu_model`` (``"<n> x <name>"``) and ``ram_total_size`` (GB) as the node reported
      them; ``tracking_mode`` ``machine`` when every figure comes from a device counter
      (RAPL, NVML), ``process`` when every one is the TDP x process-utilisation estimate;
      ``pue`` 1 (greensweep applies no PUE factor).
    """
    sweep = store.get_sweep(sweep_id)
    if sweep is None:
        raise UsageError(f"no sweep {sweep_id!r} in this store -- list sweeps with: greensweep status")
    by_stage: dict[str, list[Any]] = {}
    for m in store.measurements(sweep_id):
        by_stage.setdefault(m.stage_key, []).append(m)
    nodes = {n.node_id: n for n in store.nodes()}
    rows: list[dict[str, Any]] = []
    for stage in store.stages(sweep_id):
        node = nodes.get(stage.node_id) if stage.node_id else None
        finished = stage.finished_at
        base_run_id = f"{sweep_id}/{stage.kind}/{stage.key}"
        repeats = by_stage.get(stage.key, [])
        windows = (
            [(f"{base_run_id}/repeat-{m.repeat}", m.duration_s, m.energy) for m in repeats]
            if repeats
            else [(base_run_id, stage.duration_s, stage.energy)]
        )
        for run_id, duration_s, energy in windows:
            if energy is None or energy.total_energy_j is None:
                continue
            rows.append(_emissions_row(sweep.name, sweep_id, run_id, finished, duration_s, energy, node))
    return rows


def _emissions_row(
    project: str,
    sweep_id: str,
    run_id: str,
    finished: datetime | None,
    duration_s: float | None,
    energy: EnergyRecord,
    node: NodeRecord | None,
) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(EMISSIONS_FIELDS)
    timed = duration_s is not None and duration_s > 0
    emissions_kg = None if energy.carbon_g is None else energy.carbon_g / 1000.0
    row.update(
        timestamp=finished.astimezone(timezone.utc).strftime(TIMESTAMP_FORMAT) if finished is not None else None,
        project_name=project,
        run_id=run_id,
        experiment_id=sweep_id,
        duration=duration_s,
        emissions=emissions_kg,
        emissions_rate=emissions_kg / duration_s if emissions_kg is not None and timed else None,
        energy_consumed=energy.total_energy_j / J_PER_KWH if energy.total_energy_j is not None else None,
        tracking_mode=_tracking_mode(energy),
        pue=1,
    )
    for codecarbon_name, domain in (("cpu", "cpu"), ("gpu", "gpu"), ("ram", "dram")):
        joules = getattr(energy, f"{domain}_energy_j")
        if joules is None:
            continue
        row[f"{codecarbon_name}_energy"] = joules / J_PER_KWH
        if timed:
            row[f"{codecarbon_name}_power"] = joules / duration_s
    if node is not None:
        row.update(_node_columns(node))
    return row


def _tracking_mode(energy: EnergyRecord) -> str | None:
    sources = {
        getattr(energy, f"{d}_source")
        for d in ("gpu", "cpu", "dram")
        if getattr(energy, f"{d}_energy_j") is not None
    }
    if sources and sources <= _DEVICE_SOURCES:
        return "machine"
    if sources == {"estimate-tdp"}:
        return "process"
    return None  # mixed or unknown sources: neither of CodeCarbon's modes


def _node_columns(node: NodeRecord) -> dict[str, Any]:
    hw: Mapping[str, Any] = node.hardware or {}
    out: dict[str, Any] = {
        "region": node.region,
        "os": hw.get("os"),
        "python_version": hw.get("python"),
        "cpu_count": hw.get("cpu_count_logical"),
        "cpu_model": hw.get("cpu_model"),
    }
    memory = hw.get("memory_total_bytes")
    if isinstance(memory, (int, float)):
        out["ram_total_size"] = memory / BYTES_PER_GB
    gpus = hw.get("gpus")
    if isinstance(gpus, list):  # None: the node could not tell; []: it has none
        out["gpu_count"] = len(gpus)
        names: dict[str, int] = {}
        for g in gpus:
            name = g.get("name") if isinstance(g, Mapping) else None
            names[name or "unknown GPU"] = names.get(name or "unknown GPU", 0) + 1
        out["gpu_model"] = ", ".join(f"{n} x {name}" for name, n in names.items()) or None
    return out


def render_emissions(rows: Iterable[Mapping[str, Any]]) -> str:
    """*rows* as CodeCarbon's ``emissions.csv``: its header, then one line per row;
    unknown values are empty cells."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(EMISSIONS_FIELDS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in EMISSIONS_FIELDS})
    return buf.getvalue().rstrip("\n")


__all__ = [
    "EMISSIONS_FIELDS",
    "emissions_rows",
    "open_existing_store",
    "render_emissions",
    "resolve_sweep",
    "results_dataframe",
]
