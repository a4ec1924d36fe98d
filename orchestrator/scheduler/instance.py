"""Scheduling instances: the input of the carbon-aware planner.

An instance is a self-contained description of a cluster (node types, nodes, regions),
a set of tasks with per-node-type durations, dependencies and deadlines, and a carbon
intensity series per region. The JSON format is documented in
``docs/scheduler-instance.md`` and is stable: fields may be added, never renamed.

:func:`parse_instance` validates a decoded JSON document once, at the edge, with pydantic
plus cross-reference checks, and returns a frozen :class:`Instance`. Every problem is
raised as :class:`orchestrator.errors.SpecError` whose one-line message names the field
path and the fix.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import SpecError

NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeTypeModel(_Strict):
    power_w: NonNegative


class NodeModel(_Strict):
    id: str = Field(min_length=1)
    node_type: str
    region: str
    slots: int = Field(default=1, ge=1)
    busy_until_s: NonNegative = 0.0


class TaskModel(_Strict):
    id: str = Field(min_length=1)
    durations_s: dict[str, Positive] = Field(min_length=1)
    flexible: bool = False
    deadline_s: NonNegative | None = None
    depends_on: list[str] = Field(default_factory=list)
    release_s: NonNegative = 0.0


class InstanceModel(_Strict):
    step_s: Positive
    node_types: dict[str, NodeTypeModel] = Field(min_length=1)
    nodes: list[NodeModel] = Field(min_length=1)
    tasks: list[TaskModel]
    intensity: dict[str, Annotated[list[NonNegative], Field(min_length=1)]]


@dataclass(frozen=True)
class Node:
    """One machine: runs at most ``slots`` tasks at once, drawing ``power_w`` while busy.

    All its slots are taken until ``busy_until_s`` (work already running when the plan is
    made); nothing new starts on it before then.
    """

    id: str
    node_type: str
    region: str
    slots: int
    power_w: float
    busy_until_s: float = 0.0


@dataclass(frozen=True)
class Task:
    """One unit of work. ``depends_on`` holds indices into :attr:`Instance.tasks`; the task
    starts no earlier than ``release_s`` (e.g. "now", when re-planning mid-sweep)."""

    id: str
    durations_s: dict[str, float]
    flexible: bool
    deadline_s: float | None
    depends_on: tuple[int, ...]
    release_s: float = 0.0


@dataclass(frozen=True)
class Instance:
    """A validated scheduling instance.

    Invariants (checked by :func:`parse_instance`): ids are unique; every node's type has a
    power figure and its region an intensity series; every task names only known node
    types and at least one present node can run it; dependencies name existing tasks and
    form no cycle; ``topo_order`` lists task indices so that every task comes after its
    dependencies, ties broken by input order.
    """

    step_s: float
    nodes: tuple[Node, ...]
    tasks: tuple[Task, ...]
    intensity_g_co2_per_kwh: dict[str, tuple[float, ...]]
    topo_order: tuple[int, ...]


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out or "(top level)"


def _from_pydantic(e: ValidationError) -> SpecError:
    errors = e.errors(include_url=False)
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    path = _path(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        return SpecError(f"instance: {path}: unknown key -- remove it or fix its spelling "
                         "(see docs/scheduler-instance.md)")
    if err["type"] == "missing":
        return SpecError(f"instance: {path}: required field is missing -- add it "
                         "(see docs/scheduler-instance.md)")
    msg = err["msg"].removeprefix("Value error, ")
    return SpecError(f"instance: {path}: {msg} (got {err.get('input')!r}) -- fix the value")


def _topological_order(tasks: list[TaskModel], index: dict[str, int]) -> tuple[int, ...]:
    """Kahn's algorithm, smallest input index first; raises on a cycle."""
    children: list[list[int]] = [[] for _ in tasks]
    pending = [0] * len(tasks)
    for i, t in enumerate(tasks):
        for dep in set(t.depends_on):
            children[index[dep]].append(i)
            pending[i] += 1
    ready = [i for i, n in enumerate(pending) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in children[i]:
            pending[c] -= 1
            if pending[c] == 0:
                heapq.heappush(ready, c)
    if len(order) < len(tasks):
        stuck = next(i for i, n in enumerate(pending) if n > 0)
        raise SpecError(f"instance: tasks[{stuck}].depends_on: dependency cycle through task "
                        f"{tasks[stuck].id!r} -- remove one of the dependencies in the cycle")
    return tuple(order)


def parse_instance(data: Any) -> Instance:
    """Validate a decoded instance document and return the frozen :class:`Instance`.

    Raises :class:`SpecError` (one line: field path, problem, fix) on any malformed input.
    """
    try:
        m = InstanceModel.model_validate(data)
    except ValidationError as e:
        raise _from_pydantic(e) from None

    node_ids: set[str] = set()
    for i, n in enumerate(m.nodes):
        if n.id in node_ids:
            raise SpecError(f"instance: nodes[{i}].id: duplicate node id {n.id!r} -- give each node a unique id")
        node_ids.add(n.id)
        if n.node_type not in m.node_types:
            raise SpecError(f"instance: nodes[{i}].node_type: unknown node type {n.node_type!r} -- "
                            f"use one of {sorted(m.node_types)} or add it to node_types")
        if n.region not in m.intensity:
            raise SpecError(f"instance: nodes[{i}].region: no intensity series for region {n.region!r} -- "
                            f"add intensity.{n.region} (gCO2/kWh per step)")

    index: dict[str, int] = {}
    present_types = {n.node_type for n in m.nodes}
    for i, t in enumerate(m.tasks):
        if t.id in index:
            raise SpecError(f"instance: tasks[{i}].id: duplicate task id {t.id!r} -- give each task a unique id")
        index[t.id] = i
        for nt in t.durations_s:
            if nt not in m.node_types:
                raise SpecError(f"instance: tasks[{i}].durations_s.{nt}: unknown node type {nt!r} -- "
                                f"use one of {sorted(m.node_types)}")
        if not present_types & set(t.durations_s):
            raise SpecError(f"instance: tasks[{i}].durations_s: no node can run task {t.id!r} "
                            f"(types {sorted(t.durations_s)}) -- add a duration for a node type in "
                            f"{sorted(present_types)} or add such a node")
    for i, t in enumerate(m.tasks):
        for j, dep in enumerate(t.depends_on):
            if dep not in index:
                raise SpecError(f"instance: tasks[{i}].depends_on[{j}]: unknown task id {dep!r} -- "
                                "name a task listed in tasks")
            if dep == t.id:
                raise SpecError(f"instance: tasks[{i}].depends_on[{j}]: task {t.id!r} depends on itself -- remove it")

    order = _topological_order(m.tasks, index)
    return Instance(
        step_s=m.step_s,
        nodes=tuple(Node(n.id, n.node_type, n.region, n.slots, m.node_types[n.node_type].power_w,
                         n.busy_until_s)
                    for n in m.nodes),
        tasks=tuple(Task(t.id, dict(t.durations_s), t.flexible, t.deadline_s,
                         tuple(sorted({index[d] for d in t.depends_on})), t.release_s)
                    for t in m.tasks),
        intensity_g_co2_per_kwh={r: tuple(v) for r, v in m.intensity.items()},
        topo_order=order,
    )


def load_instance(path: Path) -> Instance:
    """Read and validate an instance JSON file; any problem is a one-line :class:`SpecError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SpecError(f"instance: cannot read {path}: {e.strerror or e} -- check the path") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"instance: {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg} "
                        "-- fix the syntax") from None
    return parse_instance(data)


def horizon_s(instance: Instance) -> float:
    """End of the longest intensity series; beyond it each region holds its last value."""
    return instance.step_s * max(len(v) for v in instance.intensity_g_co2_per_kwh.values())


__all__ = ["Instance", "Node", "Task", "horizon_s", "load_instance", "parse_instance"]
