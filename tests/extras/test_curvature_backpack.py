"""purebp's curvature quantities against BackPACK itself (issue 14), number for number, in float32.

Marked ``peer``: skipped by the default run (``addopts = -m 'not peer and not slow'``); run them with
``python -m pytest -m peer tests/extras/test_curvature_backpack.py``. They need PyTorch and BackPACK (the ``bench``
extra); without them the tests are skipped with the reason.

Each case is a small purebp network (``init_mlp`` with relu / tanh / sigmoid hidden layers, or an
``init_network`` of conv1d, pooling, flatten and dense layers), its exact weights ported to a
``torch.nn.Sequential`` (``experiments.curvature_benchmark.torch_model``: Dense w (n_out, n_in) is
``Linear.weight``, Conv1d w (C_out, C_in, K) is ``Conv1d.weight``, flatten is channel-major as
``torch.flatten(x, 1)``), a seeded batch, and a loss with its PyTorch counterpart:

- ``softmax_cross_entropy`` <-> ``CrossEntropyLoss`` on the logits, ``binary_cross_entropy`` (sigmoid output,
  one unit: BackPACK's ``BCEWithLogitsLoss`` takes scalar predictions only) <-> ``BCEWithLogitsLoss`` on z^L:
  the same losses, scale 1;
- ``mse``: purebp's C^n = 1/2 sum_j (a_j - y_j)^2, L = s sum_n C^n. ``MSELoss(reduction="sum")`` =
  sum_{n,j} (a - y)^2 = 2 L, so BackPACK's GGN, Hessian and KFLR factor g are 2 x purebp's and its
  squared-gradient statistics (sum_grad_squared, variance: squares of the individual gradients, which scale
  by 2) are 4 x purebp's; ``MSELoss(reduction="mean")`` divides by N D (D outputs) = (2/D) L, so the factors
  are 2/D and (2/D)^2. KFLR's factor a (input moments) does not scale. (``to_purebp_scale``.)

Exact quantities (sum_grad_squared, grad_variance, diag_ggn, diag_hessian, kflr's g and a for every weight,
g for every bias) must agree leaf by leaf: relative L2 error ||purebp - BackPACK||_2 / ||BackPACK||_2 <= 1e-4
per leaf (per Kronecker factor), float32 on both sides. A separate test checks the port and the scale
factors themselves against a float64 autodiff oracle (so a failure above is purebp's, not the harness's).
The MC quantities (diag_ggn with mc_samples, kfac) cannot match number for number (different random
generators): their mean over R independent calls of M samples each is compared with BackPACK's exact
counterpart, within 4 standard errors estimated from the R calls, and the standard error is required to be
small (<= 5% of the exact value) so that the test can see a biased estimate.

BackPACK's KFLR/KFAC do not support 1-D pooling (its Kronecker extensions know MaxPool2d/AvgPool2d only), so
the Kronecker factors of convolutions are compared on a conv network without pooling.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import purebp as pb
from experiments import curvature_benchmark as cb

pytestmark = [
    pytest.mark.peer,
    # BackPACK's hooks are full backward hooks; inputs that need no gradient make PyTorch warn on each call
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]
TOLERANCE = 1e-4  # float32 vs float32: relative L2 error per leaf


@pytest.fixture(scope="module", autouse=True)
def peers():
    # imported here, not at collection, so that the default run (which deselects these tests) never loads torch
    reason = "the BackPACK comparison needs PyTorch and backpack-for-pytorch: pip install -e '.[bench]'"
    torch = pytest.importorskip("torch", reason=reason)
    pytest.importorskip("backpack", reason=reason)
    torch.manual_seed(0)  # BackPACK's own MC draws (not compared number for number) start from a fixed seed


# ---------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
    kind: str  # "mlp", "conv_pool" (conv1d + max/avg pooling + flatten + dense), "conv" (no pooling)
    hidden: str
    loss: str
    reduction: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.hidden}-{self.loss}-{self.reduction}-seed{self.seed}"


def _n_out(loss: str, rng: np.random.Generator) -> int:
    return 1 if loss == "binary_cross_entropy" else int(rng.integers(2, 5))


def make(case: Case):
    """(net float32, x, y, n_out): sizes, weights and data drawn from the case's seed."""
    rng = np.random.default_rng(case.seed)
    key = jax.random.key(case.seed)
    n_out = _n_out(case.loss, rng)
    output = {"softmax_cross_entropy": "identity", "binary_cross_entropy": "sigmoid"}.get(case.loss, case.hidden)
    batch = int(rng.integers(3, 8))
    if case.kind == "mlp":
        sizes = (int(rng.integers(3, 7)), int(rng.integers(2, 8)), int(rng.integers(2, 8)), n_out)
        net = pb.init_mlp(key, sizes, (case.hidden, case.hidden, output))
        x = rng.normal(size=(batch, sizes[0]))
    elif case.kind == "conv_pool":
        net = pb.init_network(
            key,
            (2, 14),
            [
                pb.conv1d(3, 3, stride=1, padding=1, activation=case.hidden),
                pb.max_pool1d(2),
                pb.conv1d(4, 3, stride=2, activation=case.hidden),
                pb.avg_pool1d(2, stride=1),
                pb.flatten(),
                pb.dense(n_out, output),
            ],
        )
        x = rng.normal(size=(batch, 2, 14))
    else:
        net = pb.init_network(
            key,
            (2, 11),
            [
                pb.conv1d(3, 3, stride=2, padding=1, activation=case.hidden),
                pb.conv1d(4, 2, activation=case.hidden),
                pb.flatten(),
                pb.dense(n_out, output),
            ],
        )
        x = rng.normal(size=(batch, 2, 11))
    if case.loss == "softmax_cross_entropy":
        y = rng.integers(0, n_out, size=batch)
    elif case.loss == "binary_cross_entropy":
        y = rng.integers(0, 2, size=(batch, 1)).astype(np.float32)
    else:
        y = rng.normal(size=(batch, n_out)).astype(np.float32)
    return net, jnp.asarray(x, jnp.float32), jnp.asarray(y), n_out


LOSSES = ("softmax_cross_entropy", "mse", "binary_cross_entropy")
MLP_CASES = [
    Case("mlp", hidden, loss, reduction, seed)
    for seed, (hidden, loss, reduction) in enumerate(
        (h, loss, r) for h in ("relu", "tanh", "sigmoid") for loss in LOSSES for r in ("mean", "sum")
    )
]
CONV_POOL_CASES = [
    Case("conv_pool", "relu", "softmax_cross_entropy", "mean", 100),
    Case("conv_pool", "tanh", "mse", "sum", 101),
    Case("conv_pool", "sigmoid", "binary_cross_entropy", "mean", 102),
]
CONV_CASES = [
    Case("conv", "tanh", "softmax_cross_entropy", "sum", 200),
    Case("conv", "sigmoid", "mse", "mean", 201),
    Case("conv", "relu", "binary_cross_entropy", "sum", 202),
]
EXACT_CASES = [
    pytest.param(case, quantity, id=f"{case.id}-{quantity}")
    for case in MLP_CASES + CONV_POOL_CASES + CONV_CASES
    for quantity in cb.EXACT
    if not (case.kind == "conv_pool" and quantity == "kflr")  # BackPACK: no KFLR through 1-D pooling
]


def _backpack(case: Case, net, x, y, n_out: int, quantity: str) -> tuple[list, list[str]]:
    """BackPACK's ``quantity`` for the case in purebp's units, and the parameters' names ('0.weight', ...)."""
    model = cb.torch_model(net, case.loss)
    x_t, y_t = cb.torch_data(x, y, case.loss)
    cb.backpack_call(model, cb.torch_loss(case.loss, case.reduction), x_t, y_t, quantity)()
    scale = cb.to_purebp_scale(case.loss, case.reduction, n_out)
    return cb.backpack_values(model, quantity, scale), [name for name, _ in model.named_parameters()]


def _labels(names: list[str], reference: list) -> list[str]:
    """One label per compared array, in ``cb.relative_errors``' order: 'param' or 'param factor g/a'."""
    labels = []
    for name, value in zip(names, reference, strict=True):
        labels += [f"{name} {f}" for f in "ga"[: len(value)]] if isinstance(value, list) else [name]
    return labels


def _purebp(case: Case, net, x, y, quantity: str, key=None, mc_samples: int | None = None) -> list:
    options = {"loss": case.loss, "reduction": case.reduction}
    if quantity == "diag_ggn_mc":
        return cb.purebp_values(pb.diag_ggn(net, x, y, **options, mc_samples=mc_samples, key=key), quantity)
    if quantity == "kfac":
        return cb.purebp_values(pb.kfac(net, x, y, **options, mc_samples=mc_samples, key=key), quantity)
    return cb.purebp_values(getattr(pb, quantity)(net, x, y, **options), quantity)


# ---------------------------------------------------------------- exact quantities, number for number


@pytest.mark.parametrize("case, quantity", EXACT_CASES)
def test_exact_quantity_equals_backpack(case, quantity):
    net, x, y, n_out = make(case)
    expected, names = _backpack(case, net, x, y, n_out, quantity)
    got = _purebp(case, net, x, y, quantity)
    errors = cb.relative_errors(got, expected)
    labels = _labels(names, expected)
    report = {label: f"{error:.1e}" for label, error in zip(labels, errors)}
    assert max(errors) <= TOLERANCE, f"{case} {quantity}: purebp vs BackPACK, rel. L2 error per leaf {report}"


def test_diag_hessian_differs_from_the_ggn_for_curved_activations():
    # the cases above would not notice a diag_hessian that returns the GGN if tanh/sigmoid made no difference
    case = Case("mlp", "tanh", "softmax_cross_entropy", "mean", 3)
    net, x, y, n_out = make(case)
    hessian, _ = _backpack(case, net, x, y, n_out, "diag_hessian")
    ggn, _ = _backpack(case, net, x, y, n_out, "diag_ggn")
    assert max(cb.relative_errors(ggn, hessian)) > 100 * TOLERANCE


# ---------------------------------------------------------------- the harness: port and scale factors


def _kflr_oracle(case: Case, net64, x64, y64) -> list:
    """KFLR's exact factors from autodiff: g = the GGN's bias block of each layer, a = the input's second moment."""
    ggn = np.asarray(cb.autodiff_ggn(net64, x64, y64, loss=case.loss, reduction=case.reduction))
    layers, values, offset = cb._stack(net64), [], 0
    for index, layer in enumerate(layers):
        if not hasattr(layer, "w"):
            continue
        inputs = np.asarray(x64) if index == 0 else np.asarray(pb.forward(_prefix(net64, index), x64))
        n_w, n_b = layer.w.size, layer.b.size
        g = ggn[offset + n_w : offset + n_w + n_b, offset + n_w : offset + n_w + n_b]
        if isinstance(layer, pb.Conv1d):
            k, stride, padding = layer.w.shape[2], layer.stride, layer.padding
            padded = np.pad(inputs, ((0, 0), (0, 0), (padding, padding)))
            positions = (padded.shape[2] - k) // stride + 1
            u = np.stack([padded[:, :, stride * t : stride * t + k] for t in range(positions)], axis=-1)
            flat = u.reshape(u.shape[0], -1, positions)  # (N, C_in K, T), (channel, kernel) order
            a = np.einsum("nit,njt->ij", flat, flat) / len(flat)
        else:
            a = inputs.T @ inputs / len(inputs)
        values += [[g, a], [g]]
        offset += n_w + n_b
    return values


def _prefix(net, count: int):
    return pb.Sequential(net.layers[:count], net.input_shape)


REFEREE_CASES = [
    Case("mlp", "sigmoid", "softmax_cross_entropy", "mean", 300),
    Case("mlp", "tanh", "mse", "sum", 301),
    Case("mlp", "sigmoid", "mse", "mean", 302),
    Case("mlp", "tanh", "binary_cross_entropy", "sum", 303),
    Case("conv_pool", "tanh", "softmax_cross_entropy", "sum", 304),
    Case("conv", "tanh", "mse", "mean", 305),
]


@pytest.mark.parametrize("case", REFEREE_CASES, ids=[case.id for case in REFEREE_CASES])
def test_port_and_scale_factors_match_autodiff(case):
    # BackPACK (float32, scaled to purebp's units) vs float64 autodiff of purebp's own forward pass and cost:
    # rel. L2 error per leaf <= 1e-4. A wrong port (layout, flatten order, padding) or a wrong scale factor breaks it.
    net, x, y, n_out = make(case)
    net64, x64 = pb.cast_network(net, jnp.float64), jnp.asarray(x, jnp.float64)
    y64 = y if case.loss == "softmax_cross_entropy" else jnp.asarray(y, jnp.float64)
    options = {"loss": case.loss, "reduction": case.reduction}
    squares, variance = cb.autodiff_statistics(net64, x64, y64, **options)
    oracle = {
        "sum_grad_squared": cb.purebp_values(squares, "sum_grad_squared"),
        "grad_variance": cb.purebp_values(variance, "grad_variance"),
        "diag_ggn": cb.purebp_values(cb.autodiff_diag_ggn(net64, x64, y64, **options), "diag_ggn"),
        "diag_hessian": cb.purebp_values(cb.autodiff_diag_hessian(net64, x64, y64, **options), "diag_hessian"),
    }
    if case.kind != "conv_pool":
        oracle["kflr"] = _kflr_oracle(case, net64, x64, y64)
    for quantity, expected in oracle.items():
        got, names = _backpack(case, net, x, y, n_out, quantity)
        errors = cb.relative_errors(got, expected)
        report = dict(zip(_labels(names, got), (f"{e:.1e}" for e in errors)))
        assert max(errors) <= TOLERANCE, f"{case} {quantity}: BackPACK vs float64 autodiff, per leaf {report}"


def test_mse_scale_factors_are_what_the_docstring_says():
    # the factors themselves, stated: MSELoss(sum) = 2 L, MSELoss(mean) = (2/D) L
    assert cb.to_purebp_scale("mse", "sum", 3) == (0.5, 0.25)
    assert cb.to_purebp_scale("mse", "mean", 3) == (1.5, 2.25)
    assert cb.to_purebp_scale("softmax_cross_entropy", "sum", 3) == (1.0, 1.0)


# ---------------------------------------------------------------- MC quantities, in expectation

MC_CASES = [
    Case("mlp", "tanh", "softmax_cross_entropy", "mean", 400),
    Case("mlp", "sigmoid", "mse", "sum", 401),
    Case("mlp", "relu", "binary_cross_entropy", "mean", 402),
    Case("conv", "tanh", "softmax_cross_entropy", "sum", 403),
]
REPLICATES, SAMPLES = 8, 512  # R independent calls of M samples each: 4096 samples per case


def _mean_and_standard_error(calls: list[list]) -> tuple[list, list]:
    """Per compared array: the mean over the R calls and its standard error (std over calls / sqrt(R))."""
    flat = [[np.asarray(a, np.float64) for v in call for a in (v if isinstance(v, list) else [v])] for call in calls]
    stacked = [np.stack(arrays) for arrays in zip(*flat)]
    return [s.mean(0) for s in stacked], [s.std(0, ddof=1) / np.sqrt(len(s)) for s in stacked]


@pytest.mark.parametrize("quantity", cb.MONTE_CARLO)
@pytest.mark.parametrize("case", MC_CASES, ids=[case.id for case in MC_CASES])
def test_monte_carlo_mean_equals_backpack_exact(case, quantity):
    # E[diag_ggn MC] = diag_ggn exact and E[kfac g] = kflr g (kfac's a is kflr's a, deterministic): the mean of
    # R x M samples is within 4 standard errors of BackPACK's exact value (L2 over each leaf), and the standard
    # error is <= 5% of it, so that a bias of a few percent (a wrong distribution, a missing scale) shows
    net, x, y, n_out = make(case)
    exact = {"diag_ggn_mc": "diag_ggn", "kfac": "kflr"}[quantity]
    expected, names = _backpack(case, net, x, y, n_out, exact)
    keys = jax.random.split(jax.random.key(case.seed), REPLICATES)
    calls = [_purebp(case, net, x, y, quantity, key=key, mc_samples=SAMPLES) for key in keys]
    means, errors_of_mean = _mean_and_standard_error(calls)
    flat_expected = [np.asarray(a, np.float64) for v in expected for a in (v if isinstance(v, list) else [v])]
    for label, mean, se, target in zip(_labels(names, expected), means, errors_of_mean, flat_expected, strict=True):
        distance, noise, size = (float(np.linalg.norm(v)) for v in (mean - target, se, target))
        if label.endswith(" a"):  # the input factor does not depend on the samples
            assert distance <= TOLERANCE * size, f"{case} {quantity} {label}: {distance:.2e} vs |a| {size:.2e}"
            continue
        assert noise <= 0.05 * size, f"{case} {quantity} {label}: standard error {noise:.2e} vs |exact| {size:.2e}"
        assert distance <= 4 * noise + TOLERANCE * size, (
            f"{case} {quantity} {label}: |MC mean - BackPACK exact| = {distance:.2e}, standard error {noise:.2e}, "
            f"|exact| {size:.2e}"
        )


# ---------------------------------------------------------------- the benchmark's smoke run

QUICK_RUN = dict(
    command=[sys.executable, "-m", "experiments.curvature_benchmark", "--quick", "--out", "{out}/curvature_benchmark"],
    cwd=Path(__file__).resolve().parents[2],
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=600,
)


@pytest.mark.background("experiments.curvature_benchmark --quick", **QUICK_RUN)
def test_quick_benchmark_run_agrees_with_backpack(background):
    # the smoke run's tables are well formed and, inside the benchmark, every exact quantity agrees with BackPACK
    run = background.result("experiments.curvature_benchmark --quick", **QUICK_RUN)
    done, out = run.process, run.out / "curvature_benchmark"
    assert done.returncode == 0, f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {row["quantity"]: row for row in result["rows"]}
    assert set(rows) == set(cb.QUANTITIES), rows
    for quantity in cb.EXACT:
        assert rows[quantity]["vs_backpack"] <= TOLERANCE, rows[quantity]
    for quantity in ("sum_grad_squared", "grad_variance", "diag_ggn", "diag_hessian"):  # tiny: the autodiff route ran
        assert rows[quantity]["autodiff_vs_purebp"] <= TOLERANCE, rows[quantity]
    for row in result["rows"]:
        assert row["purebp_ms"] > 0 and row["backpack_ms"] > 0, row
    markdown = out.with_suffix(".md").read_text()
    tables = [line for line in markdown.splitlines() if line.startswith("|")]
    widths = {line.count("|") for line in tables if "---" not in line}
    assert tables and "Machine:" in markdown, markdown
    assert len(widths) == 2, widths  # the per-network table and the targets table, each consistent
