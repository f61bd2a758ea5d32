"""Autodiff oracles for purebp's curvature quantities (issue 14), independent of purebp/extras/curvature.py.

Everything here is computed in float64 from the flattened parameters theta
(``jax.flatten_util.ravel_pytree`` order: the network's leaves, each raveled
row-major) with JAX's autodiff, from a forward pass written here for the
layers that carry the curvature (dense and conv1d, through ``lax.dot`` and
``lax.conv_general_dilated``, not purebp's window gathers) and purebp's own
``layer.forward`` for the others (layer norm, dropout with the same per-example
keys, pooling, flatten), so that dropout masks are the library's.

Notation as in the contract (notes/curvature_contract.md): N examples, s = 1/N
("mean") or 1 ("sum"), f_n the point where the cost is convex (z^L of a dense
output layer for the cross-entropy losses, the network's output otherwise, i.e.
a^L for mse and the output of a network ending in another layer), C^n(f) the
per-example cost, H_n = d^2 C^n / df^2 (``jax.hessian``), J_n = df_n/dtheta
(``jax.jacrev``), g_n = dC^n/dtheta (``jax.vmap(jax.grad)``).

- GGN = s sum_n J_n^T H_n J_n (P x P); diag_ggn, ggn_vector_product from it
- Hessian of L = s sum_n C^n (``jax.hessian``, P x P): diag_hessian
- sum_grad_squared = sum_n (s g_n)^2, grad_variance = (1/N) sum_n (s g_n - mean)^2
- kflr per dense/conv layer: a = (1/N) sum_n a_n a_n^T (dense input; for conv the
  flattened windows u_nt, summed over positions t too), g = s sum_n J_{z,n}^T H_n J_{z,n},
  with J_{z,n} = df_n/dz^l_n taken by adding a zero perturbation eps^l to z^l and
  differentiating w.r.t. it (works inside residual bodies); for conv J_{z,n} is first
  summed over the output positions (BackPACK's convolution factor, purebp's since
  c46132b: g is then the bias block exactly, as for a dense layer).
- ``mc_diag_ggn``: the same Monte Carlo estimator the contract describes, written here,
  to validate the statistical bounds the tests put on the library's estimator.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from purebp import activations as _activations
from purebp.check import FAST_COMPILE_OPTIONS
from purebp.layers import Conv1d, Dense, Residual, example_keys, layer_keys

HIGHEST = jax.lax.Precision.HIGHEST
CE_LOSSES = ("cross_entropy", "softmax_cross_entropy")
LOSSES = ("mse", "cross_entropy", "softmax_cross_entropy", "binary_cross_entropy")


class Factors(NamedTuple):
    """An oracle Kronecker pair, in the order of purebp.KroneckerFactors: g (output side), a (input side)."""

    g: np.ndarray
    a: np.ndarray


# ---------------------------------------------------------------- casts and trees


def upcast(tree):
    """Every floating leaf as a float64 jax array (integer labels and PRNG keys unchanged); no compile."""

    def cast(leaf):
        if leaf is None or jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return leaf
        values = np.asarray(leaf)
        return jnp.asarray(values.astype(np.float64) if np.issubdtype(values.dtype, np.floating) else values)

    return jax.tree.map(cast, tree)


def dense_targets(y, k: int) -> jax.Array:
    """(N, k) float64 targets: integer labels as one-hot rows."""
    values = np.asarray(y)
    if np.issubdtype(values.dtype, np.integer):
        return jnp.asarray(np.eye(k)[values])
    return jnp.asarray(values.astype(np.float64))


def unravel_numpy(net, flat: np.ndarray):
    """A tree like ``net`` from a vector in ravel_pytree order, with NumPy leaves (no compiles)."""
    leaves, treedef = jax.tree.flatten(net)
    out, offset = [], 0
    for leaf in leaves:
        size = int(np.prod(leaf.shape))
        out.append(np.asarray(flat[offset : offset + size]).reshape(leaf.shape))
        offset += size
    assert offset == flat.shape[-1], (offset, flat.shape)
    return jax.tree.unflatten(treedef, out)


def ravel_numpy(tree) -> np.ndarray:
    return np.concatenate([np.asarray(leaf, np.float64).reshape(-1) for leaf in jax.tree.leaves(tree)])


# ---------------------------------------------------------------- the forward pass, to the convex point f


def f_is_pre_activation(net, loss: str) -> bool:
    """True when f = z^L: a dense output layer and a cross-entropy loss (the cost is convex in the logits)."""
    return isinstance(net.layers[-1], Dense) and loss != "mse"


def _layer_forward(layer, a, keys, eps, counter, records, stop_at_z):
    if isinstance(layer, Dense):
        z = jax.lax.dot_general(a, layer.w, (((1,), (1,)), ((), ())), precision=HIGHEST) + layer.b[None, :]
        records.append(("dense", a, z.shape[1:]))
    elif isinstance(layer, Conv1d):
        _, in_channels, kernel = layer.w.shape
        z = jax.lax.conv_general_dilated(
            a,
            layer.w,
            (layer.stride,),
            [(layer.padding, layer.padding)],
            dimension_numbers=("NCH", "OIH", "NCH"),
            precision=HIGHEST,
        )
        z = z + layer.b[None, :, None]
        # u_nt = the input window at position t, flattened in (channel, kernel) order
        padded = jnp.pad(a, ((0, 0), (0, 0), (layer.padding, layer.padding)))
        positions = z.shape[2]
        index = np.arange(kernel)[None, :] + layer.stride * np.arange(positions)[:, None]  # (T, K)
        u = padded[:, :, index]  # (N, C_in, T, K)
        u = jnp.transpose(u, (0, 2, 1, 3)).reshape(a.shape[0], positions, in_channels * kernel)
        records.append(("conv", u, z.shape[1:]))
    elif isinstance(layer, Residual):
        hidden = a
        for index, inner in enumerate(layer.layers):
            hidden = _layer_forward(inner, hidden, layer_keys(keys, index), eps, counter, records, False)
        return a + hidden
    else:  # layer norm, dropout (the library's masks), pooling, flatten
        out, _ = layer.forward(a, keys)
        return out
    if eps is not None:
        z = z + eps[counter[0]]
    counter[0] += 1
    if stop_at_z:
        return z
    return _activations.get(layer.activation).forward(z)


def convex_point(net, x, loss: str, key=None, eps=None, offset=0, records=None):
    """f for every example, (N, k); ``eps``: one perturbation per dense/conv layer added to its z (pre-order)."""
    layers = net.layers
    keys = None if key is None else example_keys(key, x.shape[0], offset)
    records = [] if records is None else records
    counter = [0]
    stop = f_is_pre_activation(net, loss)
    a = x
    for index, layer in enumerate(layers):
        a = _layer_forward(layer, a, layer_keys(keys, index), eps, counter, records, stop and index == len(layers) - 1)
    return a


def cost(loss: str, f, y):
    """C(f, y) for one example (f, y of shape (k,)), written here with jax.nn."""
    if loss == "mse":
        return 0.5 * jnp.sum((f - y) ** 2)
    if loss in CE_LOSSES:
        return -jnp.sum(y * jax.nn.log_softmax(f))
    if loss == "binary_cross_entropy":
        return jnp.sum(y * jax.nn.softplus(-f) + (1.0 - y) * jax.nn.softplus(f))
    raise ValueError(f"no oracle for loss {loss!r}")


def _scale(reduction: str, batch: int) -> float:
    return 1.0 / batch if reduction == "mean" else 1.0


# ---------------------------------------------------------------- the jitted oracle program


# compiled to run a few times: XLA's fast-compile options (purebp.check's), which cut the compile of these
# jacobian programs several-fold; one program per architecture, reused for new weights of the same shapes
def _jit(function, **options):
    return jax.jit(function, compiler_options=FAST_COMPILE_OPTIONS.get(jax.default_backend()), **options)


@functools.partial(_jit, static_argnames=("loss", "reduction"))
def _oracle_program(net, x, y, key, loss, reduction):
    theta, unravel = ravel_pytree(net)
    batch = x.shape[0]
    s = _scale(reduction, batch)
    records = []
    f0 = convex_point(net, x, loss, key, records=records)
    z_shapes = [shape for _, _, shape in records]
    inputs = [u for _, u, _ in records]

    def f_of_theta(flat):
        return convex_point(unravel(flat), x, loss, key)

    jac = jax.jacrev(f_of_theta)(theta)  # (N, k, P)
    hess_f = jax.vmap(jax.hessian(lambda f, t: cost(loss, f, t)))(f0, y)  # (N, k, k)
    ggn = s * jnp.einsum("nkp,nkl,nlq->pq", jac, hess_f, jac, precision=HIGHEST)

    # J_{z^l}: d f / d eps^l at eps = 0, block-diagonal over examples
    zeros = tuple(jnp.zeros((batch,) + shape, x.dtype) for shape in z_shapes)
    jac_z = jax.jacrev(lambda e: convex_point(net, x, loss, key, eps=e))(zeros)  # each (N, k, N, *z)
    rows = jnp.arange(batch)
    jac_z = tuple(j[rows, :, rows] for j in jac_z)  # each (N, k, *z)

    def example_cost(flat, xn, yn, n):
        return cost(loss, convex_point(unravel(flat), xn[None], loss, key, offset=n)[0], yn)

    per_example = jax.vmap(jax.grad(example_cost), in_axes=(None, 0, 0, 0))(theta, x, y, rows)  # (N, P)

    out = {"theta": theta, "f": f0, "J": jac, "H": hess_f, "ggn": ggn, "Jz": jac_z, "inputs": tuple(inputs)}
    out["per_example"] = per_example
    return out


@functools.partial(_jit, static_argnames=("loss", "reduction"))
def _hessian_program(net, x, y, key, loss, reduction):
    theta, unravel = ravel_pytree(net)
    s = _scale(reduction, x.shape[0])

    def total(flat):
        f = convex_point(unravel(flat), x, loss, key)
        return s * jnp.sum(jax.vmap(lambda fn, yn: cost(loss, fn, yn))(f, y))

    return jax.hessian(total)(theta)


@functools.partial(_jit, static_argnames=("loss", "reduction"))
def _gvp_by_jvp(net, x, y, key, v, loss, reduction):
    theta, unravel = ravel_pytree(net)
    tangent, _ = ravel_pytree(v)

    def f(flat):
        return convex_point(unravel(flat), x, loss, key)

    f0, jv = jax.jvp(f, (theta,), (tangent,))
    hjv = jax.vmap(lambda fn, yn, t: jax.jvp(jax.grad(lambda q: cost(loss, q, yn)), (fn,), (t,))[1])(f0, y, jv)
    return _scale(reduction, x.shape[0]) * jax.vjp(f, theta)[1](hjv)[0]


def ggn_vector_product_by_jvp(net, x, y, key, v, loss: str, reduction: str):
    """G v = s J^T (H (J v)) by jax.jvp / jax.vjp, no matrix formed: a second, matrix-free oracle."""
    net, x, v = upcast(net), upcast(x), upcast(v)
    return unravel_numpy(net, np.asarray(_gvp_by_jvp(net, x, y, key, v, loss, reduction)))


class Oracle:
    """Every curvature quantity of (net, x, y) by autodiff, in float64; trees have NumPy leaves.

    ``hessian=False`` skips the full Hessian (the one expensive part); ``diag_hessian`` then raises.
    """

    def __init__(self, net, x, y, *, loss: str, reduction: str = "mean", key=None, hessian: bool = True):
        if loss not in LOSSES:
            raise ValueError(f"no oracle for loss {loss!r}")
        self.net = upcast(net)
        self.x = upcast(x)
        self.key = key
        self.loss, self.reduction = loss, reduction
        self.batch = int(x.shape[0])
        self.s = _scale(reduction, self.batch)
        k = int(jax.eval_shape(lambda n, a: convex_point(n, a, loss), self.net, self.x).shape[-1])
        self.y = dense_targets(y, k)
        raw = _oracle_program(self.net, self.x, self.y, key, loss, reduction)
        if hessian:
            raw["hessian"] = _hessian_program(self.net, self.x, self.y, key, loss, reduction)
        self.raw = {name: jax.tree.map(np.asarray, value) for name, value in raw.items()}
        self.ggn = self.raw["ggn"]

    # trees like net
    def diag_ggn(self):
        return unravel_numpy(self.net, np.diag(self.ggn).copy())

    def ggn_vector_product(self, v):
        return unravel_numpy(self.net, self.ggn @ ravel_numpy(v))

    def diag_hessian(self):
        if "hessian" not in self.raw:
            raise RuntimeError("Oracle(..., hessian=False) has no Hessian")
        return unravel_numpy(self.net, np.diag(self.raw["hessian"]).copy())

    def individual_gradients(self) -> np.ndarray:
        """(N, P): s g_n, BackPACK's individual-gradient scaling."""
        return self.s * self.raw["per_example"]

    def sum_grad_squared(self):
        ghat = self.individual_gradients()
        return unravel_numpy(self.net, np.sum(ghat * ghat, axis=0))

    def grad_variance(self):
        ghat = self.individual_gradients()
        centred = ghat - ghat.mean(axis=0, keepdims=True)  # the two-pass form: no cancellation
        return unravel_numpy(self.net, np.mean(centred * centred, axis=0))

    # Kronecker factors
    def layer_factors(self) -> list[Factors]:
        """(g, a) for every dense/conv layer, in pre-order (residual bodies inline)."""
        out = []
        for jz, u in zip(self.raw["Jz"], self.raw["inputs"]):
            if jz.ndim == 3:  # dense: (N, k, n_out), u (N, n_in)
                g = self.s * np.einsum("nki,nkl,nlj->ij", jz, self.raw["H"], jz)
                a = u.T @ u / self.batch
            else:  # conv: (N, k, C_out, T), u (N, T, C_in K); g from J summed over positions (BackPACK's KFAC/KFLR
                # convolution factor, which makes the bias block g exactly), a summed over positions
                summed = jz.sum(axis=3)
                g = self.s * np.einsum("nki,nkl,nlj->ij", summed, self.raw["H"], summed)
                a = np.einsum("nti,ntj->ij", u, u) / self.batch
            out.append(Factors(g, a))
        return out

    def kflr(self):
        """The contract's structure: one entry per top-level layer (Dense/Conv: Factors, Residual: tuple, else None)."""
        factors = iter(self.layer_factors())

        def entry(layer):
            if isinstance(layer, (Dense, Conv1d)):
                return next(factors)
            if isinstance(layer, Residual):
                return tuple(entry(inner) for inner in layer.layers)
            if jax.tree.leaves(layer):
                raise RuntimeError(f"no Kronecker factors for {layer!r}")
            return None

        return tuple(entry(layer) for layer in self.net.layers)

    # where each dense/conv layer's w and b sit in theta (pre-order), for GGN blocks
    def parameter_slices(self) -> list[tuple[slice, slice]]:
        slices, offset = [], 0

        def walk(layer):
            nonlocal offset
            if isinstance(layer, Residual):
                for inner in layer.layers:
                    walk(inner)
                return
            sizes = [int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(layer)]
            if isinstance(layer, (Dense, Conv1d)):
                slices.append((slice(offset, offset + sizes[0]), slice(offset + sizes[0], offset + sum(sizes))))
            offset += sum(sizes)

        for layer in self.net.layers:
            walk(layer)
        assert offset == self.ggn.shape[0]
        return slices

    def ggn_block(self, rows: slice, cols: slice | None = None) -> np.ndarray:
        return self.ggn[rows, rows if cols is None else cols]

    # Monte Carlo, as the contract defines it (for validating the tests' statistics)
    def mc_diag_ggn(self, key, samples: int):
        estimate = _mc_diag(self.raw["J"], self.raw["f"], self.y, key, self.loss, samples, self.s)
        return unravel_numpy(self.net, np.asarray(estimate))


@functools.partial(_jit, static_argnames=("loss", "samples"))
def _mc_diag(jac, f, y, key, loss, samples, s):
    gt = sampled_gradients(f, y, key, loss, samples)  # (N, M, k)
    projected = jnp.einsum("nmk,nkp->nmp", gt, jac, precision=HIGHEST)
    return s * jnp.sum(jnp.mean(projected * projected, axis=1), axis=0)


def sampled_gradients(f, y, key, loss: str, samples: int):
    """gt = dC(f_n, yhat_m)/df with yhat_m ~ p(y | f_n), shape (N, M, k); E[gt gt^T] = H_n."""
    batch, k = f.shape
    if loss in CE_LOSSES:
        p = jax.nn.softmax(f)
        labels = jax.random.categorical(key, f[:, None, :], axis=-1, shape=(batch, samples))
        onehot = jax.nn.one_hot(labels, k, dtype=f.dtype)
        return (p[:, None, :] - onehot) * jnp.sqrt(jnp.sum(y, axis=-1))[:, None, None]
    if loss == "binary_cross_entropy":
        p = jax.nn.sigmoid(f)
        draws = jax.random.bernoulli(key, p[:, None, :], (batch, samples, k)).astype(f.dtype)
        return p[:, None, :] - draws
    return -jax.random.normal(key, (batch, samples, k), f.dtype)  # mse: f - yhat, yhat ~ N(f, I)


# ---------------------------------------------------------------- comparison


def leaf_paths(tree) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def relative_errors(actual, expected, *, floor: float = 1e-6, tiny: float = 1e-300) -> list[tuple[str, float]]:
    """Per leaf ||a - b||_2 / max(||b||_2, floor * ||b_all||_2, tiny), with the leaf's path; the trees must agree.

    The floor is purebp.check's convention: a leaf whose oracle value is below 1e-6 of the whole
    tree's norm (a dead unit, a sum that cancels) is measured against that instead of its own norm.
    """
    a_leaves = jax.tree.leaves(actual)
    b_leaves = jax.tree.leaves(expected)
    if len(a_leaves) != len(b_leaves):
        raise AssertionError(
            f"trees differ: {len(a_leaves)} leaves vs {len(b_leaves)} expected\n"
            f"actual {jax.tree.structure(actual)}\nexpected {jax.tree.structure(expected)}"
        )
    b64 = [np.asarray(b, np.float64) for b in b_leaves]
    total = float(np.sqrt(sum(float(np.sum(b * b)) for b in b64)))
    out = []
    for path, a, b in zip(leaf_paths(expected), a_leaves, b64):
        a = np.asarray(a, np.float64)
        if a.shape != b.shape:
            out.append((path + f" shape {a.shape} != {b.shape}", float("inf")))
            continue
        if not np.all(np.isfinite(a)):
            out.append((path + " (not finite)", float("inf")))
            continue
        difference = float(np.linalg.norm((a - b).ravel()))
        scale = max(float(np.linalg.norm(b.ravel())), floor * total, tiny)
        out.append((path, difference / scale))
    return out


def worst(errors: list[tuple[str, float]]) -> tuple[str, float]:
    return max(errors, key=lambda item: item[1]) if errors else ("", 0.0)
