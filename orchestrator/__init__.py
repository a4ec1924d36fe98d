"""greensweep's coordinator side.

``from orchestrator import results`` gives a sweep's results as a pandas DataFrame::

    from orchestrator import results
    df = results("sw-0123456789ab", db="sqlite:///./.greensweep/greensweep.db")

(see :func:`orchestrator.export.results_dataframe`). ``run_sweep`` runs a sweep from
Python, quietly, and raises the project's errors (:mod:`orchestrator.errors`)::

    from orchestrator import run_sweep
    outcome = run_sweep("examples/quickstart.yaml", db="sqlite:///./.greensweep/greensweep.db")
    outcome.sweep_id, outcome.status    # ("sw-0123456789ab", "succeeded")

(see :mod:`orchestrator.runner`; ``resume_sweep`` finishes one). Names here are loaded on first use,
so ``import orchestrator`` stays light: no pandas, torch or Ray until they are needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.export import results_dataframe as results
    from orchestrator.runner import resume_sweep, run_sweep

_LAZY = {
    "results": ("orchestrator.export", "results_dataframe"),
    "run_sweep": ("orchestrator.runner", "run_sweep"),
    "resume_sweep": ("orchestrator.runner", "resume_sweep"),
}

__all__ = ["results", "resume_sweep", "run_sweep"]


def __getattr__(name: str) -> Any:
    target = _LAZY.get(name)
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = target
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value
