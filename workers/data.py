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

Known datasets: ``digits`` (scikit-learn's bundled 8x8 digits, no download) and
``synthetic`` (random tensors for throughput-only runs; no accuracy may be claimed on it).
Loaded splits are cached per process, so the stages of one worker share one copy: treat
the tensors as read-only.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch.utils.data import TensorDataset

from workers.types import DatasetRef

DEFAULT_VAL_FRACTION = 0.1
# Share of digits held out as the fixed test split, and the split's fixed random state.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_RANDOM_STATE = 0
# Per-split sample count of the synthetic dataset when the spec gives none.
SYNTHETIC_DEFAULT_NUM_SAMPLES = 256
# Loaded splits kept per process; small because a real dataset is hundreds of MB.
_CACHE_SIZE = 4


@dataclass(frozen=True)
class Splits:
    """One dataset cut into train / val / test, ready for a model.

    ``input_shape`` is one sample's (C, H, W); ``synthetic`` marks random data that is
    good for timing only.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, int, int]
    synthetic: bool = False


def load_dataset(ref: DatasetRef, *, seed: int, val_fraction: float | None = None) -> Splits:
    """Load the dataset ``ref`` names and split it; ``seed`` picks the validation split.

    ``val_fraction`` (the share of the training data held out for validation) is taken
    from the argument, else from ``ref.options["val_fraction"]``, else 0.1. Raises
    ``ValueError`` for an unknown dataset name or invalid options.
    """
    if ref.name not in _LOADERS:
        raise ValueError(f"unknown dataset {ref.name!r}; known datasets: {', '.join(_LOADERS)}")
    options = dict(ref.options)
    option_fraction = options.pop("val_fraction", DEFAULT_VAL_FRACTION)
    fraction = float(val_fraction if val_fraction is not None else option_fraction)
    if not 0 < fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    return _load_cached(ref.name, ref.path, json.dumps(options, sort_keys=True), int(seed), fraction)


def check_input_shape(splits: Splits, model_input_shape: tuple[int, ...] | list[int]) -> None:
    """Raise ``ValueError`` unless one sample of ``splits`` has the shape the model expects.

    Resizing is not supported yet, so the model must be built for the data (for digits:
    ``in_chans=1, img_size=8``).
    """
    expected = tuple(int(d) for d in model_input_shape)
    if tuple(splits.input_shape) != expected:
        raise ValueError(
            f"dataset {splits.name!r} yields inputs of shape {tuple(splits.input_shape)} (C, H, W) "
            f"but the model expects {expected}; build the model for the data's shape "
            f"(e.g. in_chans={splits.input_shape[0]}, img_size={splits.input_shape[1]}) -- "
            "resizing is not supported yet"
        )


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _load_cached(name: str, path: str | None, options_json: str, seed: int, val_fraction: float) -> Splits:
    """The cache boundary: every argument is hashable (options travel as canonical JSON)."""
    return _LOADERS[name](path, json.loads(options_json), seed, val_fraction)


def _reject_unknown_options(name: str, options: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = ", ".join(("val_fraction", *known))
        raise ValueError(f"dataset {name!r} has no option(s) {', '.join(unknown)}; allowed: {allowed}")


def _load_digits(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
    """scikit-learn's bundled digits: 1,797 grey 8x8 images of 10 classes, values 0-16.

    Pixels are scaled to [0, 1], then standardized with the mean/std of the non-test
    data (train + validation) so the test tensors are identical for every seed.
    ``path`` is unused: the data ships with scikit-learn.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _reject_unknown_options("digits", options, ())
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
    _reject_unknown_options("synthetic", options, ("input_shape", "num_classes", "num_samples"))
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


_LOADERS = {"digits": _load_digits, "synthetic": _load_synthetic}
