"""n:m semi-structured sparsity (2:4): the pattern, the layers that take it, and whether
an evaluation runs it on sparse kernels.

**The pattern.** In every group of ``m`` consecutive weights along the *input* dimension
of a Linear layer (a row of ``weight``, shape ``(out_features, in_features)``) at most
``n`` are non-zero. :func:`prune_semi_structured` makes it by zeroing the ``m - n``
smallest |w| of each group; ties go to the earlier position (a stable sort), so the
result depends on the weights alone.

**Eligible layers** (:func:`eligible_layers`): every ``nn.Linear`` whose ``in_features``
is a multiple of ``m``, except the classifier (timm's ``get_classifier()``, always dense)
and, in mode ``keep-attention``, every Linear inside an attention module (recognised by
shape as :mod:`workers.stages.prune` does: a ``qkv`` Linear and an integer ``num_heads``).
Only shapes are read, so this runs on a model built on the meta device (the spec check).

**Simulated or materialized, per evaluation.** The artifact is a dense tensor with the
pattern (``materialized=False``): same FLOPs on dense kernels. Whether an evaluation runs
it on sparse kernels depends on where it runs, so each evaluation records it
(:meth:`SparsityPlan.record`, ``metrics["sparsity"]``)::

    {"pattern": "2:4", "materialized": bool, "reason": str, "kernels": str | None,
     "sparse_layers": [name, ...], "dense_layers": [{"name": ..., "why": ...}, ...]}

``sparse_layers`` are the layers holding the pattern that the run treats as sparse: run on
torch's semi-structured sparse kernels when ``materialized`` is true, on dense kernels
(simulated) when false. ``dense_layers`` are every other Linear and why it is dense (not
eligible, the pattern lost to a later stage, or -- when materializing -- a shape the
kernels do not take). :func:`materialize` converts the weights with
:func:`torch.sparse.to_sparse_semi_structured` on a CUDA GPU of compute capability 8.0
(Ampere) or newer at fp16 / bf16; everything else (a CPU, an older GPU, fp32, quanto's
int8 weights, an exported runtime) is simulated and says why. The kernels need both
weight dimensions to be multiples of a per-dtype block (:func:`kernel_block`; cuSPARSELt:
16 x 16 for fp16 / bf16, CUTLASS: 32 x 64); a layer that does not fit stays dense and is
listed with its shape.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from workers.util import first_line

# The precisions the sparse kernels run (the torch backend's names) and their dtypes.
KERNEL_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
MIN_CAPABILITY = (8, 0)  # Ampere: the first GPUs with sparse tensor cores
SEMI_STRUCTURED = "semi-structured"  # the prune method that makes the pattern


def pattern_text(n: int, m: int) -> str:
    return f"{n}:{m}"


# --------------------------------------------------------------------------- eligibility


def _attention_linears(model: nn.Module) -> set[nn.Module]:
    from workers.stages.prune import _attention_modules

    return {layer for attention in _attention_modules(model) for layer in attention.modules()
            if isinstance(layer, nn.Linear)}


def eligible_layers(model: nn.Module, m: int, mode: str) -> tuple[list[tuple[str, nn.Linear]], list[dict[str, str]]]:
    """``(eligible, dense)``: the Linear layers semi-structured pruning takes in *mode*
    (``all`` or ``keep-attention``), by name, in module order, and every other Linear
    with why it stays dense. Reads shapes only (works on the meta device)."""
    from workers.stages.prune import _classifier

    classifier = _classifier(model)
    in_classifier = set(classifier.modules()) if classifier is not None else set()
    in_attention = _attention_linears(model) if mode == "keep-attention" else set()
    eligible: list[tuple[str, nn.Linear]] = []
    dense: list[dict[str, str]] = []
    for name, layer in model.named_modules():
        if not isinstance(layer, nn.Linear):
            continue
        if layer in in_classifier:
            dense.append({"name": name, "why": "the classifier (always dense)"})
        elif layer in in_attention:
            dense.append({"name": name, "why": "attention (mode keep-attention)"})
        elif layer.in_features % m:
            dense.append({"name": name, "why": f"in_features {layer.in_features} is not a multiple of {m}"})
        else:
            eligible.append((name, layer))
    return eligible, dense


# --------------------------------------------------------------------------- the pattern


def semi_structured_keep(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The keep-mask (True: kept) of the *n* largest |w| in each group of *m* consecutive
    weights along the input dimension of a 2-d *weight*; ties drop the earlier position."""
    out_features, in_features = weight.shape
    groups = weight.detach().abs().reshape(out_features, in_features // m, m)
    order = torch.argsort(groups, dim=-1, stable=True)  # ascending |w|, equal values in position order
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, order[..., : m - n], False)
    return keep.reshape(out_features, in_features)


def holds_pattern(weight: torch.Tensor, n: int, m: int) -> bool:
    """Whether every group of *m* consecutive weights along the input dimension has at
    most *n* non-zeros (a quanto weight is read dequantized: int8 keeps zeros at zero)."""
    with torch.no_grad():
        dense = weight.dequantize() if hasattr(weight, "dequantize") else weight
        out_features, in_features = dense.shape
        if in_features % m:
            return False
        nonzero = (dense.reshape(out_features, in_features // m, m) != 0).sum(dim=-1)
        return bool((nonzero <= n).all())


def prune_semi_structured(model: nn.Module, n: int, m: int, mode: str) -> dict[str, Any]:
    """Zero the ``m - n`` smallest |w| of every group of *m* along the input dimension of
    each eligible Linear (:func:`eligible_layers`), in place. Returns the stage metrics:
    ``pattern``, ``sparsity`` (the share of zeros over the eligible weights: 1 - n/m, more
    if the parent had zeros already), ``sparse_layers`` (names) and ``dense_layers``
    (name and why). Raises ``ValueError`` when the model has no eligible layer."""
    eligible, dense = eligible_layers(model, m, mode)
    if not eligible:
        raise ValueError(
            f"semi-structured pruning found no Linear layer outside the classifier"
            f"{' and attention' if mode == 'keep-attention' else ''} whose in_features is a multiple of {m} in "
            f"{type(model).__name__}; use method unstructured or structured"
        )
    zeros = total = 0
    with torch.no_grad():
        for _, layer in eligible:
            layer.weight.mul_(semi_structured_keep(layer.weight, n, m))
            zeros += int((layer.weight == 0).sum())
            total += layer.weight.numel()
    return {"pattern": pattern_text(n, m), "sparsity": zeros / total,
            "sparse_layers": [name for name, _ in eligible], "dense_layers": dense}


# --------------------------------------------------------------------------- per evaluation


@dataclass(frozen=True)
class SparsityPlan:
    """The layers of a loaded model that hold its chain's n:m pattern."""

    n: int
    m: int
    sparse: tuple[str, ...]  # names of the Linear layers holding the pattern
    dense: tuple[Mapping[str, str], ...] = field(default=())  # every other Linear: name, why

    @property
    def pattern(self) -> str:
        return pattern_text(self.n, self.m)

    def record(self, materialized: bool, reason: str, *, kernels: str | None = None,
               sparse: Sequence[str] | None = None, dense: Sequence[Mapping[str, str]] | None = None) -> dict[str, Any]:
        """What an evaluation records (the module docstring's ``metrics["sparsity"]``)."""
        return {"pattern": self.pattern, "materialized": materialized, "reason": reason, "kernels": kernels,
                "sparse_layers": list(self.sparse if sparse is None else sparse),
                "dense_layers": [dict(d) for d in (self.dense if dense is None else dense)]}


def semi_structured_step(chain: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The last compression step of *chain* that made an n:m pattern, or None."""
    steps = [s for s in chain if s.get("method") == SEMI_STRUCTURED and s.get("n") and s.get("m")]
    return steps[-1] if steps else None


def plan_for(model: nn.Module, manifest: Mapping[str, Any]) -> SparsityPlan | None:
    """The n:m layers of *model* (an artifact's module, as loaded) whose compression chain
    (in *manifest*) has a semi-structured prune; None when it has none. Layers that were
    eligible but no longer hold the pattern (a later stage changed them) are dense."""
    step = semi_structured_step(manifest.get("compression", {}).get("chain", []))
    if step is None:
        return None
    n, m = int(step["n"]), int(step["m"])
    eligible, dense = eligible_layers(model, m, str(step.get("mode") or "all"))
    sparse = []
    for name, layer in eligible:
        if holds_pattern(layer.weight, n, m):
            sparse.append(name)
        else:
            dense.append({"name": name, "why": f"its weights no longer hold the {pattern_text(n, m)} pattern "
                                               "(a later stage changed them)"})
    return SparsityPlan(n, m, tuple(sparse), tuple(dense))


def kernel_backend() -> str:
    """The sparse kernels torch uses here: ``cusparselt`` when this build has cuSPARSELt
    (what :func:`torch.sparse.to_sparse_semi_structured` picks), else ``cutlass``."""
    return "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"


def kernel_block(precision: str, backend: str) -> tuple[int, int]:
    """``(rows, cols)``: both weight dimensions must be at least and a multiple of these
    for *backend*'s kernels at *precision* (torch's own table for that dtype)."""
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT, SparseSemiStructuredTensorCUTLASS

    cls = SparseSemiStructuredTensorCUSPARSELT if backend == "cusparselt" else SparseSemiStructuredTensorCUTLASS
    constraints = cls._DTYPE_SHAPE_CONSTRAINTS[KERNEL_DTYPES[precision]]
    return constraints.sparse_min_rows, constraints.sparse_min_cols


def kernel_misfit(shape: Sequence[int], precision: str, backend: str) -> str | None:
    """Why a weight of *shape* ``(out_features, in_features)`` does not fit *backend*'s
    kernels at *precision*; None when it does."""
    rows, cols = kernel_block(precision, backend)
    out_features, in_features = shape
    if out_features % rows or in_features % cols or out_features < rows or in_features < cols:
        return (f"shape ({out_features}, {in_features}) is not a multiple of ({rows}, {cols}), what the "
                f"{backend} {precision} kernels take")
    return None


def _to_sparse(weight: torch.Tensor, backend: str) -> torch.Tensor:
    """*weight* as a semi-structured sparse tensor of *backend* (torch's own converter picks
    cuSPARSELt whether or not this build has it, so CUTLASS is asked for by name)."""
    if backend == "cusparselt":
        return torch.sparse.to_sparse_semi_structured(weight)
    return torch.sparse.SparseSemiStructuredTensorCUTLASS.from_dense(weight)


def why_simulated(device: str, precision: str, *, quantized: bool = False) -> str | None:
    """Why an evaluation on *device* at *precision* runs the pattern on dense kernels;
    None when torch's sparse kernels can run it here."""
    if not device.startswith("cuda"):
        return f"{device.split(':')[0].upper()}: dense kernels (torch's 2:4 kernels are CUDA-only)"
    if quantized:
        return "quanto int8 weights: quanto's kernels are dense"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(device)} (sm_{capability[0]}{capability[1]}): the 2:4 kernels need "
                "Ampere (sm_80) or newer; dense kernels")
    if precision not in KERNEL_DTYPES:
        return f"{precision}: the 2:4 kernels run fp16 / bf16 (evaluate at precision fp16 or bf16); dense kernels"
    return None


def materialize(model: nn.Module, plan: SparsityPlan, *, device: str, precision: str,
                example: torch.Tensor | None = None, quantized: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """``(model to run, record)``: where :func:`why_simulated` allows it, a copy of *model*
    (on *device*) whose pattern layers that fit the kernels (:func:`kernel_misfit`) hold
    :class:`torch.sparse.SparseSemiStructuredTensor` weights in the precision's dtype
    (run under autocast at that precision, as the torch backend does); else *model*
    itself and a simulated record. *model* is left dense: it stays the fp32 reference
    the deployable is checked against. *example* (a batch on *device*) is pushed through
    the sparse copy once: should the kernels fail on this GPU, the dense model runs and
    the record says why."""
    reason = why_simulated(device, precision, quantized=quantized)
    if reason is not None:
        return model, plan.record(False, reason)
    backend = kernel_backend()
    dtype = KERNEL_DTYPES[precision]
    sparse_model = copy.deepcopy(model)
    modules = dict(sparse_model.named_modules())
    converted: list[str] = []
    dense = [dict(d) for d in plan.dense]
    for name in plan.sparse:
        layer = modules[name]
        misfit = kernel_misfit(tuple(layer.weight.shape), precision, backend)
        if misfit is not None:
            dense.append({"name": name, "why": misfit})
            continue
        try:
            weight = _to_sparse(layer.weight.detach().to(dtype).contiguous(), backend)
        except (RuntimeError, ValueError) as e:
            dense.append({"name": name, "why": f"conversion failed: {first_line(e)}"})
            continue
        layer.weight = nn.Parameter(weight, requires_grad=False)
        converted.append(name)
    if not converted:
        return model, plan.record(False, f"no {plan.pattern} layer fits the {backend} {precision} kernels' shape "
                                         "multiples; dense kernels", sparse=[], dense=dense)
    if example is not None:
        try:
            with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
                sparse_model(example)
        except (RuntimeError, NotImplementedError, ValueError) as e:
            return model, plan.record(False, f"the {backend} 2:4 kernels failed here ({first_line(e)}); "
                                             "dense kernels")
    gpu = torch.cuda.get_device_name(device)
    return sparse_model, plan.record(True, f"{backend} {precision} sparse kernels on {gpu}", kernels=backend,
                                     sparse=converted, dense=dense)
