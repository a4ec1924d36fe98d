"""Safe, content-addressed model artifacts: save, describe, load (no pickle anywhere).

An artifact is the directory ``<root>/<key>/`` (layout names in :mod:`workers.artifacts`):

- ``weights.safetensors`` -- ``model.state_dict()``. For an optimum-quanto model this
  holds the flattened quantized tensors (``<module>.weight._data``, ``._scale``,
  ``._shift``, ``input_scale``, ``output_scale``), all plain tensors.
- ``structure.json`` -- everything needed to rebuild the module tree without pickle:
  the base timm architecture (arch, the timm kwargs it was built with, num_classes), the
  shape and dtype of every parameter and buffer, the plain-valued attributes of every
  module (``in_features``, ``out_channels``, ``groups``, ``normalized_shape``,
  ``num_heads``, ``head_dim``, ...), and for a quantized model its quanto quantization
  map plus the modules whose output quantization calibration switched off.
- ``manifest.json`` -- written last: key, sha256 and on-disk size of the weights,
  ``materialized``, params, MACs, the compression chain, input shape, class count,
  creation time and library versions.

Loading never unpickles: it reads JSON and safetensors only, and refuses weights whose
sha256 differs from the manifest's. A pruned model is rebuilt generically: build the base
timm model, give every tensor its recorded shape, restore every recorded module
attribute that differs, then ``load_state_dict(strict=True)``. A quantized model is
rebuilt as its float structure, then ``optimum.quanto.requantize`` swaps in the
quantized modules and weights.

Saving is atomic: files are written into a temporary directory inside the root and
renamed into place, so a reader sees either no artifact or a complete one. Two processes
building the same key race harmlessly: the loser discards its copy and returns the
winner's.

Building and counting models (and the input shape a model is fed) live in
:mod:`workers.models`; this module only persists them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import timm
import torch
from torch import nn

from workers.artifacts import (
    MANIFEST_FILE,
    STRUCTURE_FILE,
    WEIGHTS_FILE,
    artifact_dir,
    read_manifest,
    verified_manifest,
)
from workers.models import (
    ArtifactLoadError,
    build_model,
    count_macs,
    count_params,
    is_quantized,
    load_state_checked,
    model_input_shape,
    plain_state_dict,
    timm_kwargs,
    weights_size_bytes,
)
from workers.types import ArtifactInfo, ModelRef, StageTask
from workers.util import sha256_file, write_durably

__all__ = [
    "ARTIFACT_FORMAT",
    "ParentModel",
    "artifact_info",
    "load_artifact",
    "load_parent",
    "save_artifact",
    "save_child",
]

log = logging.getLogger(__name__)

# Version of the structure.json / manifest.json layout this module writes and reads.
ARTIFACT_FORMAT = 1
# Module attributes that are a choice of the loading machine, not part of the structure:
# restoring the saver's value would override the loader's environment (TIMM_FUSED_ATTN).
_ENVIRONMENT_ATTRS = frozenset({"training", "fused_attn"})
_PLAIN_TYPES = (bool, int, float, str, type(None))

# --------------------------------------------------------------------------- artifacts


def save_artifact(
    model: nn.Module,
    *,
    root: str,
    key: str,
    model_ref: ModelRef,
    num_classes: int,
    input_shape: tuple[int, ...],
    materialized: bool,
    compression: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    deploy: Mapping[str, Any] | None = None,
) -> ArtifactInfo:
    """Save ``model`` as artifact ``key`` under ``root`` and describe it.

    ``deploy`` (a runtime-quantized model): ``{"format": ..., "files": {name: path}, ...}``
    -- the runtime's model files, copied into the artifact next to ``model`` (its float
    parent) and listed in the manifest's ``deploy`` with their sha256 and total size;
    the other keys are kept as they are (engine, settings). The manifest's ``size_bytes``
    is then the payload's (``torch_size_bytes``: the parent's weights kept beside it).

    ``model_ref`` names the base timm architecture the model was derived from (its
    ``arch`` and ``kwargs``; a checkpoint is not needed to rebuild). ``input_shape`` is
    one sample's (C, H, W). ``compression`` is the chain that made the model
    (``{"chain": [...]}``), ``extra`` any further JSON-able facts for the manifest (kept
    under ``"extra"``).

    ``params`` is :func:`count_params` of ``model``; ``macs`` is :func:`count_macs` of
    ``model``, or for a quantized model of its float structure rebuilt from the
    structure record (which also proves the record rebuilds). If a valid artifact
    ``key`` already exists -- another process built it first -- nothing is written and
    the existing one is described.
    """
    _check_key(key)
    existing = artifact_info(root, key)
    if existing is not None:
        return existing
    os.makedirs(root, exist_ok=True)

    structure = _record_structure(model, model_ref, num_classes)
    weights = safetensors.torch.save(plain_state_dict(model), metadata={"format": "pt"})
    float_model = _build_skeleton(structure) if structure["quantization"] is not None else model
    manifest = {
        "format": ARTIFACT_FORMAT,
        "key": key,
        "sha256": hashlib.sha256(weights).hexdigest(),
        "size_bytes": len(weights),
        "materialized": bool(materialized),
        "params": count_params(model),
        "macs": count_macs(float_model, tuple(input_shape)),
        "compression": dict(compression),
        "input_shape": [int(d) for d in input_shape],
        "num_classes": int(num_classes),
        "quantized": structure["quantization"] is not None,
        "model": {"arch": model_ref.arch, "kwargs": dict(model_ref.kwargs), "checkpoint": model_ref.checkpoint,
                  "input_size": None if model_ref.input_size is None else list(model_ref.input_size)},
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _library_versions(),
        "extra": dict(extra or {}),
    }
    payload = {name: Path(path) for name, path in dict((deploy or {}).get("files") or {}).items()}
    if deploy:
        manifest["deploy"] = {**{k: v for k, v in deploy.items() if k != "files"},
                              "files": {name: sha256_file(path) for name, path in payload.items()},
                              "size_bytes": sum(path.stat().st_size for path in payload.values())}
        # The model this artifact *is* is the runtime's: its size is the payload's.
        manifest["torch_size_bytes"], manifest["size_bytes"] = manifest["size_bytes"], manifest["deploy"]["size_bytes"]

    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        write_durably(tmp / WEIGHTS_FILE, weights)
        write_durably(tmp / STRUCTURE_FILE, _to_json(structure))
        for name, path in payload.items():
            write_durably(tmp / name, path.read_bytes())
        write_durably(tmp / MANIFEST_FILE, _to_json(manifest))  # last: its presence marks completeness
        winner = _move_into_place(tmp, root, key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless we lost a race or failed
    return winner if winner is not None else _info(root, key, manifest)


def load_artifact(root: str, key: str, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild artifact ``key`` on ``device`` in eval mode; returns ``(model, manifest)``.

    Raises :class:`ArtifactLoadError` when the artifact is absent or incomplete, when its
    weights fail their sha256 check, or when its structure no longer rebuilds (e.g. a
    timm version that changed the architecture's module tree).
    """
    _check_key(key)
    directory = artifact_dir(root, key)
    manifest = read_manifest(root, key)
    if manifest is None:
        raise ArtifactLoadError(f"artifact {key} not found or incomplete under {root}; re-run the stage that builds it")
    data = (directory / WEIGHTS_FILE).read_bytes()  # read once: what is hashed is what is loaded
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.get("sha256"):
        raise ArtifactLoadError(
            f"artifact {key} failed its checksum (weights sha256 {actual[:12]}..., manifest says "
            f"{str(manifest.get('sha256'))[:12]}...); delete {directory} and re-run"
        )
    try:
        structure = json.loads((directory / STRUCTURE_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactLoadError(
            f"artifact {key} has an unreadable {STRUCTURE_FILE} ({e}); delete {directory} and re-run"
        ) from e
    if int(structure.get("format", 0)) > ARTIFACT_FORMAT:
        raise ArtifactLoadError(
            f"artifact {key} was written by a newer greensweep (format {structure['format']}); upgrade to load it"
        )
    state = safetensors.torch.load(data)
    model = _rebuild(structure, state, device, what=f"artifact {key}")
    return model, manifest


def artifact_info(root: str, key: str) -> ArtifactInfo | None:
    """Describe artifact ``key``; None when it is absent, incomplete or fails its checksum."""
    _check_key(key)
    manifest = verified_manifest(root, key)
    return None if manifest is None else _info(root, key, manifest)


@dataclass(frozen=True)
class ParentModel:
    """The model a compression stage starts from, and what the stage must carry forward."""

    model: nn.Module  # on the CPU, eval mode
    input_shape: tuple[int, ...]  # one sample's (C, H, W)
    num_classes: int
    chain: tuple[Mapping[str, Any], ...]  # compression steps so far, root first
    size_bytes: int  # on-disk bytes of the weights
    materialized: bool = True  # the parent manifest's flag; a freshly built root model is uncompressed


def save_child(
    model: nn.Module,
    task: StageTask,
    parent: ParentModel,
    params: Mapping[str, Any],
    *,
    materialized: bool,
    extra: dict[str, Any] | None = None,
    deploy: Mapping[str, Any] | None = None,
) -> ArtifactInfo:
    """Save the model a compression stage made from *parent* as artifact ``task.key``,
    its compression chain extended by this stage (``{"kind": task.kind, **params}``);
    *deploy*: a runtime's model files (see :func:`save_artifact`)."""
    return save_artifact(
        model,
        root=task.artifact_root,
        key=task.key,
        model_ref=task.model,
        num_classes=parent.num_classes,
        input_shape=parent.input_shape,
        materialized=materialized,
        compression={"chain": [*parent.chain, {"kind": task.kind, **params}]},
        extra=extra,
        deploy=deploy,
    )


def load_parent(task: StageTask) -> ParentModel:
    """The parent artifact ``task.parent_key``, or for a root stage ``task.model`` built afresh.

    A root stage sees no dataset, so ``task.model.kwargs`` must then name
    ``num_classes``; its input shape is :func:`workers.models.model_input_shape` without
    data (``model.input_size``, else the kwargs, else the architecture's default). A quantized
    parent is refused: its layers are quanto modules, which neither pruning nor a second
    quantization can take.
    """
    if task.parent_key is None:
        ref = task.model
        if "num_classes" not in ref.kwargs:
            raise ValueError(
                f"{task.kind} is the first stage of this pipeline, so the model must say its class count: "
                "add num_classes to the model kwargs"
            )
        model = build_model(ref, int(ref.kwargs["num_classes"])).eval()
        return ParentModel(model, model_input_shape(ref), int(ref.kwargs["num_classes"]), (), weights_size_bytes(model))
    model, manifest = load_artifact(task.artifact_root, task.parent_key, device="cpu")
    if is_quantized(model):
        raise ValueError(
            f"{task.kind} cannot take a quantized model (parent {task.parent_key}); put quantize last in the pipeline"
        )
    return ParentModel(
        model=model,
        input_shape=tuple(int(d) for d in manifest["input_shape"]),
        num_classes=int(manifest["num_classes"]),
        chain=tuple(manifest.get("compression", {}).get("chain", [])),
        size_bytes=int(manifest["size_bytes"]),
        materialized=bool(manifest["materialized"]),
    )


# --------------------------------------------------------------------------- structure


def _record_structure(model: nn.Module, ref: ModelRef, num_classes: int) -> dict[str, Any]:
    """What :func:`_rebuild` needs besides the weights, as JSON-able values."""
    tensors: dict[str, dict[str, Any]] = {}
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            tensors[name] = {"kind": kind, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
    modules: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = {
            attr: value
            for attr, value in vars(module).items()
            if not attr.startswith("_") and attr not in _ENVIRONMENT_ATTRS and _is_plain(value)
        }
        if attrs:
            modules[name] = attrs
    # the kwargs timm was given (model.input_size may have added in_chans / img_size), so
    # the record rebuilds without knowing about input_size
    kwargs = {k: v for k, v in timm_kwargs(ref).items() if k != "num_classes"}
    return {
        "format": ARTIFACT_FORMAT,
        "arch": ref.arch,
        "kwargs": kwargs,
        "num_classes": int(num_classes),
        "tensors": tensors,
        "modules": modules,
        "quantization": _record_quantization(model) if is_quantized(model) else None,
    }


def _record_quantization(model: nn.Module) -> dict[str, Any]:
    """The quanto quantization map, plus the modules whose output quantization is off.

    Calibration's ``streamline`` removes the output-quantization hook of modules whose
    outputs only feed functions that cannot take quantized tensors. ``requantize``
    re-creates every hook, so that state must be recorded and re-applied, or the reloaded
    model would quantize outputs the saved one did not.
    """
    from optimum.quanto import QModuleMixin, quantization_map

    disabled = []
    for name, module in model.named_modules():
        if isinstance(module, QModuleMixin) and "output" in module._quantize_hooks:
            if module._quantize_hooks["output"].id not in module._forward_hooks:
                disabled.append(name)
    return {"map": quantization_map(model), "output_quantization_disabled": disabled}


def _build_base(structure: Mapping[str, Any]) -> nn.Module:
    """The unpruned, unquantized timm model the structure was derived from.

    Built under a forked RNG: random initialisation must not move the caller's global
    torch RNG (loading an artifact would otherwise change a later seeded run).
    """
    with torch.random.fork_rng(devices=[]):
        return timm.create_model(
            structure["arch"], pretrained=False, num_classes=structure["num_classes"], **structure["kwargs"]
        )


def _build_skeleton(structure: Mapping[str, Any]) -> nn.Module:
    """The float model with the recorded shapes and attributes (weights uninitialised)."""
    model = _build_base(structure)
    _apply_structure(model, structure, quantized=structure["quantization"] is not None)
    return model


def _apply_structure(model: nn.Module, structure: Mapping[str, Any], *, quantized: bool) -> None:
    """Reshape ``model``'s tensors and reset its module attributes to the recorded ones.

    Only tensors whose shape differs are replaced (by empty ones the state dict will
    fill), so non-persistent buffers -- which the state dict does not carry -- keep the
    values the constructor computed; one whose shape changed cannot be restored and is an
    error. Tensors the float model lacks are allowed only in a quantized record: they are
    quanto's ``input_scale`` / ``output_scale`` buffers, which ``requantize`` creates.
    Recorded attributes the float module lacks belong to quanto's wrapper modules.
    """
    for name, spec in structure["tensors"].items():
        owner_name, _, attr = name.rpartition(".")
        owner = _submodule(model, owner_name, structure)
        shape = tuple(spec["shape"])
        if attr in owner._parameters:
            current = owner._parameters[attr]
            if current is None or tuple(current.shape) != shape:
                requires_grad = current.requires_grad if current is not None else True
                owner._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=_dtype(spec["dtype"])), requires_grad)
        elif attr in owner._buffers:
            current = owner._buffers[attr]
            if current is None or tuple(current.shape) != shape:
                if attr in owner._non_persistent_buffers_set:
                    raise ArtifactLoadError(
                        f"non-persistent buffer {name} changed shape to {list(shape)}; its values are not saved, "
                        "so this model cannot be rebuilt"
                    )
                owner._buffers[attr] = torch.empty(shape, dtype=_dtype(spec["dtype"]))
        elif not quantized:
            raise ArtifactLoadError(
                f"{structure['arch']} has no tensor {name}; the artifact was made with another timm version "
                f"(this is {timm.__version__}); re-run the stage that built it"
            )
    for module_name, attrs in structure["modules"].items():
        module = _submodule(model, module_name, structure)
        present = vars(module)
        for attr, value in attrs.items():
            if attr in present:
                value = _like(value, present[attr])
                if present[attr] != value:
                    setattr(module, attr, value)


def _rebuild(structure: Mapping[str, Any], state: dict[str, torch.Tensor], device: str, *, what: str) -> nn.Module:
    """The saved model from its structure record and state dict, on ``device``, eval mode."""
    model = _build_skeleton(structure)
    quantization = structure["quantization"]
    if quantization is None:
        load_state_checked(model, state, source=what)
        return model.to(device).eval()

    from optimum.quanto import requantize

    # requantize loads with strict=False; check the keys ourselves.
    requantize(model, state, quantization["map"], torch.device(device))
    expected, saved = set(model.state_dict()), set(state)
    if expected != saved:
        raise ArtifactLoadError(
            f"{what}: quantized weights do not fit the rebuilt model "
            f"({len(expected - saved)} missing, e.g. {sorted(expected - saved)[:2]}; "
            f"{len(saved - expected)} unexpected, e.g. {sorted(saved - expected)[:2]})"
        )
    for name in quantization["output_quantization_disabled"]:
        model.get_submodule(name).disable_output_quantization()
    return model.eval()


def _submodule(model: nn.Module, name: str, structure: Mapping[str, Any]) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ArtifactLoadError(
            f"{structure['arch']} has no module {name!r}; the artifact was made with another timm version "
            f"(this is {timm.__version__}); re-run the stage that built it"
        ) from None



def _move_into_place(tmp: Path, root: str, key: str) -> ArtifactInfo | None:
    """Rename the finished ``tmp`` to ``<root>/<key>``; returns the existing artifact when a
    valid one got there first, None when ours is now in place.

    A final directory that exists but is not a valid artifact (tampered, or damaged on
    disk) is moved aside and replaced: artifacts are content-addressed, so ours is a
    valid build of the same key.
    """
    final = artifact_dir(root, key)
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return None
        except OSError:
            if not final.exists():
                raise
        existing = artifact_info(root, key)
        if existing is not None:
            return existing
        log.warning("artifact %s at %s is invalid; replacing it", key, final)
        aside = Path(root) / f".{key}.invalid-{uuid.uuid4().hex}"
        try:
            os.rename(final, aside)
        except FileNotFoundError:  # another process moved it first
            continue
        shutil.rmtree(aside, ignore_errors=True)
    raise ArtifactLoadError(f"could not move artifact {key} into place at {final}; check for another writer")


def _info(root: str, key: str, manifest: Mapping[str, Any]) -> ArtifactInfo:
    return ArtifactInfo(
        key=key,
        path=str(artifact_dir(root, key)),
        size_bytes=int(manifest["size_bytes"]),
        sha256=str(manifest["sha256"]),
        materialized=bool(manifest["materialized"]),
        params=int(manifest["params"]),
        macs=int(manifest["macs"]),
        compression=manifest.get("compression", {}),
    )


def _check_key(key: str) -> None:
    if not key or key.startswith(".") or "/" in key or "\\" in key or os.sep in key:
        raise ValueError(f"artifact key {key!r} must be a plain directory name (no path separators, no leading dot)")


def _to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _is_plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_is_plain(v) for v in value)
    return isinstance(value, _PLAIN_TYPES)


def _like(value: Any, current: Any) -> Any:
    """A JSON-decoded ``value`` in the container type of ``current`` (JSON turns tuples into lists)."""
    if isinstance(value, list) and isinstance(current, tuple):
        return tuple(_like(v, current[i] if i < len(current) else ()) for i, v in enumerate(value))
    return value


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactLoadError(f"unknown tensor dtype {name!r} in a structure record")
    return dtype


def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for dist in ("torch", "timm", "optimum-quanto", "torch-pruning", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions
