"""How fast the hand-written backward pass is, side by side with an idiomatic JAX MLP and CPU peers.

Run from the repository root (the peers need the ``bench`` extra: ``pip install -e ".[bench]"``)::

    python -m experiments.benchmark            # all four networks, writes experiments/results/benchmark.{md,json,csv}
    python -m experiments.benchmark --quick    # tiny only, a few rounds: a smoke run (writes benchmark_quick.*)
    python -m experiments.benchmark --configs tiny,mid --rounds 10 --no-peers --out /tmp/bench

Everything runs in one process, interleaved (every round times each contender
once, in turn), and reports medians over rounds after a warm-up, so that load
from elsewhere hits all contenders alike. Contenders for one gradient of the
mean softmax cross-entropy of an MLP, all from the same weights:

- ``purebp``: ``purebp.value_and_grad`` inside ``jax.jit``;
- ``idiomatic JAX`` (the baseline every ratio is to): the MLP a JAX user would
  write, params a list of (w, b) with w of shape (n_in, n_out), ``x @ w + b``,
  ``jnp.tanh`` / ``jax.nn.relu`` / ``jax.nn.sigmoid``, and
  ``optax.losses.softmax_cross_entropy_with_integer_labels(...).mean()``,
  under ``jax.jit(jax.value_and_grad(loss))``;
- ``jax.grad of purebp's forward``: ``jax.jit(jax.value_and_grad)`` of
  purebp's own forward pass and cost (``purebp.check.autodiff_value_and_grad``,
  the library's witness), a second column;
- ``torch``: PyTorch CPU autograd (extra ``bench``);
- ``sklearn``: scikit-learn's ``MLPClassifier._backprop`` (extra ``bench``);
- ``numpy``: the delta equations written in plain NumPy.

Each contender's gradient is compared with purebp's (worst per-leaf relative
L2 error). Also: a float32 2048^3 matmul as the ceiling, compile time and
compiled memory of the three JAX contenders, an eager call of
``purebp.value_and_grad`` vs a call of the jitted idiomatic gradient, and one
training epoch per contender (a jitted ``lax.scan`` of optax SGD steps for the
three JAX contenders, an optimizer loop for PyTorch,
``MLPClassifier.partial_fit`` for scikit-learn) in samples per second, with
each epoch's final parameters compared with purebp's.

``run`` returns a plain dict; ``to_markdown`` and ``to_csv`` format it; ``main``
is the command line. This is a script of the repository, not part of the
library: the library never imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from purebp import Network, init_mlp, value_and_grad
from purebp.check import autodiff_value_and_grad

RESULTS = Path(__file__).resolve().parent / "results"
LOSS = "softmax_cross_entropy"
LEARNING_RATE = 0.01
PUREBP = "purebp"
IDIOMATIC = "idiomatic JAX"  # the baseline: every ratio is a time over its time
OWN_FORWARD = "jax.grad of purebp's forward"
JAX_CONTENDERS = (PUREBP, IDIOMATIC, OWN_FORWARD)
PEERS = ("torch", "sklearn", "numpy")


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmark network: widths, the hidden activation (identity output, softmax cross-entropy), batch."""

    name: str
    sizes: tuple[int, ...]
    hidden: str
    batch: int

    @property
    def activations(self) -> tuple[str, ...]:
        return (self.hidden,) * (len(self.sizes) - 2) + ("identity",)

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of one forward + backward pass: z, dC/dW for every layer, dC/da for all but the first."""
        pairs = list(zip(self.sizes[:-1], self.sizes[1:]))
        forward = sum(2 * self.batch * n_in * n_out for n_in, n_out in pairs)
        inputs = sum(2 * self.batch * n_in * n_out for n_in, n_out in pairs[1:])
        return 2 * forward + inputs


CONFIGS = {
    "tiny": Config("tiny", (64, 32, 10), "tanh", 32),
    "mid": Config("mid", (784, 256, 256, 10), "relu", 128),
    "wide": Config("wide", (784, 1024, 1024, 10), "relu", 256),
    "deep": Config("deep", (64,) + (128,) * 20 + (10,), "sigmoid", 64),
}
# the compile-time target: a 100-hidden-layer network
DEEP100 = Config("deep100", (64,) + (128,) * 100 + (10,), "sigmoid", 64)


def _require(module: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the benchmark needs {module}: pip install -e '.[bench]'") from None


def available_peers() -> tuple[str, ...]:
    """Return the peers whose libraries are installed (numpy needs threadpoolctl, to pin BLAS threads)."""
    found = []
    for peer, module in (("torch", "torch"), ("sklearn", "sklearn"), ("numpy", "threadpoolctl")):
        try:
            importlib.import_module(module)
            found.append(peer)
        except ImportError:
            pass
    return tuple(found)


# ---------------------------------------------------------------- problems and contenders


def make_problem(config: Config, seed: int = 0) -> tuple[Network, jax.Array, jax.Array]:
    """Return (net, x, integer labels) in float32 for ``config``, deterministic in ``seed``."""
    keys = jax.random.split(jax.random.key(seed), 3)
    net = init_mlp(keys[0], config.sizes, config.activations, dtype=jnp.float32)
    x = jax.random.normal(keys[1], (config.batch, config.sizes[0]), jnp.float32)
    y = jax.random.randint(keys[2], (config.batch,), 0, config.sizes[-1])
    return net, x, y


def _jax_gradient(name: str) -> Callable:
    """purebp's value_and_grad, or jax.grad of purebp's forward pass: both take (net, x, y)."""
    function = value_and_grad if name == PUREBP else autodiff_value_and_grad
    return functools.partial(function, loss=LOSS)


# ---------------------------------------------------------------- the idiomatic JAX baseline


IDIOMATIC_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "sigmoid": jax.nn.sigmoid}


def idiomatic_params(net: Network) -> list[tuple[jax.Array, jax.Array]]:
    """purebp's weights in the layout a JAX user writes: [(w, b), ...] with w of shape (n_in, n_out)."""
    return [(jnp.asarray(layer.w.T), layer.b) for layer in net.layers]


def idiomatic_loss(hidden: str) -> Callable:
    """Return ``loss(params, x, y)``: the mean softmax cross-entropy of the MLP, written the usual JAX way."""
    g = IDIOMATIC_ACTIVATIONS[hidden]

    def loss(params, x, y):
        *hidden_layers, (w_out, b_out) = params
        a = x
        for w, b in hidden_layers:
            a = g(a @ w + b)
        logits = a @ w_out + b_out
        return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return loss


def pairs_from_idiomatic(params) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(w (n_out, n_in), b), ...] as NumPy, purebp's layout, for comparing."""
    return [(np.asarray(w).T, np.asarray(b)) for w, b in params]


def pairs_from_network(net: Network) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(layer.w), np.asarray(layer.b)) for layer in net.layers]


def _numpy_params(net: Network) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.array(layer.w), np.array(layer.b)) for layer in net.layers]  # copies: the peers write in place


_NUMPY_G = {
    "tanh": (np.tanh, lambda a: 1.0 - a * a),
    "sigmoid": (lambda z: 1.0 / (1.0 + np.exp(-z)), lambda a: a * (1.0 - a)),
    "relu": (lambda z: np.maximum(z, 0.0), lambda a: (a > 0).astype(a.dtype)),
}


def numpy_value_and_grad(params, x: np.ndarray, y: np.ndarray, hidden: str):
    """The delta equations in plain NumPy: return (mean cross-entropy, [(dW, db), ...])."""
    forward, derivative = _NUMPY_G[hidden]
    inputs, a = [], x
    for l, (w, b) in enumerate(params):
        inputs.append(a)
        z = a @ w.T + b
        a = z if l == len(params) - 1 else forward(z)
    shifted = a - a.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(np.mean(np.log(total[:, 0]) - shifted[rows, y]))
    delta = exp / total  # (BP1) softmax(z) - onehot(y), divided by N
    delta[rows, y] -= 1.0
    delta /= len(y)
    grads = [None] * len(params)
    for l in reversed(range(len(params))):
        grads[l] = (delta.T @ inputs[l], delta.sum(axis=0))  # (BP4), (BP3)
        if l > 0:
            delta = (delta @ params[l][0]) * derivative(inputs[l])  # (BP2)
    return loss, grads


def _torch_model(torch, net: Network):
    return [(torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)) for w, b in _numpy_params(net)]


def _torch_loss(torch, params, x, y, hidden: str):
    forward = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu}[hidden]
    a = x
    for l, (w, b) in enumerate(params):
        z = a @ w.T + b
        a = z if l == len(params) - 1 else forward(z)
    return torch.nn.functional.cross_entropy(a, y)


def _torch_value_and_grad(torch, params, x, y, hidden: str):
    for w, b in params:
        w.grad = b.grad = None
    loss = _torch_loss(torch, params, x, y, hidden)
    loss.backward()
    return loss.item(), [(w.grad, b.grad) for w, b in params]


def _sklearn_model(net: Network, x: np.ndarray, y: np.ndarray, config: Config, **options):
    neural_network = _require("sklearn.neural_network")
    hidden = {"tanh": "tanh", "sigmoid": "logistic", "relu": "relu"}[config.hidden]
    model = neural_network.MLPClassifier(
        hidden_layer_sizes=config.sizes[1:-1],
        activation=hidden,
        solver="sgd",
        alpha=0.0,
        batch_size=config.batch,
        learning_rate_init=LEARNING_RATE,
        momentum=0.0,
        nesterovs_momentum=False,
        shuffle=False,
        random_state=0,
        **options,
    )
    model.partial_fit(x[: config.batch], y[: config.batch], classes=np.arange(config.sizes[-1]))
    model.coefs_ = [w.T.copy() for w, _ in _numpy_params(net)]
    model.intercepts_ = [b.copy() for _, b in _numpy_params(net)]
    return model


def _sklearn_backprop(model, x: np.ndarray, y: np.ndarray, config: Config) -> Callable:
    """Return a call of ``model._backprop`` on preallocated buffers; it returns (loss, coef grads, intercept grads)."""
    targets = model._label_binarizer.transform(y).astype(x.dtype)
    activations = [x] + [np.empty((config.batch, n), x.dtype) for n in config.sizes[1:]]
    deltas = [np.empty_like(a) for a in activations[1:]]
    coef_grads = [np.empty((n_in, n_out), x.dtype) for n_in, n_out in zip(config.sizes[:-1], config.sizes[1:])]
    intercept_grads = [np.empty(n, x.dtype) for n in config.sizes[1:]]
    return lambda: model._backprop(x, targets, None, activations, deltas, coef_grads, intercept_grads)


def gradient_contenders(config: Config, peers: Sequence[str]) -> tuple[dict[str, Callable], dict[str, float]]:
    """Return ({name: call that computes one gradient and waits for it}, {name: max rel. error vs purebp}).

    The error is the worst per-leaf relative L2 error against purebp's
    gradient: a contender that computes something else is caught here.
    """
    net, x, y = make_problem(config)
    x_np, y_np = np.asarray(x), np.asarray(y)
    calls, grads = {}, {}
    for name in (PUREBP, OWN_FORWARD):
        jitted = jax.jit(_jax_gradient(name))
        calls[name] = functools.partial(lambda f: jax.block_until_ready(f(net, x, y)), jitted)
        grads[name] = pairs_from_network(jitted(net, x, y)[1])
    params = idiomatic_params(net)
    idiomatic = jax.jit(jax.value_and_grad(idiomatic_loss(config.hidden)))
    calls[IDIOMATIC] = lambda: jax.block_until_ready(idiomatic(params, x, y))
    grads[IDIOMATIC] = pairs_from_idiomatic(idiomatic(params, x, y)[1])
    calls = {name: calls[name] for name in JAX_CONTENDERS}
    if "torch" in peers:
        torch = _require("torch")
        torch_params = _torch_model(torch, net)
        x_t, y_t = torch.tensor(x_np), torch.tensor(y_np.astype(np.int64))
        calls["torch"] = lambda: _torch_value_and_grad(torch, torch_params, x_t, y_t, config.hidden)
        grads["torch"] = [(w.numpy(), b.numpy()) for w, b in calls["torch"]()[1]]
    if "sklearn" in peers:
        call = _sklearn_backprop(_sklearn_model(net, x_np, y_np, config), x_np, y_np, config)
        calls["sklearn"] = call
        _, coef, intercept = call()
        grads["sklearn"] = [(c.T.copy(), i.copy()) for c, i in zip(coef, intercept)]
    if "numpy" in peers:
        numpy_params = _numpy_params(net)
        calls["numpy"] = lambda: numpy_value_and_grad(numpy_params, x_np, y_np, config.hidden)
        grads["numpy"] = calls["numpy"]()[1]
    errors = {name: max_relative_error(g, grads[PUREBP]) for name, g in grads.items()}
    return calls, errors


def max_relative_error(grads, reference) -> float:
    """Return max over leaves of ||leaf - reference leaf||_2 / ||reference leaf||_2; both are [(w, b), ...]."""
    worst = 0.0
    for pair, reference_pair in zip(grads, reference, strict=True):
        for leaf, reference_leaf in zip(pair, reference_pair, strict=True):
            leaf, reference_leaf = np.asarray(leaf, np.float64), np.asarray(reference_leaf, np.float64)
            scale = max(float(np.linalg.norm(reference_leaf)), 1e-30)
            worst = max(worst, float(np.linalg.norm(leaf - reference_leaf)) / scale)
    return worst


# ---------------------------------------------------------------- timing


def interleaved_medians(
    calls: dict[str, Callable],
    rounds: int,
    *,
    min_seconds: float = 0.02,
    warmup_seconds: float = 0.01,
    idle_seconds: float = 0.0,
    seed: int = 0,
) -> dict[str, dict]:
    """Time every call in interleaved blocks; return {name: {median_s, spread, rounds}} per call.

    Each round runs one block per call, in a fresh order drawn from a seeded
    generator, so no contender always runs right after the same one. A block
    starts with ``idle_seconds`` of sleep (used when peers take part: their
    BLAS threads keep spinning after a call, OpenBLAS about 0.12 s of a core
    on the 2-core machine, and would slow whoever runs next; every contender
    gets the same idle start), repeats its call for ``warmup_seconds`` (thread
    pools and caches hot, as in a training loop), then times back-to-back
    calls for at least ``min_seconds``; the sample is the mean per call.
    ``spread`` is the interquartile range over the median: how noisy the run was.
    """
    order = random.Random(seed)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # compile and first-touch, outside every block
    for _ in range(rounds):
        names = list(calls)
        order.shuffle(names)
        for name in names:
            if idle_seconds:
                time.sleep(idle_seconds)
            call = calls[name]
            warm_until = time.perf_counter() + warmup_seconds
            call()
            while time.perf_counter() < warm_until:
                call()
            count, start = 0, time.perf_counter()
            while True:
                call()
                count += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            samples[name].append(elapsed / count)
    return {name: _summary(values) for name, values in samples.items()}


def _summary(values: list[float]) -> dict:
    median = statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (median, median, median)
    return {"median_s": median, "spread": (q3 - q1) / median, "rounds": len(values)}


def matmul_ceiling(n: int = 2048, repeats: int = 10) -> float:
    """Return the GFLOP/s of a jitted float32 n x n x n matmul (median of ``repeats``): the machine's ceiling."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def compile_stats(config: Config, name: str, repeats: int = 3) -> dict:
    """Return trace+lower seconds, compile seconds (medians of ``repeats`` cold compiles) and compiled memory.

    Every compile starts from ``jax.clear_caches()``, so no contender
    reuses a trace or an executable of an earlier measurement.
    """
    net, x, y = make_problem(config)
    if name == IDIOMATIC:
        gradient, args = jax.value_and_grad(idiomatic_loss(config.hidden)), (idiomatic_params(net), x, y)
    else:
        gradient, args = _jax_gradient(name), (net, x, y)
    trace_lower_times, compile_times = [], []
    for _ in range(repeats):
        jax.clear_caches()
        jitted = jax.jit(lambda *args: gradient(*args))
        start = time.perf_counter()
        lowered = jitted.trace(*args).lower()
        traced = time.perf_counter()
        compiled = lowered.compile()
        done = time.perf_counter()
        trace_lower_times.append(traced - start)
        compile_times.append(done - traced)
    memory = compiled.memory_analysis()
    peak = getattr(memory, "peak_memory_in_bytes", None)
    if not peak:  # XLA:CPU does not report a peak: arguments + outputs + temporaries bound it
        peak = (
            memory.argument_size_in_bytes
            + memory.output_size_in_bytes
            + memory.temp_size_in_bytes
            - memory.alias_size_in_bytes
        )
    return {
        "trace_lower_s": statistics.median(trace_lower_times),
        "compile_s": statistics.median(compile_times),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "peak_bytes": int(peak),
    }


def eager_overhead(rounds: int) -> dict:
    """Eager ``purebp.value_and_grad`` (validation + dispatch) vs a call of the jitted idiomatic gradient, on tiny."""
    config = CONFIGS["tiny"]
    net, x, y = make_problem(config)
    params = idiomatic_params(net)
    jitted = jax.jit(jax.value_and_grad(idiomatic_loss(config.hidden)))
    calls = {
        "purebp eager": lambda: jax.block_until_ready(value_and_grad(net, x, y, loss=LOSS)),
        "idiomatic jitted": lambda: jax.block_until_ready(jitted(params, x, y)),
    }
    times = interleaved_medians(calls, rounds)
    return {
        "purebp_eager_us": times["purebp eager"]["median_s"] * 1e6,
        "idiomatic_jitted_us": times["idiomatic jitted"]["median_s"] * 1e6,
        "ratio": times["purebp eager"]["median_s"] / times["idiomatic jitted"]["median_s"],
    }


# ---------------------------------------------------------------- training epochs


def _sgd_epoch(gradient: Callable) -> Callable:
    """A jitted epoch: ``lax.scan`` of optax SGD steps over batches xs (S, N, n_in), ys (S, N).

    ``gradient(params, x, y)`` returns (loss, grads) with grads shaped like params.
    """
    optimizer = optax.sgd(LEARNING_RATE)

    @jax.jit
    def epoch(params, xs, ys):
        def step(carry, batch):
            params, state = carry
            loss, grads = gradient(params, *batch)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), (xs, ys))
        return params, losses

    return epoch


def training_contenders(
    config: Config, steps: int, peers: Sequence[str]
) -> tuple[dict[str, Callable], dict[str, float]]:
    """Return ({name: call that trains one epoch of ``steps`` batches from the same start and waits for it},
    {name: max rel. error of its final parameters vs purebp's}).

    The error is the worst per-leaf relative L2 error of the parameters after
    the epoch against purebp's: a loop that trains on other data, with another
    step size or another gradient ends elsewhere.
    """
    net, _, _ = make_problem(config)
    keys = jax.random.split(jax.random.key(1), 2)
    xs = jax.random.normal(keys[0], (steps, config.batch, config.sizes[0]), jnp.float32)
    ys = jax.random.randint(keys[1], (steps, config.batch), 0, config.sizes[-1])
    calls, finals = {}, {}
    for name in JAX_CONTENDERS:
        if name == IDIOMATIC:
            epoch, start = _sgd_epoch(jax.value_and_grad(idiomatic_loss(config.hidden))), idiomatic_params(net)
            to_pairs = pairs_from_idiomatic
        else:
            epoch, start, to_pairs = _sgd_epoch(_jax_gradient(name)), net, pairs_from_network
        calls[name] = functools.partial(lambda f, p: jax.block_until_ready(f(p, xs, ys)), epoch, start)
        finals[name] = to_pairs(calls[name]()[0])
    xs_np, ys_np = np.asarray(xs), np.asarray(ys)
    if "torch" in peers:
        torch = _require("torch")
        batches = [(torch.tensor(x), torch.tensor(y.astype(np.int64))) for x, y in zip(xs_np, ys_np)]

        def torch_epoch():
            params = _torch_model(torch, net)
            optimizer = torch.optim.SGD([p for pair in params for p in pair], lr=LEARNING_RATE)
            for x, y in batches:
                optimizer.zero_grad()
                _torch_loss(torch, params, x, y, config.hidden).backward()
                optimizer.step()
            return params

        calls["torch"] = torch_epoch
        finals["torch"] = [(w.detach().numpy(), b.detach().numpy()) for w, b in torch_epoch()]
    if "sklearn" in peers:
        x_all, y_all = xs_np.reshape(-1, config.sizes[0]), ys_np.reshape(-1)
        model = _sklearn_model(net, x_all, y_all, config)
        initial = ([c.copy() for c in model.coefs_], [i.copy() for i in model.intercepts_])

        def sklearn_epoch():
            model.coefs_ = [c.copy() for c in initial[0]]
            model.intercepts_ = [i.copy() for i in initial[1]]
            return model.partial_fit(x_all, y_all)  # one pass in mini-batches of config.batch

        calls["sklearn"] = sklearn_epoch
        trained = sklearn_epoch()
        finals["sklearn"] = [(c.T.copy(), i.copy()) for c, i in zip(trained.coefs_, trained.intercepts_)]
    errors = {name: max_relative_error(final, finals[PUREBP]) for name, final in finals.items()}
    return calls, errors


# ---------------------------------------------------------------- the whole run


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"jax": jax.__version__, "numpy": np.__version__, "optax": optax.__version__}
    for module in ("torch", "sklearn"):
        with contextlib.suppress(ImportError):
            versions[module] = importlib.import_module(module).__version__
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax_devices": [str(device) for device in jax.devices()],
        "python": platform.python_version(),
        "versions": versions,
    }


def _load() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def _two_phases(calls: dict[str, Callable], peers: Sequence[str], rounds: int, peer_rounds: int):
    """Yield (contender, timing, baseline median, median of jax.grad of purebp's forward or None): JAX, then peers.

    The three JAX contenders are timed against each other with no peer in
    between (the ratios the targets are about). Each peer is then timed
    against the idiomatic JAX baseline in a second, interleaved phase where
    every block starts from an idle machine and warms up for 0.1 s, and is
    reported as a ratio to the baseline of that phase (the third element).
    """
    first = interleaved_medians({name: calls[name] for name in JAX_CONTENDERS}, rounds)
    for contender in JAX_CONTENDERS:
        yield contender, first[contender], first[IDIOMATIC]["median_s"], first[OWN_FORWARD]["median_s"]
    present = [name for name in peers if name in calls]
    if present:
        second = interleaved_medians(
            {IDIOMATIC: calls[IDIOMATIC], **{name: calls[name] for name in present}},
            peer_rounds,
            warmup_seconds=0.1,
            idle_seconds=0.3,
        )
        for contender in present:
            yield contender, second[contender], second[IDIOMATIC]["median_s"], None


def run(
    configs: Sequence[str] = tuple(CONFIGS),
    *,
    rounds: int = 40,
    train_steps: int = 50,
    threads: int | None = None,
    peers: Sequence[str] | None = None,
    ceiling_size: int = 2048,
    deep100: bool = True,
    progress: Callable[[str], None] = lambda message: None,
) -> dict:
    """Run the benchmark; return a dict with machine, ceiling, gradient, compile, eager and training results.

    ``threads`` pins the peers' BLAS/OpenMP pools and PyTorch's intra-op pool
    (default: the cores JAX uses); unpinned they oversubscribe a small machine.
    """
    unknown = [name for name in configs if name not in CONFIGS]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; valid: {', '.join(CONFIGS)}")
    if rounds < 1 or train_steps < 1:
        raise ValueError(f"rounds and train_steps must be at least 1, got {rounds} and {train_steps}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be at least 1 (or None: JAX's cores), got {threads}")
    if peers is not None and (unknown := [name for name in peers if name not in PEERS]):
        raise ValueError(f"unknown peer(s) {unknown}; valid: {', '.join(PEERS)}")
    # peers' OpenMP pools sleep instead of spinning between calls (read when torch loads): spinning threads
    # would take the cores from whichever contender runs next
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    info = machine()
    threads = threads or info["cores"]
    peers = available_peers() if peers is None else tuple(peers)
    threadpoolctl = _require("threadpoolctl") if set(peers) & {"sklearn", "numpy"} else None
    if "torch" in peers:
        _require("torch").set_num_threads(threads)
    result = {"machine": info, "threads": threads, "peers": list(peers), "load_before": _load(), "rounds": rounds}
    limits = threadpoolctl.threadpool_limits(threads) if threadpoolctl else contextlib.nullcontext()
    with limits:
        progress(f"matmul ceiling (float32 {ceiling_size}^3)")
        result["ceiling_gflops"] = matmul_ceiling(ceiling_size)
        gradient_rows, training_rows = [], []
        for name in configs:
            config = CONFIGS[name]
            progress(f"{name}: value_and_grad")
            calls, errors = gradient_contenders(config, peers)
            for contender, timing, base, own in _two_phases(calls, peers, rounds, max(3, rounds // 3)):
                gflops = config.flops / timing["median_s"] / 1e9
                gradient_rows.append(
                    {
                        "config": name,
                        "contender": contender,
                        "median_us": timing["median_s"] * 1e6,
                        "ratio": timing["median_s"] / base,
                        "ratio_to_own_forward": None if own is None else timing["median_s"] / own,
                        "gflops": gflops,
                        "ceiling_pct": 100 * gflops / result["ceiling_gflops"],
                        "spread_pct": 100 * timing["spread"],
                        "max_rel_error_vs_purebp": errors[contender],
                        "baseline_us": base * 1e6,
                    }
                )
            progress(f"{name}: training epoch ({train_steps} steps)")
            epochs, errors = training_contenders(config, train_steps, peers)
            for contender, timing, base, own in _two_phases(epochs, peers, max(5, rounds // 3), max(3, rounds // 6)):
                training_rows.append(
                    {
                        "config": name,
                        "contender": contender,
                        "epoch_ms": timing["median_s"] * 1e3,
                        "samples_per_s": train_steps * config.batch / timing["median_s"],
                        "ratio": timing["median_s"] / base,
                        "ratio_to_own_forward": None if own is None else timing["median_s"] / own,
                        "spread_pct": 100 * timing["spread"],
                        "max_rel_error_vs_purebp": errors[contender],
                        "baseline_ms": base * 1e3,
                    }
                )
        result["gradient"], result["training"] = gradient_rows, training_rows
        compile_configs = [CONFIGS[name] for name in configs] + ([DEEP100] if deep100 else [])
        result["compile"] = []
        for config in compile_configs:
            progress(f"{config.name}: compile")
            for contender in JAX_CONTENDERS:
                result["compile"].append(
                    {"config": config.name, "contender": contender, **compile_stats(config, contender)}
                )
        progress("eager call")
        result["eager"] = eager_overhead(rounds)
    result["load_after"] = _load()
    result["targets"] = check_targets(result)
    return result


# ---------------------------------------------------------------- targets and formatting


def check_targets(result: dict) -> list[dict]:
    """Evaluate the issue's targets on ``result``: [{target, value, passed}] (only those the run measured).

    Every target compares purebp with the idiomatic JAX baseline: the code a
    user would otherwise write.
    """
    targets = []

    def row(config: str, contender: str, key: str = "gradient") -> dict | None:
        return next((r for r in result[key] if r["config"] == config and r["contender"] == contender), None)

    for config, bound in (("tiny", 1.00), ("mid", 0.90), ("wide", 0.90), ("deep", 1.00)):
        if found := row(config, PUREBP):
            targets.append(
                {
                    "target": f"{config}: value_and_grad time / idiomatic JAX <= {bound:.2f}",
                    "value": f"{found['ratio']:.3f}",
                    "passed": found["ratio"] <= bound,
                }
            )
    if found := row("wide", PUREBP):
        targets.append(
            {
                "target": "wide: >= 75% of the matmul ceiling",
                "value": f"{found['ceiling_pct']:.0f}%",
                "passed": found["ceiling_pct"] >= 75,
            }
        )
    for config in dict.fromkeys(r["config"] for r in result["training"]):
        mine = row(config, PUREBP, "training")
        others = [r for r in result["training"] if r["config"] == config and r["contender"] != PUREBP]
        # compared as time ratios to the baseline: the JAX contenders' from their phase, each peer's from its own
        fastest = min(others, key=lambda r: r["ratio"])
        targets.append(
            {
                "target": f"{config}: training epoch faster than every other contender",
                "value": f"{mine['ratio']:.3f} vs {fastest['contender']} {fastest['ratio']:.3f} (time / idiomatic JAX)",
                "passed": mine["ratio"] < fastest["ratio"],
            }
        )
    for config in dict.fromkeys(r["config"] for r in result["compile"]):
        mine, theirs = row(config, PUREBP, "compile"), row(config, IDIOMATIC, "compile")
        mine_s = mine["trace_lower_s"] + mine["compile_s"]
        theirs_s = theirs["trace_lower_s"] + theirs["compile_s"]
        targets.append(
            {
                "target": f"{config}: compile time and temp memory <= idiomatic JAX's",
                "value": f"{mine_s:.2f}s vs {theirs_s:.2f}s, {mine['temp_bytes']} B vs {theirs['temp_bytes']} B",
                "passed": mine_s <= theirs_s and mine["temp_bytes"] <= theirs["temp_bytes"],
            }
        )
        if config == DEEP100.name:
            targets.append(
                {"target": "100 hidden layers compile in < 10 s", "value": f"{mine_s:.2f}s", "passed": mine_s < 10}
            )
    eager = result["eager"]
    targets.append(
        {
            "target": "eager purebp.value_and_grad <= 1.2x a call of the jitted idiomatic gradient (tiny)",
            "value": f"{eager['ratio']:.2f}x",
            "passed": eager["ratio"] <= 1.2,
        }
    )
    return targets


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def to_markdown(result: dict) -> str:
    """Return the result as markdown tables, machine first."""
    info = result["machine"]
    load = f"load average {result['load_before']:.2f} before, {result['load_after']:.2f} after"
    parts = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {', '.join(info['jax_devices'])}; "
        f"versions {', '.join(f'{k} {v}' for k, v in info['versions'].items())}; peers pinned to "
        f"{result['threads']} threads; {load}; medians of {result['rounds']} interleaved rounds of timed blocks.",
        f"Contenders: {PUREBP} (purebp.value_and_grad under jax.jit); {IDIOMATIC}, the baseline (a list of (w, b), "
        "x @ w + b, jnp.tanh / jax.nn.relu / jax.nn.sigmoid, optax softmax_cross_entropy_with_integer_labels(...)"
        f".mean(), under jax.jit(jax.value_and_grad(loss))); {OWN_FORWARD} (jax.jit(jax.value_and_grad) of "
        "purebp's own forward pass and cost); the peers. All start from the same weights.",
        "The three JAX contenders are timed against each other alone; each peer is timed against the idiomatic "
        "baseline in a second phase (every block starts idle, then warms up 0.1 s: the peers' BLAS threads spin "
        "on after a call), and its ratio is to that phase's baseline, whose time is in the last column.",
        f"Matmul ceiling (jitted float32 2048^3, or the run's size): {result['ceiling_gflops']:.1f} GFLOP/s.",
        "### value_and_grad (float32, mean softmax cross-entropy; time ratios, < 1 is faster)",
        _table(
            [
                "config",
                "contender",
                "median µs",
                "time / idiomatic JAX",
                "time / jax.grad of purebp's forward",
                "GFLOP/s",
                "% ceiling",
                "spread (IQR)",
                "rel. err vs purebp",
                "idiomatic JAX µs (same phase)",
            ],
            [
                [
                    r["config"],
                    r["contender"],
                    f"{r['median_us']:.1f}",
                    f"{r['ratio']:.3f}",
                    _ratio(r["ratio_to_own_forward"]),
                    f"{r['gflops']:.1f}",
                    f"{r['ceiling_pct']:.0f}%",
                    f"{r['spread_pct']:.1f}%",
                    f"{r['max_rel_error_vs_purebp']:.1e}",
                    f"{r['baseline_us']:.1f}",
                ]
                for r in result["gradient"]
            ],
        ),
        "### training epoch (optax/torch SGD, lr 0.01; JAX: one jitted lax.scan of steps; error: the parameters "
        "after the epoch vs purebp's)",
        _table(
            [
                "config",
                "contender",
                "epoch ms",
                "samples/s",
                "time / idiomatic JAX",
                "time / jax.grad of purebp's forward",
                "spread (IQR)",
                "rel. err vs purebp",
                "idiomatic JAX ms (same phase)",
            ],
            [
                [
                    r["config"],
                    r["contender"],
                    f"{r['epoch_ms']:.2f}",
                    f"{r['samples_per_s']:.0f}",
                    f"{r['ratio']:.3f}",
                    _ratio(r["ratio_to_own_forward"]),
                    f"{r['spread_pct']:.1f}%",
                    f"{r['max_rel_error_vs_purebp']:.1e}",
                    f"{r['baseline_ms']:.2f}",
                ]
                for r in result["training"]
            ],
        ),
        "### compile time and compiled memory (memory_analysis; peak = args + outputs + temp where XLA gives none)",
        _table(
            ["config", "contender", "trace+lower s", "compile s", "temp bytes", "peak bytes"],
            [
                [
                    r["config"],
                    r["contender"],
                    f"{r['trace_lower_s']:.3f}",
                    f"{r['compile_s']:.3f}",
                    str(r["temp_bytes"]),
                    str(r["peak_bytes"]),
                ]
                for r in result["compile"]
            ],
        ),
        f"### eager call (tiny)\n\npurebp.value_and_grad eager: {result['eager']['purebp_eager_us']:.1f} µs; "
        f"jitted idiomatic JAX gradient: {result['eager']['idiomatic_jitted_us']:.1f} µs; "
        f"ratio {result['eager']['ratio']:.2f}",
        "### targets",
        _table(
            ["target", "measured", "met"],
            [[t["target"], t["value"], "yes" if t["passed"] else "NO"] for t in result["targets"]],
        ),
    ]
    return "\n\n".join(parts) + "\n"


def to_csv(result: dict) -> str:
    """Return the value_and_grad and training rows as one CSV (a ``table`` column says which)."""
    import csv
    import io

    buffer = io.StringIO()
    fields = [
        "table",
        "config",
        "contender",
        "median_us",
        "ratio",
        "ratio_to_own_forward",
        "gflops",
        "ceiling_pct",
        "spread_pct",
        "max_rel_error_vs_purebp",
        "epoch_ms",
        "samples_per_s",
    ]
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    for table in ("gradient", "training"):
        for row in result[table]:
            writer.writerow({"table": table, **row})
    return buffer.getvalue()


# ---------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description="Time purebp's hand-written value_and_grad against an idiomatic JAX MLP under "
        "jax.jit(jax.value_and_grad), jax.grad of purebp's own forward pass, and CPU peers (PyTorch, "
        "scikit-learn, NumPy; the 'bench' extra), interleaved in one process (medians of rounds); also compile "
        "time, compiled memory, an eager call and a training epoch. Prints markdown tables and writes "
        "OUT.md, OUT.json and OUT.csv.",
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)} (default all)"
    )
    parser.add_argument("--rounds", type=int, default=40, help="interleaved timing rounds (default 40)")
    parser.add_argument("--train-steps", type=int, default=50, help="SGD steps in one timed epoch (default 50)")
    parser.add_argument("--threads", type=int, default=None, help="peers' thread count (default: JAX's cores)")
    parser.add_argument("--no-peers", action="store_true", help="time only the three JAX contenders")
    parser.add_argument("--quick", action="store_true", help="tiny only, 3 rounds, small ceiling: a smoke run")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output stem: writes OUT.md, OUT.json, OUT.csv (default experiments/results/benchmark, "
        "or benchmark_quick with --quick)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark from the command line; return the exit code (bad arguments exit before timing)."""
    args = parse_args(argv)
    configs = [name.strip() for name in args.configs.split(",") if name.strip()]
    options = {"rounds": args.rounds, "train_steps": args.train_steps, "threads": args.threads}
    if args.quick:
        configs, options = ["tiny"], {**options, "rounds": 3, "train_steps": 3}
        options.update(ceiling_size=256, deep100=False)
    if args.no_peers:
        options["peers"] = ()
    out = args.out or RESULTS / ("benchmark_quick" if args.quick else "benchmark")
    try:
        result = run(configs, progress=lambda message: print(f"[bench] {message}", flush=True), **options)
    except (ValueError, ImportError) as error:
        raise SystemExit(f"python -m experiments.benchmark: {error}") from None
    markdown = to_markdown(result)
    print(markdown)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".csv").write_text(to_csv(result))
    print(f"wrote {out.with_suffix('.md')}, .json and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
