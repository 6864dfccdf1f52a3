"""Tests for scaleforge.data.digits: scikit-learn's digits, read without importing scikit-learn."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from scaleforge.data import digits as digits_module
from scaleforge.data.digits import digits


def test_the_shipped_file_is_read_exactly_as_scikit_learn_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from sklearn.datasets import load_digits

    pixels, labels = digits_module._load_digits()
    expected_pixels, expected_labels = load_digits(return_X_y=True)
    np.testing.assert_array_equal(pixels, expected_pixels)
    np.testing.assert_array_equal(labels, expected_labels)
    # where the file is not found, scikit-learn's own loader gives the same data
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    fallback_pixels, fallback_labels = digits_module._load_digits()
    np.testing.assert_array_equal(fallback_pixels, expected_pixels)
    np.testing.assert_array_equal(fallback_labels, expected_labels)


def test_the_splits_are_images_in_zero_to_one_with_a_fixed_validation_share() -> None:
    splits = digits(val_fraction=0.2, split_seed=0)
    assert len(splits.val) == 359 and len(splits.train) == 1797 - 359
    images, labels = splits.train.inputs, splits.train.targets
    assert images.shape[1:] == (1, 8, 8) and float(images.min()) >= 0.0 and float(images.max()) == 1.0
    assert sorted(set(labels.tolist())) == list(range(10))
