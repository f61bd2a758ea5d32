"""check_backprop on a gallery of hand-written backward passes: correct ones pass, broken ones are named.

Each implementation is what a student would write: the notes' column layout, Nielsen's network.py (one
example at a time) or batch-first rows, with one deliberate mistake switched on by ``bug``. Every broken
one must be caught, at the expected layer (relative to the depth of the shrunk case) and equation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from purebp.cli.check_backprop import main_check_backprop
from purebp.kit.backprop import BackpropCase, assert_backprop_matches, check_backprop


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def sigmoid_prime(z):
    s = sigmoid(z)
    return s * (1.0 - s)


def notes_columns(bug=None, return_deltas=False):
    """The notes' layout: x (n_0, N), biases (n,), delta^l (n_l, N); sigmoid everywhere, mse, sum."""

    def backprop(weights, biases, x, y):
        L = len(weights)
        a, zs = [x], []
        for w, b in zip(weights, biases):
            zs.append(w @ a[-1] + b[:, None])
            a.append(sigmoid(zs[-1]))
        deltas = [None] * L
        if bug == "bp1_no_derivative":
            deltas[-1] = a[-1] - y
        elif bug == "bp1_sign":
            deltas[-1] = (y - a[-1]) * sigmoid_prime(zs[-1])
        else:
            deltas[-1] = (a[-1] - y) * sigmoid_prime(zs[-1])  # BP1
        for l in range(L - 2, -1, -1):
            g = sigmoid_prime(a[l + 1]) if bug == "bp2_derivative_at_a" else sigmoid_prime(zs[l])
            w = weights[l + 1] if bug == "bp2_no_transpose" else weights[l + 1].T
            deltas[l] = (w @ deltas[l + 1]) * g  # BP2
        gb = [d.sum(axis=1) for d in deltas]  # BP3
        gw = [d @ a[l].T for l, d in enumerate(deltas)]  # BP4
        if bug == "bp3_wrong_axis":
            gb = [d.sum(axis=0) for d in deltas]
        if bug == "bp4_transposed":
            gw = [a[l] @ d.T for l, d in enumerate(deltas)]
        if bug == "mean":
            gw = [g / x.shape[1] for g in gw]
            gb = [g / x.shape[1] for g in gb]
        if bug == "raise":
            raise ValueError("boom")
        if bug == "jax":
            gw, gb = [jnp.asarray(g) for g in gw], [jnp.asarray(g) for g in gb]
        return (gw, gb, deltas) if return_deltas else (gw, gb)

    return backprop


def nielsen_examples(bug=None):
    """Nielsen's network.py backprop(x, y): one example, column vectors, biases (n, 1)."""

    def backprop(weights, biases, x, y):
        nabla_b = [np.zeros(b.shape) for b in biases]
        nabla_w = [np.zeros(w.shape) for w in weights]
        activation, activations, zs = x, [x], []
        for b, w in zip(biases, weights):
            z = np.dot(w, activation) + b
            zs.append(z)
            activation = sigmoid(z)
            activations.append(activation)
        delta = activations[-1] - y
        if bug != "bp1_no_derivative":
            delta = delta * sigmoid_prime(zs[-1])
        nabla_b[-1] = delta
        nabla_w[-1] = np.dot(delta, activations[-2].transpose())
        for l in range(2, len(weights) + 1):
            sp = sigmoid_prime(zs[-l])
            if bug == "bp2_no_derivative":
                sp = 1.0
            delta = np.dot(weights[-l + 1].transpose(), delta) * sp
            nabla_b[-l] = delta
            if bug == "bp4_pre_activation" and l < len(weights):
                nabla_w[-l] = np.dot(delta, zs[-l - 1].transpose())
            else:
                nabla_w[-l] = np.dot(delta, activations[-l - 1].transpose())
        if bug == "bp3_double":
            nabla_b = [2.0 * nb for nb in nabla_b]
        return nabla_w, nabla_b

    return backprop


def batch_rows(bug=None, hidden="sigmoid"):
    """Batch-first: x (N, n_0), z = x W^T + b; tanh or sigmoid hidden, softmax + cross-entropy, mean."""

    def g(z):
        return np.tanh(z) if hidden == "tanh" else sigmoid(z)

    def g_prime(z):
        return 1.0 - np.tanh(z) ** 2 if hidden == "tanh" else sigmoid_prime(z)

    def backprop(weights, biases, x, y):
        N, L = x.shape[0], len(weights)
        a, zs = [x], []
        for l, (w, b) in enumerate(zip(weights, biases)):
            zs.append(a[-1] @ w.T + b)
            if l == L - 1:
                e = np.exp(zs[-1] - zs[-1].max(axis=1, keepdims=True))
                a.append(e / e.sum(axis=1, keepdims=True))
            else:
                a.append(g(zs[-1]))
        deltas = [None] * L
        deltas[-1] = (a[-1] - y) / N  # softmax + cross-entropy, mean over the batch
        for l in range(L - 2, -1, -1):
            deltas[l] = (deltas[l + 1] @ weights[l + 1]) * g_prime(zs[l])
            if bug == "bp2_no_derivative":
                deltas[l] = deltas[l + 1] @ weights[l + 1]
        gw = [d.T @ a[l] for l, d in enumerate(deltas)]
        gb = [d.sum(axis=0) for d in deltas]
        if bug == "bp4_batch_scaling":
            gw = [gw_l / N for gw_l in gw]
        if bug == "bp3_first_example":
            gb = [d[0] for d in deltas]
        return gw, gb

    return backprop


SIGMOID_MSE = dict(activation="sigmoid", output="sigmoid", loss="mse", reduction="sum")
ROWS_CE = dict(output="softmax", loss="cross_entropy", reduction="mean", layout="rows")

COLUMNS = dict(SIGMOID_MSE, layout="columns")
EXAMPLES = dict(SIGMOID_MSE, layout="examples")
ROWS_TANH = dict(activation="tanh", **ROWS_CE)
ROWS_SIGMOID = dict(activation="sigmoid", **ROWS_CE)


def top(L):
    return L


def below_top(L):
    return L - 1


# (name, implementation, settings, expected layer from the shrunk case's depth L, equation, catalogue key;
# None: caught and located, but not one the catalogue names)
GALLERY = [
    ("columns: δᴸ without G'", notes_columns("bp1_no_derivative"), COLUMNS, top, "BP1", "bp1_no_derivative"),
    ("columns: δᴸ sign", notes_columns("bp1_sign"), COLUMNS, top, "BP1", "bp1_sign"),
    ("columns: G'(a) in BP2", notes_columns("bp2_derivative_at_a"), COLUMNS, below_top, "BP2", "bp2_derivative_at_a"),
    ("columns: bias summed over units", notes_columns("bp3_wrong_axis"), COLUMNS, top, "BP3", "bp3_wrong_axis"),
    ("columns: ∂C/∂W transposed", notes_columns("bp4_transposed"), COLUMNS, top, "BP4", "bp4_transposed"),
    ("columns: mean for sum", notes_columns("mean"), COLUMNS, top, "BP1", "scale"),
    ("examples: δᴸ without G'", nielsen_examples("bp1_no_derivative"), EXAMPLES, top, "BP1", "bp1_no_derivative"),
    ("examples: BP2 without G'", nielsen_examples("bp2_no_derivative"), EXAMPLES, below_top, "BP2",
     "bp2_no_derivative"),
    ("examples: 2 ∂C/∂b", nielsen_examples("bp3_double"), EXAMPLES, top, "BP3", None),
    ("examples: z for a in BP4", nielsen_examples("bp4_pre_activation"), EXAMPLES, below_top, "BP4",
     "bp4_pre_activation"),
    ("rows: BP2 without G'", batch_rows("bp2_no_derivative", hidden="tanh"), ROWS_TANH, below_top, "BP2",
     "bp2_no_derivative"),
    ("rows: W scaled 1/N twice", batch_rows("bp4_batch_scaling"), ROWS_SIGMOID, top, "BP4", "bp4_batch_scaling"),
    ("rows: bias of one example", batch_rows("bp3_first_example"), ROWS_SIGMOID, top, "BP3", "bp3_first_example"),
]  # fmt: skip


@pytest.mark.parametrize("name, fn, settings, layer, equation, mistake", GALLERY, ids=[entry[0] for entry in GALLERY])
def test_gallery_mistake_is_caught_located_and_named(name, fn, settings, layer, equation, mistake):
    report = check_backprop(fn, trials=20, seed=1, **settings)
    text = str(report)
    assert not report.passed, text
    assert report.equation == equation, text
    assert report.layer == layer(report.case.depth), text
    assert report.mistake == mistake, text
    # the report replays: the same case fails the same way
    again = check_backprop(fn, case=report.case.as_dict(), **settings)
    assert (again.passed, again.layer, again.equation, again.mistake) == (False, report.layer, equation, report.mistake)
    assert "replay: check_backprop(fn" in text and repr(report.case.as_dict()) in text


def test_gallery_names_the_mistake_in_words():
    report = check_backprop(notes_columns("bp2_derivative_at_a"), **SIGMOID_MSE, seed=1)
    assert report.mistake == "bp2_derivative_at_a"
    L = report.case.depth
    assert L == 2 and report.case.sizes == (1, 1, 1), str(report)  # shrunk to the smallest network with a BP2
    assert "G'(a¹), the derivative evaluated at the activation instead of z¹" in str(report)


def test_shape_mistakes_report_the_expected_shape_and_its_equation():
    report = check_backprop(notes_columns("bp4_transposed"), **SIGMOID_MSE, seed=1)
    assert report.kind == "shape" and report.mistake == "bp4_transposed", str(report)
    n = report.case.sizes
    assert f"expected {(n[-1], n[-2])}" in str(report) and "transpose" in str(report)
    report = check_backprop(notes_columns("bp3_wrong_axis"), **SIGMOID_MSE, seed=1)
    assert report.kind == "shape" and report.equation == "BP3" and report.mistake == "bp3_wrong_axis", str(report)


@pytest.mark.parametrize(
    "fn, settings",
    [
        (notes_columns(), dict(SIGMOID_MSE, layout="columns")),
        (notes_columns(return_deltas=True), dict(SIGMOID_MSE, layout="columns")),
        (notes_columns("jax"), dict(SIGMOID_MSE, layout="columns")),
        (nielsen_examples(), dict(SIGMOID_MSE, layout="examples")),
        (batch_rows(hidden="tanh"), dict(activation="tanh", **ROWS_CE)),
    ],
    ids=["columns", "columns+deltas", "columns-jax-arrays", "examples", "rows"],
)
def test_correct_implementations_pass_every_trial(fn, settings):
    report = check_backprop(fn, trials=50, seed=3, **settings)
    assert report.passed, str(report)
    assert report.trials == 50 and report.max_error < 1e-12
    assert "passed" in str(report)
    assert_backprop_matches(fn, trials=5, seed=4, **settings)


def test_returned_deltas_are_compared_directly():
    report = check_backprop(notes_columns("bp2_derivative_at_a", return_deltas=True), **SIGMOID_MSE, seed=2)
    assert (report.layer, report.equation, report.mistake) == (report.case.depth - 1, "BP2", "bp2_derivative_at_a")

    def wrong_delta_only(weights, biases, x, y):
        gw, gb, deltas = notes_columns(return_deltas=True)(weights, biases, x, y)
        deltas[-1] = 3.0 * deltas[-1]  # the gradients are right, the reported δᴸ is not
        return gw, gb, deltas

    report = check_backprop(wrong_delta_only, **SIGMOID_MSE, seed=2)
    assert (report.layer, report.equation) == (report.case.depth, "BP1"), str(report)


def test_an_exception_is_reported_with_the_smallest_case_that_raises():
    report = check_backprop(notes_columns("raise"), **SIGMOID_MSE, seed=0)
    assert report.kind == "exception" and not report.passed
    assert report.case == BackpropCase((1, 1), 1, report.case.seed)
    assert "ValueError: boom" in str(report) and "replay:" in str(report)


def test_reduction_mismatch_is_named_with_the_factor():
    report = check_backprop(notes_columns("mean"), **SIGMOID_MSE, seed=0)
    assert report.mistake == "scale" and report.case.batch == 2, str(report)  # the smallest batch that shows it
    assert "1/N = 1/2" in str(report) and "reduction='mean'" in str(report)


def test_assert_backprop_matches_raises_with_the_report():
    with pytest.raises(AssertionError, match=r"layer \d \(BP1\)"):
        assert_backprop_matches(notes_columns("bp1_no_derivative"), **SIGMOID_MSE)


def test_bad_settings_are_refused_before_anything_runs():
    with pytest.raises(ValueError, match="layout"):
        check_backprop(notes_columns(), **SIGMOID_MSE, layout="cols")
    with pytest.raises(ValueError, match="trials"):
        check_backprop(notes_columns(), **SIGMOID_MSE, trials=0)
    with pytest.raises(ValueError, match="softmax"):
        check_backprop(notes_columns(), activation="softmax", output="sigmoid", loss="mse")
    with pytest.raises(ValueError, match="loss"):
        check_backprop(notes_columns(), activation="sigmoid", output="sigmoid", loss="cross_entropy")


def test_a_mistake_that_only_runs_on_square_layers_is_still_named():
    # W δ instead of Wᵀ δ raises on most shapes; the kit finds equal widths where it runs, and names it
    report = check_backprop(notes_columns("bp2_no_transpose"), **COLUMNS, seed=0)
    assert (report.equation, report.mistake) == ("BP2", "bp2_no_transpose"), str(report)
    sizes = report.case.sizes
    assert report.layer == report.case.depth - 1 and sizes[-1] == sizes[-2]  # square where W δ runs
    assert "raised" in report.note and "replay the raising one" in str(report)


def test_float32_implementations_are_checked_at_the_float32_tolerance():
    report = check_backprop(notes_columns(), **COLUMNS, trials=20, dtype="float32")
    assert report.passed, str(report)
    assert 1e-9 < report.max_error < 1e-5  # it really ran in float32
    assert not check_backprop(notes_columns("bp2_derivative_at_a"), **COLUMNS, dtype="float32").passed


STUDENT_FILE = """
import numpy as np


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def backprop(weights, biases, x, y, wrong=False):
    a, zs = [x], []
    for w, b in zip(weights, biases):
        zs.append(w @ a[-1] + b[:, None])
        a.append(sigmoid(zs[-1]))
    deltas = [None] * len(weights)
    deltas[-1] = (a[-1] - y) * a[-1] * (1 - a[-1])
    for l in range(len(weights) - 2, -1, -1):
        s = sigmoid(a[l + 1]) if wrong else a[l + 1]
        deltas[l] = (weights[l + 1].T @ deltas[l + 1]) * s * (1 - s)
    return [d @ a[l].T for l, d in enumerate(deltas)], [d.sum(axis=1) for d in deltas]


def broken(weights, biases, x, y):
    return backprop(weights, biases, x, y, wrong=True)
"""


def test_command_line_exit_status_and_report(tmp_path, capsys):
    path = tmp_path / "student.py"
    path.write_text(STUDENT_FILE)
    common = ["--activation", "sigmoid", "--loss", "mse", "--layout", "columns", "--trials", "10"]
    assert main_check_backprop([f"{path}:backprop", *common]) == 0
    assert "passed" in capsys.readouterr().out
    assert main_check_backprop([f"{path}:broken", *common]) == 1
    out = capsys.readouterr().out
    assert "layer 1 (BP2)" in out and "G'(a¹)" in out and "replay:" in out
    assert main_check_backprop([f"{path}:missing", *common]) == 2
    assert "no function 'missing'" in capsys.readouterr().err


def test_the_command_is_a_subcommand_of_purebp_with_the_kits_choices(capsys):
    from purebp import cli
    from purebp.cli import check_backprop as command
    from purebp.kit import backprop as kit

    assert (command.LAYOUTS, command.DTYPES) == (kit.LAYOUTS, kit.DTYPES)  # the parser repeats them, without JAX
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["check-backprop", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert help_text.startswith("usage: purebp check-backprop") and "--layout {columns,rows,examples}" in help_text
    assert not hasattr(kit, "main_check_backprop")  # the kit keeps the library; the command line is cli's


@pytest.mark.slow
def test_a_registered_activation_is_used_by_name():
    import purebp as pb

    name = "kit_test_softsign"  # z / (1 + |z|), G' = 1 / (1 + |z|)^2
    pb.register_activation(
        name, lambda z: z / (1.0 + jnp.abs(z)), lambda z: 1.0 / (1.0 + jnp.abs(z)) ** 2, overwrite=True
    )

    def softsign_backprop(weights, biases, x, y, prime=lambda z: 1.0 / (1.0 + np.abs(z)) ** 2):
        a, zs = [x], []
        for w, b in zip(weights, biases):
            zs.append(w @ a[-1] + b[:, None])
            a.append(zs[-1] / (1.0 + np.abs(zs[-1])))
        deltas = [(a[-1] - y) * prime(zs[-1])]
        for l in range(len(weights) - 2, -1, -1):
            deltas.insert(0, (weights[l + 1].T @ deltas[0]) * prime(zs[l]))
        return [d @ a[l].T for l, d in enumerate(deltas)], [d.sum(axis=1) for d in deltas]

    assert_backprop_matches(softsign_backprop, activation=name, output=name, loss="mse", trials=20)
    report = check_backprop(lambda *args: softsign_backprop(*args, prime=lambda z: 1.0 / (1.0 + np.abs(z))),
                            activation=name, output=name, loss="mse")  # fmt: skip
    assert (report.layer, report.equation) == (report.case.depth, "BP1"), str(report)


@pytest.mark.parametrize(
    "fn, settings, mistake",
    [
        (notes_columns("bp2_derivative_at_a"), COLUMNS, "bp2_derivative_at_a"),
        (nielsen_examples("bp2_no_derivative"), EXAMPLES, "bp2_no_derivative"),
    ],
)
def test_a_mistake_in_the_loop_is_located_at_its_first_layer_from_the_output(fn, settings, mistake):
    # replayed unshrunk on four layers: the BP2 mistake is in layers 3, 2, 1; the first from the output is 3
    report = check_backprop(fn, **settings, case=dict(sizes=(3, 4, 5, 4, 2), batch=3, seed=5))
    assert (report.layer, report.equation, report.mistake) == (3, "BP2", mistake), str(report)
    assert "the same in layers 3, 2, 1" in report.detail
    assert [name for name, err in report.errors if err > 1e-6] == ["W³", "b³", "W²", "b²", "W¹", "b¹"]
