"""What a sweep run is, apart from driving it: its options (stored with the sweep, so
``resume`` drives it alike), its outcome, its owner (``host:pid``), the progress events
it emits, and the :class:`~workers.types.StageTask` a planned stage becomes on a worker.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

from orchestrator.cluster import NodeInfo
from orchestrator.plan import PlannedStage
from orchestrator.spec import SweepSpec
from workers.types import ArtifactInfo, DatasetRef, ModelRef, StageResult, StageTask


class Progress(Protocol):
    """Receives progress events; the CLI prints them (plain lines or a live display)."""

    def stage_started(self, stage: PlannedStage, node: NodeInfo) -> None: ...
    def stage_finished(self, stage: PlannedStage, result: StageResult, done: int, total: int) -> None: ...
    def stage_reused(self, stage: PlannedStage, done: int, total: int) -> None: ...
    def stage_skipped(self, stage: PlannedStage, reason: str) -> None: ...
    def stage_progress(self, stage: PlannedStage, report: dict[str, Any]) -> None: ...
    def stage_retrying(self, stage: PlannedStage, node: NodeInfo, attempt: int, reason: str) -> None: ...
    def stage_requeued(self, stage: PlannedStage, reason: str) -> None: ...
    def stage_waiting(self, stage: PlannedStage, note: str) -> None: ...
    def warning(self, message: str) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class RunOptions:
    """How a sweep is driven; stored with the sweep so ``resume`` drives it the same way.

    ``max_attempts``: attempts per stage when its worker dies (a stage that raises is not
    retried: it would raise again). ``stage_timeout_s``: an attempt running longer is
    killed and counts as lost (timed from when it starts on its worker, not while it
    waits in the worker's queue). ``stale_after_s``: a coordinator (or artifact claim)
    whose heartbeat is older is presumed dead. ``queue_depth``: at most
    this many stages queued on one worker -- only stages of kinds whose median run is
    under ``SHORT_STAGE_S`` ever queue behind another (they still run one at a time
    there; it hides the dispatch round trip). Long stages and carbon-aware placement keep
    one stage per worker, so placement is decided when a worker is free.
    """

    max_attempts: int = 3
    stage_timeout_s: float = 24 * 3600.0
    heartbeat_s: float = 5.0
    stale_after_s: float = 60.0
    queue_depth: int = 64
    transfer: str = "shared"  # "shared": one artifact root every node reads; "object-store": ship bytes

    def to_json(self) -> dict[str, Any]:
        return {"max_attempts": self.max_attempts, "stage_timeout_s": self.stage_timeout_s,
                "heartbeat_s": self.heartbeat_s, "stale_after_s": self.stale_after_s,
                "queue_depth": self.queue_depth, "transfer": self.transfer}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> RunOptions:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclass
class SweepOutcome:
    """How a run ended: ``counts`` of stages by status, ``carbon_aware`` when a
    carbon-aware placer decided (its decisions and fifo counterfactuals are stored)."""

    sweep_id: str
    status: str  # succeeded | partial | failed | cancelled
    counts: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    carbon_aware: bool = False


def coordinator_id() -> str:
    """``host:pid`` of this coordinator process, stored as the sweep's owner."""
    return f"{socket.gethostname()}:{os.getpid()}"


def coordinator_gone(owner: str | None) -> bool:
    """True when *owner* (``host:pid``) is a coordinator on this host whose process no
    longer exists: its sweep may be taken over at once, without waiting for its heartbeat
    to go stale. Unknown (another host): False."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def task_for(spec: SweepSpec, sweep_id: str, stage: PlannedStage, artifact_root: str) -> StageTask:
    return StageTask(
        sweep_id=sweep_id,
        key=stage.key,
        kind=stage.kind,
        params=dict(stage.params),
        parent_key=stage.parent_key,
        model=ModelRef(
            arch=spec.model.arch,
            kwargs=dict(spec.model.kwargs),
            checkpoint=spec.model.checkpoint,
            pretrained=spec.model.pretrained,
            input_size=spec.model.input_size,
        ),
        dataset=DatasetRef(name=spec.dataset.name, path=spec.dataset.path, options=dict(spec.dataset.options)),
        seed=spec.seed,
        artifact_root=artifact_root,
    )


def artifact_from_manifest(key: str, path: str, m: dict[str, Any]) -> ArtifactInfo:
    return ArtifactInfo(
        key=key, path=path, size_bytes=int(m["size_bytes"]), sha256=m["sha256"],
        materialized=bool(m["materialized"]), params=int(m["params"]), macs=int(m["macs"]),
        compression=m.get("compression", {}),
    )
