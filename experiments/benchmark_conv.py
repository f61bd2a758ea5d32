"""The benchmark's conv row: MNIST-1D's CNN, batch 100, float32, purebp vs jax.grad of idiomatic JAX and PyTorch CPU.

The model is the MNIST-1D authors' ``ConvBase`` (github.com/greydanus/mnist1d, notebooks/models.py):
Conv1d(1->25, k5, s2, p1), Conv1d(25->25, k3, s2, p1), Conv1d(25->25, k3, s2, p1), relu after each, flatten
to 125, Linear(125->10); 5,210 parameters; mean softmax cross-entropy on integer labels. Contenders, all from
the same weights:

- ``purebp``: ``jax.jit`` of ``purebp.engine.loss_and_grads`` (the hand-written pass);
- ``idiomatic JAX`` (the baseline every ratio is to): params a list of (w, b), ``lax.conv_general_dilated``
  with PyTorch's layout ("NCH", "OIH", "NCH"), ``jax.nn.relu``, ``reshape``, ``h @ w.T + b`` and
  ``optax.losses.softmax_cross_entropy_with_integer_labels(...).mean()`` under
  ``jax.jit(jax.value_and_grad(loss))``;
- ``jax.grad of purebp's forward``: autodiff of purebp's own forward and cost (the library's witness);
- ``torch``: PyTorch CPU autograd of ``torch.nn.functional.conv1d`` (when installed; threads pinned).

Timed interleaved with medians (``experiments.benchmark.interleaved_medians``): one value_and_grad on a batch
of 100, and one training epoch (40 optax SGD steps of batch 100 in a jitted ``lax.scan`` for the JAX
contenders, an optimizer loop for PyTorch), each contender's result compared with purebp's.

    python -m experiments.benchmark_conv            # writes experiments/results/benchmark_conv.{md,json}
    python -m experiments.benchmark_conv --quick    # a few rounds (for the test suite)
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import purebp as pb
from experiments import _common
from experiments.benchmark import LEARNING_RATE, _sgd_epoch, interleaved_medians, max_relative_error

BATCH = 100
STEPS = 40  # one epoch of MNIST-1D's 4000 training examples
IDIOMATIC = "idiomatic JAX"
PUREBP = "purebp"
OWN_FORWARD = "jax.grad of purebp's forward"
LAYOUT = ("NCH", "OIH", "NCH")


def cnn_layers() -> list:
    """MNIST-1D's ConvBase as purebp layer builders."""
    return [
        pb.conv1d(25, 5, stride=2, padding=1, activation="relu"),
        pb.conv1d(25, 3, stride=2, padding=1, activation="relu"),
        pb.conv1d(25, 3, stride=2, padding=1, activation="relu"),
        pb.flatten(),
        pb.dense(10),
    ]


def make_problem(seed: int = 0) -> tuple[pb.Sequential, jax.Array, jax.Array]:
    net = pb.init_network(jax.random.key(seed), (1, 40), cnn_layers())
    keys = jax.random.split(jax.random.key(seed + 1), 2)
    x = jax.random.normal(keys[0], (BATCH, 1, 40), jnp.float32)
    y = jax.random.randint(keys[1], (BATCH,), 0, 10)
    return net, x, y


def idiomatic_params(net: pb.Sequential) -> list[tuple[jax.Array, jax.Array]]:
    return [(layer.w, layer.b) for layer in net.layers if hasattr(layer, "w")]


def idiomatic_loss(params, x, y):
    """What a JAX user writes for this CNN."""
    h = x
    for w, b in params[:3]:
        h = jax.lax.conv_general_dilated(h, w, (2,), [(1, 1)], dimension_numbers=LAYOUT) + b[None, :, None]
        h = jax.nn.relu(h)
    w, b = params[3]
    logits = h.reshape(h.shape[0], -1) @ w.T + b[None, :]
    return optax.losses.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def purebp_value_and_grad(net, x, y):
    return pb.engine.loss_and_grads(net, x, y, loss="softmax_cross_entropy")


def own_forward_value_and_grad(net, x, y):
    return pb.autodiff_value_and_grad(net, x, y, loss="softmax_cross_entropy")


def _leaves(tree) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def _torch_contenders(net, x, y, xs, ys):
    import torch

    torch.set_num_threads(1)
    start = [torch.tensor(np.asarray(leaf)) for leaf in jax.tree.leaves(net)]

    def loss_of(params, x, y):
        h = x
        for i in range(3):
            h = torch.nn.functional.conv1d(h, params[2 * i], params[2 * i + 1], stride=2, padding=1).relu()
        logits = h.flatten(1) @ params[6].T + params[7]
        return torch.nn.functional.cross_entropy(logits, y)

    x_t, y_t = torch.tensor(np.asarray(x)), torch.tensor(np.asarray(y).astype(np.int64))
    batches = [(torch.tensor(np.asarray(a)), torch.tensor(np.asarray(b).astype(np.int64))) for a, b in zip(xs, ys)]

    def gradient():
        params = [p.clone().requires_grad_(True) for p in start]
        loss = loss_of(params, x_t, y_t)
        loss.backward()
        return loss.item(), [p.grad.numpy() for p in params]

    def epoch():
        params = [p.clone().requires_grad_(True) for p in start]
        optimizer = torch.optim.SGD(params, lr=LEARNING_RATE)
        for xb, yb in batches:
            optimizer.zero_grad()
            loss_of(params, xb, yb).backward()
            optimizer.step()
        return [p.detach().numpy() for p in params]

    return gradient, epoch


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def run(rounds: int, epoch_rounds: int, seed: int = 0) -> dict:
    net, x, y = make_problem(seed)
    params = idiomatic_params(net)
    gradients = {
        PUREBP: (jax.jit(purebp_value_and_grad), net),
        IDIOMATIC: (jax.jit(jax.value_and_grad(idiomatic_loss)), params),
        OWN_FORWARD: (jax.jit(own_forward_value_and_grad), net),
    }
    calls = {name: functools.partial(lambda f, p: jax.block_until_ready(f(p, x, y)), f, p)
             for name, (f, p) in gradients.items()}  # fmt: skip
    reference = _leaves(calls[PUREBP]()[1])
    errors = {name: max_relative_error(list(zip(_leaves(call()[1])[::2], _leaves(call()[1])[1::2])),
                                       list(zip(reference[::2], reference[1::2])))
              for name, call in calls.items()}  # fmt: skip
    keys = jax.random.split(jax.random.key(seed + 2), 2)
    xs = jax.random.normal(keys[0], (STEPS, BATCH, 1, 40), jnp.float32)
    ys = jax.random.randint(keys[1], (STEPS, BATCH), 0, 10)
    epochs = {
        PUREBP: (_sgd_epoch(purebp_value_and_grad), net),
        IDIOMATIC: (_sgd_epoch(jax.value_and_grad(idiomatic_loss)), params),
        OWN_FORWARD: (_sgd_epoch(own_forward_value_and_grad), net),
    }
    epoch_calls = {name: functools.partial(lambda f, p: jax.block_until_ready(f(p, xs, ys)), f, p)
                   for name, (f, p) in epochs.items()}  # fmt: skip
    final = _leaves(epoch_calls[PUREBP]()[0])
    epoch_errors = {name: max_relative_error(list(zip(_leaves(call()[0])[::2], _leaves(call()[0])[1::2])),
                                             list(zip(final[::2], final[1::2])))
                    for name, call in epoch_calls.items()}  # fmt: skip
    if torch_available():
        torch_gradient, torch_epoch = _torch_contenders(net, x, y, xs, ys)
        calls["torch"], epoch_calls["torch"] = torch_gradient, torch_epoch
        grads = torch_gradient()[1]
        pairs = list(zip(reference[::2], reference[1::2]))
        errors["torch"] = max_relative_error(list(zip(grads[::2], grads[1::2])), pairs)
        trained = torch_epoch()
        epoch_errors["torch"] = max_relative_error(list(zip(trained[::2], trained[1::2])),
                                                   list(zip(final[::2], final[1::2])))  # fmt: skip
    load_before = os.getloadavg()[0]
    timings = interleaved_medians(calls, rounds, idle_seconds=0.05 if "torch" in calls else 0.0)
    epoch_timings = interleaved_medians(epoch_calls, epoch_rounds, min_seconds=0.0, warmup_seconds=0.0,
                                        idle_seconds=0.05 if "torch" in epoch_calls else 0.0)  # fmt: skip
    baseline, epoch_baseline = timings[IDIOMATIC]["median_s"], epoch_timings[IDIOMATIC]["median_s"]
    rows = [
        {
            "contender": name,
            "value_and_grad (ms)": 1e3 * timings[name]["median_s"],
            "vs idiomatic JAX": timings[name]["median_s"] / baseline,
            "spread": timings[name]["spread"],
            "epoch (ms)": 1e3 * epoch_timings[name]["median_s"],
            "epoch vs idiomatic JAX": epoch_timings[name]["median_s"] / epoch_baseline,
            "gradient vs purebp": errors[name],
            "epoch's parameters vs purebp": epoch_errors[name],
        }
        for name in calls
    ]
    return {
        "machine": _common.machine(),
        "jax": jax.__version__,
        "rounds": rounds,
        "epoch_rounds": epoch_rounds,
        "load": f"1-minute load average {load_before:.1f} before timing, {os.getloadavg()[0]:.1f} after",
        "rows": rows,
    }


COLUMNS = (
    "contender",
    "value_and_grad (ms)",
    "vs idiomatic JAX",
    "spread",
    "epoch (ms)",
    "epoch vs idiomatic JAX",
    "gradient vs purebp",
    "epoch's parameters vs purebp",
)


def to_markdown(result: dict, command: str) -> list[str]:
    return [
        "# The conv row: MNIST-1D's CNN (5,210 parameters), batch 100, float32",
        "",
        f"Command: `{command}`. Machine: {result['machine']}; jax {result['jax']}; {result['load']}. Medians over "
        f"{result['rounds']} interleaved rounds (value_and_grad) and {result['epoch_rounds']} (one epoch = "
        f"{STEPS} SGD steps of batch {BATCH}); `spread` is the interquartile range over the median.",
        "",
        *_common.markdown_table(
            result["rows"],
            COLUMNS,
            {
                "value_and_grad (ms)": ".3f",
                "vs idiomatic JAX": ".3f",
                "spread": ".2f",
                "epoch (ms)": ".1f",
                "epoch vs idiomatic JAX": ".3f",
                "gradient vs purebp": ".1e",
                "epoch's parameters vs purebp": ".1e",
            },
        ),
        "",
        "purebp's formulation (`purebp/layers/conv.py`, `windows.py`): z, dC/dW and the window shares W^T delta as "
        "matrix products over the input windows u[n, i, k, t] = a_pad[n, i, s t + k] (one gather at a static index), "
        "and dC/da, the transposed convolution, as K zero-interleaving pads adding those shares back. With "
        "`lax.conv_general_dilated` for all three products the epoch took about 4x as long: XLA's CPU convolution "
        "runs several times slower inside a `lax.scan` than outside it; the idiomatic JAX column shows that.",
    ]


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    stem = _common.output_stem(args, "benchmark_conv")
    rounds, epoch_rounds = (3, 2) if args.quick else (41, 15)
    start = time.perf_counter()
    result = run(rounds, epoch_rounds, args.seed)
    result["seconds"] = time.perf_counter() - start
    command = "python -m experiments.benchmark_conv" + (" --quick" if args.quick else "")
    _common.write_markdown(stem.with_suffix(".md"), to_markdown(result, command))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    for row in result["rows"]:
        print(f"{row['contender']:<30} {row['value_and_grad (ms)']:8.3f} ms  x{row['vs idiomatic JAX']:.3f}   "
              f"epoch {row['epoch (ms)']:8.1f} ms  x{row['epoch vs idiomatic JAX']:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
