"""Datasets a stage reads, as in-memory train / validation / test splits.

Every loader returns a :class:`Splits` of ``TensorDataset`` s holding float32 images
(N x C x H x W, already normalized) and int64 labels, so a stage never does I/O or
preprocessing inside a timed window.

Splits are part of the evaluation protocol, so their rules are fixed here:

- the **test split never depends on the sweep seed** (nor on ``val_fraction``): every
  model of every sweep is scored on the same samples, byte for byte;
- the **validation split is carved from the training data by the sweep seed**, and it is
  the only split training may look at to choose weights;
- normalization statistics come from the non-test data only.

Known datasets: ``digits`` (scikit-learn's bundled 8x8 digits, no download),
``cifar10`` / ``cifar100`` (the python versions of the archives, read from a local
directory), ``imagefolder`` (one folder of images per class) and ``synthetic`` (random
tensors for throughput-only runs; no accuracy may be claimed on it). Nothing is ever
downloaded: a missing dataset is a one-line error naming the files and where to put them.
The directory of a file-based dataset is ``DatasetRef.path``, else the ``root`` option
(which, unlike ``path``, the spec does not require to exist, so a spec that names data
only present on the cluster still plans).

RGB datasets are scaled to [0, 1] and normalized with ImageNet's mean/std unless the
``mean`` / ``std`` options say otherwise (use the pretrained model's own statistics:
timm's ``pretrained_cfg``); grey datasets with the statistics of their non-test data.

Images are kept at the dataset's own size. :func:`load_dataset` resizes (bilinear) and
converts channels (grey <-> RGB) when asked for a model's ``input_shape``; the training
loop instead adapts each batch on the device (:func:`adapt_images`), so 32x32 CIFAR
is not held in memory at 224x224 (27 GB of float32 for the CIFAR-100 training set).

Loaded splits are cached per process, so the stages of one worker share one copy: treat
the tensors as read-only.
"""

from __future__ import annotations

import codecs
import functools
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from workers.data_common import (  # re-exported: the public names of workers.data
    DEFAULT_VAL_FRACTION,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetFormatError,
    DatasetHeader,
    DatasetNotFoundError,
    Splits,
    normalized_subset,
    reject_unknown_options,
    seeded_split,
    shape3,
)
from workers.data_files import (
    CIFAR_URL,
    IMAGEFOLDER_TEST_FRACTION,
    IMAGEFOLDER_TEST_RANDOM_STATE,
    cifar_header,
    imagefolder_header,
    load_cifar10,
    load_cifar100,
    load_imagefolder,
)
from workers.types import DatasetRef

# Share of digits held out as the fixed test split, and the split's fixed random state.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_RANDOM_STATE = 0
# Per-split sample count of the synthetic dataset when the spec gives none.
SYNTHETIC_DEFAULT_NUM_SAMPLES = 256
# Loaded splits kept per process; small because a real dataset is hundreds of MB.
_CACHE_SIZE = 4
# ITU-R BT.601 luma weights, as PIL's convert("L") uses: RGB -> grey.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Images adapted per chunk, so resizing a split never holds two full copies at once.
_ADAPT_CHUNK = 1024


def load_dataset(
    ref: DatasetRef,
    *,
    seed: int,
    val_fraction: float | None = None,
    input_shape: Sequence[int] | None = None,
) -> Splits:
    """Load the dataset ``ref`` names and split it; ``seed`` picks the validation split.

    ``val_fraction`` (the share of the training data held out for validation) is taken
    from the argument, else from ``ref.options["val_fraction"]``, else 0.1. With
    ``input_shape`` (a model's (C, H, W)) every split is converted to it by
    :func:`adapt_images`; without it the data keeps its own shape
    (:func:`check_input_shape` then tells a mismatch). Raises ``ValueError`` for an
    unknown dataset name or invalid options, :class:`DatasetNotFoundError` when the files
    are missing and :class:`DatasetFormatError` when they are unreadable or unsafe.
    """
    if ref.name not in _LOADERS:
        raise ValueError(f"unknown dataset {ref.name!r}; known datasets: {', '.join(_LOADERS)}")
    options = dict(ref.options)
    option_fraction = options.pop("val_fraction", DEFAULT_VAL_FRACTION)
    fraction = float(val_fraction if val_fraction is not None else option_fraction)
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    shape = None if input_shape is None else shape3(input_shape, "input_shape")
    return _load_cached(ref.name, ref.path, json.dumps(options, sort_keys=True), int(seed), fraction, shape)


def check_input_shape(splits: Splits, model_input_shape: tuple[int, ...] | list[int]) -> None:
    """Raise ``ValueError`` unless one sample of ``splits`` has the shape the model expects.

    For data loaded without ``input_shape``; the fix is to load it with the model's shape.
    """
    expected = tuple(int(d) for d in model_input_shape)
    if tuple(splits.input_shape) != expected:
        raise ValueError(
            f"dataset {splits.name!r} yields inputs of shape {tuple(splits.input_shape)} (C, H, W) "
            f"but the model expects {expected}; load it with load_dataset(..., input_shape={expected}) "
            f"to resize it, or build the model for the data's shape "
            f"(e.g. in_chans={splits.input_shape[0]}, img_size={splits.input_shape[1]})"
        )


def dataset_header(ref: DatasetRef) -> DatasetHeader:
    """Class count and sample shape of ``ref``, from the files' headers only: CIFAR's
    small meta file, an imagefolder's class folders and image headers, the options of
    ``digits`` / ``synthetic`` -- never the images themselves.

    Raises what :func:`load_dataset` would raise for the same ``ref`` (``ValueError``
    for an unknown name or bad options, :class:`DatasetNotFoundError` when the directory
    or its files are missing, :class:`DatasetFormatError` for an unreadable meta file),
    so a spec check catches it before a worker does.
    """
    if ref.name not in _LOADERS:
        raise ValueError(f"unknown dataset {ref.name!r}; known datasets: {', '.join(_LOADERS)}")
    options = dict(ref.options)
    fraction = float(options.pop("val_fraction", DEFAULT_VAL_FRACTION))
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    if ref.name == "digits":
        reject_unknown_options("digits", options, ())
        return DatasetHeader(10, (1, 8, 8))
    if ref.name == "synthetic":
        shape, num_classes, _ = _synthetic_options(options)
        return DatasetHeader(num_classes, shape)
    if ref.name in ("cifar10", "cifar100"):
        return cifar_header(ref.name, ref.path, options)
    return imagefolder_header(ref.path, options)


def adapt_images(images: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """``images`` (N, C, H, W) converted to ``input_shape`` (C', H', W'), on their device.

    Channels: grey is repeated to C' channels; RGB becomes grey by BT.601 luma weights
    (applied to the normalized values, so the result is only approximately normalized).
    Size: bilinear, antialiased when shrinking. Images already of that shape are
    returned as they are (no copy). Raises ``ValueError`` for other channel counts.
    """
    channels, height, width = shape3(input_shape, "input_shape")
    count, have_channels, have_height, have_width = images.shape
    if have_channels != channels:
        if have_channels == 1:
            images = images.expand(count, channels, have_height, have_width)
        elif have_channels == 3 and channels == 1:
            weights = torch.tensor(_LUMA_WEIGHTS, dtype=images.dtype, device=images.device)
            images = (images * weights.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        else:
            raise ValueError(
                f"cannot convert {have_channels}-channel images to {channels} channels "
                "(only grey <-> RGB); build the model for the data's channels"
            )
    if (have_height, have_width) != (height, width):
        shrinking = height < have_height or width < have_width
        images = F.interpolate(images, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking)
    return images


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_cached(
    name: str,
    path: str | None,
    options_json: str,
    seed: int,
    val_fraction: float,
    input_shape: tuple[int, int, int] | None,
) -> Splits:
    """The cache boundary: every argument is hashable (options travel as canonical JSON)."""
    splits = _LOADERS[name](path, json.loads(options_json), seed, val_fraction)
    if input_shape is None or input_shape == splits.input_shape:
        return splits
    return Splits(
        name=splits.name,
        train=_AdaptedSplit(splits.train, input_shape),
        val=_AdaptedSplit(splits.val, input_shape),
        test=_AdaptedSplit(splits.test, input_shape),
        num_classes=splits.num_classes,
        input_shape=input_shape,
        synthetic=splits.synthetic,
    )


class _AdaptedSplit(TensorDataset):
    """A split converted by :func:`adapt_images` on first access to ``tensors``.

    Lazy because a stage rarely needs every split at the model's size, and the sizes
    differ by orders of magnitude: ``evaluate`` reads only the test split, and
    CIFAR-100's training split at 224x224 would be 27 GB of float32.
    """

    def __init__(self, source: TensorDataset, input_shape: tuple[int, int, int]) -> None:
        # TensorDataset.__init__ would assign ``tensors``, which is computed here.
        self._source = source
        self._input_shape = input_shape
        self._tensors: tuple[torch.Tensor, ...] | None = None

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        if self._tensors is None:
            images, labels = self._source.tensors
            out = torch.empty((len(images), *self._input_shape), dtype=images.dtype)
            for start in range(0, len(images), _ADAPT_CHUNK):
                chunk = images[start : start + _ADAPT_CHUNK]
                out[start : start + _ADAPT_CHUNK] = adapt_images(chunk, self._input_shape)
            self._tensors = (out, labels)
        return self._tensors

    def __len__(self) -> int:
        return len(self._source)


def _load_digits(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
    """scikit-learn's bundled digits: 1,797 grey 8x8 images of 10 classes, values 0-16.

    Pixels are scaled to [0, 1], then standardized with the mean/std of the non-test
    data (train + validation) so the test tensors are identical for every seed.
    ``path`` is unused: the data ships with scikit-learn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    reject_unknown_options("digits", options, ())
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    indices = np.arange(len(labels))

    dev_idx, test_idx = train_test_split(
        indices,
        test_size=DIGITS_TEST_FRACTION,
        stratify=labels.numpy(),
        random_state=DIGITS_TEST_RANDOM_STATE,
    )
    train_idx, val_idx = train_test_split(
        dev_idx, test_size=val_fraction, stratify=labels.numpy()[dev_idx], random_state=seed
    )

    dev_images = images[torch.as_tensor(dev_idx)]
    mean = dev_images.mean(dim=(0, 2, 3), keepdim=True)
    std = dev_images.std(dim=(0, 2, 3), keepdim=True)
    normalized = (images - mean) / std

    def subset(idx: np.ndarray) -> TensorDataset:
        # sorted: a split's order must not depend on how the shuffle happened to fall
        idx_t = torch.as_tensor(np.sort(idx))
        return TensorDataset(normalized[idx_t].contiguous(), labels[idx_t].contiguous())

    return Splits(
        name="digits",
        train=subset(train_idx),
        val=subset(val_idx),
        test=subset(test_idx),
        num_classes=10,
        input_shape=(1, 8, 8),
    )


def _load_synthetic(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
    """Standard-normal images with uniform labels, for throughput-only runs.

    Options: ``input_shape`` (C, H, W) and ``num_classes`` (both required: they must
    match the model), ``num_samples`` (train and test size each, default 256; the
    validation split holds ``val_fraction`` of it, at least one sample).
    """
    shape, num_classes, num_samples = _synthetic_options(options)
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> TensorDataset:
        images = torch.randn((n, *shape), generator=generator, dtype=torch.float32)
        labels = torch.randint(0, num_classes, (n,), generator=generator, dtype=torch.int64)
        return TensorDataset(images, labels)

    return Splits(
        name="synthetic",
        train=split(num_samples),
        val=split(max(1, round(num_samples * val_fraction))),
        test=split(num_samples),
        num_classes=num_classes,
        input_shape=shape,
        synthetic=True,
    )


def _synthetic_options(options: Mapping[str, Any]) -> tuple[tuple[int, int, int], int, int]:
    """The synthetic dataset's (input_shape, num_classes, num_samples), checked."""
    reject_unknown_options("synthetic", options, ("input_shape", "num_classes", "num_samples"))
    missing = [k for k in ("input_shape", "num_classes") if k not in options]
    if missing:
        raise ValueError(
            f"dataset 'synthetic' needs option(s) {', '.join(missing)} "
            "(e.g. input_shape: [3, 224, 224], num_classes: 1000)"
        )
    try:
        dims = [int(d) for d in options["input_shape"]]
    except (TypeError, ValueError):
        dims = []
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(
            f"synthetic input_shape must be three positive integers (C, H, W), got {options['input_shape']!r}"
        )
    shape = (dims[0], dims[1], dims[2])
    num_classes = int(options["num_classes"])
    num_samples = int(options.get("num_samples", SYNTHETIC_DEFAULT_NUM_SAMPLES))
    if num_classes < 2 or num_samples < 1:
        raise ValueError(f"synthetic needs num_classes >= 2 and num_samples >= 1, got {num_classes} and {num_samples}")
    return shape, num_classes, num_samples


_LOADERS = {
    "digits": _load_digits,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
    "synthetic": _load_synthetic,
}
