"""workers.data: fixed test split, seeded validation split, synthetic data, CIFAR and
image folders from tiny files written here, safe unpickling, resizing, errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from workers import data
from workers.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DatasetFormatError,
    DatasetNotFoundError,
    Splits,
    adapt_images,
    check_input_shape,
    load_dataset,
)
from workers.types import DatasetRef

DIGITS = DatasetRef("digits")
DIGITS_SIZE = 1797


@pytest.fixture(autouse=True)
def _fresh_cache():
    data._load_cached.cache_clear()
    yield
    data._load_cached.cache_clear()


def _rows(split: torch.utils.data.TensorDataset) -> set[bytes]:
    return {row.numpy().tobytes() for row in split.tensors[0].flatten(1)}


def test_digits_shapes_dtypes_and_sizes():
    splits = load_dataset(DIGITS, seed=0)
    assert (splits.name, splits.num_classes, splits.input_shape, splits.synthetic) == ("digits", 10, (1, 8, 8), False)
    for split in (splits.train, splits.val, splits.test):
        images, labels = split.tensors
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape[1:] == (1, 8, 8) and len(images) == len(labels)
    assert len(splits.test) == 360  # 20 % of 1,797, rounded up by scikit-learn
    assert len(splits.val) == 144  # 10 % of the remaining 1,437
    assert len(splits.train) + len(splits.val) + len(splits.test) == DIGITS_SIZE


def test_digits_splits_are_disjoint_and_cover_the_dataset():
    splits = load_dataset(DIGITS, seed=3)
    train, val, test = _rows(splits.train), _rows(splits.val), _rows(splits.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert len(train | val | test) == DIGITS_SIZE  # the digits images are all distinct


def test_digits_test_split_is_fixed_across_seeds_and_val_fractions():
    reference = load_dataset(DIGITS, seed=0).test.tensors
    for seed, fraction in ((1, 0.1), (7, 0.25)):
        other = load_dataset(DIGITS, seed=seed, val_fraction=fraction).test.tensors
        assert torch.equal(reference[0], other[0]) and torch.equal(reference[1], other[1])


def test_digits_val_split_follows_the_seed():
    first = load_dataset(DIGITS, seed=0).val.tensors[0]
    data._load_cached.cache_clear()
    again = load_dataset(DIGITS, seed=0).val.tensors[0]
    other = load_dataset(DIGITS, seed=1).val.tensors[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_digits_val_split_is_stratified():
    counts = torch.bincount(load_dataset(DIGITS, seed=5).val.tensors[1], minlength=10)
    assert counts.min() >= 13 and counts.max() <= 16


def test_digits_normalized_with_non_test_statistics():
    splits = load_dataset(DIGITS, seed=0)
    dev = torch.cat([splits.train.tensors[0], splits.val.tensors[0]])
    assert dev.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert dev.std().item() == pytest.approx(1.0, abs=1e-4)


def test_val_fraction_argument_wins_over_option():
    from_option = load_dataset(DatasetRef("digits", options={"val_fraction": 0.2}), seed=0)
    from_argument = load_dataset(DatasetRef("digits", options={"val_fraction": 0.2}), seed=0, val_fraction=0.3)
    assert len(from_option.val) == 288
    assert len(from_argument.val) == 432


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_val_fraction_out_of_range(fraction):
    with pytest.raises(ValueError, match="val_fraction"):
        load_dataset(DIGITS, seed=0, val_fraction=fraction)


def test_loaded_splits_are_cached_per_process():
    assert load_dataset(DIGITS, seed=0) is load_dataset(DatasetRef("digits"), seed=0)
    assert load_dataset(DIGITS, seed=0) is not load_dataset(DIGITS, seed=1)


def test_unknown_dataset_names_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'imagenet'; known datasets: digits, cifar10, cifar100, imagefolder, synthetic"
    ):
        load_dataset(DatasetRef("imagenet"), seed=0)


def test_digits_rejects_unknown_options():
    with pytest.raises(ValueError, match="no option"):
        load_dataset(DatasetRef("digits", options={"img_size": 32}), seed=0)


def test_synthetic_shapes_and_flag():
    ref = DatasetRef("synthetic", options={"input_shape": [3, 16, 16], "num_classes": 7, "num_samples": 40})
    splits = load_dataset(ref, seed=0)
    assert splits.synthetic and splits.input_shape == (3, 16, 16) and splits.num_classes == 7
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 4, 40)
    images, labels = splits.test.tensors
    assert images.shape == (40, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 7


def test_synthetic_is_seeded():
    ref = DatasetRef("synthetic", options={"input_shape": [1, 4, 4], "num_classes": 3, "num_samples": 8})
    first = load_dataset(ref, seed=0).test.tensors[0]
    data._load_cached.cache_clear()
    assert torch.equal(first, load_dataset(ref, seed=0).test.tensors[0])
    assert not torch.equal(first, load_dataset(ref, seed=1).test.tensors[0])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_classes": 3}, "needs option"),
        ({"input_shape": [3, 8], "num_classes": 3}, "three positive integers"),
        ({"input_shape": 8, "num_classes": 3}, "three positive integers"),
        ({"input_shape": [3, 8, 8], "num_classes": 1}, "num_classes >= 2"),
        ({"input_shape": [3, 8, 8], "num_classes": 3, "size": 10}, "no option"),
    ],
)
def test_synthetic_option_errors(options, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(DatasetRef("synthetic", options=options), seed=0)


def test_check_input_shape():
    splits: Splits = load_dataset(DIGITS, seed=0)
    check_input_shape(splits, (1, 8, 8))
    check_input_shape(splits, [1, 8, 8])  # as read back from a JSON manifest
    with pytest.raises(ValueError, match=r"\(1, 8, 8\).*expects \(3, 224, 224\).*input_shape=.*in_chans=1, img_size=8"):
        check_input_shape(splits, (3, 224, 224))


# --------------------------------------------------------------------------- resizing


def test_adapt_images_converts_channels_and_resizes():
    grey = torch.rand(2, 1, 8, 8)
    rgb = adapt_images(grey, (3, 16, 16))
    assert rgb.shape == (2, 3, 16, 16)
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    back = adapt_images(adapt_images(grey, (3, 8, 8)), (1, 8, 8))  # luma weights sum to 1
    torch.testing.assert_close(back, grey)
    assert adapt_images(grey, (1, 8, 8)) is grey  # nothing to do, no copy
    constant = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(adapt_images(constant, (3, 7, 9)), torch.full((1, 3, 7, 9), 0.7))  # bilinear, antialiased
    with pytest.raises(ValueError, match="cannot convert 2-channel images to 3 channels"):
        adapt_images(torch.rand(1, 2, 4, 4), (3, 4, 4))


def test_load_dataset_adapts_every_split_to_an_input_shape():
    native = load_dataset(DIGITS, seed=0)
    resized = load_dataset(DIGITS, seed=0, input_shape=(3, 16, 16))
    assert resized.input_shape == (3, 16, 16)
    assert len(resized.train) == len(native.train)
    assert resized.train._tensors is None  # converted on first use only: a stage may need one split
    for name in ("train", "val", "test"):
        images, labels = getattr(resized, name).tensors
        assert images.shape[1:] == (3, 16, 16) and torch.equal(labels, getattr(native, name).tensors[1])
    torch.testing.assert_close(resized.test.tensors[0], adapt_images(native.test.tensors[0], (3, 16, 16)))
    check_input_shape(resized, [3, 16, 16])


# --------------------------------------------------------------------------- CIFAR


def _cifar_batch(labels: list[int], labels_key: bytes, seed: int) -> dict[bytes, object]:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"tiny batch",
        labels_key: labels,
        b"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }


def _dump(path: Path, obj: object, protocol: int) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def _write_cifar10(directory: Path) -> dict[str, dict[bytes, object]]:
    """The cifar-10-batches-py layout, 20 training and 6 test images, pickled at protocol 2
    with numpy 1's module name, as in the archive's own (Python 2 cPickle) files."""
    directory.mkdir(parents=True)
    batches = {
        f"data_batch_{i}": _cifar_batch([(4 * (i - 1) + j) % 10 for j in range(4)], b"labels", i) for i in range(1, 6)
    }
    batches["test_batch"] = _cifar_batch([0, 1, 2, 3, 4, 5], b"labels", 9)
    for name, batch in batches.items():
        raw = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
        assert b"numpy.core.multiarray\n_reconstruct" in raw
        (directory / name).write_bytes(raw)
    _dump(directory / "batches.meta", {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, 2)
    return batches


def _write_cifar100(directory: Path) -> dict[str, dict[bytes, object]]:
    """The cifar-100-python layout: 2 training images per class, 5 test images."""
    directory.mkdir(parents=True)
    train = _cifar_batch([i % 100 for i in range(200)], b"fine_labels", 1)
    train[b"coarse_labels"] = [i % 20 for i in range(200)]
    test = _cifar_batch([7, 3, 99, 0, 50], b"fine_labels", 2)
    _dump(directory / "train", train, pickle.HIGHEST_PROTOCOL)
    _dump(directory / "test", test, pickle.HIGHEST_PROTOCOL)
    names = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": [b"c"] * 20}
    _dump(directory / "meta", names, pickle.HIGHEST_PROTOCOL)
    return {"train": train, "test": test}


def _normalized(raw: np.ndarray) -> torch.Tensor:
    images = torch.from_numpy(raw.reshape(-1, 3, 32, 32)).float() / 255
    return (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_cifar10_from_the_python_batches(tmp_path):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py")
    splits = load_dataset(DatasetRef("cifar10", path=str(tmp_path / "cifar-10-batches-py")), seed=0, val_fraction=0.5)
    assert (splits.name, splits.num_classes, splits.input_shape) == ("cifar10", 10, (3, 32, 32))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 10, 6)
    test_images, test_labels = splits.test.tensors
    assert test_labels.tolist() == [0, 1, 2, 3, 4, 5]  # the archive's own test batch, in order
    torch.testing.assert_close(test_images, _normalized(batches["test_batch"][b"data"]))
    assert sorted(splits.val.tensors[1].tolist()) == list(range(10))  # stratified: one per class


def test_cifar10_validation_split_follows_the_seed_and_test_does_not(tmp_path):
    _write_cifar10(tmp_path / "c")
    ref = DatasetRef("cifar10", options={"root": str(tmp_path / "c")})
    first, other = load_dataset(ref, seed=0, val_fraction=0.5), load_dataset(ref, seed=1, val_fraction=0.5)
    assert not torch.equal(first.val.tensors[0], other.val.tensors[0])
    assert torch.equal(first.test.tensors[0], other.test.tensors[0])


def test_cifar100_from_the_archive_directory_with_model_statistics(tmp_path):
    files = _write_cifar100(tmp_path / "data" / "cifar-100-python")
    options = {"root": str(tmp_path / "data"), "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    splits = load_dataset(DatasetRef("cifar100", options=options), seed=0, val_fraction=0.1)
    assert (splits.num_classes, splits.input_shape, len(splits.test)) == (100, (3, 32, 32), 5)
    assert splits.test.tensors[1].tolist() == [7, 3, 99, 0, 50]  # fine labels
    expected = torch.from_numpy(files["test"][b"data"].reshape(-1, 3, 32, 32)).float() / 255 * 2 - 1
    torch.testing.assert_close(splits.test.tensors[0], expected)
    assert len(splits.train) + len(splits.val) == 200


def test_a_missing_cifar_says_which_files_to_put_where(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(DatasetRef("cifar100", options={"root": str(where)}), seed=0)
    message = str(info.value)
    assert message == (
        f"cifar100 not found at {where}: put the 'train', 'test' and 'meta' files of cifar-100-python there "
        "(from https://www.cs.toronto.edu/~kriz/cifar.html)"
    )
    with pytest.raises(DatasetNotFoundError, match="'cifar10' needs its directory: set dataset.path or dataset.options.root"):
        load_dataset(DatasetRef("cifar10"), seed=0)


class _Payload:
    """A pickle that would create a directory when loaded by a plain unpickler."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


class _EvalPayload:
    def __reduce__(self):
        return eval, ("1 + 1",)


@pytest.mark.parametrize("payload, named", [("mkdir", "posix.mkdir"), ("eval", "__builtin__.eval")])
def test_a_dataset_pickle_that_would_run_code_is_refused(tmp_path, payload, named):
    # protocol 2 names builtins by their Python 2 module, __builtin__
    directory = tmp_path / "cifar-100-python"
    _write_cifar100(directory)
    target = tmp_path / "pwned"
    obj = _Payload(target) if payload == "mkdir" else _EvalPayload()
    _dump(directory / "train", {b"data": obj, b"fine_labels": [0]}, 2)
    with pytest.raises(DatasetFormatError, match=rf"file .*train was refused: it names {named}, which a dataset file never needs"):
        load_dataset(DatasetRef("cifar100", path=str(directory)), seed=0)
    assert not target.exists()


def test_a_cifar_file_of_another_shape_is_refused(tmp_path):
    directory = tmp_path / "c"
    _write_cifar100(directory)
    _dump(directory / "test", {b"data": np.zeros((2, 10), dtype=np.uint8), b"fine_labels": [0, 1]}, 2)
    with pytest.raises(DatasetFormatError, match="is not a CIFAR batch"):
        load_dataset(DatasetRef("cifar100", path=str(directory)), seed=0)


# --------------------------------------------------------------------------- imagefolder


def _write_images(directory: Path, classes: dict[str, int], *, size=(12, 10), mode="RGB") -> None:
    """``classes`` maps a class name to how many images it gets; each class has its own colour."""
    from PIL import Image

    for c, (name, count) in enumerate(sorted(classes.items())):
        (directory / name).mkdir(parents=True)
        for i in range(count):
            colour = (40 * c + i, 255 - 40 * c, 100) if mode == "RGB" else 40 * c + i
            Image.new(mode, size, colour).save(directory / name / f"{i}.png")


def test_imagefolder_flat_layout_has_a_fixed_stratified_test_split(tmp_path):
    _write_images(tmp_path, {"cat": 10, "dog": 10, "emu": 10})
    ref = DatasetRef("imagefolder", path=str(tmp_path), options={"image_size": 8})
    splits = load_dataset(ref, seed=0, val_fraction=0.25)
    assert (splits.num_classes, splits.input_shape) == (3, (3, 8, 8))
    assert torch.bincount(splits.test.tensors[1]).tolist() == [2, 2, 2]  # 20 %, stratified
    assert len(splits.train) + len(splits.val) == 24
    other = load_dataset(ref, seed=5, val_fraction=0.25)
    assert torch.equal(splits.test.tensors[0], other.test.tensors[0])
    assert not torch.equal(splits.val.tensors[0], other.val.tensors[0])
    # a solid colour survives decoding and resizing: class "dog" (label 1) is (40, 215, 100) + i
    red = splits.test.tensors[0][splits.test.tensors[1] == 1][:, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert ((red * 255).round() >= 40).all() and ((red * 255).round() < 50).all()


def test_imagefolder_train_and_test_folders_and_grey(tmp_path):
    _write_images(tmp_path / "train", {"a": 4, "b": 4}, mode="L")
    _write_images(tmp_path / "test", {"a": 2, "b": 1}, mode="L")
    splits = load_dataset(DatasetRef("imagefolder", path=str(tmp_path), options={"channels": 1}), seed=0, val_fraction=0.25)
    assert splits.input_shape == (1, 10, 12)  # the images' own size (H, W)
    assert splits.test.tensors[1].tolist() == [0, 0, 1]
    dev = torch.cat([splits.train.tensors[0], splits.val.tensors[0]])
    assert dev.mean().item() == pytest.approx(0.0, abs=1e-5)  # grey: normalized with its own statistics


def test_imagefolder_of_mixed_sizes_asks_for_image_size(tmp_path):
    _write_images(tmp_path, {"a": 3}, size=(12, 10))
    _write_images(tmp_path, {"b": 3}, size=(16, 16))
    with pytest.raises(ValueError, match="different sizes.*set dataset.options.image_size"):
        load_dataset(DatasetRef("imagefolder", path=str(tmp_path)), seed=0)


def test_a_missing_imagefolder_says_what_to_put_there(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="imagefolder not found at .*one folder of images per class"):
        load_dataset(DatasetRef("imagefolder", path=str(tmp_path / "none")), seed=0)
