"""A stage kind the code base does not ship, for tests/unit/test_stage_kinds.py: its
parameter model and its runner are all a new kind needs besides its registration.

``round`` rounds every weight to ``dtype`` and back: simulated compression (same dense
compute), a real artifact with the parent's structure.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from workers.types import StageOutput, StageTask, WorkerEnv


class RoundParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dtype: Literal["float16", "bfloat16"] = "float16"


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    import torch

    from workers.modelio import load_parent, save_child

    params = RoundParams.model_validate(dict(task.params))
    parent = load_parent(task)
    with torch.no_grad():
        for p in parent.model.parameters():
            p.copy_(p.to(getattr(torch, params.dtype)).float())
    artifact = save_child(parent.model, task, parent, params.model_dump(), materialized=False)
    return StageOutput(metrics={"dtype": params.dtype}, artifact=artifact)
