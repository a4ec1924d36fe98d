"""``tensorrt``: an NVIDIA TensorRT engine built from the model's ONNX form, on a CUDA GPU.

TensorRT 11 removed the weak-typing builder flags (``FP16``, ``INT8``) and the int8
calibrators; an engine runs the types its network states. So every engine here is built
from a **strongly typed** network (``STRONGLY_TYPED`` on TensorRT 10, always on in 11):

- ``fp32``: the torch model exported to ONNX (:func:`workers.backends.export.export_onnx`,
  the export ONNX Runtime uses), with TF32 off where the builder has the flag -- fp32
  means fp32, and the deployable must agree with torch like every fp32 one;
- ``fp16``: the same export converted to float16 weights and operations with fp32 inputs
  and outputs (:func:`workers.backends.export.to_fp16`): the types
  the engine then runs;
- int8: a model quantized by ``quantize: {engine: tensorrt}`` -- explicit symmetric Q/DQ
  nodes (int8 weights and activations, zero points 0) calibrated on train batches
  (:func:`workers.stages.quantize_runtimes.quantize_onnxruntime`) -- built as it is,
  evaluated at ``precision: fp32`` (the float parts of a quantized model), like every
  runtime-quantized model.

One optimization profile covers batches 1 to the example's (the evaluation's
``batch_size``; the last batch of a test split is short). Engines are cached like other
deployables, keyed also by the GPU's name and compute capability and TensorRT's version (an
engine runs only where it was built). Inputs and outputs stay on the GPU: a call binds the
torch tensors' memory and enqueues on torch's current stream, so the evaluation's
synchronize at the window edges covers it. TensorRT and the CUDA device have no thread
settings; the CPU thread count is recorded as 1 (one host thread enqueues).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from workers.backends.base import Backend, Deployable, ThreadSettings, cache_or_temporary, native_files
from workers.backends.cache import cached, entry_facts, files_size
from workers.backends.export import INPUT_NAME, ONNX_OPSET, OUTPUT_NAME, export_onnx, to_fp16

ENGINE_FILE = "model.plan"
ONNX_FILE = "model.onnx"
NATIVE_FORMAT = "onnx-qdq"  # what quantize: {engine: tensorrt} produces (workers.stages.registry.ENGINE_FORMATS)
WORKSPACE_BYTES = 1 << 30


def _trt() -> Any:
    import tensorrt as trt

    return trt


class TensorRtDeployable(Deployable):
    def __init__(self, engine: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.engine = engine
        self.context = engine.create_execution_context()

    def run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to(self.device, torch.float32).contiguous()
        self.context.set_input_shape(INPUT_NAME, tuple(x.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device=x.device)
        self.context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise RuntimeError("TensorRT could not enqueue the engine (see its log above)")
        return out

    def close(self) -> None:
        self.context = None
        self.engine = None
        super().close()


class TensorRtBackend(Backend):
    name = "tensorrt"

    def version(self) -> str:
        return str(_trt().__version__)

    def unsupported(self, device: str, precision: str) -> str | None:
        if not device.startswith("cuda"):
            return "TensorRT runs on NVIDIA GPUs only; evaluate on a GPU target or another runtime"
        if not torch.cuda.is_available():
            return f"no CUDA device on this node (asked {device})"
        try:
            _trt()
        except ImportError:
            return "TensorRT is not installed here -- pip install tensorrt on the GPU nodes"
        if precision not in ("fp32", "fp16"):
            return f"tensorrt runs fp32 and fp16 (int8: quantize with engine: tensorrt), not {precision}"
        return None

    def prepare(self, model: nn.Module, manifest: Mapping[str, Any], *, precision: str, device: str,
                threads: ThreadSettings, example: torch.Tensor, cache_dir: Path | None,
                artifact_dir: Path | None = None) -> Deployable:
        self.require(device, precision)
        trt = _trt()
        native = native_files(manifest, artifact_dir, NATIVE_FORMAT)
        gpu = torch.cuda.get_device_properties(torch.device(device))
        max_batch = int(example.shape[0])
        material = {"artifact": manifest.get("key") or manifest.get("sha256"), "runtime": self.name,
                    "precision": precision, "runtime_version": self.version(), "opset": ONNX_OPSET,
                    "torch": torch.__version__, "gpu": gpu.name, "compute_capability": f"{gpu.major}.{gpu.minor}",
                    "max_batch": max_batch, "from": "quantized payload" if native else "export"}
        cache_dir, temporary = cache_or_temporary(cache_dir, self.name)

        def build(directory: Path) -> dict[str, Any]:
            if native is not None:
                onnx_path = native[ONNX_FILE]
            else:
                onnx_path = directory / ONNX_FILE
                _export(model, example, precision, onnx_path)
            engine_bytes = build_engine(onnx_path, example.shape, precision)
            (directory / ENGINE_FILE).write_bytes(engine_bytes)
            if native is None:
                for extra in directory.glob(ONNX_FILE + "*"):  # the ONNX form is not deployed
                    extra.unlink()
            return {"files": [ENGINE_FILE]}

        directory, built = cached(cache_dir, material, build)
        files = [directory / name for name in entry_facts(directory)["files"]]
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine((directory / ENGINE_FILE).read_bytes())
        if engine is None:
            raise RuntimeError(f"TensorRT could not load the engine in {directory} -- delete it and re-run")
        source = "quantized payload" if native else ("exported now" if built else "exported earlier (cache)")
        settings = {"engine": source, "strongly_typed": True, "tf32": False, "opset": ONNX_OPSET,
                    "gpu": gpu.name, "compute_capability": f"{gpu.major}.{gpu.minor}",
                    "optimization_profile": {"min": 1, "opt": max_batch, "max": max_batch},
                    "workspace_bytes": WORKSPACE_BYTES}
        return TensorRtDeployable(engine, temporary=temporary, runtime=self.name, runtime_version=self.version(),
                                  precision=precision, device=device, size_bytes=files_size(files),
                                  threads=ThreadSettings(intra_op=1), settings=settings)


def build_engine(onnx_path: Path, example_shape: torch.Size | tuple[int, ...], precision: str) -> bytes:
    """A serialized engine of the ONNX model at *onnx_path*: a strongly typed network (its
    types are the model's), one profile for batches 1 .. ``example_shape[0]``, TF32 off.
    Raises ValueError, one line, naming the parser's first error."""
    trt = _trt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ValueError(f"TensorRT cannot parse the ONNX model ({precision}): "
                         f"{errors[0] if errors else 'no error reported'} -- evaluate it with another runtime")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32
    batch, *sample = (int(d) for d in example_shape)
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, *sample), (batch, *sample), (batch, *sample))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ValueError(f"TensorRT could not build an engine of the ONNX model ({precision}) -- see its log; "
                         "evaluate it with another runtime")
    return bytes(serialized)


def _export(model: nn.Module, example: torch.Tensor, precision: str, path: Path) -> None:
    """The ONNX form TensorRT builds from: fp32 as exported, fp16 converted with fp32 I/O."""
    cpu_model = model if next(model.parameters()).device.type == "cpu" else copy.deepcopy(model).cpu()
    files = export_onnx(cpu_model, example.detach().cpu().float(), path)
    if precision == "fp16":
        to_fp16(files[0])
