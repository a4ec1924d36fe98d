"""Objects that cross the coordinator/worker border.

The coordinator hands a :class:`StageTask` to a ``StageWorker`` actor and gets a
:class:`StageResult` back. Both are frozen, picklable dataclasses holding only plain
values (str, int, float, bool, None, tuples and JSON-able dicts), so they travel through
Ray unchanged and can be written to the store as they are. Workers never write to the
store; the coordinator is the only writer.

Units live in field names (``duration_s``, ``size_bytes``, ``gpu_energy_j``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Literal, Mapping

EnergySource = Literal["nvml-counter", "nvml-power", "rapl", "estimate-tdp", "none"]
ENERGY_SOURCES: tuple[str, ...] = ("nvml-counter", "nvml-power", "rapl", "estimate-tdp", "none")


@dataclass(frozen=True)
class EnergyReading:
    """What one meter window saw.

    A domain with no sensor has ``None`` energy and source ``"none"`` -- never a silent
    0 J. ``idle_power_w_*`` is the power sampled before the window (None when not sampled).
    Readings subtract, so a window's delta is ``end - begin``.
    """

    duration_s: float
    gpu_energy_j: float | None = None
    cpu_energy_j: float | None = None
    dram_energy_j: float | None = None
    gpu_source: EnergySource = "none"
    cpu_source: EnergySource = "none"
    dram_source: EnergySource = "none"
    gpu_idle_power_w: float | None = None
    cpu_idle_power_w: float | None = None
    dram_idle_power_w: float | None = None

    def __sub__(self, other: "EnergyReading") -> "EnergyReading":
        def sub(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None else a - b

        return EnergyReading(
            duration_s=self.duration_s - other.duration_s,
            gpu_energy_j=sub(self.gpu_energy_j, other.gpu_energy_j),
            cpu_energy_j=sub(self.cpu_energy_j, other.cpu_energy_j),
            dram_energy_j=sub(self.dram_energy_j, other.dram_energy_j),
            gpu_source=self.gpu_source,
            cpu_source=self.cpu_source,
            dram_source=self.dram_source,
            gpu_idle_power_w=self.gpu_idle_power_w,
            cpu_idle_power_w=self.cpu_idle_power_w,
            dram_idle_power_w=self.dram_idle_power_w,
        )

    @property
    def total_energy_j(self) -> float | None:
        """Sum of the domains that have a figure; None when no domain has one."""
        parts = [v for v in (self.gpu_energy_j, self.cpu_energy_j, self.dram_energy_j) if v is not None]
        return sum(parts) if parts else None

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ArtifactInfo:
    """A saved model artifact: the directory ``<artifact_root>/<key>/``.

    ``materialized`` is False for *simulated* compression (unstructured masks, fake-quant:
    same dense FLOPs) and True for a real change of shapes or kernels (structured pruning,
    a model that was never compressed, real low-bit weights). ``size_bytes`` is the size
    of the serialized weights on disk, not ``numel * element_size``.
    """

    key: str
    path: str
    size_bytes: int
    sha256: str  # of the weights file
    materialized: bool
    params: int  # parameter count of the (dense-equivalent) architecture
    macs: int  # multiply-accumulates for one sample at the model's input size
    compression: Mapping[str, Any] = field(default_factory=dict)  # the chain that made it


@dataclass(frozen=True)
class ModelRef:
    """How to build the root model: a timm architecture plus kwargs, or a checkpoint."""

    arch: str
    kwargs: Mapping[str, Any]
    checkpoint: str | None = None  # path to a .safetensors or weights-only torch file
    pretrained: bool = False
    # the spec's model.input_size (C, H, W); None: workers.models.model_input_shape decides
    input_size: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class DatasetRef:
    """Which data a stage reads. ``name`` is one of the names in ``workers.data``."""

    name: str
    path: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageTask:
    """One stage to run on a worker.

    ``parent_key`` is None for a root stage (the baseline ``train``, or the first stage
    of a pipeline when the spec names a checkpoint): the worker builds the model from
    ``model``. Otherwise the worker loads the artifact ``parent_key`` from
    ``artifact_root``. ``params`` is the stage kind's validated parameter dict (see
    ``workers.stages.registry``), with every default filled in.
    """

    sweep_id: str
    key: str
    kind: str
    params: Mapping[str, Any]
    parent_key: str | None
    model: ModelRef
    dataset: DatasetRef
    seed: int
    artifact_root: str
    attempt: int = 1
    # evaluations measured together with others (all the tasks of one call share it)
    cohort: Cohort | None = None


@dataclass(frozen=True)
class Cohort:
    """Evaluations of one node measured together (``workers.stages.evaluate.run_cohort``):
    every model warmed up, then ``repeats`` rounds in which each gets one window, in an
    order drawn from ``seed`` per round, with the ``reference`` -- the uncompressed model on
    torch at fp32 -- in every round, so each model has a paired ratio to it.

    ``reference_shown``: the reference's own evaluation is a point of the sweep, and then
    one of the call's tasks (else it is measured only for the ratios)."""

    id: str
    seed: int
    reference: StageTask
    reference_shown: bool


@dataclass(frozen=True)
class EvalRepeat:
    """One measured repeat of an evaluation over the whole test split; in a cohort,
    ``repeat`` is the round and ``position`` the window's place in that round's order."""

    repeat: int
    samples: int
    top1: float  # fraction in [0, 1]
    top5: float
    duration_s: float
    time_per_sample_s: float
    throughput_samples_per_s: float
    energy: EnergyReading | None = None
    position: int | None = None


@dataclass(frozen=True)
class StageResult:
    """What a worker returns for one stage. ``status`` is ``succeeded`` or ``failed``.

    ``artifact`` is set for stages that produce a model (train, prune, quantize, distill);
    ``repeats`` for ``evaluate``. ``metrics`` holds small stage-specific figures
    (e.g. best validation top-1 of a train, sparsity reached by a prune, evaluation's
    params/MACs/size_bytes/materialized) as JSON-able values.
    """

    key: str
    kind: str
    status: Literal["succeeded", "failed"]
    duration_s: float
    node_id: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    artifact: ArtifactInfo | None = None
    repeats: tuple[EvalRepeat, ...] = ()
    energy: EnergyReading | None = None
    error: str | None = None  # one line
    traceback: str | None = None
    hardware: Mapping[str, Any] = field(default_factory=dict)
    # the artifact itself (workers.artifacts.pack), when the coordinator asked for it back
    # because nodes share no disk; the coordinator installs it and drops the bytes
    artifact_blob: bytes | None = None


@dataclass(frozen=True)
class StageOutput:
    """What a stage runner returns; the actor wraps it into a :class:`StageResult`
    (adding timing, node id, hardware facts and error capture)."""

    metrics: Mapping[str, Any] = field(default_factory=dict)
    artifact: ArtifactInfo | None = None
    repeats: tuple[EvalRepeat, ...] = ()
    energy: EnergyReading | None = None


@dataclass(frozen=True)
class WorkerEnv:
    """Where a stage runs: the torch device, how many CPU threads it may use, the Ray
    node id, and the node's labels (``greensweep/node-type``, ``greensweep/region``).

    ``report_progress``, when set, receives one JSON-able dict per completed training
    epoch while a retraining stage runs (shape documented in ``workers.training``), so
    the coordinator can show progress before the stage returns. It is called on the
    stage's thread after the epoch is checkpointed; an exception it raises fails the
    stage (which then resumes from that checkpoint when run again), so a reporter that
    must not interrupt training should catch its own errors.
    """

    device: str = "cpu"
    num_threads: int = 1
    node_id: str = "local"
    labels: Mapping[str, str] = field(default_factory=dict)
    report_progress: Callable[[dict[str, Any]], None] | None = None
