"""Tools for hand-written-vs-autodiff equivalence tests, in purebp's tests and in yours.

- ``CaseSpec``: a random architecture with its data, as plain values (prints
  as a line you can paste to replay it); ``make_case(spec)`` builds it.
- ``random_spec(rng)``: draw a spec from a NumPy ``Generator`` (no hypothesis).
- ``cases(...)``: a hypothesis strategy of ``Case``s (needs the ``test`` extra).
- ``assert_gradients_match(...)``: ``check_gradients`` that raises
  AssertionError with the per-leaf table when the hand-written gradient
  disagrees with jax.grad.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp import losses as _losses
from purebp.check import GradientReport, check_gradients
from purebp.network import Layer, Network

HIDDEN_ACTIVATIONS = tuple(name for name in _activations.BUILTIN_NAMES if name != "softmax")
# every (built-in loss, built-in output activation) pair purebp accepts, from the loss table
LOSS_OUTPUT_PAIRS = tuple(
    (loss, output)
    for loss in _losses.LOSSES
    for output in (
        _activations.BUILTIN_NAMES
        if _losses.get(loss).output_activation is None
        else (_losses.get(loss).output_activation,)
    )
)


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """Everything that defines a test case, as plain values; ``make_case`` builds it."""

    sizes: tuple[int, ...]
    activations: tuple[str, ...]
    loss: str
    reduction: str = "mean"
    dtype: str = "float64"
    batch: int = 8
    one_hot: bool = False  # classification targets as one-hot rows instead of integer labels
    input_scale: float = 1.0  # large values drive units into saturation
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Case:
    """A network with inputs and targets that fit it, and the loss to use."""

    spec: CaseSpec
    net: Network
    x: jax.Array
    y: jax.Array

    @property
    def loss(self) -> str:
        return self.spec.loss

    @property
    def reduction(self) -> str:
        return self.spec.reduction

    def __repr__(self) -> str:
        return f"Case(make_case({self.spec!r}))"


def make_case(spec: CaseSpec) -> Case:
    """Build the network, inputs and targets that ``spec`` describes, deterministically from ``spec.seed``.

    Drawn with NumPy (not ``init_mlp``) so a case costs no compile: W ~ N(0, 1/n_in),
    b ~ N(0, 1/4) (non-zero biases exercise the b-paths), x ~ N(0, input_scale^2).
    """
    dtype = np.dtype(spec.dtype)
    rng = np.random.default_rng(spec.seed)
    layers = tuple(
        Layer(
            w=jnp.asarray(rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), dtype=dtype),
            b=jnp.asarray(0.5 * rng.standard_normal(n_out), dtype=dtype),
        )
        for n_in, n_out in zip(spec.sizes[:-1], spec.sizes[1:])
    )
    net = Network(layers=layers, activations=tuple(spec.activations))
    x = jnp.asarray(spec.input_scale * rng.standard_normal((spec.batch, spec.sizes[0])), dtype=dtype)
    n_out = spec.sizes[-1]
    cost = _losses.get(spec.loss)
    if cost.classification:
        labels = rng.integers(0, n_out, spec.batch)
        y = jnp.asarray(np.eye(n_out)[labels], dtype=dtype) if spec.one_hot else jnp.asarray(labels)
    elif cost.targets_in_unit_interval:
        y = jnp.asarray(rng.uniform(size=(spec.batch, n_out)), dtype=dtype)
    else:
        y = jnp.asarray(rng.standard_normal((spec.batch, n_out)), dtype=dtype)
    return Case(spec=spec, net=net, x=x, y=y)


def random_spec(
    rng: np.random.Generator,
    *,
    dtype: str = "float64",
    max_depth: int = 8,
    max_width: int = 64,
    max_batch: int = 64,
) -> CaseSpec:
    """Draw a random ``CaseSpec``: depth 1..max_depth, widths 1..max_width, any valid loss/output pair."""
    depth = int(rng.integers(1, max_depth + 1))
    loss, output = LOSS_OUTPUT_PAIRS[int(rng.integers(len(LOSS_OUTPUT_PAIRS)))]
    min_out = 2 if output == "softmax" or _losses.get(loss).classification else 1
    sizes = [int(rng.integers(1, max_width + 1)) for _ in range(depth)]
    sizes.append(int(rng.integers(min_out, max(min_out, max_width) + 1)))
    hidden = [HIDDEN_ACTIVATIONS[int(rng.integers(len(HIDDEN_ACTIVATIONS)))] for _ in range(depth - 1)]
    return CaseSpec(
        sizes=tuple(sizes),
        activations=(*hidden, output),
        loss=loss,
        reduction=("mean", "sum")[int(rng.integers(2))],
        dtype=dtype,
        batch=int(rng.integers(1, max_batch + 1)),
        one_hot=bool(rng.integers(2)),
        seed=int(rng.integers(2**31)),
    )


def cases(
    *,
    dtypes: Sequence[str] = ("float32", "float64"),
    max_depth: int = 8,
    max_width: int = 64,
    max_batch: int = 64,
    losses: Sequence[str] = _losses.LOSSES,
    hidden_activations: Sequence[str] = HIDDEN_ACTIVATIONS,
    input_scales: Sequence[float] = (1.0,),
):
    """A hypothesis strategy of ``Case``s over random architectures (needs ``pip install purebp[test]``).

    Failures print the ``CaseSpec``, so a failing architecture can be replayed
    with ``make_case(CaseSpec(...))``.
    """
    try:
        from hypothesis import strategies as st
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("purebp.testing.cases needs hypothesis: pip install 'purebp[test]'") from error

    pairs = [pair for pair in LOSS_OUTPUT_PAIRS if pair[0] in losses]

    @st.composite
    def strategy(draw):
        loss, output = draw(st.sampled_from(pairs))
        depth = draw(st.integers(1, max_depth))
        min_out = 2 if output == "softmax" or _losses.get(loss).classification else 1
        widths = draw(st.lists(st.integers(1, max_width), min_size=depth, max_size=depth))
        n_out = draw(st.integers(min_out, max(min_out, max_width)))
        hidden = draw(st.lists(st.sampled_from(hidden_activations), min_size=depth - 1, max_size=depth - 1))
        spec = CaseSpec(
            sizes=(*widths, n_out),
            activations=(*hidden, output),
            loss=loss,
            reduction=draw(st.sampled_from(("mean", "sum"))),
            dtype=draw(st.sampled_from(tuple(dtypes))),
            batch=draw(st.integers(1, max_batch)),
            one_hot=draw(st.booleans()),
            input_scale=draw(st.sampled_from(tuple(input_scales))),
            seed=draw(st.integers(0, 2**31 - 1)),
        )
        return make_case(spec)

    return strategy()


def assert_gradients_match(
    net: Network,
    x: jax.Array,
    y: jax.Array,
    *,
    loss: str,
    reduction: str = "mean",
    tolerance: float | None = None,
) -> GradientReport:
    """Assert that purebp's hand-written gradient equals jax.grad's; return the report.

    On failure, the AssertionError carries the per-leaf table (max abs error,
    relative error, first failing layer) of ``check_gradients``.
    """
    report = check_gradients(net, x, y, loss=loss, reduction=reduction, tolerance=tolerance)
    if not report.passed:
        raise AssertionError("hand-written gradient differs from jax.grad\n" + str(report))
    return report


# users' own backward passes (issue 15): check_backprop lives in backprop_kit.py, re-exported here
from purebp.backprop_kit import assert_backprop_matches, check_backprop  # noqa: E402, F401
