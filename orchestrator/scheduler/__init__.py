"""Placement: which worker slot runs a ready stage.

The scheduler only decides; the coordinator acts. ``choose_slot`` is a pure function of
the stage and the free slots (idempotent, no Ray calls), so it is testable without a
cluster. Rules (DESIGN.md, data flow step 5):

- pinned kinds (``evaluate``) run only on a node of their target node type;
- flexible kinds run on any node, GPU nodes first (training is faster there);
- among equals, the first in the stable slot order wins.

Carbon-aware choice of node and start time plugs in here (a later issue).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from orchestrator.cluster import NodeInfo
from workers.stages.registry import get_kind


@dataclass(eq=False)
class Slot:
    """A worker actor on one node; ``busy_key`` is the stage it runs, None when free."""

    node: NodeInfo
    handle: Any
    busy_key: str | None = None


def compatible(stage: Any, node: NodeInfo) -> bool:
    if get_kind(stage.kind).flexible:
        return True
    return node.node_type == stage.target


def choose_slot(stage: Any, free: Sequence[Slot]) -> Slot | None:
    candidates = [s for s in free if compatible(stage, s.node)]
    if not candidates:
        return None
    return sorted(candidates, key=lambda s: -s.node.num_gpus)[0]
