"""Building timm models, counting them, and the one rule for the input shape they are fed.

- :func:`build_model` builds a spec's model (kwargs, ``model.input_size``, a local
  checkpoint read without unpickling code, or timm's pretrained weights);
- :func:`model_input_shape` is the only place that decides one sample's (C, H, W):
  what the data is converted to, what MACs are counted on, what an artifact records;
- :func:`count_params`, :func:`count_macs`, :func:`weights_size_bytes` describe a model;
- :func:`probe_model` is the spec-time check: the model built on the meta device (no
  memory, no weights) with a meta input of its input shape pushed through it, so kwargs
  timm rejects and input sizes the architecture cannot take are caught before a sweep
  starts.

Saving and loading artifacts is :mod:`workers.modelio`.
"""

from __future__ import annotations

import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import safetensors.torch
import timm
import torch
from torch import nn

from workers.types import ModelRef
from workers.util import first_line

__all__ = [
    "ArtifactLoadError",
    "ModelCheckError",
    "ModelFacts",
    "PretrainedWeightsUnavailableError",
    "build_model",
    "check_checkpoint",
    "count_macs",
    "count_params",
    "first_line",
    "is_quantized",
    "load_state_checked",
    "model_input_shape",
    "plain_state_dict",
    "probe_model",
    "timm_kwargs",
    "weights_size_bytes",
]

# Keys under which training scripts commonly nest a state dict inside a checkpoint.
_CHECKPOINT_NESTING_KEYS = ("state_dict", "model")


class ArtifactLoadError(RuntimeError):
    """An artifact or checkpoint cannot be loaded safely; the message names the file and the fix."""


class PretrainedWeightsUnavailableError(RuntimeError):
    """``pretrained: true`` was asked for where the weights cannot be downloaded."""


# --------------------------------------------------------------------------- building


def build_model(ref: ModelRef, num_classes: int) -> nn.Module:
    """Build ``ref``'s timm model with a ``num_classes``-way classifier (train mode, CPU).

    With ``ref.checkpoint`` the weights come from that local file (``.safetensors``, or a
    weights-only ``torch.save`` file holding a state dict, possibly nested under
    ``"state_dict"`` or ``"model"``); ``ref.pretrained`` is then ignored, since the
    checkpoint would overwrite the downloaded weights anyway. A ``num_classes`` entry in
    ``ref.kwargs`` must agree with the argument. ``ref.input_size`` adds ``in_chans`` /
    ``img_size`` as :func:`timm_kwargs` says.

    Raises ``ValueError`` for an unknown architecture or kwargs timm rejects,
    :class:`PretrainedWeightsUnavailableError` when pretrained weights cannot be fetched,
    and :class:`ArtifactLoadError` for a checkpoint that is unreadable, would execute
    code (not weights-only), or does not fit the architecture.
    """
    kwargs = timm_kwargs(ref)
    kw_classes = kwargs.pop("num_classes", num_classes)
    if int(kw_classes) != int(num_classes):
        raise ValueError(f"model kwargs say num_classes={kw_classes} but {num_classes} classes were asked for")
    if ":" not in ref.arch and not timm.is_model(ref.arch):  # "hf-hub:..." / "local-dir:..." resolve at build
        raise ValueError(f"unknown timm architecture {ref.arch!r}; timm.list_models('<pattern>') lists the known names")
    pretrained = ref.pretrained and not ref.checkpoint
    try:
        model = timm.create_model(ref.arch, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise ValueError(f"timm cannot build {ref.arch!r} with kwargs {kwargs}: {first_line(e)}") from e
    except OSError as e:  # huggingface_hub reports an unreachable hub as LocalEntryNotFoundError
        if not pretrained:
            raise
        raise PretrainedWeightsUnavailableError(
            f"pretrained weights for {ref.arch!r} cannot be downloaded here ({first_line(e)}); "
            "download them where there is network access and name the file in the model's `checkpoint:`"
        ) from e
    if ref.checkpoint:
        state = _read_checkpoint(ref.checkpoint)
        load_state_checked(model, state, source=f"checkpoint {ref.checkpoint}")
    return model


def _arch_defaults(arch: str) -> tuple[tuple[int, int, int], bool]:
    """The architecture's default (C, H, W) (timm's pretrained config; 3 x 224 x 224 when
    it has none) and whether it only takes that size (``fixed_input_size``: ViT, DeiT,
    Swin, ... -- exactly the architectures whose constructor takes ``img_size``)."""
    cfg = timm.get_pretrained_cfg(arch, allow_unregistered=True)
    default = tuple(int(d) for d in cfg.input_size) if cfg is not None and cfg.input_size else (3, 224, 224)
    return (default[0], default[1], default[2]), bool(cfg is not None and cfg.fixed_input_size)


def _size2(value: Any) -> tuple[int, int]:
    """An ``img_size`` kwarg (int or [H, W]) as (H, W)."""
    if isinstance(value, (int, float)):
        return int(value), int(value)
    height, width = (int(v) for v in value)
    return height, width


def timm_kwargs(ref: ModelRef) -> dict[str, Any]:
    """The kwargs ``timm.create_model`` gets for ``ref`` (``num_classes`` included if given).

    ``ref.kwargs``, plus, when ``ref.input_size`` (C, H, W) is given and the kwargs do not
    name them: ``in_chans=C`` for every architecture, and ``img_size=(H, W)`` for those
    that only take a fixed size (a CNN takes any size, and timm refuses ``img_size``
    for it). Kwargs that disagree with ``input_size`` are refused when the spec is
    checked, so here the kwargs simply win.
    """
    kwargs = dict(ref.kwargs)
    if ref.input_size is not None:
        channels, height, width = (int(d) for d in ref.input_size)
        kwargs.setdefault("in_chans", channels)
        if _arch_defaults(ref.arch)[1]:
            kwargs.setdefault("img_size", (height, width))
    return kwargs


def model_input_shape(ref: ModelRef, data_shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """One sample's (C, H, W) for ``ref``'s model: the shape the data is converted to.

    The only place this is decided (training, evaluation, artifacts and the spec check
    all ask here). In order: ``ref.input_size`` when the spec gives ``model.input_size``;
    else channels from ``in_chans`` (else the architecture's default) and size from
    ``img_size``; else the architecture's default when it only takes a fixed size
    (timm's ``fixed_input_size``, e.g. ViTs without ``dynamic_img_size``); else the
    data's own size when the caller knows it (``data_shape``: a CNN trained here runs
    at any size, and upsampling would only cost); else (a root stage that sees no
    dataset: a checkpoint or pretrained model) the architecture's default size.

    A built model's ``pretrained_cfg["input_size"]`` is not used: timm keeps the default
    there even when the model was built for another size.
    """
    if ref.input_size is not None:
        channels, height, width = (int(d) for d in ref.input_size)
        return channels, height, width
    default, fixed = _arch_defaults(ref.arch)
    fixed = fixed and not ref.kwargs.get("dynamic_img_size", False)
    channels = int(ref.kwargs.get("in_chans", default[0]))
    if ref.kwargs.get("img_size") is not None:
        height, width = _size2(ref.kwargs["img_size"])
    elif fixed or data_shape is None:
        height, width = default[1], default[2]
    else:
        height, width = int(data_shape[1]), int(data_shape[2])
    return channels, height, width


class ModelCheckError(ValueError):
    """The spec's model cannot be built or fed; ``field`` is the spec field to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ModelFacts:
    """What the spec check learnt from the probe build."""

    input_shape: tuple[int, int, int] | None  # None: not known (data not readable here)
    attention_heads: tuple[int, ...]  # num_heads of every attention module, in module order
    # (semi-structured mode, m) -> how many Linear layers that pruning would take (workers.sparsity)
    semi_structured_layers: Mapping[tuple[str, int], int] = field(default_factory=dict)


def probe_model(ref: ModelRef, num_classes: int, input_shape: Sequence[int] | None) -> ModelFacts:
    """Build ``ref``'s model on the meta device and push one meta sample of
    ``input_shape`` through it in eval mode: no memory, no weights, no download.

    Catches what would otherwise fail on a worker after the sweep started: kwargs timm
    rejects (an unknown one, ``img_size`` for a CNN) and an input size the architecture
    cannot take (convnext_atto on 8x8 digits). An op without a meta kernel is no user
    error: then the check is repeated on a CPU build, and only its failure counts.
    Raises :class:`ModelCheckError` naming the spec field and the fix.
    """
    kwargs = {k: v for k, v in timm_kwargs(ref).items() if k != "num_classes"}
    default, fixed = _arch_defaults(ref.arch)

    def build(device: str) -> nn.Module:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            return timm.create_model(ref.arch, pretrained=False, num_classes=num_classes, **kwargs).eval()

    try:
        try:
            model = build("meta")
        except TypeError:
            raise
        except Exception:  # noqa: BLE001 - an init that needs real tensors: try the real build
            model = build("cpu")
    except Exception as e:  # noqa: BLE001 - timm raises TypeError, ValueError, AssertionError, ...
        hint = "remove or fix the kwargs it does not take"
        if "img_size" in kwargs and not fixed:
            hint = (f"{ref.arch} takes any input size, so it has no img_size -- remove img_size and give "
                    "model.input_size: [C, H, W] to set the size the images are converted to")
        raise ModelCheckError("model.kwargs", f"timm cannot build {ref.arch!r} with kwargs {kwargs}: "
                                              f"{first_line(e)} -- {hint}") from None
    heads = tuple(int(m.num_heads) for m in model.modules()
                  if isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "num_heads", None), int))
    sparse = _semi_structured_counts(model)
    if input_shape is None:
        return ModelFacts(None, heads, sparse)
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    try:
        _forward_once(model, shape)
    except Exception:  # noqa: BLE001 - confirm on real tensors: meta kernels are not complete
        try:
            _forward_once(build("cpu") if _on_meta(model) else model, shape)
        except Exception as e:  # noqa: BLE001 - any failure here is what the worker would hit
            raise ModelCheckError(
                "model.input_size",
                f"{ref.arch} cannot take inputs of shape {list(shape)} (C, H, W): {first_line(e)} -- give "
                f"model.input_size: [C, H, W] the architecture takes (its default is {list(default)}), the "
                "size the images are converted to",
            ) from None
    return ModelFacts(shape, heads, sparse)


def _semi_structured_counts(model: nn.Module) -> dict[tuple[str, int], int]:
    """Eligible layers of *model* for each semi-structured mode and supported m (shapes only)."""
    from workers.sparsity import eligible_layers
    from workers.stages.registry import SEMI_STRUCTURED_PATTERNS

    return {(mode, m): len(eligible_layers(model, m, mode)[0])
            for mode in ("all", "keep-attention") for m in sorted({m for _, m in SEMI_STRUCTURED_PATTERNS})}


def _on_meta(model: nn.Module) -> bool:
    first = next(model.parameters(), None)
    return first is not None and first.device.type == "meta"


def _forward_once(model: nn.Module, shape: tuple[int, int, int]) -> None:
    device = "meta" if _on_meta(model) else "cpu"
    with torch.no_grad():
        model(torch.zeros((1, *shape), device=device))


def count_params(model: nn.Module) -> int:
    """Parameter count of the dense-equivalent architecture.

    Zeros left by unstructured pruning still count; a quanto-quantized weight counts its
    logical elements (a ``QTensor``'s ``numel()``), not its bytes.
    """
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on one sample of ``input_shape`` (C, H, W).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and
    attention) as FLOPs / 2, on the model's device, in eval mode (BatchNorm statistics
    are left untouched). ``model`` must be a float model: quanto routes quantized layers
    through custom ops the counter does not see, and quantization does not change the
    MAC count anyway -- count the float structure instead (``save_artifact`` does).
    """
    from torch.utils.flop_counter import FlopCounterMode

    if is_quantized(model):
        raise ValueError("count_macs needs a float model; count the MACs of the unquantized structure")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    sample = torch.zeros((1, *input_shape), device=device, dtype=dtype)
    was_training = model.training
    counter = FlopCounterMode(display=False)
    model.eval()
    try:
        with counter, torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def weights_size_bytes(model: nn.Module) -> int:
    """Bytes ``model``'s weights would take on disk as an artifact (its safetensors file)."""
    return len(safetensors.torch.save(plain_state_dict(model), metadata={"format": "pt"}))


def is_quantized(model: nn.Module) -> bool:
    """Whether any submodule is an optimum-quanto quantized module."""
    if "optimum.quanto" not in sys.modules:  # nothing can be quantized without it
        return False
    from optimum.quanto import QModuleMixin

    return any(isinstance(m, QModuleMixin) for m in model.modules())


# --------------------------------------------------------------------------- helpers


def check_checkpoint(path: str) -> None:
    """Refuse a checkpoint that :func:`_read_checkpoint` would refuse, without reading its
    tensors (a safetensors header; a torch zip file memory-mapped), so a bad or unsafe
    file is caught when the spec is checked rather than on a worker."""
    if path.endswith(".safetensors"):
        try:
            with safetensors.safe_open(path, framework="pt") as f:
                list(f.keys())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own untyped errors
            raise ArtifactLoadError(f"checkpoint {path} is not a readable safetensors file: {first_line(e)}") from e
        return
    _read_checkpoint(path, mmap=zipfile.is_zipfile(path))


def _read_checkpoint(path: str, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A state dict from a local checkpoint file, without ever executing code from it."""
    if not Path(path).is_file():
        raise ArtifactLoadError(f"checkpoint {path} does not exist; fix the model's `checkpoint:` path")
    if path.endswith(".safetensors"):
        try:
            return safetensors.torch.load_file(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own untyped errors
            raise ArtifactLoadError(f"checkpoint {path} is not a readable safetensors file: {first_line(e)}") from e
    try:
        with warnings.catch_warnings():
            # torch warns about the pickle protocol of a file it then refuses; the refusal
            # below is the one line the user needs
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise ArtifactLoadError(
            f"checkpoint {path} is not weights-only (loading it would run code from the file), so it was refused; "
            "re-save it with torch.save(model.state_dict(), path) or as .safetensors"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ArtifactLoadError(f"checkpoint {path} is not a readable torch file: {first_line(e)}") from e
    if isinstance(obj, Mapping):
        for nesting in _CHECKPOINT_NESTING_KEYS:
            if isinstance(obj.get(nesting), Mapping):
                obj = obj[nesting]
                break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise ArtifactLoadError(
        f"checkpoint {path} holds no state dict (expected a mapping of tensors, possibly under "
        f"{' or '.join(repr(k) for k in _CHECKPOINT_NESTING_KEYS)})"
    )


def load_state_checked(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error that counts what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        raise ArtifactLoadError(
            f"{source} does not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(mismatched)} of another shape "
            f"(e.g. {mismatched[:2]})"
        )
    model.load_state_dict(state, strict=True)


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as contiguous CPU tensors that share no storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out
