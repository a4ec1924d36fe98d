"""The ``prune`` stage: magnitude pruning, simulated or materialized.

``unstructured`` zeroes the globally smallest-|w| weights of every Linear/Conv layer but
the classifier (``torch.nn.utils.prune``, made permanent). The tensors keep their dense
shapes, so the artifact is *simulated* compression (``materialized=False``): same
FLOPs, same kernels. ``importance`` does not matter here: L1 and L2 rank single weights
alike.

``structured`` removes whole channels, hidden units, head dimensions or heads with
torch-pruning's dependency graph, so every coupled layer (residual adds, norms,
depthwise convs, the ViT ``cls_token`` / ``pos_embed``) shrinks with them; the artifact
is *materialized*. The classifier never loses outputs. Modes:

- ``all``: every prunable layer, the embedding width included; in attention, every head
  loses the same share of dimensions (``num_heads`` fixed, ``head_dim`` shrinks).
- ``keep-attention``: attention modules are left untouched, so in a ViT only the MLP
  hidden widths shrink (the embedding width is tied to the attention projections). In a
  CNN there is no attention and this equals ``all``.
- ``heads``: only whole heads are removed, ``round(ratio * num_heads)`` of them per
  attention module, at least one and never all. A model without attention is an error.

``semi-structured`` makes the ``n:m`` pattern (2:4) in every eligible Linear: in each
group of ``m`` consecutive weights along the input dimension the ``m - n`` smallest |w|
are zeroed (:mod:`workers.sparsity`, where eligibility and the per-evaluation
materialization live). The tensors stay dense, so the artifact is ``materialized=False``;
whether an evaluation runs it on sparse kernels is recorded by that evaluation. ``mode``
``all`` takes every eligible Linear but the classifier, ``keep-attention`` also leaves
attention dense.

Attention modules are recognised by shape rather than class: a module with a ``qkv``
``nn.Linear`` and an integer ``num_heads`` (timm's ``Attention``). After pruning, their
``num_heads``, ``head_dim``, ``attn_dim`` and ``scale`` are updated so ``forward`` reshapes
correctly; ``scale`` follows the new ``head_dim`` so the fused (SDPA, which derives the
scale from the tensor shape) and unfused paths agree.
"""

from __future__ import annotations

import warnings
from typing import Any, cast

import torch
from torch import nn

from workers.meters import make_meter
from workers.stages.registry import PruneParams
from workers.types import StageOutput, StageTask, WorkerEnv

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Prune the parent artifact (or, for a root stage, ``task.model``) and save the result.

    Pruning runs on the CPU: it is a one-off pass over the weights (plus one traced
    forward for the dependency graph), not worth a device transfer. Metrics:
    ``unstructured`` -> ``sparsity`` (fraction of zeros over the pruned weights);
    ``structured`` -> ``params_before``/``params_after``, ``macs_before``/``macs_after``,
    and for ``heads`` also ``heads_before``/``heads_after`` (summed over modules);
    ``semi-structured`` -> ``pattern``, ``sparsity`` (over the eligible weights),
    ``sparse_layers`` and ``dense_layers`` (name and why). The
    energy is that of the pruning itself, not of loading or saving.
    """
    from workers.modelio import load_parent, save_child
    from workers.models import count_macs, count_params

    params = PruneParams.model_validate(dict(task.params))
    torch.set_num_threads(env.num_threads)
    parent = load_parent(task)
    model, input_shape = parent.model, parent.input_shape

    meter = make_meter("cpu")
    if params.method == "unstructured":
        meter.begin()
        metrics: dict[str, Any] = {"sparsity": prune_unstructured(model, cast(float, params.ratio))}
        energy = meter.end()
    elif params.method == "semi-structured":
        from workers.sparsity import prune_semi_structured

        meter.begin()
        metrics = prune_semi_structured(model, cast(int, params.n), cast(int, params.m), str(params.mode))
        energy = meter.end()
    else:
        before = {"params_before": count_params(model), "macs_before": count_macs(model, input_shape)}
        meter.begin()
        mode_metrics = prune_structured(model, params, input_shape)
        energy = meter.end()
        after = {"params_after": count_params(model), "macs_after": count_macs(model, input_shape)}
        metrics = {**before, **after, **mode_metrics}

    artifact = save_child(model, task, parent, params.model_dump(), materialized=params.method == "structured")
    return StageOutput(metrics=metrics, artifact=artifact, energy=energy)


def prune_unstructured(model: nn.Module, ratio: float) -> float:
    """Zero the ``ratio`` smallest-|w| share of all non-classifier Linear/Conv weights,
    ranked globally, and make it permanent. Returns the sparsity reached over those weights."""
    from torch.nn.utils import prune

    classifier = _classifier(model)
    skip = set(classifier.modules()) if classifier is not None else set()
    targets = [(m, "weight") for m in model.modules() if isinstance(m, _PRUNABLE) and m not in skip]
    if not targets:
        raise ValueError("the model has no Linear/Conv layer outside the classifier to prune")
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=ratio)
    for module, name in targets:
        prune.remove(module, name)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in targets)
    return zeros / sum(m.weight.numel() for m, _ in targets)


def prune_structured(model: nn.Module, params: PruneParams, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Structured pruning in place (see the module docstring for the modes).

    Returns mode-specific metrics (heads counts for ``heads``). Raises ``ValueError`` for
    ``heads`` on a model without attention or with single-head attention.
    """
    import torch_pruning as tp

    ratio = cast(float, params.ratio)  # the parameter model requires it for structured pruning
    attentions = _attention_modules(model)
    classifier = _classifier(model)
    ignored: list[nn.Module] = [classifier] if classifier is not None else []
    widths = _width_sources(model)
    options: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    if params.mode == "keep-attention":
        ignored += attentions
    elif params.mode == "heads":
        if not attentions:
            raise ValueError(
                "prune mode 'heads' needs a model with multi-head attention; "
                f"{type(model).__name__} has none (use mode 'all')"
            )
        if any(a.num_heads < 2 for a in attentions):
            raise ValueError("prune mode 'heads' needs at least 2 heads per attention module; use mode 'all'")
        qkv = {a.qkv for a in attentions}
        # Only the qkv groups may lose channels; every other layer is held fixed. The channel
        # pruning_ratio still matters: torch-pruning only visits groups it has channels to take
        # from, and with prune_head_dims=False it takes whole heads and nothing else.
        ignored = [m for m in model.modules() if isinstance(m, _PRUNABLE) and m not in qkv]
        # torch-pruning removes ceil(r * num_heads) heads; r = (n - 0.5) / num_heads makes that exactly n.
        head_ratios = {a.qkv: (_heads_to_remove(a.num_heads, ratio) - 0.5) / a.num_heads for a in attentions}
        options = {"prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio_dict": head_ratios}
        metrics["heads_before"] = sum(a.num_heads for a in attentions)
    num_heads = {a.qkv: a.num_heads for a in attentions} if params.mode != "keep-attention" else {}

    example = torch.randn(1, *input_shape)
    with warnings.catch_warnings():
        # torch-pruning announces each bare nn.Parameter it found (cls_token, pos_embed, gamma); it prunes them right.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=tp.importance.MagnitudeImportance(p=1 if params.importance == "l1" else 2),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            num_heads=num_heads,
            # Fresh dicts: torch-pruning 1.6 mutates these arguments, and their defaults are shared module-level dicts.
            in_channel_groups={},
            out_channel_groups={},
            **options,
        )
        pruner.step()

    for attention in attentions:
        if attention.qkv in num_heads:
            _sync_attention(attention, pruner.num_heads[attention.qkv])
    for attr, (layer, layer_attr) in widths.items():
        setattr(model, attr, getattr(layer, layer_attr))
    if params.mode == "heads":
        metrics["heads_after"] = sum(a.num_heads for a in attentions)
    _check_runs(model, example)
    return metrics


def _heads_to_remove(num_heads: int, ratio: float) -> int:
    return min(max(round(ratio * num_heads), 1), num_heads - 1)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int)
    ]


def _sync_attention(attention: nn.Module, num_heads: int) -> None:
    """Make an attention module's reshape attributes match its pruned qkv projection."""
    head_dim = attention.qkv.out_features // (3 * num_heads)
    attention.num_heads = num_heads
    for attr, value in (("head_dim", head_dim), ("attn_dim", num_heads * head_dim), ("scale", head_dim**-0.5)):
        if hasattr(attention, attr):
            setattr(attention, attr, value)


def _classifier(model: nn.Module) -> nn.Module | None:
    """The classifier head (timm's ``get_classifier()``), which pruning never narrows."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    return classifier if isinstance(classifier, nn.Module) else None


def _width_sources(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """timm's model-level width attributes that equal a layer's width, with that layer.

    ``num_features`` / ``head_hidden_size`` (read by distillation and
    ``reset_classifier``) equal the classifier's ``in_features`` in most timm models;
    ViT's ``embed_dim`` equals the patch embedding's output channels. Only attributes that
    match before pruning are kept in step with their layer afterwards.
    """
    sources: dict[str, tuple[nn.Module, str]] = {}
    classifier = _classifier(model)
    if isinstance(classifier, nn.Linear):
        for attr in ("num_features", "head_hidden_size"):
            if getattr(model, attr, None) == classifier.in_features:
                sources[attr] = (classifier, "in_features")
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, nn.Conv2d) and getattr(model, "embed_dim", None) == proj.out_channels:
        sources["embed_dim"] = (proj, "out_channels")
    return sources


def _check_runs(model: nn.Module, example: torch.Tensor) -> None:
    """Fail the stage here, not at evaluation, if the pruned model no longer runs."""
    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError, AssertionError) as e:
        from workers.models import first_line

        raise ValueError(
            f"structured pruning left {type(model).__name__} unable to run ({first_line(e)}); "
            "this architecture needs a mode that leaves the failing layers alone, or unstructured pruning"
        ) from e
