"""The ``qat`` stage: quantization-aware training, then an int8 model a runtime runs fast.

Post-training quantization rounds a trained model; when that costs accuracy, training
*with* the rounding in the forward pass lets the weights adapt to it. The stage:

1. loads the parent (the float model: a baseline, a pruned or a retrained one) and the
   training data, as ``finetune`` does -- an unstructured parent's zeros stay zero;
2. inserts NNCF's fake quantizers (:func:`workers.stages.quantize_runtimes.prepare_qat`:
   int8 weights per channel, int8 activations, symmetric) and initialises their scales
   by calibration on train batches -- the post-training model, whose validation top-1
   is recorded as ``ptq_val_top1``;
3. trains that model in the shared loop (:mod:`workers.training`: checkpoints every epoch
   and resumes bit for bit, selection on validation, progress) -- fake quantization in
   the forward pass, full-precision straight-through gradients, scales trained too;
4. converts the best epoch to OpenVINO IR, where the quantizers are ``FakeQuantize``
   nodes that OpenVINO's CPU plugin runs as int8 kernels (optimum-quanto's torch models
   have no fast CPU kernels, so QAT does not target it).

The artifact is a *runtime artifact* like ``quantize(engine=openvino)``'s: the float
weights QAT trained (safetensors; they load into the parent's architecture) plus the
OpenVINO int8 model as its ``deploy`` payload -- no pickle anywhere -- so it is evaluated
on the ``openvino`` runtime, and its agreement is measured against those float weights.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from workers.checkpoints import discard_checkpoints
from workers.meters import make_meter
from workers.stages.registry import QatParams
from workers.types import StageOutput, StageTask, WorkerEnv


def run(task: StageTask, env: WorkerEnv) -> StageOutput:
    """Quantization-aware training of the parent artifact; saves the OpenVINO int8 model.

    Metrics: those of :meth:`workers.training.FitResult.metrics` (``history``,
    ``best_val_top1`` -- of the fake-quantized model --, ``resumed_from_epoch``, ...),
    ``initial_val_top1`` (the float parent), ``ptq_val_top1`` (after calibration, before
    training), ``quantizers`` (fake quantizers inserted), ``calibration_samples`` and
    ``size_bytes_before`` / ``size_bytes_after``. The energy is that of calibration and
    every epoch (not of loading, export or saving).
    """
    from workers.modelio import save_child
    from workers.stages.quantize import calibration_images
    from workers.stages.quantize_runtimes import export_qat, float_weights, prepare_qat
    from workers.training import CrossEntropy, fit, load_student, loop_autocast, sum_readings, top1

    params = QatParams.model_validate(dict(task.params))
    torch.set_num_threads(env.num_threads)
    student = load_student(task, params)
    parent, splits = student.parent, student.splits
    device = torch.device(env.device)
    autocast = loop_autocast(params, device)  # the fake quantizers run under it too
    model = parent.model.to("cpu").eval()
    float_copy = copy.deepcopy(model)  # the architecture the trained float weights load into
    calibration = calibration_images(task, params, parent.input_shape)
    val_images, val_labels = splits.val.tensors
    shape = parent.input_shape

    def val_top1(m: torch.nn.Module) -> float:
        return top1(m, val_images, val_labels, input_shape=shape, batch_size=params.batch_size, device=device,
                    autocast=autocast)

    initial = val_top1(model.to(device))
    model.to("cpu")
    meter = make_meter(env.device)
    meter.begin()
    quantized, settings = prepare_qat(model, calibration, batch_size=params.batch_size)
    setup = meter.end()
    ptq = val_top1(quantized.to(device))
    result = fit(quantized, splits, params, objective=CrossEntropy(params.label_smoothing), input_shape=shape,
                 task=task, env=env, keep_masks=student.keep_masks)
    quantized.load_state_dict(result.best_state)
    quantized.to("cpu").eval()
    float_copy.load_state_dict(float_weights(quantized))
    with tempfile.TemporaryDirectory(prefix="greensweep-qat-") as scratch:
        deploy = export_qat(quantized, calibration[: params.batch_size], Path(scratch), settings)
        artifact = save_child(float_copy, task, parent, params.model_dump(mode="json"), materialized=True,
                              extra={"float_parent": task.parent_key, "qat": settings}, deploy=deploy)
    discard_checkpoints(task)
    return StageOutput(
        metrics={**result.metrics(), "initial_val_top1": initial, "ptq_val_top1": ptq,
                 "quantizers": settings["quantizers"], "calibration_samples": len(calibration),
                 "size_bytes_before": parent.size_bytes, "size_bytes_after": artifact.size_bytes,
                 "engine": params.engine},
        artifact=artifact,
        energy=sum_readings([setup, *result.epoch_energy]),
    )
