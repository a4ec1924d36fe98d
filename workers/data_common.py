"""What every dataset loader of :mod:`workers.data` shares: the split container, the
errors, and the small rules (option checks, the seeded split, normalization statistics)
that make every loader follow the same protocol.

Internal to :mod:`workers.data` and :mod:`workers.data_files`; other code imports the
public names from :mod:`workers.data`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

DEFAULT_VAL_FRACTION = 0.1
# Normalization of RGB datasets unless the spec gives ``mean`` / ``std``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetNotFoundError(FileNotFoundError):
    """A file-based dataset is not where the spec says; the message names the files and the place."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is not in the expected format, or was refused as unsafe."""


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


@dataclass(frozen=True)
class DatasetHeader:
    """What a spec check needs of a dataset, read without loading it."""

    num_classes: int
    input_shape: tuple[int, int, int]  # one sample's (C, H, W) as stored (before any conversion)


def shape3(value: Any, what: str) -> tuple[int, int, int]:
    try:
        dims = [int(d) for d in value]
    except (TypeError, ValueError):
        dims = []
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"{what} must be three positive integers (C, H, W), got {value!r}")
    return dims[0], dims[1], dims[2]


def reject_unknown_options(name: str, options: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        allowed = ", ".join(("val_fraction", *known))
        raise ValueError(f"dataset {name!r} has no option(s) {', '.join(unknown)}; allowed: {allowed}")


def dataset_root(name: str, path: str | None, options: Mapping[str, Any], where: str) -> Path:
    """``path``, else the ``root`` option; relative roots resolve against the working directory."""
    location = path or options.get("root")
    if not location:
        raise DatasetNotFoundError(
            f"dataset {name!r} needs its directory: set dataset.path or dataset.options.root, then {where}"
        )
    return Path(str(location)).expanduser().resolve()


def seeded_split(labels: np.ndarray, fraction: float, *, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions (kept, held out) of a seeded split of ``labels``, both sorted.

    Stratified by label whenever every class can give a sample to both sides; tiny
    datasets that cannot fall back to a plain seeded split.
    """
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    present = np.bincount(labels)[np.unique(labels)]
    held = int(np.ceil(fraction * len(labels)))
    can_stratify = present.min() >= 2 and len(present) <= held <= len(labels) - len(present)
    kept, held_out = train_test_split(
        positions, test_size=fraction, stratify=labels if can_stratify else None, random_state=random_state
    )
    return np.sort(kept), np.sort(held_out)


def normalized_subset(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> TensorDataset:
    """uint8 images at positions ``idx`` as float32 in [0, 1], normalized per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    chosen = torch.from_numpy(np.ascontiguousarray(images[idx])).to(torch.float32).div_(255.0)
    return TensorDataset(chosen.sub_(mean_t).div_(std_t), torch.from_numpy(labels[idx]).to(torch.int64))


def rgb_statistics(name: str, options: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = channel_values(name, "mean", options.get("mean", IMAGENET_MEAN), 3)
    std = channel_values(name, "std", options.get("std", IMAGENET_STD), 3)
    return mean, std


def grey_statistics(
    name: str, options: Mapping[str, Any], dev_images: np.ndarray
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``mean``/``std`` options, else the statistics of the non-test images in [0, 1]."""
    scaled = dev_images.astype(np.float64) / 255.0
    mean = channel_values(name, "mean", options.get("mean", [float(scaled.mean())]), 1)
    std = channel_values(name, "std", options.get("std", [max(float(scaled.std()), 1e-6)]), 1)
    return mean, std


def channel_values(name: str, option: str, value: Any, channels: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != channels or (option == "std" and min(values) <= 0):
        positive = " positive" if option == "std" else ""
        raise ValueError(f"dataset {name!r} option {option} must be {channels}{positive} number(s), got {value!r}")
    return values


def size2(value: Any) -> tuple[int, int]:
    try:
        dims = [int(value)] * 2 if isinstance(value, (int, float)) else [int(d) for d in value]
    except (TypeError, ValueError):
        dims = []
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"image_size must be a positive integer or [height, width], got {value!r}")
    return dims[0], dims[1]
