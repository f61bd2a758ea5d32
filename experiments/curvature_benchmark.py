"""purebp's curvature quantities side by side with BackPACK (PyTorch) and the JAX autodiff route.

Run from the repository root (BackPACK is in the ``bench`` extra: ``pip install -e ".[bench]"``)::

    python -m experiments.curvature_benchmark          # all networks: experiments/results/curvature_benchmark.{md,json}
    python -m experiments.curvature_benchmark --quick  # tiny only, 3 rounds: a smoke run (curvature_benchmark_quick.*)
    python -m experiments.curvature_benchmark --configs wide --quantities diag_ggn,diag_hessian --slow-rounds 8

For every network (``experiments.benchmark``'s four MLPs, a tanh variant of the MNIST MLP so that the diagonal
Hessian differs from the diagonal GGN, and MNIST-1D's CNN of ``experiments.benchmark_conv``), float32, the mean
softmax cross-entropy, all from the same weights, one process, interleaved (``benchmark.interleaved_medians``:
every round times each contender once, in a fresh order; medians over rounds):

- ``purebp``: each quantity (``sum_grad_squared``, ``grad_variance``, ``diag_ggn`` exact and with one MC sample,
  ``diag_hessian``, ``kflr``, ``kfac`` with one MC sample) under ``jax.jit``, waited for with
  ``block_until_ready``;
- ``BackPACK``: the matching extension (SumGradSquared, Variance, DiagGGNExact, DiagGGNMC, DiagHessian, KFLR,
  KFAC) as its documentation uses it: ``loss = lossfunc(model(x), y)`` then ``with backpack(extension):
  loss.backward()`` on an ``extend``-ed ``torch.nn.Sequential`` (PyTorch's threads pinned as in
  ``experiments.benchmark``);
- ``JAX autodiff`` (small networks only: it builds per-example Jacobians or the full Hessian): the diagonal GGN
  as ``vmap`` of ``jacrev`` of the per-example output and ``jax.hessian`` of the per-example cost, and the
  diagonal Hessian as the diagonal of ``jax.hessian`` of the loss over the flattened parameters;
- the two units: ``purebp.value_and_grad`` (jitted) and a plain PyTorch ``loss.backward()`` (a model without
  BackPACK's hooks).

Every exact quantity purebp computes is compared with BackPACK's (and the autodiff route's where it ran): the
worst per-leaf relative L2 error, which has to stay within float32's 1e-4. The MC quantities cannot match
number for number (different random draws); their column says how far one MC sample is from the exact value.

The same module holds what ``tests/extras/test_curvature_backpack.py`` uses: the port of a purebp network to PyTorch
(``torch_model``), the matching PyTorch loss and the factor that turns BackPACK's numbers into purebp's
(``to_purebp_scale``), BackPACK's quantities as lists per parameter (``backpack_quantity``) and purebp's in the
same layout (``purebp_quantity``), and the autodiff oracles. This is a script of the repository, not part of
the library: the library never imports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import purebp as pb
from experiments import benchmark, benchmark_conv

RESULTS = Path(__file__).resolve().parent / "results"
LOSS = "softmax_cross_entropy"
PUREBP, BACKPACK, AUTODIFF = "purebp", "BackPACK", "JAX autodiff"
VALUE_AND_GRAD, TORCH_BACKWARD = "purebp value_and_grad", "torch backward"
QUANTITIES = ("sum_grad_squared", "grad_variance", "diag_ggn", "diag_ggn_mc", "diag_hessian", "kflr", "kfac")
MONTE_CARLO = ("diag_ggn_mc", "kfac")
EXACT = tuple(q for q in QUANTITIES if q not in MONTE_CARLO)
SQUARED = ("sum_grad_squared", "grad_variance")  # statistics of squared gradients: scale with the loss squared
# quantity -> (BackPACK extension, keyword arguments, the attribute it writes on every parameter)
EXTENSIONS = {
    "sum_grad_squared": ("SumGradSquared", {}, "sum_grad_squared"),
    "grad_variance": ("Variance", {}, "variance"),
    "diag_ggn": ("DiagGGNExact", {}, "diag_ggn_exact"),
    "diag_ggn_mc": ("DiagGGNMC", {"mc_samples": 1}, "diag_ggn_mc"),
    "diag_hessian": ("DiagHessian", {}, "diag_h"),
    "kflr": ("KFLR", {}, "kflr"),
    "kfac": ("KFAC", {"mc_samples": 1}, "kfac"),
}
TOLERANCE = 1e-4  # float32: worst per-leaf relative L2 error between purebp and BackPACK
AUTODIFF_MAX_PARAMETERS = 10_000  # the autodiff route holds N x C x P Jacobians (and vmap(grad) N x P)
HESSIAN_MAX_PARAMETERS = 3_000  # jax.hessian of the loss: a P x P matrix, and P forward-over-reverse passes


# ---------------------------------------------------------------- porting a purebp network to PyTorch


def _require(module: str):
    return benchmark._require(module)


def _torch_activation(torch, name: str):
    modules = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}
    if name == "identity":
        return None
    if name not in modules:
        raise ValueError(
            f"no PyTorch/BackPACK counterpart for activation {name!r}; portable: identity, {list(modules)}"
        )
    return modules[name]()


def _stack(net: pb.Sequential) -> tuple:
    """The layers of ``net``."""
    return tuple(net.layers)


def torch_model(net: pb.Sequential, loss: str):
    """Return a ``torch.nn.Sequential`` with ``net``'s weights (float32 copies) that outputs BackPACK's f.

    Dense w (n_out, n_in) is ``Linear.weight``; Conv1d w (C_out, C_in, K) is ``Conv1d.weight``; pooling has
    PyTorch's semantics and flatten is channel-major as ``torch.nn.Flatten``. For the cross-entropy losses the
    model ends at the logits z^L (PyTorch's losses take logits), so the output layer's activation is dropped:
    identity for ``softmax_cross_entropy``, sigmoid for ``binary_cross_entropy`` (``BCEWithLogitsLoss``); for
    ``mse`` the output activation stays. The model is not ``extend``-ed.
    """
    torch = _require("torch")
    if loss not in ("softmax_cross_entropy", "mse", "binary_cross_entropy"):
        raise ValueError(
            f"loss {loss!r} has no BackPACK counterpart (softmax_cross_entropy, mse, binary_cross_entropy)"
        )
    layers = _stack(net)
    modules = []

    def tensor(array):
        return torch.tensor(np.array(array, dtype=np.float32))

    for index, layer in enumerate(layers):
        last = index == len(layers) - 1
        if isinstance(layer, pb.Dense):
            n_out, n_in = layer.w.shape
            module = torch.nn.Linear(n_in, n_out)
        elif isinstance(layer, pb.Conv1d):
            c_out, c_in, k = layer.w.shape
            module = torch.nn.Conv1d(c_in, c_out, k, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, pb.MaxPool1d):
            modules.append(torch.nn.MaxPool1d(layer.kernel, stride=layer.stride))
            continue
        elif isinstance(layer, pb.AvgPool1d):
            modules.append(torch.nn.AvgPool1d(layer.kernel, stride=layer.stride))
            continue
        elif isinstance(layer, pb.Flatten):
            modules.append(torch.nn.Flatten())
            continue
        else:
            raise ValueError(f"layer {index} ({type(layer).__name__}) has no port to PyTorch here")
        with torch.no_grad():
            module.weight.copy_(tensor(layer.w))
            module.bias.copy_(tensor(layer.b))
        modules.append(module)
        expected = {"softmax_cross_entropy": "identity", "binary_cross_entropy": "sigmoid"}.get(loss)
        if last and expected is not None:
            if layer.activation != expected:
                raise ValueError(f"{loss} needs a {expected} output layer, got {layer.activation!r}")
            continue
        activation = _torch_activation(torch, layer.activation)
        if activation is not None:
            modules.append(activation)
    return torch.nn.Sequential(*modules)


def torch_loss(loss: str, reduction: str):
    """The PyTorch loss whose BackPACK quantities ``to_purebp_scale`` turns into purebp's."""
    torch = _require("torch")
    modules = {
        "softmax_cross_entropy": torch.nn.CrossEntropyLoss,
        "mse": torch.nn.MSELoss,
        "binary_cross_entropy": torch.nn.BCEWithLogitsLoss,
    }
    return modules[loss](reduction=reduction)


def torch_data(x, y, loss: str):
    """(x, y) as PyTorch tensors: integer labels as int64 for cross-entropy, float32 targets otherwise."""
    torch = _require("torch")
    x_t = torch.tensor(np.array(x, dtype=np.float32))
    if loss == "softmax_cross_entropy":
        return x_t, torch.tensor(np.array(y, dtype=np.int64))
    return x_t, torch.tensor(np.array(y, dtype=np.float32))


def to_purebp_scale(loss: str, reduction: str, n_out: int) -> tuple[float, float]:
    """Return (c, c**2): purebp's quantity = c x BackPACK's (c**2 for the squared-gradient statistics).

    softmax_cross_entropy and binary_cross_entropy (one output: BackPACK's BCEWithLogitsLoss takes scalar
    predictions only): the same losses, c = 1. mse: purebp's C^n = 1/2 sum_j (a_j - y_j)^2 and
    L = s sum_n C^n; PyTorch's MSELoss(reduction="sum") is sum_{n,j} (a - y)^2 = 2 L, so c = 1/2;
    MSELoss(reduction="mean") divides by N D (D outputs), = (2/D) L, so c = D/2. Every quantity that is
    linear in L (the gradient, the GGN and its factor g, the Hessian) scales by c; the per-example gradients
    ghat_n scale by c, so sum_grad_squared and grad_variance scale by c**2. KFLR's factor a (inputs only)
    does not scale.
    """
    if loss != "mse":
        return 1.0, 1.0
    c = 0.5 if reduction == "sum" else n_out / 2
    return c, c * c


# ---------------------------------------------------------------- the two sides in one layout


def backpack_call(model, lossfunc, x, y, quantity: str) -> Callable[[], None]:
    """Return a call that computes BackPACK's ``quantity`` on (an ``extend``-ed copy of) ``model``, as documented.

    ``loss = lossfunc(model(x), y)``, then ``with backpack(Extension()): loss.backward()``; the results land on
    each parameter (``param.<savefield>``).
    """
    backpack = _require("backpack")
    extensions = _require("backpack.extensions")
    name, options, _ = EXTENSIONS[quantity]
    extension = getattr(extensions, name)(**options)
    model, lossfunc = backpack.extend(model), backpack.extend(lossfunc)

    def call():
        model.zero_grad(set_to_none=True)
        loss = lossfunc(model(x), y)
        with backpack.backpack(extension):
            loss.backward()

    return call


def backpack_values(model, quantity: str, scale: tuple[float, float]) -> list:
    """What the last BackPACK call left on ``model``'s parameters, in purebp's units, as NumPy.

    One entry per parameter (weight, bias, ... in order): an array shaped like it, or for KFLR/KFAC the list of
    Kronecker factors, [g, a] for a weight and [g] for a bias.
    """
    _, _, field = EXTENSIONS[quantity]
    linear, squared = scale
    factor = squared if quantity in SQUARED else linear
    values = []
    for param in model.parameters():
        value = getattr(param, field)
        if quantity in ("kflr", "kfac"):
            # [G, A] for a weight (G = the GGN w.r.t. the layer's output, A the input's second moment), [G] for a bias
            values.append([value[0].detach().numpy() * linear] + [v.detach().numpy() for v in value[1:]])
        else:
            values.append(value.detach().numpy() * factor)
    return values


def purebp_function(quantity: str, loss: str, reduction: str = "mean", mc_samples: int = 1) -> Callable:
    """Return ``f(net, x, y, key)`` computing purebp's ``quantity`` (the key is used by the MC quantities only)."""
    options = {"loss": loss, "reduction": reduction}
    if quantity in ("sum_grad_squared", "grad_variance", "diag_hessian", "kflr"):
        function = getattr(pb, quantity)
        return lambda net, x, y, key: function(net, x, y, **options)
    if quantity == "diag_ggn":
        return lambda net, x, y, key: pb.diag_ggn(net, x, y, **options)
    if quantity == "diag_ggn_mc":
        return lambda net, x, y, key: pb.diag_ggn(net, x, y, **options, mc_samples=mc_samples, key=key)
    if quantity == "kfac":
        return lambda net, x, y, key: pb.kfac(net, x, y, **options, mc_samples=mc_samples, key=key)
    raise ValueError(f"unknown quantity {quantity!r}; valid: {', '.join(QUANTITIES)}")


def purebp_values(result, quantity: str) -> list:
    """purebp's result in ``backpack_values``' layout: one entry per parameter leaf, [g, a] / [g] for KFLR/KFAC."""
    if quantity not in ("kflr", "kfac"):
        return [np.asarray(leaf) for leaf in jax.tree.leaves(result)]
    values = []
    for entry in result:
        if entry is None:
            continue  # a parameterless layer
        if not isinstance(entry, pb.KroneckerFactors):
            raise ValueError(f"expected KroneckerFactors or None per top-level layer, got {type(entry).__name__}")
        g, a = np.asarray(entry.g), np.asarray(entry.a)
        values += [[g, a], [g]]  # the weight's factors, the bias's
    return values


def relative_errors(values: list, reference: list) -> list[float]:
    """Per-leaf ||value - reference||_2 / ||reference||_2 (Kronecker factors: one number per factor), flattened."""
    errors = []
    for value, expected in zip(values, reference, strict=True):
        pairs = zip(value, expected, strict=True) if isinstance(expected, list) else [(value, expected)]
        for v, e in pairs:
            v, e = np.asarray(v, np.float64), np.asarray(e, np.float64)
            if v.shape != e.shape:
                raise ValueError(f"shapes differ: {v.shape} vs {e.shape}")
            errors.append(float(np.linalg.norm(v - e)) / max(float(np.linalg.norm(e)), 1e-30))
    return errors


def max_relative_error(values: list, reference: list) -> float:
    return max(relative_errors(values, reference))


# ---------------------------------------------------------------- the JAX autodiff route (oracles)


def _f_network(net: pb.Sequential, loss: str):
    """``net`` up to f, the point where the loss is convex: z^L for the cross-entropy losses, a^L for mse."""
    if loss == "mse":
        return net
    return pb.Sequential(
        net.layers[:-1] + (dataclasses.replace(net.layers[-1], activation="identity"),), net.input_shape
    )


def cost_of_f(loss: str, n_out: int) -> Callable:
    """C(f, y) for one example: what purebp's costs are as functions of f (y: a label, or a target row)."""
    if loss in ("softmax_cross_entropy", "cross_entropy"):
        return lambda f, y: -jnp.sum(jax.nn.one_hot(y, n_out, dtype=f.dtype) * jax.nn.log_softmax(f))
    if loss == "binary_cross_entropy":
        return lambda f, y: jnp.sum(y * jax.nn.softplus(-f) + (1 - y) * jax.nn.softplus(f))
    if loss == "mse":
        return lambda f, y: 0.5 * jnp.sum((f - y) ** 2)
    raise ValueError(f"unknown loss {loss!r}")


def _pieces(net, x, loss: str, reduction: str):
    f_net = _f_network(net, loss)
    flat, unravel = ravel_pytree(f_net)
    n_out = pb.forward(f_net, x[:1]).shape[-1]
    scale = 1.0 / x.shape[0] if reduction == "mean" else 1.0

    def f_example(theta, x_n):
        return pb.forward(unravel(theta), x_n[None])[0]

    def net_like(flat_values):  # a flat vector in the layout of net's leaves
        return jax.tree.unflatten(jax.tree.structure(net), jax.tree.leaves(unravel(flat_values)))

    return flat, f_example, net_like, cost_of_f(loss, n_out), scale


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def autodiff_diag_ggn(net, x, y, *, loss: str, reduction: str = "mean"):
    """diag(s sum_n J_n^T H_n J_n): J_n by ``jacrev`` of the per-example f, H_n by ``jax.hessian`` of C(f)."""
    flat, f_example, net_like, cost, scale = _pieces(net, x, loss, reduction)

    def example(x_n, y_n):
        f = f_example(flat, x_n)
        jacobian = jax.jacrev(f_example)(flat, x_n)  # (C, P)
        hessian = jax.hessian(cost)(f, y_n)  # (C, C)
        return jnp.einsum("cp,cd,dp->p", jacobian, hessian, jacobian)

    return net_like(scale * jnp.sum(jax.vmap(example)(x, y), axis=0))


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def autodiff_ggn(net, x, y, *, loss: str, reduction: str = "mean") -> jax.Array:
    """The full GGN s sum_n J_n^T H_n J_n over the flattened parameters (P x P, leaves in order)."""
    flat, f_example, _, cost, scale = _pieces(net, x, loss, reduction)

    def example(x_n, y_n):
        jacobian = jax.jacrev(f_example)(flat, x_n)
        return jacobian.T @ jax.hessian(cost)(f_example(flat, x_n), y_n) @ jacobian

    return scale * jnp.sum(jax.vmap(example)(x, y), axis=0)


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def autodiff_diag_hessian(net, x, y, *, loss: str, reduction: str = "mean"):
    """The diagonal of ``jax.hessian`` of L(theta) = s sum_n C^n over the flattened parameters."""
    flat, f_example, net_like, cost, scale = _pieces(net, x, loss, reduction)

    def total(theta):
        return scale * jnp.sum(jax.vmap(lambda x_n, y_n: cost(f_example(theta, x_n), y_n))(x, y))

    return net_like(jnp.diag(jax.hessian(total)(flat)))


@functools.partial(jax.jit, static_argnames=("loss", "reduction"))
def autodiff_statistics(net, x, y, *, loss: str, reduction: str = "mean"):
    """(sum_n ghat_n^2, (1/N) sum ghat_n^2 - ((1/N) sum ghat_n)^2) from ``vmap(grad)`` of the per-example cost."""
    flat, f_example, net_like, cost, scale = _pieces(net, x, loss, reduction)
    per_example = jax.grad(lambda theta, x_n, y_n: cost(f_example(theta, x_n), y_n))
    ghat = scale * jax.vmap(per_example, in_axes=(None, 0, 0))(flat, x, y)
    return net_like(jnp.sum(ghat**2, axis=0)), net_like(jnp.mean(ghat**2, axis=0) - jnp.mean(ghat, axis=0) ** 2)


# ---------------------------------------------------------------- the benchmark networks


@dataclasses.dataclass(frozen=True)
class Problem:
    name: str
    describe: str
    make: Callable[[], tuple]  # () -> (net, x, integer labels), float32


def _mlp(config: benchmark.Config) -> Problem:
    sizes = "-".join(map(str, config.sizes))
    return Problem(
        config.name, f"MLP {sizes} {config.hidden}, batch {config.batch}", lambda: benchmark.make_problem(config)
    )


MID_TANH = benchmark.Config("mid_tanh", (784, 256, 256, 10), "tanh", 128)
PROBLEMS = {
    **{name: _mlp(config) for name, config in benchmark.CONFIGS.items()},
    MID_TANH.name: _mlp(MID_TANH),
    "cnn": Problem(
        "cnn",
        f"MNIST-1D CNN (3 conv1d relu + flatten + dense, {benchmark_conv.__name__}), batch {benchmark_conv.BATCH}",
        lambda: benchmark_conv.make_problem(),
    ),
}


# ---------------------------------------------------------------- contenders and the run


def _parameter_count(net) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(net))


def autodiff_quantities(net) -> tuple[str, ...]:
    """The quantities the autodiff route computes for ``net``: none past a size (it holds N x C x P Jacobians and,
    for the diagonal Hessian, the P x P Hessian)."""
    count = _parameter_count(net)
    if count > AUTODIFF_MAX_PARAMETERS:
        return ()
    hessian = ("diag_hessian",) if count <= HESSIAN_MAX_PARAMETERS else ()
    return ("sum_grad_squared", "grad_variance", "diag_ggn", *hessian)


def _autodiff_function(quantity: str) -> Callable:
    if quantity in SQUARED:
        index = SQUARED.index(quantity)
        return lambda net, x, y: autodiff_statistics(net, x, y, loss=LOSS)[index]
    function = {"diag_ggn": autodiff_diag_ggn, "diag_hessian": autodiff_diag_hessian}[quantity]
    return functools.partial(function, loss=LOSS)


def contenders(problem: Problem, quantities: Sequence[str]) -> tuple[dict[str, Callable], dict[str, dict]]:
    """Return ({contender name: a call that computes one result and waits for it}, {quantity: agreement}).

    Agreement per quantity: ``vs_backpack``, the worst per-leaf relative L2 error of purebp's result against
    BackPACK's (exact quantities; for the MC ones, purebp's one-sample estimate against BackPACK's exact
    counterpart, and ``backpack_mc_vs_exact`` the same for BackPACK's own sample: how noisy one sample is), and
    ``autodiff_vs_purebp`` where the autodiff route ran.
    """
    net, x, y = problem.make()
    key = jax.random.key(1)
    x_t, y_t = torch_data(x, y, LOSS)
    model, lossfunc = torch_model(net, LOSS), torch_loss(LOSS, "mean")
    scale = to_purebp_scale(LOSS, "mean", 0)
    calls: dict[str, Callable] = {}
    purebp_results, backpack_results = {}, {}
    for quantity in quantities:
        jitted = jax.jit(purebp_function(quantity, LOSS))
        calls[f"{PUREBP} {quantity}"] = functools.partial(lambda f: jax.block_until_ready(f(net, x, y, key)), jitted)
        purebp_results[quantity] = purebp_values(jitted(net, x, y, key), quantity)
        calls[f"{BACKPACK} {quantity}"] = backpack_call(model, lossfunc, x_t, y_t, quantity)
        calls[f"{BACKPACK} {quantity}"]()
        backpack_results[quantity] = backpack_values(model, quantity, scale)
    jitted_gradient = jax.jit(functools.partial(pb.value_and_grad, loss=LOSS))
    calls[VALUE_AND_GRAD] = lambda: jax.block_until_ready(jitted_gradient(net, x, y))
    plain_model = torch_model(net, LOSS)  # no BackPACK hooks

    def torch_backward():
        plain_model.zero_grad(set_to_none=True)
        lossfunc(plain_model(x_t), y_t).backward()

    calls[TORCH_BACKWARD] = torch_backward
    agreement = {}
    for quantity in quantities:
        exact = {"diag_ggn_mc": "diag_ggn", "kfac": "kflr"}.get(quantity, quantity)
        row = {}
        if exact in backpack_results:
            row["vs_backpack"] = max_relative_error(purebp_results[quantity], backpack_results[exact])
        if quantity in MONTE_CARLO and exact in backpack_results:
            row["backpack_mc_vs_exact"] = max_relative_error(backpack_results[quantity], backpack_results[exact])
        agreement[quantity] = row
    for quantity in autodiff_quantities(net):
        if quantity not in quantities:
            continue
        jitted = jax.jit(_autodiff_function(quantity))
        calls[f"{AUTODIFF} {quantity}"] = functools.partial(lambda f: jax.block_until_ready(f(net, x, y)), jitted)
        agreement[quantity]["autodiff_vs_purebp"] = max_relative_error(
            purebp_values(jitted(net, x, y), quantity), purebp_results[quantity]
        )
    return calls, agreement


def run(
    configs: Sequence[str] = tuple(PROBLEMS),
    *,
    rounds: int = 10,
    quantities: Sequence[str] = QUANTITIES,
    threads: int | None = None,
    slow_rounds: int = 3,
    slow_seconds: float = 0.25,
    progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """Time every contender on every network; return a plain dict (machine, rows, units, targets).

    A quantity where one call of either side takes longer than ``slow_seconds`` (BackPACK's diagonal Hessian
    of the deep sigmoid network takes seconds) is timed in a second interleaved phase of ``slow_rounds``
    rounds, both sides and the two units together, so that the whole run stays within minutes; its ratios
    are to that phase's units.
    """
    unknown = [name for name in configs if name not in PROBLEMS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; valid: {', '.join(PROBLEMS)}")
    if unknown := [q for q in quantities if q not in QUANTITIES]:
        raise ValueError(f"unknown quantities {unknown}; valid: {', '.join(QUANTITIES)}")
    if rounds < 1 or slow_rounds < 1:
        raise ValueError(f"rounds and slow_rounds must be at least 1, got {rounds} and {slow_rounds}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1 (or None: JAX's cores), got {threads}")
    # as experiments.benchmark: PyTorch's OpenMP threads sleep between calls (read when torch loads), and its
    # intra-op pool is pinned to the cores JAX uses, so neither side oversubscribes the machine
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    info = benchmark.machine()
    info["versions"]["backpack"] = _backpack_version()
    threads = threads or info["cores"]
    torch = _require("torch")
    torch.set_num_threads(threads)
    import warnings

    # BackPACK's hooks are full backward hooks; with inputs that need no gradient PyTorch warns on every call
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    result = {
        "machine": info,
        "threads": threads,
        "rounds": rounds,
        "slow_rounds": slow_rounds,
        "slow_seconds": slow_seconds,
        "load_before": benchmark._load(),
        "configs": {},
        "rows": [],
    }
    for name in configs:
        problem = PROBLEMS[name]
        progress(f"{name}: {problem.describe}: compiling and checking")
        calls, agreement = contenders(problem, quantities)
        phases = _phases(calls, quantities, rounds, slow_rounds, slow_seconds)
        times, phase_of = {}, {}
        for phase, (members, phase_rounds, warmup) in enumerate(phases):
            progress(f"{name}: timing {len(members)} contenders, {phase_rounds} interleaved rounds")
            timed = benchmark.interleaved_medians({m: calls[m] for m in members}, phase_rounds, warmup_seconds=warmup)
            for member, timing in timed.items():
                times.setdefault(member, timing)  # the units run in both phases: the first phase's are reported
                phase_of.setdefault(member, phase)
            for unit_name in (VALUE_AND_GRAD, TORCH_BACKWARD):
                times[(unit_name, phase)] = timed[unit_name]
        net = problem.make()[0]
        result["configs"][name] = {
            "describe": problem.describe,
            "parameters": _parameter_count(net),
            "value_and_grad_ms": 1e3 * times[VALUE_AND_GRAD]["median_s"],
            "value_and_grad_spread_pct": 100 * times[VALUE_AND_GRAD]["spread"],
            "torch_backward_ms": 1e3 * times[TORCH_BACKWARD]["median_s"],
            "torch_backward_spread_pct": 100 * times[TORCH_BACKWARD]["spread"],
        }
        for quantity in quantities:
            mine, theirs = times[f"{PUREBP} {quantity}"], times[f"{BACKPACK} {quantity}"]
            phase = phase_of[f"{PUREBP} {quantity}"]
            unit, torch_unit = times[(VALUE_AND_GRAD, phase)], times[(TORCH_BACKWARD, phase)]
            autodiff = times.get(f"{AUTODIFF} {quantity}")
            result["rows"].append(
                {
                    "config": name,
                    "quantity": quantity,
                    "purebp_ms": 1e3 * mine["median_s"],
                    "backpack_ms": 1e3 * theirs["median_s"],
                    "autodiff_ms": None if autodiff is None else 1e3 * autodiff["median_s"],
                    "purebp_over_backpack": mine["median_s"] / theirs["median_s"],
                    "purebp_over_value_and_grad": mine["median_s"] / unit["median_s"],
                    "backpack_over_torch_backward": theirs["median_s"] / torch_unit["median_s"],
                    "purebp_spread_pct": 100 * mine["spread"],
                    "backpack_spread_pct": 100 * theirs["spread"],
                    "rounds": mine["rounds"],
                    **agreement[quantity],
                }
            )
    result["load_after"] = benchmark._load()
    result["targets"] = check_targets(result)
    return result


def _phases(calls: dict[str, Callable], quantities, rounds: int, slow_rounds: int, slow_seconds: float) -> list:
    """Split the contenders into [(names, rounds, warm-up seconds)]: the fast ones, then the slow quantities'.

    Each quantity's contenders (purebp, BackPACK, autodiff) stay together; the two units are in every phase.
    One call of each contender, timed here, decides.
    """
    seconds = {}
    for name, call in calls.items():
        start = time.perf_counter()
        call()
        seconds[name] = time.perf_counter() - start
    units = [VALUE_AND_GRAD, TORCH_BACKWARD]
    slow = set()
    for quantity in quantities:
        members = [n for n in calls if n.endswith(f" {quantity}")]
        if any(seconds[n] > slow_seconds for n in members):
            slow.update(members)
    fast = [n for n in calls if n not in slow and n not in units]
    phases = [(fast + units, rounds, 0.02)]
    if slow:
        phases.append(([n for n in calls if n in slow] + units, slow_rounds, 0.0))
    return phases


def _backpack_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("backpack-for-pytorch")
    except metadata.PackageNotFoundError:
        return "not installed"


def check_targets(result: dict) -> list[dict]:
    """The issue's targets on ``result``: exact quantities agree with BackPACK, every quantity is faster than
    BackPACK (aim: at most half its time), and diag GGN-MC and KFAC cost at most 3 value_and_grads."""
    targets = []
    for row in result["rows"]:
        where = f"{row['config']} {row['quantity']}"
        if row["quantity"] in EXACT and "vs_backpack" in row:
            targets.append(
                {
                    "target": f"{where}: equal to BackPACK (float32, rel. L2 per leaf <= {TOLERANCE:g})",
                    "value": f"{row['vs_backpack']:.1e}",
                    "passed": row["vs_backpack"] <= TOLERANCE,
                }
            )
        ratio = row["purebp_over_backpack"]
        targets.append(
            {
                "target": f"{where}: faster than BackPACK (time ratio < 1; aim <= 0.5)",
                "value": f"{ratio:.3f}" + (" (aim met)" if ratio <= 0.5 else ""),
                "passed": ratio < 1,
            }
        )
        if row["quantity"] in MONTE_CARLO:
            units = row["purebp_over_value_and_grad"]
            targets.append(
                {
                    "target": f"{where}: within 3x purebp's value_and_grad",
                    "value": f"{units:.2f}x",
                    "passed": units <= 3,
                }
            )
    return targets


def _cell(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def to_markdown(result: dict) -> str:
    """The result as markdown: machine and load first, then one table per network, then the targets."""
    info = result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    load = f"load average {result['load_before']:.2f} before, {result['load_after']:.2f} after"
    parts = [
        "# purebp's curvature quantities vs BackPACK",
        f"Machine: {info['cpu']}, {info['cores']} cores, {', '.join(info['jax_devices'])}; versions {versions}; "
        f"PyTorch pinned to {result['threads']} threads; {load}; medians of {result['rounds']} interleaved rounds "
        "(`experiments.benchmark.interleaved_medians`: every round times each contender once, in a fresh order, "
        "back-to-back calls for >= 20 ms after a 20 ms warm-up).",
        "float32, mean softmax cross-entropy, integer labels, the same weights on both sides. purebp: each quantity "
        "under `jax.jit`, `block_until_ready`. BackPACK: `loss = lossfunc(model(x), y)` and `with backpack(ext): "
        "loss.backward()` on an `extend`-ed `torch.nn.Sequential` (zero_grad first). MC quantities draw one sample "
        "(`mc_samples=1` on both sides). JAX autodiff (networks of <= "
        f"{AUTODIFF_MAX_PARAMETERS} parameters; diagonal Hessian <= {HESSIAN_MAX_PARAMETERS}): `vmap(grad)` for the "
        "statistics, `vmap(jacrev)` + `jax.hessian` of the cost for the diagonal GGN, the diagonal of `jax.hessian` "
        "of the loss for the diagonal Hessian. A quantity where one call of either side takes over "
        f"{result['slow_seconds']:g} s is timed in a second interleaved phase of fewer rounds with the two units "
        "(its rounds column says so; its ratios are to that phase's units).",
        "Errors: worst per-leaf relative L2 error (Kronecker factors: per factor). Exact quantities: purebp vs "
        "BackPACK, must be <= 1e-4. MC rows: purebp's one-sample estimate vs BackPACK's exact quantity (and "
        "BackPACK's own one-sample estimate, for scale): the size of one sample's noise, not an error.",
    ]
    for name, config in result["configs"].items():
        rows = [r for r in result["rows"] if r["config"] == name]
        parts.append(
            f"### {name}: {config['describe']} ({config['parameters']} parameters)\n\n"
            f"Units: purebp value_and_grad {config['value_and_grad_ms']:.3f} ms "
            f"(spread {config['value_and_grad_spread_pct']:.0f}%), plain PyTorch backward "
            f"{config['torch_backward_ms']:.3f} ms (spread {config['torch_backward_spread_pct']:.0f}%)."
        )
        parts.append(
            benchmark._table(
                [
                    "quantity",
                    "purebp ms",
                    "BackPACK ms",
                    "purebp / BackPACK",
                    "purebp / value_and_grad",
                    "BackPACK / torch backward",
                    "JAX autodiff ms",
                    "rel. err vs BackPACK",
                    "BackPACK MC vs exact",
                    "autodiff vs purebp",
                    "spread purebp / BackPACK",
                    "rounds",
                ],
                [
                    [
                        r["quantity"],
                        f"{r['purebp_ms']:.3f}",
                        f"{r['backpack_ms']:.3f}",
                        f"{r['purebp_over_backpack']:.3f}",
                        f"{r['purebp_over_value_and_grad']:.2f}",
                        f"{r['backpack_over_torch_backward']:.2f}",
                        _cell(r["autodiff_ms"], ".3f"),
                        _cell(r.get("vs_backpack"), ".1e") + (" (MC)" if r["quantity"] in MONTE_CARLO else ""),
                        _cell(r.get("backpack_mc_vs_exact"), ".1e"),
                        _cell(r.get("autodiff_vs_purebp"), ".1e"),
                        f"{r['purebp_spread_pct']:.0f}% / {r['backpack_spread_pct']:.0f}%",
                        str(r["rounds"]),
                    ]
                    for r in rows
                ],
            )
        )
    failed = [t for t in result["targets"] if not t["passed"]]
    parts.append(
        f"### targets ({len(result['targets']) - len(failed)} of {len(result['targets'])} met)\n\n"
        + benchmark._table(
            ["target", "measured", "met"],
            [[t["target"], t["value"], "yes" if t["passed"] else "NO"] for t in result["targets"]],
        )
    )
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.curvature_benchmark",
        description="Time purebp's curvature quantities (sum_grad_squared, grad_variance, diag_ggn exact and MC, "
        "diag_hessian, kflr, kfac) against BackPACK and the JAX autodiff route, interleaved in one process "
        "(medians of rounds), checking that purebp and BackPACK agree. Writes OUT.md and OUT.json.",
    )
    parser.add_argument(
        "--configs", default=",".join(PROBLEMS), help=f"comma-separated: {', '.join(PROBLEMS)} (default all)"
    )
    parser.add_argument("--quantities", default=",".join(QUANTITIES), help="comma-separated (default all)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds (default 10)")
    parser.add_argument(
        "--slow-rounds", type=int, default=3, help="rounds of the second phase, for the slow quantities (default 3)"
    )
    parser.add_argument(
        "--slow-seconds",
        type=float,
        default=0.25,
        help="a quantity where one call of either side takes longer goes to the second phase (default 0.25)",
    )
    parser.add_argument("--threads", type=int, default=None, help="PyTorch's thread count (default: JAX's cores)")
    parser.add_argument("--quick", action="store_true", help="tiny only, 3 rounds: a smoke run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output stem: writes OUT.md and OUT.json (default experiments/results/curvature_benchmark, "
        "or curvature_benchmark_quick with --quick)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; return the exit code (bad arguments exit before timing)."""
    args = parse_args(argv)
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    quantities = [name.strip() for name in args.quantities.split(",") if name.strip()]
    rounds = args.rounds
    if args.quick:
        configs, rounds = ["tiny"], 3
    out = args.out or RESULTS / ("curvature_benchmark_quick" if args.quick else "curvature_benchmark")
    try:
        result = run(
            configs,
            rounds=rounds,
            quantities=quantities,
            threads=args.threads,
            slow_rounds=args.slow_rounds,
            slow_seconds=args.slow_seconds,
            progress=lambda message: print(f"[curvature] {message}", flush=True),
        )
    except (ValueError, ImportError) as error:
        raise SystemExit(f"python -m experiments.curvature_benchmark: {error}") from None
    markdown = to_markdown(result)
    print(markdown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.md')} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
