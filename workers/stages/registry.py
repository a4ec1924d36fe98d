"""The one place stage kinds are registered.

Each kind declares (:class:`StageKind`) its parameter model (pydantic, validated at spec
time on the coordinator, torch-free), the function that runs it on a worker (imported
lazily, so the CLI never imports torch to validate a spec), whether it produces a model
artifact and in which format, where it may run and whether it may wait for a cleaner
window, its duration estimate before anything was measured, the parameters that name
another model (and so what the stage reads), and its label.

Nothing else in the code base switches on kind names: the spec, the planner, the
coordinator, the scheduler and the reports look kinds up here.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoopParams(_Params):
    """What every stage that runs the shared training loop (``workers.training``) takes.

    AdamW; the learning rate is set once per epoch: ``warmup_epochs`` linear warm-up
    epochs, then a cosine decay over the remaining epochs. The best *validation* epoch's
    weights are kept; ``patience`` stops after that many epochs without a new best.
    ``accumulate_steps`` micro-batches of ``batch_size`` make one optimizer step.
    ``augment`` (random flip + padded crop) is off by default. ``precision`` is the
    mixed precision of the forward passes (weights and optimizer stay fp32): ``bf16``
    autocast on CPUs with AVX512-BF16 or AMX and on GPUs that have it, ``fp16`` autocast
    with gradient scaling on CUDA GPUs; the scheduler places such a stage only on a node
    that says it can (:attr:`StageKind.needs`). ``amp`` is bf16 autocast at ``precision:
    fp32``, effective on CUDA only. ``val_fraction`` carves the validation split from the
    training data by the sweep seed; keep it equal across a sweep's stages so a student
    is never selected on samples its teacher trained on.
    """

    epochs: int = Field(10, ge=1, le=10_000)
    lr: float = Field(1e-4, gt=0, le=10)
    weight_decay: float = Field(0.05, ge=0, le=10)
    batch_size: int = Field(64, ge=1, le=65_536)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    warmup_epochs: int = Field(0, ge=0, le=10_000)
    augment: Literal["none", "flip-crop"] = "none"
    accumulate_steps: int = Field(1, ge=1, le=1_024)
    patience: int | None = Field(None, ge=1, le=10_000)
    amp: bool = True
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"

    @model_validator(mode="after")
    def _warmup_leaves_epochs(self) -> "LoopParams":
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"warmup_epochs ({self.warmup_epochs}) must be less than epochs ({self.epochs}); "
                "lower warmup_epochs or raise epochs"
            )
        return self


class TrainParams(LoopParams):
    """Baseline training from scratch (or from a checkpoint / pretrained weights): CE.

    The loop options beyond its original six fields (``warmup_epochs``, ``augment``,
    ``accumulate_steps``, ``patience``, ``amp``, ``precision``) default to the behaviour
    it had before.
    """

    epochs: int = Field(30, ge=1, le=10_000)
    lr: float = Field(2e-3, gt=0, le=10)


class FinetuneParams(LoopParams):
    """Retrain the parent (typically a pruned model) with cross-entropy only: the control
    that ``distill`` is compared against. The parent's structure is kept."""


# "artifact:<stage key>" or "checkpoint:<path>"; "baseline" is resolved by the planner.
_TEACHER_FORM = re.compile(r"baseline|artifact:[0-9a-f]+|checkpoint:.+")


class DistillParams(LoopParams):
    """Hinton knowledge distillation into the parent (the student, typically pruned):
    ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    ``teacher`` is ``baseline`` (the sweep's unpruned model, resolved by the planner),
    ``artifact:<key>`` (any artifact under the artifact root) or ``checkpoint:<path>``
    (the spec's architecture with those weights). Defaults follow the reference study
    (alpha 0.25, T 4).
    """

    alpha: float = Field(0.25, ge=0, le=1)
    temperature: float = Field(4.0, gt=0, le=1_000)
    teacher: str = "baseline"

    @field_validator("teacher")
    @classmethod
    def _teacher_form(cls, v: str) -> str:
        if not _TEACHER_FORM.fullmatch(v):
            raise ValueError(
                "teacher must be 'baseline', 'artifact:<hex key>' or 'checkpoint:<path to .safetensors/.pt>'"
            )
        return v


# The n:m patterns semi-structured pruning makes: the one torch's sparse kernels run (2:4).
SEMI_STRUCTURED_PATTERNS: tuple[tuple[int, int], ...] = ((2, 4),)


class PruneParams(_Params):
    """``unstructured``: L1 magnitude masks made permanent (simulated: same dense FLOPs).

    ``structured``: torch-pruning DepGraph, physically removing channels/heads
    (materialized). ``mode`` applies to structured (and semi-structured, below) pruning:
    ``all`` every prunable layer but the classifier; ``keep-attention`` leaves attention
    blocks and the classifier untouched (MLPs/convs only); ``heads`` removes whole
    attention heads.

    ``semi-structured``: ``n:m`` sparsity (only 2:4, :data:`SEMI_STRUCTURED_PATTERNS`):
    in every group of ``m`` consecutive weights along the input dimension of a Linear
    layer the ``m - n`` smallest |w| are zeroed. ``mode`` ``all`` (default) takes every
    eligible Linear but the classifier, ``keep-attention`` also leaves attention dense.
    Its sparsity is ``1 - n/m``, so it takes no ``ratio``. The artifact is dense with the
    pattern; whether an evaluation runs it on sparse kernels is recorded per evaluation
    (:mod:`workers.sparsity`). ``n`` and ``m`` apply to this method only.
    """

    method: Literal["unstructured", "structured", "semi-structured"]
    ratio: float | None = Field(None, gt=0, lt=1)
    mode: Literal["all", "keep-attention", "heads"] | None = None
    importance: Literal["l1", "l2"] = "l1"
    n: int | None = Field(None, ge=1, le=64)
    m: int | None = Field(None, ge=1, le=64)

    @model_validator(mode="after")
    def _mode_matches_method(self) -> "PruneParams":
        if self.method == "semi-structured":
            return self._semi_structured()
        if self.n is not None or self.m is not None:
            raise ValueError("'n' and 'm' apply to method semi-structured only; remove them or use "
                             "method: semi-structured")
        if self.ratio is None:
            raise ValueError(f"'ratio' is required for method {self.method} (the share of weights to remove) "
                             "-- add it, e.g. ratio: 0.5")
        if self.method == "unstructured" and self.mode is not None:
            raise ValueError("'mode' applies to structured and semi-structured pruning only; remove it or use "
                             "method: structured")
        if self.method == "structured" and self.mode is None:
            object.__setattr__(self, "mode", "all")
        return self

    def _semi_structured(self) -> "PruneParams":
        if self.ratio is not None:
            raise ValueError("'ratio' does not apply to method semi-structured (its sparsity is set by n:m, "
                             "2 of every 4 weights kept); remove it")
        n, m = self.n if self.n is not None else 2, self.m if self.m is not None else 4
        if (n, m) not in SEMI_STRUCTURED_PATTERNS:
            supported = " or ".join(f"n: {a}, m: {b}" for a, b in SEMI_STRUCTURED_PATTERNS)
            raise ValueError(f"unsupported pattern n:m {n}:{m}; use {supported}")
        if self.mode == "heads":
            raise ValueError("mode 'heads' applies to structured pruning; semi-structured takes mode all or "
                             "keep-attention")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "m", m)
        if self.mode is None:
            object.__setattr__(self, "mode", "all")
        return self


Engine = Literal["quanto", "onnxruntime", "openvino", "tensorrt"]

# The artifact format each quantization engine produces; backends declare the formats
# they run (workers/backends), so the planner pairs a chain with the runtimes that can
# run its last artifact.
ENGINE_FORMATS: dict[str, str] = {"quanto": "quanto", "onnxruntime": "onnx", "openvino": "openvino",
                                  "tensorrt": "onnx-qdq"}


class QuantizeParams(_Params):
    """Post-training quantization; activations are calibrated on train batches.

    ``engine``: ``quanto`` (optimum-quanto, a torch model with low-bit weights; its fast
    kernels are CUDA-only), ``onnxruntime`` (``quantize_static`` with QDQ nodes, or
    ``quantize_dynamic`` with ``mode: dynamic``: int8 weights, activations quantized at
    run time), ``openvino`` (NNCF post-training quantization of the OpenVINO model) or
    ``tensorrt`` (explicit symmetric int8 Q/DQ nodes, calibrated by ONNX Runtime on the
    CPU, that TensorRT builds an int8 engine from on a GPU). A runtime engine's model runs
    on that runtime only. ``per_channel`` (onnxruntime, tensorrt): one weight scale per
    output channel.
    """

    weights: Literal["int8", "float8", "int4"]
    activations: Literal["none", "int8", "float8"] = "none"
    calibration_batches: int = Field(8, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    engine: Engine = "quanto"
    mode: Literal["static", "dynamic"] = "static"
    per_channel: bool = False

    @model_validator(mode="after")
    def _engine_options(self) -> "QuantizeParams":
        if self.engine == "quanto":
            if self.mode != "static" or self.per_channel:
                raise ValueError("'mode' and 'per_channel' apply to engines onnxruntime and tensorrt; remove them "
                                 "or set engine: onnxruntime")
            return self
        if self.weights != "int8":
            raise ValueError(f"engine {self.engine} quantizes weights to int8 only; use weights: int8")
        if self.engine == "tensorrt" and self.mode != "static":
            raise ValueError("engine tensorrt quantizes statically (TensorRT builds int8 from calibrated Q/DQ "
                             "nodes); remove mode or use engine: onnxruntime for dynamic quantization")
        if self.engine == "openvino" and (self.mode != "static" or self.per_channel):
            raise ValueError("engine openvino takes neither 'mode' nor 'per_channel' (NNCF quantizes weights "
                             "per channel and calibrates activations); remove them")
        if self.mode == "static" and self.activations != "int8":
            raise ValueError(f"engine {self.engine} static quantization needs activations: int8 (or, for "
                             "onnxruntime, mode: dynamic with activations: none)")
        if self.mode == "dynamic" and self.activations != "none":
            raise ValueError("mode: dynamic quantizes activations at run time; use activations: none")
        return self


class QatParams(LoopParams):
    """Quantization-aware training of the parent: NNCF inserts fake quantizers (int8
    weights per channel, int8 activations), calibrated first on ``calibration_batches``
    train batches as post-training quantization would be; the model then trains in the
    shared loop with them in the forward pass (straight-through gradients in full
    precision, the quantizer scales trained too) and the best validation epoch is
    converted to an OpenVINO int8 model. ``engine``, ``weights`` and ``activations`` name
    the quantization it targets: ``quantize`` with the same three is its post-training
    counterpart. Defaults: 3 epochs at a fine-tuning rate (1e-5, NNCF's advice)."""

    engine: Literal["openvino"] = "openvino"
    weights: Literal["int8"] = "int8"
    activations: Literal["int8"] = "int8"
    calibration_batches: int = Field(8, ge=1, le=10_000)
    epochs: int = Field(3, ge=1, le=10_000)
    lr: float = Field(1e-5, gt=0, le=10)


PRECISIONS = ("fp32", "bf16", "fp16", "auto")
Precision = Literal["fp32", "bf16", "fp16", "auto"]


class EvaluateParams(_Params):
    """The evaluation protocol: unmeasured warm-up, the whole test split, N repeats,
    on one runtime at one precision (``auto``: the runtime's own choice, recorded)."""

    target: str = "local"
    runtime: str = Field("torch", min_length=1)
    precision: Precision = "fp32"
    batch_size: int = Field(64, ge=1, le=65_536)
    warmup_batches: int = Field(3, ge=0, le=10_000)
    # ... and at least this long: a CPU on a shared VM takes seconds to reach steady speed.
    warmup_s: float = Field(3.0, ge=0, le=3_600)
    # Rounds of a cohort (one window per model per round): 7 give the paired ratio's
    # t-interval 6 degrees of freedom (workers.stats).
    repeats: int = Field(7, ge=1, le=1_000)
    # Each repeat's window covers whole passes over the test split until it lasts this
    # long, so timer granularity and scheduler noise stay small against the window.
    min_window_s: float = Field(5.0, ge=0, le=3_600)
    # How the models of a cohort share a round: ``slices`` -- each model's window is made
    # of slices of whole passes lasting at least ``slice_s``, the models taking turns
    # slice by slice in a seeded order until every one has ``min_window_s``, so drift of
    # the machine within a round lands on all alike; ``windows`` -- one contiguous window
    # per model after another; ``auto`` -- slices on CPU, windows on CUDA (NVML's energy
    # counter updates at its own cadence, too coarse to split among 50 ms slices).
    interleave: Literal["auto", "slices", "windows"] = "auto"
    slice_s: float = Field(0.05, gt=0, le=60)
    # Idle power is sampled for this long before the first window, so net energy (gross
    # minus idle power x duration) can be reported next to gross; 0 skips it (net: None).
    idle_s: float = Field(2.0, ge=0, le=600)


class NoopParams(_Params):
    """A stage that does nothing and returns at once: it measures what the machinery
    itself costs per stage (``benchmarks/overhead.py``). ``index`` only tells otherwise
    identical stages apart, so each gets its own key; ``sleep_s`` makes it take that long
    (tests of timeouts and queueing); ``hold_file`` makes it wait while that file exists
    (at most ``hold_timeout_s``, then it fails), so a test that kills, cancels or times
    out a running stage knows it is still running until the test deletes the file."""

    index: int = Field(0, ge=0)
    sleep_s: float = Field(0.0, ge=0, le=3600)
    hold_file: str | None = None
    hold_timeout_s: float = Field(900.0, gt=0, le=3600)


# A parameter naming another model: the sweep's baseline, an artifact, or a file.
BASELINE_REF = "baseline"
ARTIFACT_PREFIX = "artifact:"
CHECKPOINT_PREFIX = "checkpoint:"

Role = Literal["baseline", "pipeline", "evaluation"]


@dataclass(frozen=True)
class StageInputs:
    """What a stage reads besides its parent artifact, known at plan time.

    The coordinator ships exactly these to a node that shares no disk and waits for
    nothing else; the planner derives them from the kind's declaration, so neither
    interprets a kind's parameters itself.
    """

    artifacts: tuple[str, ...] = ()  # other artifacts, by stage key (e.g. a teacher)
    files: tuple[tuple[str, str], ...] = ()  # (absolute path, sha256 taken at spec time)
    # Stage keys of evaluations whose stored results this stage waits for and reads: a
    # conditional stage (``when:``) runs only if they say so (orchestrator/gate.py).
    evaluations: tuple[str, ...] = ()


def _never(params: Mapping[str, Any]) -> bool:
    return False


def _torch_format(params: Mapping[str, Any]) -> str:
    return "torch"


def _quantize_format(params: Mapping[str, Any]) -> str:
    return ENGINE_FORMATS[str(params.get("engine", "quanto"))]


# What a stage needs of the node that runs it: (runtime, precision) pairs the node's own
# hardware facts must say it can run (workers.hardware.runtime_precisions, on the device
# the node's worker uses). fp32 on torch runs everywhere, so it is never asked for.
Needs = tuple[tuple[str, str], ...]


def _needs_nothing(params: Mapping[str, Any]) -> Needs:
    return ()


def _loop_needs(params: Mapping[str, Any]) -> Needs:
    """The shared training loop runs in torch eager at the stage's ``precision``."""
    precision = str(params.get("precision", "fp32"))
    return () if precision == "fp32" else (("torch", precision),)


# The kinds that run the shared training loop, left out of whose keys ``precision`` is
# while it holds its default (it came after stores existed).
_LOOP_UNKEYED = ("precision",)


# Formats a stage that retrains, prunes or quantizes a torch model can start from.
TORCH_FORMATS = ("torch", "quanto")


def _load(ref: str) -> Callable[..., Any]:
    module, _, func = ref.partition(":")
    return getattr(importlib.import_module(module), func)


@dataclass(frozen=True)
class StageKind:
    """Everything the rest of the system needs to know about a stage kind.

    Adding a kind is its module (parameter model + runner) and one :func:`register_kind`
    call; the spec, the planner, the coordinator, the scheduler, the progress display and
    the reports read these fields and never switch on kind names.
    """

    name: str
    params: type[_Params]
    # "module:function", imported on the worker; called as
    # ``run(task: StageTask, env: WorkerEnv) -> StageOutput``.
    runner: str
    produces_artifact: bool
    flexible: bool  # may run on any capable node (False: pinned to params.target)
    # Where the kind sits in a sweep: "baseline" (the spec's top-level train: section,
    # the root of every chain), "pipeline" (named inside pipelines:), "evaluation" (added
    # by the planner for every chain and target).
    role: Role = "pipeline"
    # May be held back for a cleaner window by a carbon-aware policy (heavy work such as
    # retraining); the spec's scheduling.flexible adds more kinds for one sweep.
    may_wait: bool = False
    # Expected duration on a node of relative speed 1 before anything was measured.
    default_duration_s: float = 60.0
    label: str = ""  # what the kind does, for people ("baseline training", ...)
    # Parameters that name another model: "baseline" (the sweep's baseline model,
    # resolved by the planner), "artifact:<key>" or "checkpoint:<path>" (a file the spec
    # names, shipped with the stage and keyed by its content).
    references: tuple[str, ...] = ()
    # The artifact format a stage with these params produces ("torch": a torch module
    # rebuilt from safetensors + JSON); execution backends declare the formats they run.
    artifact_format: Callable[[Mapping[str, Any]], str] = _torch_format
    # True when the zeros of this stage's output *are* its compression (unstructured
    # masks): retraining a descendant must keep them at zero.
    keeps_zeros: Callable[[Mapping[str, Any]], bool] = _never
    # The parameter that is the x axis of the reports' compression curves (prune ratio).
    curve_param: str | None = None
    # Internal kinds (benchmarks, tests) that a sweep spec may not name.
    hidden: bool = False
    # The artifact formats a stage of this kind can start from (its parent's format);
    # an evaluation runs whatever format a runtime declares it runs.
    consumes: tuple[str, ...] = TORCH_FORMATS
    # Parameters added after stores existed: left out of the stage key while they hold
    # their default, so the keys (and stored results) of stages without them stay valid.
    unkeyed_defaults: tuple[str, ...] = ()
    # "module:function" measuring several stages of this kind together in one worker call,
    # ``run_cohort(tasks: list[StageTask], env) -> list[StageOutput | BaseException]``
    # (one per task: its output or what stopped it); the coordinator then forms cohorts
    # of this kind's ready stages per node (workers.types.Cohort). None: one at a time.
    cohort_runner: str | None = None
    # Conditions a spec may put on a stage of this kind (``when: {<name>: <threshold>}``,
    # decided by orchestrator/gate.py from stored evaluations), and the post-training
    # counterpart they compare against: *sibling(params)* is the kind and the parameters a
    # stage on the same parent must have to be this stage's sibling.
    conditions: tuple[str, ...] = ()
    sibling: Callable[[Mapping[str, Any]], tuple[str, dict[str, Any]]] | None = None
    # What a stage with these params needs of its node (:data:`Needs`); the scheduler
    # places it only on nodes whose own facts say they can, and the run start refuses a
    # sweep no live node can run.
    needs: Callable[[Mapping[str, Any]], Needs] = _needs_nothing

    def load_runner(self) -> Callable[..., Any]:
        return _load(self.runner)

    def load_cohort_runner(self) -> Callable[..., Any]:
        if self.cohort_runner is None:
            raise ValueError(f"stage kind {self.name!r} is not measured in cohorts")
        return _load(self.cohort_runner)

    def resolve(self, params: Mapping[str, Any], baseline: str | None) -> dict[str, Any]:
        """*params* with every ``baseline`` reference replaced by *baseline* (an
        ``artifact:``/``checkpoint:`` reference to the sweep's baseline model).

        Raises ValueError naming the parameter when the sweep has no baseline model."""
        out = dict(params)
        for name in self.references:
            if out.get(name) == BASELINE_REF:
                if baseline is None:
                    raise ValueError(f"{name} 'baseline' needs the sweep's baseline model")
                out[name] = baseline
        return out

    def inputs(self, params: Mapping[str, Any], file_sha256: Mapping[str, str]) -> StageInputs:
        """What a stage with (resolved) *params* reads; *file_sha256* maps every file
        the spec names to its digest."""
        artifacts, files = [], []
        for name in self.references:
            value = str(params.get(name) or "")
            if value.startswith(ARTIFACT_PREFIX):
                artifacts.append(value.removeprefix(ARTIFACT_PREFIX))
            elif value.startswith(CHECKPOINT_PREFIX):
                path = value.removeprefix(CHECKPOINT_PREFIX)
                if path in file_sha256:
                    files.append((path, file_sha256[path]))
        return StageInputs(artifacts=tuple(artifacts), files=tuple(files))

    def key_material(self, params: Mapping[str, Any], inputs: StageInputs) -> dict[str, Any]:
        """What the stage key hashes: the params plus the content digest of each file a
        reference names (``<param>_sha256``), so keys follow file content, not names."""
        digests = dict(inputs.files)
        defaults = _param_defaults(self.params)
        out = {name: value for name, value in params.items()
               if not (name in self.unkeyed_defaults and name in defaults and defaults[name] == value)}
        for name in self.references:
            value = str(params.get(name) or "")
            if value.startswith(CHECKPOINT_PREFIX) and value.removeprefix(CHECKPOINT_PREFIX) in digests:
                out[f"{name}_sha256"] = digests[value.removeprefix(CHECKPOINT_PREFIX)]
        return out

    def localize(self, params: Mapping[str, Any], path: str, local: str) -> dict[str, Any]:
        """*params* reading the node-local copy *local* of the shipped file *path*."""
        out = dict(params)
        for name in self.references:
            if out.get(name) == f"{CHECKPOINT_PREFIX}{path}":
                out[name] = f"{CHECKPOINT_PREFIX}{local}"
        return out


def _ptq_sibling(params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """QAT's post-training counterpart: ``quantize`` with the quantization it targets."""
    return "quantize", {name: params[name] for name in ("engine", "weights", "activations")}


def _zeros_are_compression(params: Mapping[str, Any]) -> bool:
    return params.get("method") in ("unstructured", "semi-structured")


STAGE_KINDS: dict[str, StageKind] = {}


def register_kind(kind: StageKind) -> StageKind:
    """Register *kind* (replacing one of the same name) and return it. The one place a
    kind becomes known to the spec, the planner, the coordinator and the reports."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", kind.name):
        raise ValueError(f"stage kind name {kind.name!r}: use lower-case letters, digits and '_'")
    if kind.role == "evaluation" and kind.produces_artifact:
        raise ValueError(f"stage kind {kind.name!r}: an evaluation produces no artifact")
    if kind.conditions and kind.sibling is None:
        raise ValueError(f"stage kind {kind.name!r}: conditions need a sibling to compare against")
    for what, names in (("reference", kind.references), ("unkeyed default", kind.unkeyed_defaults)):
        for name in names:
            if name not in kind.params.model_fields:
                raise ValueError(f"stage kind {kind.name!r}: {what} {name!r} is not one of its parameters")
    STAGE_KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Forget *name* (tests that register a kind of their own)."""
    STAGE_KINDS.pop(name, None)


for _kind in (
    StageKind("train", TrainParams, "workers.stages.train:run", True, True, role="baseline", may_wait=True,
              default_duration_s=600.0, label="baseline training", unkeyed_defaults=_LOOP_UNKEYED,
              needs=_loop_needs),
    StageKind("prune", PruneParams, "workers.stages.prune:run", True, True, label="pruning",
              keeps_zeros=_zeros_are_compression, curve_param="ratio",
              unkeyed_defaults=("ratio", "n", "m")),
    StageKind("quantize", QuantizeParams, "workers.stages.quantize:run", True, True, label="quantization",
              artifact_format=_quantize_format, unkeyed_defaults=("engine", "mode", "per_channel")),
    StageKind("finetune", FinetuneParams, "workers.stages.finetune:run", True, True, may_wait=True,
              default_duration_s=300.0, label="fine-tuning", unkeyed_defaults=_LOOP_UNKEYED, needs=_loop_needs),
    StageKind("distill", DistillParams, "workers.stages.distill:run", True, True, may_wait=True,
              default_duration_s=300.0, label="knowledge distillation", references=("teacher",),
              unkeyed_defaults=_LOOP_UNKEYED, needs=_loop_needs),
    StageKind("qat", QatParams, "workers.stages.qat:run", True, True, may_wait=True, default_duration_s=300.0,
              label="quantization-aware training", artifact_format=_quantize_format, consumes=("torch",),
              conditions=("ptq_top1_drop_over",), sibling=_ptq_sibling, unkeyed_defaults=_LOOP_UNKEYED,
              needs=_loop_needs),
    StageKind("evaluate", EvaluateParams, "workers.stages.evaluate:run", False, False, role="evaluation",
              label="evaluation", unkeyed_defaults=("runtime", "precision", "interleave", "slice_s"),
              cohort_runner="workers.stages.evaluate:run_cohort"),
    StageKind("noop", NoopParams, "workers.stages.noop:run", produces_artifact=False, flexible=True,
              default_duration_s=1.0, label="no-op", hidden=True),
):
    register_kind(_kind)


def pipeline_kinds() -> tuple[str, ...]:
    """Kinds a user may place inside a pipeline (in registration order)."""
    return tuple(k for k, kind in STAGE_KINDS.items() if kind.role == "pipeline" and not kind.hidden)


def kind_with_role(role: Role) -> StageKind:
    """The one registered kind with *role* ("baseline" or "evaluation")."""
    found = [kind for kind in STAGE_KINDS.values() if kind.role == role]
    if len(found) != 1:
        raise LookupError(f"expected one stage kind with role {role!r}, found {[k.name for k in found]}")
    return found[0]


def find_kind(name: Any) -> StageKind | None:
    """The registered kind called *name*, or None (a kind this process does not know --
    a store written by another greensweep -- or not a string at all)."""
    return STAGE_KINDS.get(name) if isinstance(name, str) else None


def get_kind(name: str) -> StageKind:
    try:
        return STAGE_KINDS[name]
    except KeyError:
        known = ", ".join(k for k, kind in STAGE_KINDS.items() if not kind.hidden)
        raise KeyError(f"unknown stage kind {name!r}; known kinds: {known}") from None


# ------------------------------------------------------------------ stage labels


def stage_label(kind: str, params: Mapping[str, Any]) -> str:
    """The one readable label of a stage, ``kind(name=value, ...)``: the planner's, the
    progress lines', ``results``' and the reports', so a stage reads the same everywhere.

    Shows the parameters that differ from the defaults of the kind's registered
    parameter model, in *params* order, joined by ``", "``; strings are shown bare, other
    values as compact JSON (``true``, ``null``, ``[1,2]``). Pass the full (validated)
    parameters: the label then tells apart every two stages of a grid. A kind that is not
    registered (a store written by another greensweep) shows every parameter.
    """
    registered = STAGE_KINDS.get(kind)
    defaults = _param_defaults(registered.params) if registered is not None else {}
    shown = [f"{name}={_label_value(value)}" for name, value in params.items()
             if name not in defaults or defaults[name] != value]
    return f"{kind}({', '.join(shown)})"


_LABEL_DEFAULTS: dict[type[BaseModel], dict[str, Any]] = {}


def _param_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The parameter model's optional fields and their defaults (cached per model class,
    so a kind registered again with another model is labelled by the new one)."""
    cached = _LABEL_DEFAULTS.get(model)
    if cached is None:
        cached = {name: f.get_default(call_default_factory=True)
                  for name, f in model.model_fields.items() if not f.is_required()}
        _LABEL_DEFAULTS[model] = cached
    return cached


def _label_value(value: Any) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
