"""workers.data: fixed test split, seeded validation split, synthetic data, errors."""

from __future__ import annotations

import pytest
import torch

from workers import data
from workers.data import Splits, check_input_shape, load_dataset
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
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; known datasets: digits, synthetic"):
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
    with pytest.raises(ValueError, match=r"\(1, 8, 8\).*expects \(3, 224, 224\).*in_chans=1, img_size=8"):
        check_input_shape(splits, (3, 224, 224))
