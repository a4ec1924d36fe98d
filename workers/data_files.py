"""The file-based datasets of :mod:`workers.data`: CIFAR-10 / CIFAR-100 (the python
version of the archives) and imagefolder (one folder of images per class).

Both read from a local directory and never download. CIFAR's files are pickles, read by
an unpickler that can build numpy arrays and nothing else (:class:`_DatasetUnpickler`),
so a tampered file cannot run code. ``*_header`` read only what a spec check needs.
"""

from __future__ import annotations

import codecs
import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from workers.data_common import (
    DatasetFormatError,
    DatasetHeader,
    DatasetNotFoundError,
    Splits,
    dataset_root,
    grey_statistics,
    normalized_subset,
    reject_unknown_options,
    rgb_statistics,
    seeded_split,
    size2,
)

__all__ = [
    "CIFAR_URL",
    "IMAGEFOLDER_TEST_FRACTION",
    "IMAGEFOLDER_TEST_RANDOM_STATE",
    "cifar_header",
    "imagefolder_header",
    "load_cifar10",
    "load_cifar100",
    "load_imagefolder",
]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
# imagefolder without train/ and test/ folders: the fixed, seed-independent test share.
IMAGEFOLDER_TEST_FRACTION = 0.2
IMAGEFOLDER_TEST_RANDOM_STATE = 0
# imagefolder headers read to find the images' common size; beyond this the first are trusted.
_HEADER_IMAGES = 2000


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


def load_cifar10(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
    return _load_cifar("cifar10", path, options, seed, val_fraction)


def load_cifar100(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
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

    train_idx, val_idx = seeded_split(dev_labels, val_fraction, random_state=seed)
    mean, std = rgb_statistics(name, options)
    return Splits(
        name=name,
        train=normalized_subset(dev_images, dev_labels, train_idx, mean, std),
        val=normalized_subset(dev_images, dev_labels, val_idx, mean, std),
        test=normalized_subset(test_images, test_labels, np.arange(len(test_labels)), mean, std),
        num_classes=num_classes,
        input_shape=(3, _CIFAR_SIDE, _CIFAR_SIDE),
    )


def _cifar_directory(name: str, path: str | None, options: Mapping[str, Any]) -> tuple[Path, _CifarLayout]:
    """The directory holding every file of the archive (its own or the unpacked folder)."""
    reject_unknown_options(name, options, ("root", "mean", "std"))
    layout = _CIFAR[name]
    wanted = (*layout.train_files, layout.test_file, layout.meta_file)
    listed = ", ".join(repr(f) for f in wanted[:-1]) + f" and {wanted[-1]!r}"
    where = f"put the {listed} files of {layout.archive_dir} there (from {CIFAR_URL})"
    root = dataset_root(name, path, options, where)
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

def cifar_header(name: str, path: str | None, options: Mapping[str, Any]) -> DatasetHeader:
    """Class count and sample shape of CIFAR ``name`` from its small meta file only."""
    directory, layout = _cifar_directory(name, path, options)
    rgb_statistics(name, options)
    return DatasetHeader(_cifar_class_count(name, directory, layout), (3, _CIFAR_SIDE, _CIFAR_SIDE))


# --------------------------------------------------------------------------- imagefolder


def load_imagefolder(path: str | None, options: Mapping[str, Any], seed: int, val_fraction: float) -> Splits:
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
        dev_pos, test_pos = seeded_split(labels, fraction, random_state=IMAGEFOLDER_TEST_RANDOM_STATE)
        dev_files, test_files = [dev_files[i] for i in dev_pos], [dev_files[i] for i in test_pos]
    if not dev_files or not test_files:
        raise DatasetNotFoundError(f"imagefolder at {root} has no images in its train or test split: {_IMAGEFOLDER_WHERE}")

    size = image_size or _common_size(root, [f for f, _ in dev_files + test_files])
    dev_images, dev_labels = _decode_images(dev_files, size, channels)
    test_images, test_labels = _decode_images(test_files, size, channels)
    train_idx, val_idx = seeded_split(dev_labels, val_fraction, random_state=seed)

    if channels == 3:
        mean, std = rgb_statistics("imagefolder", options)
    else:
        mean, std = grey_statistics("imagefolder", options, dev_images)
    return Splits(
        name="imagefolder",
        train=normalized_subset(dev_images, dev_labels, train_idx, mean, std),
        val=normalized_subset(dev_images, dev_labels, val_idx, mean, std),
        test=normalized_subset(test_images, test_labels, np.arange(len(test_labels)), mean, std),
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

    reject_unknown_options(
        "imagefolder", options, ("root", "image_size", "channels", "mean", "std", "test_fraction")
    )
    root = dataset_root("imagefolder", path, options, _IMAGEFOLDER_WHERE)
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
    image_size = None if options.get("image_size") is None else size2(options["image_size"])

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

def imagefolder_header(path: str | None, options: Mapping[str, Any]) -> DatasetHeader:
    """Class count and sample shape of an imagefolder from its class folders and the
    headers of (at most ``_HEADER_IMAGES``) images; no image is decoded."""
    root, dev_files, test_files, classes, channels, image_size = _imagefolder_files(path, options)
    if test_files is None:
        fraction = float(options.get("test_fraction", IMAGEFOLDER_TEST_FRACTION))
        if not 0 < fraction < 1:
            raise ValueError(f"imagefolder option test_fraction must be between 0 and 1 (exclusive), got {fraction!r}")
    if len(dev_files) < 2 or test_files == []:
        raise DatasetNotFoundError(f"imagefolder at {root} has no images in its train or test split: {_IMAGEFOLDER_WHERE}")
    if channels == 3:
        rgb_statistics("imagefolder", options)
    size = image_size or _common_size(root, [f for f, _ in (dev_files + (test_files or []))[:_HEADER_IMAGES]])
    return DatasetHeader(len(classes), (channels, size[0], size[1]))


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
