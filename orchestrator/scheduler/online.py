"""Carbon-aware placement during a sweep: the pure planner, applied and re-planned.

:class:`CarbonPlacer` turns the sweep's remaining stages and the live worker slots into
a planning :class:`~orchestrator.scheduler.instance.Instance` (the documented JSON format,
``docs/scheduler-instance.md``), asks :func:`~orchestrator.scheduler.planner.plan` for a
schedule under the sweep's policy **and** under ``fifo``, and dispatches the ready stages
whose planned start has come, on their planned node. A stage planned for later (a cleaner
window before the deadline) waits. It re-plans when a stage finishes (early or late,
the expectations change), when the set of ready stages or free slots changes, and at
least every :data:`REPLAN_S`.

Every dispatched stage carries a decision -- node, start, expected duration, energy,
intensity and carbon -- and the ``fifo`` counterfactual from the same instance: the node
and start a carbon-agnostic scheduler would have used and its expected carbon. The
coordinator stores both (``placements``), so "carbon saved" is a query.

Intensity series are read through a :class:`~orchestrator.carbon.cache.SeriesCache`:
per (region, hour), refreshed by a background thread for remote providers, so a slow or
rate-limited API never stalls dispatch. A plan made on a region's last known series or
on the labelled fallback says so: its decisions' ``estimate_source`` carries
``+stale-intensity`` / ``+fallback-intensity`` (e.g. ``catalog+stale-intensity``), and
the coordinator's warning line names the region and the reason, once per change.

Expected durations and power per (stage kind, node type) come from earlier measurements
in the store when there are any (median of succeeded stages), else from the catalog:
each kind's registered ``default_duration_s`` scaled by the node type's ``relative_speed`` and its nominal
power (``cpu_tdp_w + gpu_power_w``).
"""

from __future__ import annotations

import statistics
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

from orchestrator.scheduler import Slot, choose_slot, compatible
from workers.stages.registry import STAGE_KINDS, find_kind
from workers.util import J_PER_KWH

REPLAN_S = 30.0
STEP_S = 3600.0  # intensity series resolution (the shipped traces and the APIs are hourly)
HORIZON_S = 48 * 3600.0  # intensity looked ahead without a deadline
START_TOLERANCE_S = 1.0  # a planned start this close to now is "now"
WAIT_NOTE_S = 300.0  # a held stage is reported when it starts this much later than fifo would start it
ONLINE_EFFORT = 1000  # carbon-deadline search budget per re-plan (~0.1 s for a few hundred stages)
DEFAULT_POWER_W = 100.0  # a node type missing from the catalog


def _default_duration_s(kind: str) -> float:
    """The kind's registered estimate before anything was measured (60 s for a kind
    this coordinator does not know)."""
    known = find_kind(kind)
    return known.default_duration_s if known is not None else 60.0


@dataclass(frozen=True)
class Estimate:
    duration_s: float
    power_w: float
    source: str  # "measured" | "scaled" | "catalog"


class Estimates:
    """Expected duration and power of a stage kind on a node type."""

    def __init__(self, measured: Sequence[tuple[str, str | None, float, float | None]], catalog: Any) -> None:
        """*measured*: ``(kind, node_type, duration_s, energy_j)`` of succeeded stages."""
        self._samples: dict[tuple[str, str], list[tuple[float, float | None]]] = {}
        for kind, node_type, duration, energy in measured:
            if node_type and duration and duration > 0:
                self._samples.setdefault((kind, node_type), []).append((duration, energy))
        self._catalog = catalog

    def observe(self, kind: str, node_type: str, duration_s: float, energy_j: float | None) -> None:
        if duration_s > 0:
            self._samples.setdefault((kind, node_type), []).append((duration_s, energy_j))

    def _nominal(self, node_type: str) -> tuple[float, float]:
        try:
            nt = self._catalog.get(node_type)
        except Exception:  # noqa: BLE001 - a node type outside the catalog: defaults, labelled "catalog"
            return DEFAULT_POWER_W, 1.0
        return nt.cpu_tdp_w + nt.gpu_power_w, nt.relative_speed

    def get(self, kind: str, node_type: str) -> Estimate:
        """``measured``: medians of this kind's runs on this node type. ``scaled``: none
        here, but runs on another type, scaled by the catalog's ratios of relative speed
        and nominal power -- so a node type nobody ran yet is compared on the same footing
        as one that was measured (not at full nominal power against a measured few
        watts). ``catalog``: no run of this kind anywhere -- default durations divided by
        ``relative_speed``, at nominal power."""
        power, speed = self._nominal(node_type)
        samples = self._samples.get((kind, node_type))
        if samples:
            return Estimate(*self._medians(samples, power), "measured")
        others = [(len(v), t) for (k, t), v in self._samples.items() if k == kind]
        if others:
            _, other = max(others)
            other_power, other_speed = self._nominal(other)
            duration, measured_power = self._medians(self._samples[(kind, other)], other_power)
            return Estimate(duration * other_speed / speed, measured_power * power / other_power, "scaled")
        return Estimate(_default_duration_s(kind) / speed, power, "catalog")

    @staticmethod
    def _medians(samples: list[tuple[float, float | None]], nominal_w: float) -> tuple[float, float]:
        """Median duration and median power (nominal when no energy was measured)."""
        duration = statistics.median(d for d, _ in samples)
        powers = [e / d for d, e in samples if e is not None and d > 0]
        return duration, statistics.median(powers) if powers else nominal_w


class CarbonPlacer:
    """Places ready stages under ``greedy-carbon`` or ``carbon-deadline``; see the module."""

    def __init__(self, *, policy: str, provider: Any, estimates: Estimates, deadline: datetime | None = None,
                 flexible_kinds: Sequence[str] = (), warn: Callable[[str], None] = lambda m: None,
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 intensity: Any = None) -> None:
        """*intensity*: the :class:`~orchestrator.carbon.cache.SeriesCache` to read series
        through (default: one over *provider* with this *clock*); the placer owns it and
        stops its refresher in :meth:`close` (or when the placer is garbage-collected)."""
        if policy not in ("greedy-carbon", "carbon-deadline"):
            raise ValueError(f"CarbonPlacer does not do policy {policy!r}")
        self.policy, self.provider, self.estimates = policy, provider, estimates
        self.deadline, self.clock, self.warn = deadline, clock, warn
        self.flexible_kinds = {k for k, sk in STAGE_KINDS.items() if sk.may_wait} | set(flexible_kinds)
        self._plan: dict[str, tuple[str, datetime, float]] = {}  # key -> (node id, start, carbon g)
        self._fifo: dict[str, tuple[str, datetime, float]] = {}
        if intensity is None:
            from orchestrator.carbon.cache import SeriesCache

            intensity = SeriesCache(provider, step_s=STEP_S, clock=clock)
        self.intensity = intensity
        self._views: dict[str, Any] = {}  # region -> SeriesView of the last plan
        self._told: dict[str, str] = {}  # region -> the intensity status last warned about
        weakref.finalize(self, intensity.close, wait=False)
        self._dirty = True
        self._planned_at = 0.0
        self._signature: tuple[Any, ...] = ()
        self._fallback: str | None = None  # why placement is by fifo now (no plan could be made)
        self._running_since: dict[str, datetime] = {}
        self.replans = 0
        self.held: dict[str, tuple[str, datetime, float]] = {}  # ready stages waiting for their window

    # -- events from the coordinator ----------------------------------------------------

    def observe(self, stage: Any, node: Any, result: Any) -> None:
        """A stage finished: learn its duration and energy, re-plan before the next dispatch."""
        self._running_since.pop(stage.key, None)
        if result.status == "succeeded" and result.duration_s > 0:
            energy = result.energy.total_energy_j if result.energy is not None else None
            self.estimates.observe(stage.kind, node.node_type, result.duration_s, energy)
        self._dirty = True

    # -- planning ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the intensity refresher (idempotent); the placer still plans on what it has."""
        self.intensity.close()

    def _series(self, regions: list[str], origin: datetime, horizon_s: float) -> dict[str, list[float]]:
        """Hourly intensity of each region from *origin* (the start of an hour), cached
        per (region, hour) and never waited for on the network (see the module); a
        region's stale or fallback series is warned about when its status changes."""
        self._views = self.intensity.read(regions, origin, horizon_s + 2 * STEP_S)
        for region, view in self._views.items():
            if self._told.get(region, "fresh") == view.status:
                continue
            self._told[region] = view.status
            name = repr(region) if region else "(unlabelled)"
            if view.status == "fresh":
                self.warn(f"carbon intensity for region {name} is current again")
            elif view.status == "stale":
                self.warn(f"carbon intensity for region {name} is not available for {origin:%Y-%m-%d %H:%M} UTC "
                          f"({view.reason}); planning with the series fetched {view.fetched_at:%Y-%m-%d %H:%M} UTC, "
                          f"labelled {view.label}")
            else:
                self.warn(f"no carbon intensity for region {name} ({view.reason}); planning with the fallback "
                          f"{view.values[0]:g} g/kWh ({view.source}), labelled {view.label}")
        return {region: list(view.values) for region, view in self._views.items()}

    def _intensity_label(self, *regions: str | None) -> str:
        """``+stale-intensity`` / ``+fallback-intensity`` when the last plan used such a
        series for any of *regions* (the worst wins), else ``""``."""
        labels = {self._views[r or ""].label for r in regions if (r or "") in self._views}
        for label in ("fallback-intensity", "stale-intensity"):
            if label in labels:
                return f"+{label}"
        return ""

    def _instance(self, stages: list[Any], slots: list[Slot], status: dict[str, str], plan: Any,
                  now: datetime, origin: datetime) -> dict[str, Any] | None:
        """The planning instance at *now*. Its time 0 is *origin*, the start of the
        current intensity step, so element k of each series covers exactly
        ``[origin + k*step, origin + (k+1)*step)``; nothing starts before *now*
        (``release_s``) or on a slot before its running stages are expected to end
        (``busy_until_s``)."""
        at = (now - origin).total_seconds()
        horizon = at + HORIZON_S
        if self.deadline is not None:
            horizon = max(horizon, (self.deadline - origin).total_seconds())
        groups = _placement_groups(stages, slots)
        nodes, types = [], {}
        left_s: dict[str, float] = {}  # expected time left of each running stage
        for s in slots:
            for k in s.busy_keys:
                exp = self.estimates.get(plan.stage(k).kind, s.node.node_type).duration_s
                since = self._running_since.get(k, now)
                left_s[k] = max(1.0, exp - (now - since).total_seconds())
        for s in slots:
            group = groups[s.node.node_id]
            types.setdefault(group, {"power_w": self.estimates.get("train", s.node.node_type).power_w})
            node: dict[str, Any] = {"id": s.node.node_id, "node_type": group,
                                    "region": s.node.region or "", "slots": 1}
            if s.busy_keys:
                node["busy_until_s"] = at + sum(left_s[k] for k in s.busy_keys)
            nodes.append(node)
        pending = {s.key for s in stages}
        members = {groups[s.node.node_id]: s.node for s in slots}  # each group and one of its nodes
        tasks = []
        for st in stages:
            durations = {group: self.estimates.get(st.kind, node.node_type).duration_s
                         for group, node in members.items() if compatible(st, node)}
            if not durations:
                continue
            task: dict[str, Any] = {"id": st.key, "durations_s": durations,
                                    "flexible": self.policy == "carbon-deadline" and st.kind in self.flexible_kinds,
                                    "depends_on": [st.parent_key] if st.parent_key in pending else []}
            if self.deadline is not None:
                task["deadline_s"] = max(0.0, (self.deadline - origin).total_seconds())
            task["release_s"] = at
            if st.parent_key and status.get(st.parent_key) == "running":
                task["release_s"] = at + left_s.get(st.parent_key, 1.0)
            tasks.append(task)
        if not tasks:
            return None
        regions = sorted({n["region"] for n in nodes})
        intensity = self._series(regions, origin, horizon)
        return {"step_s": STEP_S, "node_types": types, "nodes": nodes, "tasks": tasks, "intensity": intensity}

    def _replan(self, stages: list[Any], slots: list[Slot], status: dict[str, str], plan: Any) -> None:
        from orchestrator.scheduler.instance import parse_instance
        from orchestrator.scheduler.planner import plan as make_plan

        now = self.clock()
        origin = now.replace(minute=0, second=0, microsecond=0)  # STEP_S is one hour
        self._plan, self._fifo = {}, {}
        data = self._instance(stages, slots, status, plan, now, origin)
        self._dirty, self._planned_at = False, time.monotonic()
        if data is None:
            return
        instance = parse_instance(data)
        for policy, out in ((self.policy, self._plan), ("fifo", self._fifo)):
            for a in make_plan(instance, policy, effort=ONLINE_EFFORT).assignments:
                out[a.task] = (a.node, origin + timedelta(seconds=a.start_s), a.carbon_g)
        self.replans += 1

    def place(self, ready: list[Any], free: list[Slot], slots: list[Slot], status: dict[str, str],
              plan: Any) -> list[tuple[Any, Slot, dict[str, Any]]]:
        """Decide which ready stages start now and where; the rest wait for their window."""
        from orchestrator.carbon import CarbonDataError, CarbonProviderError

        remaining = [s for s in plan.stages if status[s.key] == "pending"]
        signature = (tuple(s.key for s in ready), tuple(id(s) for s in free))
        stale = time.monotonic() - self._planned_at > REPLAN_S
        if stale or (self._fallback is None and (self._dirty or signature != self._signature
                                                  or any(s.key not in self._plan for s in ready))):
            try:
                self._replan(remaining, slots, status, plan)
                self._fallback = None
            except (CarbonDataError, CarbonProviderError) as e:
                note = f"carbon-aware placement unavailable ({e}); placing by fifo until it is back"
                if note != self._fallback:  # once per cause, not once per tick
                    self.warn(note)
                self._fallback, self._plan, self._fifo = note, {}, {}
                self._dirty, self._planned_at = False, time.monotonic()  # try again after REPLAN_S
            self._signature = signature
        if self._fallback is not None:
            return self._place_fifo(ready, free)
        now = self.clock()
        by_node = {s.node.node_id: s for s in free}
        taken: set[int] = set()
        out = []
        self.held = {}
        for stage in ready:
            planned = self._plan.get(stage.key)
            if planned is None:
                continue
            node_id, start, carbon_g = planned
            if (start - now).total_seconds() > START_TOLERANCE_S:
                self.held[stage.key] = planned  # waits for its cleaner window
                continue
            slot = by_node.get(node_id)
            if slot is None or id(slot) in taken:
                self._dirty = True  # the plan expected a slot that is busy: plan again
                continue
            taken.add(id(slot))
            self._running_since[stage.key] = now
            out.append((stage, slot, self._decision(stage, slot, start, carbon_g, slots)))
        return out

    def cohort_decisions(self, stages: list[Any], slot: Slot, slots: list[Slot]) -> list[dict[str, Any]]:
        """Decisions to record for evaluations measured together on *slot* now (a cohort:
        pinned to their target and never held): what the current plan expected of each;
        none while placing by fifo (there is no intensity to record)."""
        if self._fallback is not None:
            return []
        now = self.clock()
        out = []
        for stage in stages:
            planned = self._plan.get(stage.key)
            if planned is None:
                continue
            self._running_since[stage.key] = now
            out.append(self._decision(stage, slot, now, planned[2], slots))
        return out

    def _place_fifo(self, ready: list[Any], free: list[Slot]) -> list[tuple[Any, Slot, dict[str, Any] | None]]:
        """While no plan can be made: what fifo would start now, with no carbon decision
        recorded (there is no intensity to record), so the sweep goes on."""
        self.held = {}
        out, taken = [], set()
        for stage in ready:
            slot = choose_slot(stage, [s for s in free if id(s) not in taken])
            if slot is not None:
                taken.add(id(slot))
                out.append((stage, slot, None))
        return out

    def held_notes(self, slots: list[Slot]) -> dict[str, tuple[tuple[str, str], str]]:
        """Ready stages held back for a cleaner window -- planned to start more than
        :data:`WAIT_NOTE_S` after the fifo counterfactual would start them (not merely
        queued for a busy slot, as fifo would be too): key -> ((node id, planned start to
        the minute), text saying when and where, and what fifo would emit instead)."""
        where = {s.node.node_id: f"{s.node.node_type}/{s.node.region or '-'}" for s in slots}
        notes = {}
        for key, (node_id, start, carbon_g) in self.held.items():
            fifo = self._fifo.get(key)
            if fifo is not None and (start - fifo[1]).total_seconds() <= WAIT_NOTE_S:
                continue
            text = f"planned start {start:%Y-%m-%d %H:%M} UTC on {where.get(node_id, node_id[:12])}, " \
                   f"expected {carbon_g:.3g} g CO2"
            if fifo is not None:
                text += f"; fifo would start it {fifo[1]:%H:%M} on {where.get(fifo[0], fifo[0][:12])}, {fifo[2]:.3g} g"
            notes[key] = ((node_id, f"{start:%Y-%m-%d %H:%M}"), text)
        return notes

    def _decision(self, stage: Any, slot: Slot, start: datetime, carbon_g: float,
                  slots: list[Slot]) -> dict[str, Any]:
        est = self.estimates.get(stage.kind, slot.node.node_type)
        fifo_node_id, fifo_start, fifo_carbon = self._fifo.get(stage.key, (slot.node.node_id, start, carbon_g))
        fifo_node = next((s.node for s in slots if s.node.node_id == fifo_node_id), slot.node)
        fifo_est = self.estimates.get(stage.kind, fifo_node.node_type)

        def mean_intensity(g: float, e: Estimate) -> float | None:
            kwh = e.power_w * e.duration_s / J_PER_KWH
            return g / kwh if kwh > 0 else None

        return {
            "stage_key": stage.key, "policy": self.policy, "node_id": slot.node.node_id,
            "node_type": slot.node.node_type, "region": slot.node.region, "start_at": start,
            "expected_duration_s": est.duration_s, "expected_energy_j": est.power_w * est.duration_s,
            "expected_intensity_g_per_kwh": mean_intensity(carbon_g, est), "expected_carbon_g": carbon_g,
            "estimate_source": est.source + self._intensity_label(slot.node.region, fifo_node.region),
            "fifo_node_id": fifo_node.node_id, "fifo_node_type": fifo_node.node_type,
            "fifo_region": fifo_node.region, "fifo_start_at": fifo_start,
            "fifo_expected_energy_j": fifo_est.power_w * fifo_est.duration_s,
            "fifo_expected_intensity_g_per_kwh": mean_intensity(fifo_carbon, fifo_est),
            "fifo_expected_carbon_g": fifo_carbon,
        }


def _placement_groups(stages: list[Any], slots: list[Slot]) -> dict[str, str]:
    """Node id -> the node type the planning instance gives it: its own, followed by
    what the node lacks of what *stages* need (``cpu-xeon without torch bf16``), so two
    nodes of one type whose hardware differs (one CPU has bf16, the other not) land in
    different instance types. Nodes of one instance type are then alike for every
    stage: a task's durations never offer it a node that cannot run it. Estimates stay
    per real node type."""
    asked = sorted({need for st in stages if (kind := find_kind(st.kind)) is not None
                    for need in kind.needs(st.params)})
    out = {}
    for s in slots:
        lacks = [f"{runtime} {precision}" for runtime, precision in asked
                 if s.node.cannot_run(runtime, precision) is not None]
        out[s.node.node_id] = s.node.node_type + (f" without {', '.join(lacks)}" if lacks else "")
    return out


def policy_for(spec: Any) -> str:
    """The sweep's policy: the spec's, else greedy-carbon with carbon data (carbon-deadline
    with a deadline too), else fifo."""
    sched = spec.scheduling
    if sched.policy:
        return sched.policy
    if spec.carbon is None:
        return "fifo"
    return "carbon-deadline" if sched.deadline_h else "greedy-carbon"


def make_placer(spec: Any, store: Any, provider: Any, started_at: datetime,
                warn: Callable[[str], None]) -> CarbonPlacer | None:
    """The sweep's placer, or None for ``fifo``."""
    from orchestrator.catalog import load_catalog

    policy = policy_for(spec)
    if policy == "fifo" or provider is None:
        return None
    deadline = started_at + timedelta(hours=spec.scheduling.deadline_h) if spec.scheduling.deadline_h else None
    return CarbonPlacer(policy=policy, provider=provider, estimates=Estimates(store.stage_durations(), load_catalog()),
                        deadline=deadline, flexible_kinds=spec.scheduling.flexible, warn=warn)
