"""Reading a sweep back: the results table, the cross-hardware comparison, the Pareto
frontier, plots and the self-contained HTML report.

- :mod:`~orchestrator.report.aggregate` -- the store's raw point records -> one
  :class:`~orchestrator.store.records.ResultRow` per point (means, std, per-sample energy).
- :mod:`~orchestrator.report.savings` -- carbon-aware placement against ``fifo``.
- :mod:`~orchestrator.report.results` -- ``results``: one row per sweep point
  (``results --format json`` is a stable contract, :data:`RESULT_FIELDS`).
- :mod:`~orchestrator.report.compare` -- ``compare``: compressed models x targets (x runtimes
  and precisions), with each model's best runtime per target marked.
- :mod:`~orchestrator.report.pareto` -- ``pareto``: non-dominated points per target, costs
  following the paired verdicts.
- :mod:`~orchestrator.report.answer` -- the answer first: per target and runtime, the
  cheapest model whose saving is significant; each target's noise floor.
- :mod:`~orchestrator.report.plots` -- matplotlib figures as PNG bytes (imported lazily).
- :mod:`~orchestrator.report.html` -- ``report``: one HTML file, images embedded.

Nothing here touches the store: the CLI reads it and passes records in.
"""

from orchestrator.report.aggregate import result_row, result_rows
from orchestrator.report.answer import ANSWER_RULE, Answer, NoiseFloor, answer_lines, answers, noise_floors
from orchestrator.report.compare import BEST_RULE, Column, Comparison, ModelRow, build_comparison, render_comparison
from orchestrator.report.html import NO_PLACEMENT, build_report, placement_section, placement_summary
from orchestrator.report.pareto import (
    X_METRICS,
    Y_METRICS,
    Pareto,
    ParetoPoint,
    TargetFront,
    available_x,
    build_pareto,
    pareto_mask,
    render_pareto,
)
from orchestrator.report.results import RESULT_FIELDS, render_results, result_dicts
from orchestrator.report.savings import carbon_savings

__all__ = [
    "ANSWER_RULE", "Answer", "NoiseFloor", "answer_lines", "answers", "noise_floors",
    "BEST_RULE", "NO_PLACEMENT", "RESULT_FIELDS", "X_METRICS", "Y_METRICS", "Column", "Comparison", "ModelRow",
    "Pareto", "ParetoPoint", "TargetFront", "available_x", "build_comparison", "build_pareto", "build_report",
    "carbon_savings", "pareto_mask", "placement_section", "placement_summary", "render_comparison", "render_pareto",
    "render_results", "result_dicts", "result_row", "result_rows",
]
