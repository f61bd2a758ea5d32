"""Bundled datasets: shapes, fixed seeded splits, standardisation from the training split only, missing extras."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest

from purebp import data


def _check_classification(dataset, n_train, n_test, n_features, num_classes):
    assert dataset.x_train.shape == (n_train, n_features) and dataset.x_test.shape == (n_test, n_features)
    assert dataset.y_train.shape == (n_train,) and dataset.y_test.shape == (n_test,)
    assert dataset.x_train.dtype == np.float32 and dataset.y_train.dtype == np.int32
    assert dataset.num_classes == dataset.n_outputs == num_classes
    assert set(np.unique(dataset.y_train)) == set(range(num_classes))
    assert np.all(np.isfinite(dataset.x_train)) and np.all(np.isfinite(dataset.x_test))


def test_digits_shapes_split_and_standardisation():
    from sklearn.datasets import load_digits

    dataset = data.load_digits(dtype="float64")
    assert dataset.x_train.shape == (1438, 64) and dataset.x_test.shape == (359, 64)
    _check_classification(data.load_digits(), 1438, 359, 64, 10)
    # the split is the seeded permutation; the statistics come from the training rows only
    raw = load_digits()
    train, test = data.split_indices(1797, 0.2, 0)
    mean, std = raw.data[train].mean(axis=0), raw.data[train].std(axis=0)
    std = np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(dataset.x_train, (raw.data[train] - mean) / std, rtol=0, atol=1e-12)
    np.testing.assert_allclose(dataset.x_test, (raw.data[test] - mean) / std, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(dataset.y_test, raw.target[test])
    varying = raw.data[train].std(axis=0) > 0
    np.testing.assert_allclose(dataset.x_train.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(dataset.x_train.std(axis=0)[varying], 1.0, rtol=1e-12)
    assert np.max(np.abs(dataset.x_test.mean(axis=0))) > 1e-3  # the test split was not used to fit


def test_splits_are_fixed_by_the_seed_and_disjoint():
    first, second, other = data.load_digits(), data.load_digits(), data.load_digits(seed=1)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    np.testing.assert_array_equal(first.y_test, second.y_test)
    assert not np.array_equal(first.y_test, other.y_test)
    train, test = data.split_indices(100, 0.25, 3)
    assert len(test) == 25 and len(np.intersect1d(train, test)) == 0 and len(np.union1d(train, test)) == 100
    with pytest.raises(ValueError, match="test_fraction must lie strictly between 0 and 1"):
        data.split_indices(100, 1.0, 0)


def test_raw_inputs_are_kept_when_asked():
    dataset = data.load_digits(standardized=False)
    assert dataset.x_train.min() == 0.0 and dataset.x_train.max() == 16.0


def test_mnist1d_is_generated_offline_and_restores_the_global_generators(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the package's get_dataset would write a pickle here: make_dataset must not
    data._mnist1d_raw.cache_clear()
    np.random.seed(123)
    random.seed(456)
    numpy_state, python_state = np.random.get_state(), random.getstate()
    dataset = data.load_mnist1d()
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
    assert random.getstate() == python_state
    assert list(tmp_path.iterdir()) == []
    _check_classification(dataset, 4000, 1000, 40, 10)
    np.testing.assert_array_equal(dataset.y_train, data.load_mnist1d().y_train)


def test_mnist5k_has_the_notes_784_inputs_and_no_nan_from_constant_pixels():
    dataset = data.load_mnist5k()
    _check_classification(dataset, 4000, 1000, 784, 10)
    raw = data.load_mnist5k(standardized=False)
    assert raw.x_train.min() == 0.0 and raw.x_train.max() == 1.0  # pixels / 255
    constant = raw.x_train.std(axis=0) == 0
    assert constant.any()  # border pixels: centred, not divided by 0
    np.testing.assert_array_equal(dataset.x_train[:, constant], 0.0)


def test_synthetic_sets_are_seeded():
    first, second, other = data.load_synthetic(), data.load_synthetic(), data.load_synthetic(seed=1)
    _check_classification(first, 1600, 400, 20, 4)
    np.testing.assert_array_equal(first.x_train, second.x_train)
    assert not np.array_equal(first.x_train, other.x_train)
    regression = data.load("synthetic-regression", n=300, n_outputs=3, dtype="float64")
    assert regression.x_train.shape == (240, 8) and regression.y_train.shape == (240, 3)
    assert regression.y_train.dtype == np.float64 and regression.num_classes is None and regression.n_outputs == 3


def test_loaded_arrays_are_read_only():
    dataset = data.load_digits()
    with pytest.raises(ValueError, match="read-only"):
        dataset.x_train[0, 0] = 1.0


def test_unknown_dataset_and_missing_extra_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'; available: digits, mnist1d"):
        data.load("cifar")
    data._mnist1d_raw.cache_clear()
    monkeypatch.setitem(sys.modules, "mnist1d", None)  # makes `import mnist1d` fail
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=r"optional package 'mnist1d': pip install 'purebp\[data\]'"):
        data.load_mnist1d()
    data._mnist1d_raw.cache_clear()
