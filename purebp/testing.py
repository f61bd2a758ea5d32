"""Tools for hand-written-vs-autodiff equivalence tests, in purebp's tests and in yours.

- ``CaseSpec``: a random architecture with its data, as plain values (prints
  as a line you can paste to replay it); ``make_case(spec)`` builds it.
- ``random_spec(rng)``: draw a spec from a NumPy ``Generator`` (no hypothesis).
- ``cases(...)``: a hypothesis strategy of ``Case``s (needs the ``test`` extra).
- ``assert_gradients_match(...)``: ``check_gradients`` that raises
  AssertionError with the per-leaf table when the hand-written gradient
  disagrees with jax.grad.

The same for stacks over every layer kind (dense, residual, layer norm,
dropout): ``StackSpec`` / ``make_stack_case`` / ``random_stack_spec`` /
``stack_specs`` (and ``stack_cases``), with ``StackSpec.notation`` the compact
architecture line ``purebp verify --layers all`` prints.

Why one module of ~670 lines: ``from purebp.testing import ...`` is the public door for users' own
equivalence tests (DESIGN.md), and the MLP and stack generators share their drawing rules.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from purebp import activations as _activations
from purebp import losses as _losses
from purebp.check import GradientReport, check_gradients
from purebp.layers import kinds as _kinds
from purebp.network import AnyNetwork, Sequential, dense_stack, validate_sequential

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
    net: Sequential
    x: jax.Array
    y: jax.Array

    @property
    def loss(self) -> str:
        return self.spec.loss

    @property
    def reduction(self) -> str:
        return self.spec.reduction

    @property
    def key(self) -> None:
        """An MLP has no dropout: no key (so ``Case`` and ``StackCase`` are checked alike)."""
        return None

    def __repr__(self) -> str:
        return f"Case(make_case({self.spec!r}))"


def make_case(spec: CaseSpec) -> Case:
    """Build the network, inputs and targets that ``spec`` describes, deterministically from ``spec.seed``.

    Drawn with NumPy (not ``init_mlp``) so a case costs no compile: W ~ N(0, 1/n_in),
    b ~ N(0, 1/4) (non-zero biases exercise the b-paths), x ~ N(0, input_scale^2).
    """
    dtype = np.dtype(spec.dtype)
    rng = np.random.default_rng(spec.seed)
    weights, biases = [], []
    for n_in, n_out in zip(spec.sizes[:-1], spec.sizes[1:]):  # drawn in this order: w then b, layer by layer
        weights.append(jnp.asarray(rng.standard_normal((n_out, n_in)) / np.sqrt(n_in), dtype=dtype))
        biases.append(jnp.asarray(0.5 * rng.standard_normal(n_out), dtype=dtype))
    net = dense_stack(weights, biases, tuple(spec.activations))
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
    net: AnyNetwork,
    x: jax.Array,
    y: jax.Array,
    *,
    loss: str,
    reduction: str = "mean",
    tolerance: float | None = None,
    key: jax.Array | None = None,
) -> GradientReport:
    """Assert that purebp's hand-written gradient equals jax.grad's; return the report.

    Works on any ``Sequential`` (``init_mlp``'s and ``init_network``'s); ``key``
    draws the dropout masks (the same for both passes). On failure, the
    AssertionError carries the per-leaf table (max abs error, relative error,
    first failing layer) of ``check_gradients``.
    """
    report = check_gradients(net, x, y, loss=loss, reduction=reduction, tolerance=tolerance, key=key)
    if not report.passed:
        raise AssertionError("hand-written gradient differs from jax.grad\n" + str(report))
    return report


def assert_case_matches(case: Case | StackCase, *, tolerance: float | None = None) -> GradientReport:
    """``assert_gradients_match`` on a ``Case`` or ``StackCase``; a failure also prints the line that rebuilds it."""
    try:
        return assert_gradients_match(
            case.net, case.x, case.y, loss=case.loss, reduction=case.reduction, tolerance=tolerance, key=case.key
        )
    except AssertionError as error:
        raise AssertionError(f"{error}\nreplay: {case!r}") from None


# ---------------------------------------------------------------- random stacks over every layer kind

# A layer description is a plain tuple, the kind's name first: ("dense", n_out, activation), ("residual",
# (description, ...)), ("layer_norm",), ("dropout", rate), ("conv1d", channels, kernel, stride, padding,
# activation), ("max_pool1d", kernel, stride), ("avg_pool1d", kernel, stride), ("flatten",), or any kind registered
# in the table of layer kinds (purebp.layers.kinds), whose row validates, draws and notates it. A StackSpec holds a
# tuple of them: its repr is a line that replays it.
LAYER_KINDS = tuple(kind.name for kind in _kinds.all_kinds() if kind.builtin)  # purebp's own, at import
CONV_KINDS = ("conv1d", "max_pool1d", "avg_pool1d")
DROPOUT_RATES = (0.5, 0.1, 0.25)
# Every width from 1 is drawn, in every dtype, layer norm included: a layer norm over 1 or 2 features, or behind a
# narrower layer, and a conv bias that a layer norm removes are ill-conditioned (the gradient below them is a
# difference of much larger terms), and the verdict, which measures both gradients against a float64 truth
# (check_gradients), tells that from a wrong rule; the generators never step around a hard case.
# the costs that see a network ending in a layer other than dense as an identity output (logits or values)
IDENTITY_OUTPUT_LOSSES = ("mse", "softmax_cross_entropy")
ACTIVATION_CODES = _kinds.ACTIVATION_CODES  # StackSpec.notation's activation letters: d5t is dense(5, "tanh")


def _notation_help() -> str:
    return "; ".join(["in4 = 4 inputs", *(kind.help for kind in _kinds.all_kinds()), "> = then"])


NOTATION_HELP = _notation_help()


def _kind(description: object, where: str) -> _kinds.Kind:
    kind = _kinds.kind_named(description[0]) if isinstance(description, tuple) and description else None
    if kind is None:
        forms = ", ".join(kind.form for kind in _kinds.all_kinds())
        raise ValueError(f"{where}: expected a layer description (one of {forms}), got {description!r}")
    return kind


def _check_description(description: object, where: str) -> None:
    """Raise ValueError naming the bad description if it does not have its kind's form."""
    _kind(description, where).validate(description, where, _check_description)


def _notation(description: tuple) -> str:
    return _kind(description, "layer").notation(description, _notation)


def _shape_after(description: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-example shape after one layer: (width,) for flat features, (channels, length) for conv inputs."""
    return _kind(description, "layer").shape_after(description, shape)


def _split_top(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside parentheses."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    return parts + [text[start:]]


def _parse_layers(text: str) -> tuple:
    """Layer descriptions from their notation, ``,``- or ``>``-separated (a residual body uses ``,``)."""
    descriptions = []
    for part in (piece for chunk in _split_top(text, ">") for piece in _split_top(chunk, ",")):
        found = [d for kind in _kinds.all_kinds() if (d := kind.parse(part, _parse_layers)) is not None]
        if len(found) != 1:
            raise ValueError(f"notation {part!r}: {'no' if not found else 'more than one'} layer kind reads it")
        descriptions.append(found[0])
    return tuple(descriptions)


def parse_notation(text: str) -> tuple[tuple[int, ...], tuple]:
    """``(input_shape, layers)`` from ``StackSpec.notation``'s line, e.g. ``in4>d5t>r(d5r,ln)>d3``.

    The inverse of the notation: ``parse_notation(spec.notation) == (spec.input_shape, spec.layers)``
    (dropout rates as printed, ``%g``). Raises ValueError on text no layer kind reads.
    """
    first, _, rest = text.partition(">")
    match = re.fullmatch(r"in(\d+)(?:x(\d+))?", first)
    if match is None or not rest:
        raise ValueError(f"notation {text!r}: expected in<width>[x<length>]><layer>>..., see NOTATION_HELP")
    shape = (int(match[1]),) if match[2] is None else (int(match[1]), int(match[2]))
    return shape, _parse_layers(rest)


def _contains(descriptions: Sequence[tuple], kind: str) -> bool:
    return any(d[0] == kind or (d[0] == "residual" and _contains(d[1], kind)) for d in descriptions)


@dataclasses.dataclass(frozen=True)
class StackSpec:
    """A random stack of layers with its data, as plain values; ``make_stack_case`` builds it.

    ``layers`` holds layer descriptions: ``("dense", n_out, activation)``,
    ``("residual", (description, ...))`` (a + F(a), F the body),
    ``("layer_norm",)`` (eps 1e-5) and ``("dropout", rate)``. ``with_key``:
    a dropout key is drawn (training mode); without it dropout is the
    identity. ``repr(spec)`` is a line that replays the case.
    """

    input_width: int
    layers: tuple
    loss: str
    reduction: str = "mean"
    dtype: str = "float64"
    batch: int = 4
    seed: int = 0
    with_key: bool = True
    one_hot: bool = False  # classification targets as one-hot rows instead of integer labels
    input_length: int = 0  # 0: inputs (N, input_width); L > 0: (N, input_width channels, L), for conv stacks

    def __post_init__(self) -> None:
        if not isinstance(self.layers, tuple) or not self.layers:
            raise ValueError(f"StackSpec.layers must be a non-empty tuple of layer descriptions, got {self.layers!r}")
        for index, description in enumerate(self.layers):
            _check_description(description, f"StackSpec.layers[{index}]")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The per-example input shape: (input_width,) or (channels, length)."""
        return (self.input_width, self.input_length) if self.input_length else (self.input_width,)

    @property
    def output_width(self) -> int:
        shape = self.input_shape
        for description in self.layers:
            shape = _shape_after(description, shape)
        return shape[-1]

    @property
    def has_dropout(self) -> bool:
        """True when a dropout layer is active: the stack holds one and a key is drawn."""
        return self.with_key and _contains(self.layers, "dropout")

    @property
    def notation(self) -> str:
        """The architecture in one short line, e.g. ``in4>d5t>r(d5r,ln)>do.2>d3`` (see ``NOTATION_HELP``)."""
        first = f"in{self.input_width}" + (f"x{self.input_length}" if self.input_length else "")
        return ">".join([first] + [_notation(description) for description in self.layers])


@dataclasses.dataclass(frozen=True)
class StackCase:
    """A ``Sequential`` with inputs, targets and the dropout key (None: inference) that fit it."""

    spec: StackSpec
    net: Sequential
    x: jax.Array
    y: jax.Array
    key: jax.Array | None

    @property
    def loss(self) -> str:
        return self.spec.loss

    @property
    def reduction(self) -> str:
        return self.spec.reduction

    def __repr__(self) -> str:
        return f"StackCase(make_stack_case({self.spec!r}))"


_array = _kinds.host_array


def _draw_inner(rng: np.random.Generator, dtype):
    return lambda descriptions, shape, scale: _build_layers(descriptions, shape, rng, dtype, scale)


def _build_layers(
    descriptions: Sequence[tuple], shape: tuple[int, ...], rng: np.random.Generator, dtype, scale: float
) -> list:
    """Initialised layers for ``descriptions`` on per-example inputs of ``shape``, drawn in order from ``rng``."""
    layers = []
    for description in descriptions:
        kind = _kind(description, "layer")
        layers.append(kind.draw(description, shape, rng, dtype, scale, _draw_inner(rng, dtype)))
        shape = kind.shape_after(description, shape)
    return layers


def _targets(rng: np.random.Generator, loss: str, batch: int, n_out: int, one_hot: bool, dtype) -> jax.Array:
    if loss in _losses.CLASSIFICATION_LOSSES:
        labels = rng.integers(0, n_out, batch)
        return _array(np.eye(n_out)[labels], dtype) if one_hot else jnp.asarray(labels)
    if loss == "binary_cross_entropy":
        return _array(rng.uniform(size=(batch, n_out)), dtype)
    return _array(rng.standard_normal((batch, n_out)), dtype)


def make_stack_case(spec: StackSpec) -> StackCase:
    """Build the ``Sequential``, inputs, targets and key that ``spec`` describes, deterministically from ``spec.seed``.

    Parameters are drawn with NumPy, as ``make_case`` draws them (no compile per
    case): dense W ~ N(0, s^2 / n_in) with s = 1, or 2^(-k/2) inside k nested
    residual bodies, b ~ N(0, 1/4) (non-zero biases, so that no relu
    pre-activation sits exactly on its kink, also behind a dropped input);
    layer norm scale ~ N(1, 1/16), offset ~ N(0, 1/16); x ~ N(0, 1). The
    ``Sequential`` is what ``purebp.init_network`` makes of these initialised
    layers (built directly: ``init_network`` splits a key per layer count, a
    compile each), its shapes checked by ``validate_sequential``. The dropout
    key is ``jax.random.key(seed)`` when ``with_key``, else None.
    """
    dtype = np.dtype(spec.dtype)
    rng = np.random.default_rng(spec.seed)
    layers = _build_layers(spec.layers, spec.input_shape, rng, dtype, 1.0)
    net = Sequential(layers=tuple(layers), input_shape=spec.input_shape)
    validate_sequential(net)
    x = _array(rng.standard_normal((spec.batch,) + spec.input_shape), dtype)
    y = _targets(rng, spec.loss, spec.batch, spec.output_width, spec.one_hot, dtype)
    key = jax.random.key(spec.seed) if spec.with_key else None
    return StackCase(spec=spec, net=net, x=x, y=y, key=key)


# In a conv front, a layer norm over the length axis removes every per-channel constant, so the biases of the convs
# in front of it are (nearly, or exactly: an identity conv) unidentifiable and their gradient is a cancellation of
# rounding: the hardest leaves there are, drawn in both dtypes.
def _draw_conv_front(
    integer, pick, hidden: tuple, dtype: str = "float64", max_items: int = 3
) -> tuple[int, int, tuple]:
    """(channels, length, layers): 1..max_items conv1d / pooling / shape-keeping residual / layer norm, then flatten."""
    channels, length = integer(1, 3), integer(4, 12)
    shape, layers = (channels, length), []
    for _ in range(integer(1, max_items)):
        kind = pick(("conv1d", "max_pool1d", "avg_pool1d", "residual", "conv1d", "layer_norm"))
        if kind == "conv1d":
            padding = integer(0, 2)
            kernel = integer(1, min(5, shape[1] + 2 * padding))
            description = ("conv1d", integer(1, 4), kernel, integer(1, 3), padding, pick(hidden))
        elif kind in ("max_pool1d", "avg_pool1d"):
            description = (kind, integer(1, min(3, shape[1])), integer(1, 3))
        elif kind == "residual":
            # a + F(a): F keeps the shape, so its convs have stride 1 and padding (K - 1) / 2 around an odd K
            body = []
            for _ in range(integer(1, 2)):
                kernel = pick((1, 3, 5))
                body.append(("conv1d", shape[0], kernel, 1, (kernel - 1) // 2, pick(hidden)))
            if pick((False, True)):
                body.insert(integer(0, len(body)), ("layer_norm",))
            description = ("residual", tuple(body))
        else:
            description = ("layer_norm",)
        layers.append(description)
        shape = _shape_after(description, shape)
    layers.append(("flatten",))
    return channels, length, tuple(layers)


def _draw_block(integer, pick, hidden, width: int, nested: bool) -> tuple:
    """A residual block's body: 0-2 dense layers of the block's width, maybe a layer norm, a dropout, a nested
    block (once), in the order ``_draw_stack_spec`` has always drawn them (old seeds replay)."""
    items = [("dense", width, pick(hidden)) for _ in range(integer(0, 2))]
    extras = []
    if pick((False, True)):
        extras.append(("layer_norm",))
    if pick((False, False, True)):
        extras.append(("dropout", pick(DROPOUT_RATES)))
    if nested and pick((False, True)):
        extras.append(("residual", _draw_block(integer, pick, hidden, width, nested=False)))
    if not items and not extras:
        items.append(("dense", width, pick(hidden)))
    for extra in extras:
        items.insert(integer(0, len(items)), extra)
    return tuple(items)


def _draw_stack_spec(
    integer, pick, *, dtypes, max_depth, max_width, max_batch, outputs, hidden, with_keys, conv=False
) -> StackSpec:
    """The one generator behind ``random_stack_spec`` (NumPy) and ``stack_specs`` (hypothesis).

    ``integer(lo, hi)`` draws from lo..hi inclusive, ``pick(options)`` one of
    them; simpler choices come first, so hypothesis shrinks towards them.
    """
    dtype = pick(tuple(dtypes))
    loss = pick(tuple(outputs))  # each loss equally often, then one of the output activations it takes
    output = pick(outputs[loss])
    depth = integer(1, max_depth)  # top-level layers, the output layer included
    width = input_width = integer(1, max_width)
    input_length, front = 0, ()
    if conv is None:
        conv = pick((False, True))
    if conv:  # a conv front, flattened into the dense part; draws nothing when conv is False
        input_width, input_length, front = _draw_conv_front(integer, pick, tuple(hidden), dtype)
        shape = (input_width, input_length)
        for description in front:
            shape = _shape_after(description, shape)
        width = shape[0]
    # mse and softmax cross-entropy also take a network ending in a residual block, layer norm or dropout
    trailing = None
    if loss in IDENTITY_OUTPUT_LOSSES and depth >= 2 and pick((False, True)):
        trailing = pick(("layer_norm", "dropout", "residual"))

    def body(width: int, nested: bool) -> tuple:
        return _draw_block(integer, pick, hidden, width, nested)

    layers = list(front)
    for _ in range(depth - 1 - (trailing is not None)):
        kind = pick(("dense", "residual", "layer_norm", "dropout", "dense", "residual"))
        if kind == "dense":
            width = integer(1, max_width)
            layers.append(("dense", width, pick(hidden)))
        elif kind == "residual":
            layers.append(("residual", body(width, nested=True)))
        elif kind == "layer_norm":
            layers.append(("layer_norm",))
        else:
            layers.append(("dropout", pick(DROPOUT_RATES)))
    min_out = 2 if output == "softmax" or loss in _losses.CLASSIFICATION_LOSSES else 1
    n_out = integer(min_out, max(min_out, max_width))
    # before a trailing layer the dense layer is a hidden one (softmax stays on output layers)
    layers.append(("dense", n_out, output if trailing is None else pick(hidden)))
    if trailing == "residual":
        layers.append(("residual", body(n_out, nested=True)))
    elif trailing == "layer_norm":
        layers.append(("layer_norm",))
    elif trailing == "dropout":
        layers.append(("dropout", pick(DROPOUT_RATES)))
    return StackSpec(
        input_width=input_width,
        layers=tuple(layers),
        loss=loss,
        reduction=pick(("mean", "sum")),
        dtype=dtype,
        batch=integer(1, max_batch),
        seed=integer(0, 2**31 - 1),
        with_key=pick(tuple(with_keys)),
        one_hot=loss in _losses.CLASSIFICATION_LOSSES and pick((False, True)),
        input_length=input_length,
    )


def _stack_options(losses, hidden_activations, with_key) -> dict:
    outputs = {}
    for loss, output in LOSS_OUTPUT_PAIRS:
        if loss in losses:
            outputs.setdefault(loss, []).append(output)
    if not outputs:
        raise ValueError(f"no built-in loss among {tuple(losses)}; valid losses: {', '.join(_losses.LOSSES)}")
    if "softmax" in hidden_activations:
        raise ValueError("softmax is only allowed on the output layer: leave it out of hidden_activations")
    with_keys = (True, False) if with_key is None else (bool(with_key),)
    outputs = {loss: tuple(names) for loss, names in outputs.items()}
    return {"outputs": outputs, "hidden": tuple(hidden_activations), "with_keys": with_keys}


def random_stack_spec(
    rng: np.random.Generator,
    *,
    dtype: str = "float64",
    max_depth: int = 6,
    max_width: int = 16,
    max_batch: int = 16,
    with_key: bool | None = None,
    losses: Sequence[str] = _losses.LOSSES,
    hidden_activations: Sequence[str] = HIDDEN_ACTIVATIONS,
    conv: bool | None = False,
) -> StackSpec:
    """Draw a random ``StackSpec`` from a NumPy ``Generator`` (no hypothesis).

    1..max_depth top-level layers: dense (any hidden activation, widths
    1..max_width), residual blocks (body: up to two dense layers of the
    block's width, maybe a layer norm and a dropout, maybe one nested block),
    layer norm and dropout anywhere, and a dense output layer fitting a
    built-in loss (each loss equally likely) and one of the output
    activations it takes; mse and softmax cross-entropy networks may end in a
    residual block, layer norm or dropout instead. ``with_key`` None: drawn
    (dropout active or not). Every width from 1 in every dtype: no hard case
    is stepped around (the comment "Every width from 1" above).

    ``conv=True``: the stack starts with a conv front on inputs (N, 1..3
    channels, length 4..12): 1..3 of conv1d (kernel 1..5, stride 1..3,
    padding 0..2, any hidden activation), max or average pooling, a residual
    block of shape-keeping convs (maybe with a layer norm) and layer norm over
    the length axis, in both dtypes, any hidden activation identity included,
    then a flatten before the dense part above. ``conv=None``:
    drawn. ``conv=False`` (the default) draws exactly what it drew before conv
    layers existed, so old seeds replay.
    """
    options = _stack_options(losses, hidden_activations, with_key)
    return _draw_stack_spec(
        lambda lo, hi: int(rng.integers(lo, hi + 1)),
        lambda choices: choices[int(rng.integers(len(choices)))],
        dtypes=(dtype,),
        max_depth=max_depth,
        max_width=max_width,
        max_batch=max_batch,
        conv=conv,
        **options,
    )


def stack_specs(
    *,
    dtypes: Sequence[str] = ("float32", "float64"),
    max_depth: int = 5,
    max_width: int = 8,
    max_batch: int = 8,
    with_key: bool | None = None,
    losses: Sequence[str] = _losses.LOSSES,
    hidden_activations: Sequence[str] = HIDDEN_ACTIVATIONS,
    conv: bool | None = False,
):
    """A hypothesis strategy of ``StackSpec``s, drawn as ``random_stack_spec`` draws (needs ``purebp[test]``).

    A failing example prints the spec, a line that ``make_stack_case`` replays.
    """
    try:
        from hypothesis import strategies as st
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("purebp.testing.stack_specs needs hypothesis: pip install 'purebp[test]'") from error
    options = _stack_options(losses, hidden_activations, with_key)

    @st.composite
    def strategy(draw):
        return _draw_stack_spec(
            lambda lo, hi: draw(st.integers(lo, hi)),
            lambda choices: draw(st.sampled_from(choices)),
            dtypes=tuple(dtypes),
            max_depth=max_depth,
            max_width=max_width,
            max_batch=max_batch,
            conv=conv,
            **options,
        )

    return strategy()


def stack_cases(**options):
    """``stack_specs(**options)`` built into ``StackCase``s (a failure prints ``StackCase(make_stack_case(...))``)."""
    return stack_specs(**options).map(make_stack_case)


# users' own backward passes: check_backprop lives in kit/, re-exported here
from purebp.kit.backprop import assert_backprop_matches, check_backprop  # noqa: E402, F401
