"""Node-type catalog and simulated-cluster files.

The catalog (``clusters/catalog.yaml``) names the kinds of machine greensweep knows:
what accelerator and CPU a node type has, and the *nominal* power figures used when a
node cannot measure its own energy (``estimate-tdp``) and when the scheduler predicts
the energy of a stage it has not run yet. Measured facts always come from the node
itself (``workers.hardware``); the catalog is what a node type is *meant* to be.

A simulated-cluster file (``clusters/local-sim.yaml``) describes several Ray nodes on
one machine, each labelled with a node type from the catalog and a carbon region, so
the multi-node, multi-region code paths run on a laptop. Both files are validated here,
before any Ray process starts; an error is one line that names the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.errors import SpecError
from orchestrator.resources import shipped_dir
from orchestrator.spec import _pydantic_error

CLUSTERS_DIR = shipped_dir("clusters")  # the repository's clusters/, shipped as package data
DEFAULT_CATALOG = CLUSTERS_DIR / "catalog.yaml"
_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"  # also a valid Kubernetes label value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeType(_Strict):
    """One kind of machine. Power figures are nominal (datasheet TDP/board power)."""

    name: str = Field(pattern=_NAME_PATTERN)
    accelerator: str | None = Field(default=None, pattern=_NAME_PATTERN)
    cpu: str = Field(min_length=1)
    cpu_tdp_w: float = Field(gt=0)
    gpu_power_w: float = Field(default=0.0, ge=0)
    num_cpus: int = Field(ge=1)
    num_gpus: int = Field(default=0, ge=0)
    relative_speed: float = Field(default=1.0, gt=0)  # nominal throughput factor for expected durations
    default_region: str | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _gpu_fields_agree(self) -> NodeType:
        has_accel = self.accelerator is not None
        if has_accel != (self.num_gpus > 0):
            raise ValueError("accelerator and num_gpus must agree: give both (num_gpus >= 1) or neither")
        if has_accel != (self.gpu_power_w > 0):
            raise ValueError("gpu_power_w must be > 0 exactly when the node type has an accelerator")
        return self


class Catalog(_Strict):
    """The known node types, looked up by name."""

    node_types: tuple[NodeType, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Catalog:
        seen: set[str] = set()
        for nt in self.node_types:
            if nt.name in seen:
                raise ValueError(f"node type {nt.name!r} is defined twice -- keep one")
            seen.add(nt.name)
        return self

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(nt.name for nt in self.node_types)

    def get(self, name: str) -> NodeType:
        """The node type called *name*; an unknown name raises :class:`SpecError` listing the known ones."""
        for nt in self.node_types:
            if nt.name == name:
                return nt
        raise SpecError(
            f"unknown node type {name!r} -- known node types: {', '.join(self.names)} "
            "(add it to clusters/catalog.yaml)"
        )


class SimulatedNode(_Strict):
    """*count* Ray nodes of one node type in one region, each with *num_cpus* logical CPUs."""

    node_type: str = Field(pattern=_NAME_PATTERN)
    region: str = Field(min_length=1)
    num_cpus: int = Field(ge=1)
    count: int = Field(default=1, ge=1)


class SimulatedCluster(_Strict):
    """A heterogeneous cluster simulated by several Ray nodes on one host.

    The node types share the host's CPU, so timings and energy on a simulated cluster are
    *not* hardware comparisons; the file exercises placement, labels and carbon regions.
    """

    name: str = Field(min_length=1)
    simulated: Literal[True]
    description: str | None = None
    nodes: tuple[SimulatedNode, ...] = Field(min_length=1)

    @property
    def total_cpus(self) -> int:
        return sum(n.num_cpus * n.count for n in self.nodes)


def _read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise SpecError(f"{path}: not valid YAML{where} -- fix the {what}'s syntax") from None


def _validate(model: type[_Strict], raw: Any, path: Path) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: must be a YAML mapping at the top level")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise SpecError(f"{path}: {_pydantic_error(e, model=model)}") from None


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Load and validate a node-type catalog (default: the shipped ``clusters/catalog.yaml``)."""
    p = Path(path) if path is not None else DEFAULT_CATALOG
    return _validate(Catalog, _read_yaml(p, "node-type catalog"), p)


def known_regions() -> set[str]:
    """Regions for which greensweep ships intensity data: the static table's rows and the
    hourly traces (e.g. ``DE`` has a trace but no static row)."""
    from orchestrator.carbon.static import DEFAULT_TABLE, load_table
    from orchestrator.carbon.timeseries import DATA_DIR, discover

    return set(load_table(DEFAULT_TABLE)) | set(discover(DATA_DIR))


def load_simulated_cluster(path: Path | str, catalog: Catalog | None = None) -> SimulatedCluster:
    """Load a simulated-cluster file; every node type must be in *catalog* (default: the
    shipped one) and every region must have shipped carbon data."""
    p = Path(path)
    sim = _validate(SimulatedCluster, _read_yaml(p, "cluster file"), p)
    catalog = catalog or load_catalog()
    regions = known_regions()
    for i, node in enumerate(sim.nodes):
        if node.node_type not in catalog.names:
            raise SpecError(
                f"{p}: nodes[{i}].node_type: unknown node type {node.node_type!r} -- known node types: "
                f"{', '.join(catalog.names)}"
            )
        if node.region not in regions:
            raise SpecError(
                f"{p}: nodes[{i}].region: {node.region!r} has no carbon data in clusters/carbon "
                "-- use a region from clusters/carbon/regions.csv or an hourly trace (e.g. FR, DE)"
            )
    return sim
