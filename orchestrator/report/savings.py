"""What carbon-aware placement saved: the sweep's placement decisions against their
``fifo`` counterfactual, as ``greensweep carbon savings`` and the HTML report show it.

"Carbon saved" is a query over stored decisions, not a claim: every decision was stored
with the intensity it used and the carbon-agnostic choice it replaced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from orchestrator.store.records import PlacementRecord


def carbon_savings(sweep_id: str, placed: Sequence[PlacementRecord]) -> dict[str, Any] | None:
    """The sweep's placements (``Store.placements``) summed, as a JSON-able dict; None
    when the sweep recorded no placement decisions.

    ``expected_carbon_g`` and ``fifo_expected_carbon_g`` sum the scheduler's expected
    carbon of the placed stages with both decisions; ``measured_carbon_g`` sums what was
    accounted for the stages that ran (None when none was). The fifo figure is a
    counterfactual estimate: the stage did not run there. A sum over stages of which
    none has a figure is None, never 0 g.
    """
    if not placed:
        return None
    expected = _total([p.expected_carbon_g for p in placed])
    fifo = _total([p.fifo_expected_carbon_g for p in placed])
    measured = _total([p.measured_carbon_g for p in placed])
    saved = (fifo - expected) if expected is not None and fifo is not None else None
    return {
        "sweep_id": sweep_id,
        "policy": placed[0].policy,
        "stages": [_stage(p) for p in placed],
        "expected_carbon_g": expected,
        "fifo_expected_carbon_g": fifo,
        "measured_carbon_g": measured,
        "saved_expected_g": saved,
        "saved_expected_pct": (100.0 * saved / fifo) if saved is not None and fifo else None,
    }


def _stage(p: PlacementRecord) -> dict[str, Any]:
    return {
        "key": p.stage_key, "kind": p.kind, "status": p.stage_status, "node_id": p.node_id,
        "node_type": p.node_type, "region": p.region, "start": p.start_at.isoformat(),
        "expected_duration_s": p.expected_duration_s, "expected_energy_j": p.expected_energy_j,
        "expected_intensity_g_per_kwh": p.expected_intensity_g_per_kwh,
        "expected_carbon_g": p.expected_carbon_g, "measured_carbon_g": p.measured_carbon_g,
        "estimate_source": p.estimate_source, "fifo_node_id": p.fifo_node_id,
        "fifo_node_type": p.fifo_node_type, "fifo_region": p.fifo_region,
        "fifo_start": p.fifo_start_at.isoformat(),
        "fifo_expected_intensity_g_per_kwh": p.fifo_expected_intensity_g_per_kwh,
        "fifo_expected_carbon_g": p.fifo_expected_carbon_g,
        "moved": p.node_id != p.fifo_node_id or p.start_at != p.fifo_start_at,
    }


def _total(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None
