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

from workers.types import DatasetRef

DEFAULT_VAL_FRACTION = 0.1
# Share of digits held out as the fixed test split, and the split's fixed random state.
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_RANDOM_STATE = 0
# Per-split sample count of the synthetic dataset when the spec gives none.
SYNTHETIC_DEFAULT_NUM_SAMPLES = 256
# Loaded splits kept per process; small because a real dataset is hundreds of MB.
_CACHE_SIZE = 4
# Normalization of RGB datasets unless the spec gives ``mean`` / ``std``.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma weights, as PIL's convert("L") uses: RGB -> grey.
_LUMA_WEIGHTS = (0.299, 0.587, 0.114)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# imagefolder without train/ and test/ folders: the fixed, seed-independent test share.
IMAGEFOLDER_TEST_FRACTION = 0.2
IMAGEFOLDER_TEST_RANDOM_STATE = 0
# Images adapted per chunk, so resizing a split never holds two full copies at once.
_ADAPT_CHUNK = 1024


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
    shape = None if input_shape is None else _shape3(input_shape, "input_shape")
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


@dataclass(frozen=True)
class DatasetHeader:
    """What a spec check needs of a dataset, read without loading it."""

    num_classes: int
    input_shape: tuple[int, int, int]  # one sample's (C, H, W) as stored (before any conversion)


# imagefolder headers read to find the images' common size; beyond this the first are trusted.
_HEADER_IMAGES = 2000


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
        _reject_unknown_options("digits", options, ())
        return DatasetHeader(10, (1, 8, 8))
    if ref.name == "synthetic":
        shape, num_classes, _ = _synthetic_options(options)
        return DatasetHeader(num_classes, shape)
    if ref.name in _CIFAR:
        directory, layout = _cifar_directory(ref.name, ref.path, options)
        _rgb_statistics(ref.name, options)
        return DatasetHeader(_cifar_class_count(ref.name, directory, layout), (3, _CIFAR_SIDE, _CIFAR_SIDE))
    root, dev_files, test_files, classes, channels, image_size = _imagefolder_files(ref.path, options)
    if test_files is None:
        fraction = float(options.get("test_fraction", IMAGEFOLDER_TEST_FRACTION))
        if not 0 < fraction < 1:
            raise ValueError(f"imagefolder option test_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    if len(dev_files) < 2 or test_files == []:
        raise DatasetNotFoundError(f"imagefolder at {root} has no images in its train or test split: {_IMAGEFOLDER_WHERE}")
    if channels == 3:
        _rgb_statistics("imagefolder", options)
    size = image_size or _common_size(root, [f for f, _ in (dev_files + (test_files or []))[:_HEADER_IMAGES]])
    return DatasetHeader(len(classes), (channels, size[0], size[1]))


def adapt_images(images: torch.Tensor, input_shape: Sequence[int]) -> torch.Tensor:
    """``images`` (N, C, H, W) converted to ``input_shape`` (C', H', W'), on their device.

    Channels: grey is repeated to C' channels; RGB becomes grey by BT.601 luma weights
    (applied to the normalized values, so the result is only approximately normalized).
    Size: bilinear, antialiased when shrinking. Images already of that shape are
    returned as they are (no copy). Raises ``ValueError`` for other channel counts.
    """
    channels, height, width = _shape3(input_shape, "input_shape")
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


def _shape3(value: Any, what: str) -> tuple[int, int, int]:
    try:
        dims = [int(d) for d in value]
    except (TypeError, ValueError):
        dims = []
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(f"{what} must be three positive integers (C, H, W), got {value!r}")
    return dims[0], dims[1], dims[2]


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
    return shape, num_classes, num_samples


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _CifarLayout:
    """The files and keys of one CIFAR archive's python version."""

    archive_dir: str  # the directory the archive unpacks to
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    labels_key: bytes
    names_key: bytes


_CIFAR = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "batches.meta",
        b"labels",
        b"label_names",
    ),
    "cifar100": _CifarLayout("cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names"),
}
_CIFAR_SIDE = 32


def _load_cifar10(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
    return _load_cifar("cifar10", path, options, seed, val_fraction)


def _load_cifar100(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
    return _load_cifar("cifar100", path, options, seed, val_fraction)


def _load_cifar(name: str, path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
    """CIFAR-10 / CIFAR-100 (fine labels) from the python version of the archive.

    The directory holds the archive's files (or the directory the archive unpacks to).
    The test split is the archive's own test batch; validation is a seeded, stratified
    share of its training batches. Options: ``root``, ``mean``, ``std``.
    """
    directory, layout = _cifar_directory(name, path, options)
    num_classes = _cifar_class_count(name, directory, layout)
    dev_images, dev_labels = _read_cifar_batches(name, [directory / f for f in layout.train_files], layout, num_classes)
    test_images, test_labels = _read_cifar_batches(name, [directory / layout.test_file], layout, num_classes)

    train_idx, val_idx = _seeded_split(dev_labels, val_fraction, random_state=seed)
    mean, std = _rgb_statistics(name, options)
    return Splits(
        name=name,
        train=_normalized_subset(dev_images, dev_labels, train_idx, mean, std),
        val=_normalized_subset(dev_images, dev_labels, val_idx, mean, std),
        test=_normalized_subset(test_images, test_labels, np.arange(len(test_labels)), mean, std),
        num_classes=num_classes,
        input_shape=(3, _CIFAR_SIDE, _CIFAR_SIDE),
    )


def _cifar_directory(name: str, path: str | None, options: Mapping[str, Any]) -> tuple[Path, _CifarLayout]:
    """The directory holding every file of the archive (its own or the unpacked folder)."""
    _reject_unknown_options(name, options, ("root", "mean", "std"))
    layout = _CIFAR[name]
    wanted = (*layout.train_files, layout.test_file, layout.meta_file)
    listed = ", ".join(repr(f) for f in wanted[:-1]) + f" and {wanted[-1]!r}"
    where = f"put the {listed} files of {layout.archive_dir} there (from {CIFAR_URL})"
    root = _dataset_root(name, path, options, where)
    directory = next((d for d in (root, root / layout.archive_dir) if all((d / f).is_file() for f in wanted)), None)
    if directory is None:
        raise DatasetNotFoundError(f"{name} not found at {root}: {where}")
    return directory, layout


def _cifar_class_count(name: str, directory: Path, layout: _CifarLayout) -> int:
    """The number of class names in the archive's (small) meta file."""
    meta = _read_pickle(directory / layout.meta_file, name)
    names = meta.get(layout.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or len(names) < 2:
        raise DatasetFormatError(
            f"{name} file {directory / layout.meta_file} has no {layout.names_key.decode()!r} list; "
            f"replace it with the file from {CIFAR_URL}"
        )
    return len(names)


def _read_cifar_batches(
    name: str, files: list[Path], layout: _CifarLayout, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 images (N, 3, 32, 32) and int64 labels of some CIFAR batch files."""
    images, labels = [], []
    for file in files:
        batch = _read_pickle(file, name)
        data = batch.get(b"data") if isinstance(batch, dict) else None
        batch_labels = batch.get(layout.labels_key) if isinstance(batch, dict) else None
        side = _CIFAR_SIDE
        if (
            not isinstance(data, np.ndarray)
            or data.dtype != np.uint8
            or data.ndim != 2
            or data.shape[1] != 3 * side * side
            or batch_labels is None
            or len(batch_labels) != len(data)
        ):
            raise DatasetFormatError(
                f"{name} file {file} is not a CIFAR batch (expected uint8 b'data' of shape (N, 3072) and "
                f"{layout.labels_key!r} of length N); replace it with the file from {CIFAR_URL}"
            )
        label_array = np.asarray(batch_labels, dtype=np.int64)
        if len(label_array) and (label_array.min() < 0 or label_array.max() >= num_classes):
            raise DatasetFormatError(f"{name} file {file} has labels outside 0..{num_classes - 1}")
        images.append(data.reshape(-1, 3, side, side))
        labels.append(label_array)
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------- imagefolder


def _load_imagefolder(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
    """Images in one folder per class (class names sorted = label order, as torchvision).

    With ``train/`` and ``test/`` folders (each one folder per class) those are the
    splits; otherwise every image is in the root's class folders and a fixed, stratified
    ``test_fraction`` (default 0.2, independent of the seed) is the test split.
    Validation is a seeded, stratified share of the rest. Images are decoded with PIL,
    converted to RGB (``channels: 3``, default) or grey (``channels: 1``) and, when
    their sizes differ from ``image_size`` (int or [H, W]; default: the size of the
    images when they all have one), resized bilinearly. Options: ``root``,
    ``image_size``, ``channels``, ``mean``, ``std``, ``test_fraction``.
    """
    root, dev_files, test_files, classes, channels, image_size = _imagefolder_files(path, options)
    if test_files is None:
        fraction = float(options.get("test_fraction", IMAGEFOLDER_TEST_FRACTION))
        if not 0 < fraction < 1:
            raise ValueError(f"imagefolder option test_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
        labels = np.array([label for _, label in dev_files])
        dev_pos, test_pos = _seeded_split(labels, fraction, random_state=IMAGEFOLDER_TEST_RANDOM_STATE)
        dev_files, test_files = [dev_files[i] for i in dev_pos], [dev_files[i] for i in test_pos]
    if not dev_files or not test_files:
        raise DatasetNotFoundError(f"imagefolder at {root} has no images in its train or test split: {_IMAGEFOLDER_WHERE}")

    size = image_size or _common_size(root, [f for f, _ in dev_files + test_files])
    dev_images, dev_labels = _decode_images(dev_files, size, channels)
    test_images, test_labels = _decode_images(test_files, size, channels)
    train_idx, val_idx = _seeded_split(dev_labels, val_fraction, random_state=seed)

    if channels == 3:
        mean, std = _rgb_statistics("imagefolder", options)
    else:
        mean, std = _grey_statistics("imagefolder", options, dev_images)
    return Splits(
        name="imagefolder",
        train=_normalized_subset(dev_images, dev_labels, train_idx, mean, std),
        val=_normalized_subset(dev_images, dev_labels, val_idx, mean, std),
        test=_normalized_subset(test_images, test_labels, np.arange(len(test_labels)), mean, std),
        num_classes=len(classes),
        input_shape=(channels, size[0], size[1]),
    )


_IMAGEFOLDER_WHERE = (
    "put one folder of images per class there (or train/ and test/ folders, each with one folder per class)"
)


def _imagefolder_files(
    path: str | None, options: Mapping[str, Any]
) -> tuple[Path, list[tuple[str, int]], list[tuple[str, int]] | None, list[str], int, tuple[int, int] | None]:
    """(root, dev files, test files -- None without train/ and test/ folders --, class
    names, channels, image_size option) of an imagefolder, options checked; no image is
    opened."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    _reject_unknown_options(
        "imagefolder", options, ("root", "image_size", "channels", "mean", "std", "test_fraction")
    )
    root = _dataset_root("imagefolder", path, options, _IMAGEFOLDER_WHERE)
    split_dirs = (root / "train").is_dir() and (root / "test").is_dir()
    dev_dir = root / "train" if split_dirs else root
    classes = sorted(d.name for d in dev_dir.iterdir() if d.is_dir()) if dev_dir.is_dir() else []
    if len(classes) < 2:
        raise DatasetNotFoundError(
            f"imagefolder not found at {root} (it needs at least 2 class folders): {_IMAGEFOLDER_WHERE}")
    class_to_idx = {c: i for i, c in enumerate(classes)}

    channels = int(options.get("channels", 3))
    if channels not in (1, 3):
        raise ValueError(f"imagefolder option channels must be 1 or 3, got {options['channels']!r}")
    image_size = None if options.get("image_size") is None else _size2(options["image_size"])

    dev_files = _image_files(dev_dir, class_to_idx, IMG_EXTENSIONS)
    test_files = _image_files(root / "test", class_to_idx, IMG_EXTENSIONS) if split_dirs else None
    return root, dev_files, test_files, classes, channels, image_size


def _image_files(
    directory: Path, class_to_idx: Mapping[str, int], extensions: tuple[str, ...]
) -> list[tuple[str, int]]:
    """(path, label) of every image under ``directory``'s class folders, in a fixed order."""
    from torchvision.datasets.folder import make_dataset

    present = {d.name for d in directory.iterdir() if d.is_dir()}
    unknown = sorted(present - set(class_to_idx))
    if unknown:
        raise DatasetFormatError(
            f"imagefolder {directory} has class folders the training data lacks ({', '.join(unknown[:3])}); "
            "give train/ and test/ the same class folders"
        )
    known = {c: i for c, i in class_to_idx.items() if c in present}
    return make_dataset(str(directory), known, extensions=extensions, allow_empty=True)


def _common_size(root: Path, files: list[str]) -> tuple[int, int]:
    """The (H, W) all images share; an error naming ``image_size`` when they differ."""
    from PIL import Image

    sizes: dict[tuple[int, int], str] = {}
    for file in files:
        with Image.open(file) as image:
            sizes.setdefault((image.height, image.width), file)
        if len(sizes) > 1:
            (a, _), (b, _) = sizes.items()
            raise ValueError(
                f"imagefolder images at {root} have different sizes ({a[0]}x{a[1]} and {b[0]}x{b[1]}); "
                "set dataset.options.image_size (e.g. 224) to resize them to one"
            )
    return next(iter(sizes))


def _decode_images(files: list[tuple[str, int]], size: tuple[int, int], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, C, H, W) and int64 labels; PIL converts modes and resizes bilinearly."""
    from PIL import Image, UnidentifiedImageError

    height, width = size
    images = np.empty((len(files), channels, height, width), dtype=np.uint8)
    for i, (file, _) in enumerate(files):
        try:
            with Image.open(file) as image:
                converted = image.convert("RGB" if channels == 3 else "L")
        except (UnidentifiedImageError, OSError) as e:
            raise DatasetFormatError(
                f"imagefolder file {file} is not a readable image ({e}); remove or replace it"
            ) from e
        if converted.size != (width, height):
            converted = converted.resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(converted, dtype=np.uint8)
        images[i] = array.transpose(2, 0, 1) if channels == 3 else array[None]
    return images, np.array([label for _, label in files], dtype=np.int64)


# --------------------------------------------------------------------------- shared helpers


def _dataset_root(name: str, path: str | None, options: Mapping[str, Any], where: str) -> Path:
    """``path``, else the ``root`` option; relative roots resolve against the working directory."""
    location = path or options.get("root")
    if not location:
        raise DatasetNotFoundError(
            f"dataset {name!r} needs its directory: set dataset.path or dataset.options.root, then {where}"
        )
    return Path(str(location)).expanduser().resolve()


def _seeded_split(labels: np.ndarray, fraction: float, *, random_state: int) -> tuple[np.ndarray, np.ndarray]:
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


def _normalized_subset(
    images: np.ndarray, labels: np.ndarray, idx: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> TensorDataset:
    """uint8 images at positions ``idx`` as float32 in [0, 1], normalized per channel."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    chosen = torch.from_numpy(np.ascontiguousarray(images[idx])).to(torch.float32).div_(255.0)
    return TensorDataset(chosen.sub_(mean_t).div_(std_t), torch.from_numpy(labels[idx]).to(torch.int64))


def _rgb_statistics(name: str, options: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = _channel_values(name, "mean", options.get("mean", IMAGENET_MEAN), 3)
    std = _channel_values(name, "std", options.get("std", IMAGENET_STD), 3)
    return mean, std


def _grey_statistics(
    name: str, options: Mapping[str, Any], dev_images: np.ndarray
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``mean``/``std`` options, else the statistics of the non-test images in [0, 1]."""
    scaled = dev_images.astype(np.float64) / 255.0
    mean = _channel_values(name, "mean", options.get("mean", [float(scaled.mean())]), 1)
    std = _channel_values(name, "std", options.get("std", [max(float(scaled.std()), 1e-6)]), 1)
    return mean, std


def _channel_values(name: str, option: str, value: Any, channels: int) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != channels or (option == "std" and min(values) <= 0):
        positive = " positive" if option == "std" else ""
        raise ValueError(f"dataset {name!r} option {option} must be {channels}{positive} number(s), got {value!r}")
    return values


def _size2(value: Any) -> tuple[int, int]:
    try:
        dims = [int(value)] * 2 if isinstance(value, (int, float)) else [int(d) for d in value]
    except (TypeError, ValueError):
        dims = []
    if len(dims) != 2 or min(dims) < 1:
        raise ValueError(f"image_size must be a positive integer or [height, width], got {value!r}")
    return dims[0], dims[1]


# --------------------------------------------------------------------------- safe unpickling


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes at protocol <= 2, limited to latin-1."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codec {encoding!r} is not allowed in a dataset file")
    return codecs.encode(text, "latin1")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any] | type]:
    """The only globals a dataset pickle may name: numpy array reconstruction.

    CIFAR's files (Python 2 cPickle) name ``numpy.core.multiarray._reconstruct``,
    ``numpy.ndarray`` and ``numpy.dtype``; the same arrays re-pickled by Python 3 may use
    numpy 2's ``numpy._core`` names, ``_frombuffer`` (protocol 5) or ``_codecs.encode``
    (bytes at protocol <= 2). The objects are taken from this numpy, not imported by name.
    """
    reconstruct = np.zeros(1).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]
    allowed: dict[tuple[str, str], Callable[..., Any] | type] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = frombuffer
    allowed[("_codecs", "encode")] = _latin1_encode
    return allowed


class _DatasetUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and plain containers and nothing else,
    so a tampered dataset file cannot run code (the globals are the whole attack surface)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals().get((module, name))
        if allowed is None:
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        return allowed


def _read_pickle(file: Path, dataset: str) -> Any:
    """One dataset pickle, read with :class:`_DatasetUnpickler` (Python 2 strings as bytes)."""
    try:
        with open(file, "rb") as f:
            return _DatasetUnpickler(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DatasetFormatError(
            f"{dataset} file {file} was refused: {e}, which a dataset file never needs (only numpy arrays, "
            f"lists, dicts and bytes are allowed); replace it with the file from the official archive"
        ) from e
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as e:
        raise DatasetFormatError(f"{dataset} file {file} is not a readable pickle ({type(e).__name__}: {e})") from e


_LOADERS = {
    "digits": _load_digits,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "imagefolder": _load_imagefolder,
    "synthetic": _load_synthetic,
}
