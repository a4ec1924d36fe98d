"""Placement: which worker slot runs a ready stage.

The scheduler only decides; the coordinator acts. ``choose_slot`` is a pure function of
the stage and the free slots (idempotent, no Ray calls), so it is testable without a
cluster. Rules (DESIGN.md, data flow step 5):

- pinned kinds (``evaluate``) run only on a node of their target node type;
- flexible kinds run on any node, GPU nodes first (training is faster there);
- a stage whose kind declares ``needs`` (a training stage at bf16 / fp16) runs only on a
  node whose own hardware facts say it can (:meth:`NodeInfo.cannot_run`);
- among equals, the first in the stable slot order wins.

Carbon-aware choice of node and start time: :mod:`orchestrator.scheduler.online`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from orchestrator.cluster import NodeInfo
from workers.stages.registry import get_kind


@dataclass(eq=False)
class Slot:
    """A worker actor on one node; ``busy_keys`` are the stages dispatched to it and not
    yet collected (the first runs, the others wait their turn on the actor)."""

    node: NodeInfo
    handle: Any
    busy_keys: list[str] = field(default_factory=list)


def unmet(stage: Any, node: NodeInfo) -> str | None:
    """Why *stage* may not run on *node* (its target is another node type, or the node
    cannot give what the stage needs); None when it may."""
    kind = get_kind(stage.kind)
    if not kind.flexible and node.node_type != stage.target:
        return f"it runs on {stage.target} nodes only"
    for runtime, precision in kind.needs(stage.params):
        reason = node.cannot_run(runtime, precision)
        if reason is not None:
            return f"{precision}: {reason}"
    return None


def compatible(stage: Any, node: NodeInfo) -> bool:
    return unmet(stage, node) is None


def choose_slot(stage: Any, free: Sequence[Slot], load: Mapping[int, int] | None = None) -> Slot | None:
    """The ``fifo`` choice: the least-loaded compatible slot, GPU nodes first, then the
    stable slot order. *load* maps ``id(slot)`` to stages already queued on it (default:
    its ``busy_keys``)."""
    candidates = [s for s in free if compatible(stage, s.node)]
    if not candidates:
        return None
    queued = (lambda s: load.get(id(s), 0)) if load is not None else (lambda s: len(s.busy_keys))
    return min(candidates, key=lambda s: (queued(s), -s.node.num_gpus))
