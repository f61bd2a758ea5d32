"""Curvature preconditioners as optax gradient transformations: divide by a diagonal GGN, or by K-FAC factors.

Each is an ``optax.GradientTransformationExtraArgs`` whose ``update`` takes the
curvature as a keyword, computed by the caller on the same batch as the
gradient (``purebp.diag_ggn``, ``purebp.kfac``, ``purebp.kflr``), so the
preconditioner itself is a few lines of linear algebra and the curvature code
stays where it is tested. Chain it with a learning rate (and momentum if
wanted) as any optax transformation::

    opt = optax.chain(pb.preconditioning.diag_ggn_preconditioner(1e-3), optax.scale_by_learning_rate(0.1))
    state = opt.init(net)
    loss, grads = pb.value_and_grad(net, x, y, loss="softmax_cross_entropy")
    curvature = pb.diag_ggn(net, x, y, loss="softmax_cross_entropy", mc_samples=1, key=k)
    updates, state = opt.update(grads, state, net, curvature=curvature)
    net = optax.apply_updates(net, updates)

``optax.chain`` hands ``curvature=`` only to the transformations that take
extra arguments, so ``scale_by_learning_rate``, ``trace`` (momentum) and the
rest are unaffected. Hyperparameters are numbers (or 0-d arrays), checked
when the transformation is built; under ``optax.inject_hyperparams`` they are
checked at ``init`` and traced afterwards, so a sweep over learning rates and
dampings reuses one compiled program. The curvature is checked against the
updates (tree structure, shapes, dtypes) when ``update`` is traced, before
anything compiles. No autodiff: Cholesky factorisations and triangular solves
from ``jax.scipy.linalg``.

With ``decay`` set, both keep an exponential moving average of the curvature
in their state, bias-corrected like Adam's moments (Kingma & Ba 2015, Alg. 1):
c_t = decay c_{t-1} + (1 - decay) C_t from c_0 = 0, and the step uses
c_t / (1 - decay^t), so the first step is not divided by a curvature shrunk
towards zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import optax

from purebp import network as _network
from purebp.extras.curvature import KroneckerFactors

Array = jax.Array

__all__ = [
    "DiagGGNState",
    "KFACState",
    "diag_ggn_preconditioner",
    "kfac_preconditioner",
    "kfac_solve",
]


class DiagGGNState(NamedTuple):
    """``count`` (int32 scalar): curvatures averaged so far; ``curvature``: their moving average (tree like params)."""

    count: Array
    curvature: Any


class KFACState(NamedTuple):
    """``count`` (int32 scalar): factors averaged so far; ``factors``: their moving averages, laid out as pb.kfac's."""

    count: Array
    factors: tuple


# ---------------------------------------------------------------- hyperparameters, checked when built


def _scalar(value: object, name: str, expected: str, who: str) -> float | Array | None:
    """The hyperparameter as a float if it is concrete (then checked by the caller), as itself if it is traced.

    Python numbers and 0-d arrays are accepted; a traced 0-d value (optax.inject_hyperparams passes its
    hyperparameters into ``update`` as traced arrays; a sweep can pass them as arguments of one jitted
    function) cannot be checked here: it was checked when it was concrete (``init``) or is the caller's.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating, np.ndarray, jax.Array)):
        raise TypeError(f"{who}: {name} must be {expected}, got {value!r}")
    if getattr(value, "ndim", 0) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.number):
        raise TypeError(f"{who}: {name} must be {expected} (a scalar), got an array of shape {np.shape(value)}")
    if isinstance(value, jax.core.Tracer):
        return None
    return float(value)


def _check_damping(damping: object, who: str) -> float | Array:
    value = _scalar(damping, "damping", "a non-negative number", who)
    if value is None:
        return damping  # traced: see _scalar
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{who}: damping must be a finite number >= 0, got {damping!r}")
    return value


def _check_decay(decay: object, who: str) -> float | Array | None:
    if decay is None:
        return None
    value = _scalar(decay, "decay", "None or a number in [0, 1)", who)
    if value is None:
        return decay  # traced: see _scalar
    if not 0.0 <= value < 1.0:  # NaN fails this too
        raise ValueError(f"{who}: decay must be in [0, 1) (None: no moving average), got {decay!r}")
    return value


@jax.jit
def _advance_average(count: Array, average: Any, new: Any, decay: Array) -> tuple[Array, Any, Any]:
    """Return (count + 1, the updated moving average, its bias-corrected value)."""
    count = optax.safe_increment(count)
    average = jax.tree.map(lambda old, c: decay * old + (1.0 - decay) * c, average, new)

    def corrected(leaf: Array) -> Array:
        # decay^t in the leaf's dtype: the int32 counter never meets a float under strict promotion
        return leaf / (1.0 - jnp.power(decay.astype(leaf.dtype), count.astype(leaf.dtype)))

    return count, average, jax.tree.map(corrected, average)


# ---------------------------------------------------------------- diagonal


def _leaf_paths(tree: Any) -> dict[str, Any]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _check_diagonal(who: str, curvature: Any, updates: Any) -> None:
    if curvature is None:
        raise TypeError(
            f"{who}.update needs the curvature as a keyword: update(grads, state, params, curvature=pb.diag_ggn(...))"
        )
    if jax.tree.structure(curvature) != jax.tree.structure(updates):
        mine, theirs = _leaf_paths(curvature), _leaf_paths(updates)
        missing = [p for p in theirs if p not in mine]
        extra = [p for p in mine if p not in theirs]
        detail = (
            f"leaves missing from the curvature: {missing[:4]}; leaves the updates do not have: {extra[:4]}"
            if missing or extra
            else f"same leaves, different static metadata: {jax.tree.structure(curvature)} vs "
            f"{jax.tree.structure(updates)}"
        )
        raise ValueError(
            f"{who}: the curvature must be a tree like the updates (pb.diag_ggn of the same network); {detail}"
        )
    for (path, c), u in zip(jax.tree_util.tree_leaves_with_path(curvature), jax.tree.leaves(updates)):
        where = jax.tree_util.keystr(path)
        if getattr(c, "shape", None) != getattr(u, "shape", None):
            raise ValueError(
                f"{who}: curvature{where} has shape {getattr(c, 'shape', c)}, the update has {getattr(u, 'shape', u)}"
            )
        if c.dtype != u.dtype:
            raise TypeError(f"{who}: curvature{where} is {c.dtype}, the update is {u.dtype}; cast one to the other")


@jax.jit
def _divide(updates: Any, curvature: Any, damping: Array) -> Any:
    # one program per tree for eager callers; inlined inside the caller's jit
    return jax.tree.map(lambda u, c: u / (c + damping), updates, curvature)


def diag_ggn_preconditioner(damping: float, *, decay: float | None = None) -> optax.GradientTransformationExtraArgs:
    """Divide each update entry by its diagonal curvature plus ``damping``: u_i / (c_i + damping).

    ``update(updates, state, params=None, *, curvature)``: ``curvature`` is a
    tree like the updates (``pb.diag_ggn``, exact or Monte Carlo; any other
    non-negative diagonal such as ``pb.diag_hessian`` of a convex loss or
    ``pb.sum_grad_squared``). With the generalised Gauss-Newton G of the loss
    this is the diagonal approximation of the damped Gauss-Newton step
    (G + damping I)^{-1} grad (Martens 2010, section 4; Becker & LeCun 1988
    for the diagonal; Dangel, Kunstner & Hennig 2020, BackPACK, for the
    Monte-Carlo DiagGGN). Chain with ``optax.scale_by_learning_rate(lr)``:
    the descent step is then -lr grad / (diag G + damping).

    ``damping`` >= 0 (a number): 0 divides by the bare curvature, which
    is 0 for a dead unit's weights (the step is then inf or NaN). ``decay``
    None uses each step's curvature as given; a number in [0, 1) averages it
    over steps (see the module docstring: bias-corrected EMA).
    """
    who = "diag_ggn_preconditioner"
    damping = _check_damping(damping, who)
    decay = _check_decay(decay, who)

    def init(params: Any) -> optax.OptState:
        if decay is None:
            return optax.EmptyState()
        return DiagGGNState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update(
        updates: Any, state: optax.OptState, params: Any = None, *, curvature: Any = None, **extra: Any
    ) -> tuple[Any, optax.OptState]:
        del params, extra  # the step needs only the updates and the curvature
        _check_diagonal(who, curvature, updates)
        if decay is None:
            return _divide(updates, curvature, damping), state
        count, average, curvature = _advance_average(state.count, state.curvature, curvature, decay)
        return _divide(updates, curvature, damping), DiagGGNState(count, average)

    return optax.GradientTransformationExtraArgs(init, update)


# ---------------------------------------------------------------- Kronecker-factored


def _is_factors(entry: object) -> bool:
    return isinstance(entry, tuple) and getattr(entry, "_fields", None) == ("g", "a")


def kfac_solve(
    g: Array, a: Array, dw: Array, db: Array, damping: float, *, pi_damping: bool = True
) -> tuple[Array, Array]:
    """One layer's damped Kronecker-factored step: (G_d^{-1} dW A_d^{-1}, (g + damping I)^{-1} db).

    ``dw`` is (n_out, n_in) (a convolution's weight flattened to (C_out, C_in K)),
    ``g`` (n_out, n_out) and ``a`` (n_in, n_in) symmetric. With W row-major,
    kron(g, a) vec(W) = vec(g W a^T) = vec(g W a), so kron(G_d, A_d)^{-1}
    vec(dW) = vec(G_d^{-1} dW A_d^{-1}): two small solves instead of one of
    size n_out n_in. The damping is Martens & Grosse's factored Tikhonov
    damping (2015, section 6.3): G_d = g + (sqrt(damping) / pi) I,
    A_d = a + pi sqrt(damping) I, with pi = sqrt((tr a / n_in) / (tr g / n_out))
    when ``pi_damping`` (their trace-norm choice, which makes the two added
    terms equally large relative to their factors) and pi = 1 otherwise; pi is
    also 1 where either trace is 0 (nothing to balance). The bias block of
    K-FAC/KFLR is g alone, damped exactly: (g + damping I)^{-1} db. Each
    system is solved by a Cholesky factorisation (g, a are positive
    semi-definite; the damping makes them definite; damping 0 on a singular
    factor gives NaN).
    """
    damping = _check_damping(damping, "kfac_solve")
    if not isinstance(pi_damping, bool):
        raise TypeError(f"kfac_solve: pi_damping must be True or False, got {pi_damping!r}")
    return _kfac_solve(g, a, dw, db, damping, pi_damping)


@functools.partial(jax.jit, static_argnames="pi_damping")
def _kfac_solve(g: Array, a: Array, dw: Array, db: Array, damping: Array, pi_damping: bool) -> tuple[Array, Array]:
    # one program per shape for eager callers (the damping is traced); inlined inside the caller's jit
    n_out, n_in = g.shape[0], a.shape[0]
    root = jnp.sqrt(damping)  # traced: one program serves every damping
    if pi_damping:
        trace_g, trace_a = jnp.trace(g) / n_out, jnp.trace(a) / n_in
        usable = (trace_g > 0) & (trace_a > 0)
        pi = jnp.sqrt(jnp.where(usable, trace_a, 1) / jnp.where(usable, trace_g, 1))
    else:
        pi = jnp.ones([], g.dtype)
    g_damped = g + (root / pi) * jnp.eye(n_out, dtype=g.dtype)
    a_damped = a + (root * pi) * jnp.eye(n_in, dtype=a.dtype)
    left = jsl.cho_solve(jsl.cho_factor(g_damped, lower=True), dw)  # G_d^{-1} dW
    step_w = jsl.cho_solve(jsl.cho_factor(a_damped, lower=True), left.T).T  # (A_d^{-1} (G_d^{-1} dW)^T)^T
    step_b = jsl.cho_solve(jsl.cho_factor(g + damping * jnp.eye(n_out, dtype=g.dtype), lower=True), db)
    return step_w, step_b


def _layer_name(layer: object) -> str:
    return type(layer).__name__


def _weight_bias(layer: object, where: str, who: str) -> tuple[Array, Array]:
    w, b = getattr(layer, "w", None), getattr(layer, "b", None)
    leaves = jax.tree.leaves(layer)
    if w is None or b is None or len(leaves) != 2 or not dataclasses.is_dataclass(layer):
        raise TypeError(
            f"{who}: layer {where} ({_layer_name(layer)}) has no Kronecker-factored curvature: K-FAC covers layers "
            f"whose parameters are exactly w and b (dense, conv1d), None for layers without parameters"
        )
    if getattr(w, "ndim", 0) < 2 or getattr(b, "ndim", None) != 1 or b.shape[0] != w.shape[0]:
        raise ValueError(
            f"{who}: layer {where} ({_layer_name(layer)}): expected w (n_out, ...) and b (n_out,), got "
            f"w {getattr(w, 'shape', w)} and b {getattr(b, 'shape', b)}"
        )
    return w, b


def _factor_shapes(w: Array) -> tuple[tuple[int, int], tuple[int, int]]:
    n_out = w.shape[0]
    n_in = math.prod(w.shape[1:])
    return (n_out, n_out), (n_in, n_in)


def _zero_factors(layer: object, where: str, who: str) -> object:
    """The zero moving average for one layer: factors for w/b layers, None without parameters, tuples for blocks."""
    if not jax.tree.leaves(layer):
        return None
    body = getattr(layer, "layers", None)
    if isinstance(body, tuple) and not hasattr(layer, "w"):
        return tuple(_zero_factors(sub, f"{where}.{i}", who) for i, sub in enumerate(body))
    w, _ = _weight_bias(layer, where, who)
    g_shape, a_shape = _factor_shapes(w)
    return KroneckerFactors(jnp.zeros(g_shape, w.dtype), jnp.zeros(a_shape, w.dtype))


def _check_entry(entry: object, layer: object, where: str, who: str) -> None:
    """Raise if one curvature entry does not fit its layer of the updates (recursing into blocks)."""
    if entry is None:
        if jax.tree.leaves(layer):
            raise ValueError(
                f"{who}: the curvature entry for layer {where} ({_layer_name(layer)}) is None but the layer has "
                f"parameters"
            )
        return
    if _is_factors(entry):
        if not jax.tree.leaves(layer):
            raise ValueError(
                f"{who}: the curvature entry for layer {where} ({_layer_name(layer)}) is KroneckerFactors but the "
                f"layer has no parameters (expected None)"
            )
        w, _ = _weight_bias(layer, where, who)
        g_shape, a_shape = _factor_shapes(w)
        for name, factor, shape in (("g", entry.g, g_shape), ("a", entry.a, a_shape)):
            if getattr(factor, "shape", None) != shape:
                raise ValueError(
                    f"{who}: layer {where} ({_layer_name(layer)}, w {w.shape}): factor {name} has shape "
                    f"{getattr(factor, 'shape', factor)}, expected {shape}"
                )
            if factor.dtype != w.dtype:
                raise TypeError(
                    f"{who}: layer {where}: factor {name} is {factor.dtype}, the update is {w.dtype}; cast one"
                )
        return
    if isinstance(entry, (tuple, list)):
        body = getattr(layer, "layers", None)
        if not isinstance(body, tuple) or hasattr(layer, "w"):
            raise ValueError(
                f"{who}: the curvature entry for layer {where} ({_layer_name(layer)}) is a tuple of "
                f"{len(entry)} entries, which belongs to a block (residual); the layer is not one"
            )
        if len(entry) != len(body):
            raise ValueError(
                f"{who}: layer {where} ({_layer_name(layer)}) has {len(body)} body layers, its curvature entry "
                f"{len(entry)}"
            )
        for i, (sub_entry, sub) in enumerate(zip(entry, body)):
            _check_entry(sub_entry, sub, f"{where}.{i}", who)
        return
    raise TypeError(
        f"{who}: the curvature entry for layer {where} must be KroneckerFactors(g, a), None or a tuple of "
        f"entries (a residual block), got {type(entry).__name__}"
    )


def _check_kronecker(who: str, curvature: object, layers: tuple) -> None:
    if curvature is None:
        raise TypeError(f"{who}.update needs the curvature as a keyword: curvature=pb.kfac(...) or pb.kflr(...)")
    if _is_factors(curvature) or not isinstance(curvature, (tuple, list)):
        raise TypeError(
            f"{who}: the curvature must be a tuple with one entry per layer (pb.kfac / pb.kflr), got "
            f"{type(curvature).__name__}"
        )
    if len(curvature) != len(layers):
        raise ValueError(f"{who}: the network has {len(layers)} layers, the curvature {len(curvature)} entries")
    for index, (entry, layer) in enumerate(zip(curvature, layers)):
        _check_entry(entry, layer, str(index), who)


def _apply(entry: object, layer: object, damping: float, pi_damping: bool) -> object:
    if entry is None:
        return layer
    if _is_factors(entry):
        w, b = layer.w, layer.b
        step_w, step_b = kfac_solve(entry.g, entry.a, w.reshape(w.shape[0], -1), b, damping, pi_damping=pi_damping)
        return dataclasses.replace(layer, w=step_w.reshape(w.shape), b=step_b)
    return dataclasses.replace(
        layer, layers=tuple(_apply(e, sub, damping, pi_damping) for e, sub in zip(entry, layer.layers))
    )


def _as_factors(entry: object) -> object:
    # one container type in the moving average, whatever NamedTuple with fields (g, a) the caller passed
    if entry is None:
        return None
    if _is_factors(entry):
        return KroneckerFactors(entry.g, entry.a)
    return tuple(_as_factors(e) for e in entry)


def _stack_of(updates: object, who: str) -> tuple:
    if not isinstance(updates, _network.Sequential):
        raise TypeError(
            f"{who}: the updates must be a purebp Sequential (the gradient tree), got {type(updates).__name__}"
        )
    return updates.layers


def kfac_preconditioner(
    damping: float, *, decay: float | None = None, pi_damping: bool = True
) -> optax.GradientTransformationExtraArgs:
    """Precondition each layer's update by its Kronecker-factored curvature: (G_d^{-1} dW A_d^{-1}, (g + dI)^{-1} db).

    ``update(updates, state, params=None, *, curvature)``: ``updates`` a
    purebp ``Network`` or ``Sequential`` (the gradients), ``curvature`` the
    tuple ``pb.kfac`` / ``pb.kflr`` return, one entry per layer:
    ``KroneckerFactors(g, a)`` for a dense or conv1d layer, None for a layer
    without parameters, a tuple of its body's entries for a residual block.
    K-FAC approximates the GGN (Fisher) block of a layer's weights by
    kron(g, a) (Martens & Grosse 2015; KFLR: Botev, Ritter & Barber 2017),
    so the step is the damped natural-gradient / Gauss-Newton step of that
    block-diagonal approximation; the algebra and the damping (factored
    Tikhonov, with Martens & Grosse's pi when ``pi_damping``) are
    ``kfac_solve``'s. Chain with ``optax.scale_by_learning_rate(lr)``.

    ``damping`` >= 0 (a number; 0 needs positive definite factors);
    ``decay`` None uses each step's factors as given, a number in [0, 1)
    averages g and a separately over steps (bias-corrected EMA; the usual
    K-FAC running estimate of the factors).
    """
    who = "kfac_preconditioner"
    damping = _check_damping(damping, who)
    decay = _check_decay(decay, who)
    if not isinstance(pi_damping, bool):
        raise TypeError(f"{who}: pi_damping must be True or False, got {pi_damping!r}")

    def init(params: Any) -> optax.OptState:
        layers = _stack_of(params, who)
        zeros = tuple(_zero_factors(layer, str(index), who) for index, layer in enumerate(layers))
        if decay is None:
            return optax.EmptyState()
        return KFACState(jnp.zeros([], jnp.int32), zeros)

    def update(
        updates: Any, state: optax.OptState, params: Any = None, *, curvature: Any = None, **extra: Any
    ) -> tuple[Any, optax.OptState]:
        del params, extra  # the step needs only the updates and the curvature
        layers = _stack_of(updates, who)
        _check_kronecker(who, curvature, layers)
        if decay is not None:
            count, average, curvature = _advance_average(state.count, state.factors, _as_factors(curvature), decay)
            state = KFACState(count, average)
        stepped = [_apply(entry, layer, damping, pi_damping) for entry, layer in zip(curvature, layers)]
        return _network.like(updates, stepped), state

    return optax.GradientTransformationExtraArgs(init, update)
