"""Spec-time checks that read more than the spec's text.

:func:`orchestrator.spec.parse_spec` runs these (unless ``check_arch=False``) so that
what would otherwise fail on a worker, after the cluster started and the sweep row was
written, fails now with one line naming the field: the timm architecture, the
checkpoint (weights-only), the dataset's headers, the model built on the meta device,
and ``artifact:<key>`` references. Torch and timm are imported inside the functions,
never when this module (or :mod:`orchestrator.spec`) is imported.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.errors import SpecError

if TYPE_CHECKING:
    from orchestrator.spec import StageTemplate, SweepSpec

__all__ = ["ARTIFACT_PREFIX", "check_checkpoint", "check_environment", "check_timm_arch"]

# A stage parameter value that names an existing artifact by key (e.g. distill's teacher).
ARTIFACT_PREFIX = "artifact:"


def check_timm_arch(arch: str) -> None:
    import timm  # lazy: imports torch

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise SpecError(f"model.arch: unknown timm architecture {arch!r}{hint} -- see timm.list_models()")



def check_checkpoint(path: str) -> None:
    """The checkpoint must load weights-only (never unpickling code); checked now, not on
    a worker after the cluster started."""
    from orchestrator.errors import ArtifactError
    from workers.models import ArtifactLoadError, check_checkpoint

    try:
        check_checkpoint(path)
    except ArtifactLoadError as e:
        raise ArtifactError(f"model.checkpoint: {e}") from None


def check_environment(spec: SweepSpec, artifact_root: Path) -> None:
    """What would otherwise fail on a worker after the sweep row was written, checked
    cheaply now: the dataset (name, options, directory, class count and sample shape,
    from its headers only), the model (built on the meta device, a meta input of the
    shape the worker will feed pushed through it), ``num_classes`` against the data,
    pruning modes the architecture has, and ``artifact:<key>`` references. Torch is
    imported here, never when this module is."""
    from workers.data import DatasetFormatError, DatasetNotFoundError, dataset_header
    from workers.models import ModelCheckError, model_input_shape, probe_model
    from workers.types import DatasetRef, ModelRef

    ds = spec.dataset
    root = ds.options.get("root")
    where = "dataset.path" if ds.path else "dataset.options.root" if root else "dataset"
    header = None
    # An options.root that does not exist here names data on the cluster: it still plans.
    if ds.path is not None or not (isinstance(root, str) and not Path(root).exists()):
        try:
            header = dataset_header(DatasetRef(ds.name, ds.path, dict(ds.options)))
        except (DatasetNotFoundError, DatasetFormatError) as e:
            raise SpecError(f"{where}: {e}") from None
        except ValueError as e:
            raise SpecError(f"{'dataset.name' if 'unknown dataset' in str(e) else 'dataset.options'}: {e}") from None

    kw_classes = spec.model.kwargs.get("num_classes")
    if kw_classes is not None and (not isinstance(kw_classes, int) or isinstance(kw_classes, bool) or kw_classes < 1):
        raise SpecError(f"model.kwargs.num_classes: must be a positive integer (got {kw_classes!r})")
    if header is not None and kw_classes is not None and kw_classes < header.num_classes:
        raise SpecError(f"model.kwargs.num_classes: {kw_classes} is fewer than the {header.num_classes} classes of "
                        f"dataset {ds.name!r} -- remove it (the dataset's count is used) or raise it")
    if spec.train is None and kw_classes is None:
        count = f"num_classes: {header.num_classes}" if header is not None else "num_classes: <classes>"
        raise SpecError(f"model.kwargs.num_classes: required without a 'train:' section (the model is used as "
                        f"loaded, so it must say its class count) -- add {count} to model.kwargs")

    ref = ModelRef(spec.model.arch, dict(spec.model.kwargs), input_size=spec.model.input_size)
    data_shape = header.input_shape if header is not None and spec.train is not None else None
    shape: tuple[int, int, int] | None = model_input_shape(ref, data_shape)
    if spec.train is not None and header is None and shape != model_input_shape(ref, (1, 1, 1)):
        shape = None  # the size follows data that is not here to read
    if header is not None and shape is not None and header.input_shape[0] != shape[0] \
            and not (header.input_shape[0] == 1 or (header.input_shape[0] == 3 and shape[0] == 1)):
        raise SpecError(f"model.input_size: the model takes {shape[0]}-channel images but dataset {ds.name!r} has "
                        f"{header.input_shape[0]} channels (only grey <-> RGB is converted) -- give "
                        f"model.input_size: [{header.input_shape[0]}, H, W]")
    num_classes = kw_classes or (header.num_classes if header is not None else 1000)
    try:
        facts = probe_model(ref, int(num_classes), shape)
    except ModelCheckError as e:
        raise SpecError(f"{e.field}: {e}") from None

    for i, pipeline in enumerate(spec.pipelines):
        for j, template in enumerate(pipeline.stages):
            path = f"pipelines[{i}].stages[{j}].{template.kind}"
            if template.kind == "prune":
                modes = {full.get("mode") for _, full in template.combinations() if full.get("method") == "structured"}
                if "heads" in modes and not facts.attention_heads:
                    raise SpecError(f"{path}.mode: 'heads' removes attention heads, and {spec.model.arch} has no "
                                    "multi-head attention -- use mode 'all' (or 'keep-attention')")
                if "heads" in modes and min(facts.attention_heads) < 2:
                    raise SpecError(f"{path}.mode: 'heads' needs at least 2 heads per attention module, and "
                                    f"{spec.model.arch} has {min(facts.attention_heads)} -- use mode 'all'")
                semi = {(full["mode"], full["m"]) for _, full in template.combinations()
                        if full.get("method") == "semi-structured"}
                for mode, m in sorted(semi):
                    if not facts.semi_structured_layers.get((mode, m)):
                        outside = "the classifier and attention" if mode == "keep-attention" else "the classifier"
                        raise SpecError(f"{path}.method: semi-structured needs an nn.Linear outside {outside} whose "
                                        f"in_features is a multiple of {m}, and {spec.model.arch} has none -- use "
                                        "method unstructured or structured"
                                        + (" (or mode all)" if mode == "keep-attention"
                                           and facts.semi_structured_layers.get(("all", m)) else ""))
            _check_artifact_refs(template, path, artifact_root)


def _check_artifact_refs(template: StageTemplate, path: str, artifact_root: Path) -> None:
    """Every ``artifact:<key>`` parameter names a complete, verified artifact under the root."""
    from workers.artifacts import read_manifest, verified_manifest

    for name, values in template.axes:
        for j, v in enumerate(values):
            if not (isinstance(v, str) and v.startswith(ARTIFACT_PREFIX)):
                continue
            key = v[len(ARTIFACT_PREFIX):]
            if verified_manifest(artifact_root, key) is not None:
                continue
            where = f"{path}.{name}" + (f"[{j}]" if len(values) > 1 else "")
            problem = "fails its checksum" if read_manifest(artifact_root, key) is not None else "does not exist"
            raise SpecError(f"{where}: artifact {key} {problem} under {artifact_root} -- give the key of an artifact "
                            "there (set GREENSWEEP_ARTIFACTS to its root)" + (" or use teacher: baseline" if name == "teacher" else ""))
