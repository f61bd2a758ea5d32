"""`purebp verify` and the purebp.testing helpers users build their own tests from."""

import jax
import pytest
from hypothesis import given, settings

import purebp as pb
from purebp import activations
from purebp.cli import main
from purebp.testing import LOSS_OUTPUT_PAIRS, CaseSpec, assert_gradients_match, cases, make_case


def test_verify_passes_and_prints_a_table_and_summary(capsys):
    assert main(["verify", "--trials", "6", "--dtype", "both", "--seed", "1", "--max-depth", "3"]) == 0
    out = capsys.readouterr().out
    assert "hand" in out and "autodiff" in out and out.count("\n") >= 8
    assert "purebp verify: 6 architectures, 0 mismatches" in out


def test_verify_exits_1_and_prints_the_replayable_architecture_on_a_mismatch(capsys, monkeypatch):
    broken = activations.Activation("tanh", activations._REGISTRY["tanh"].forward, lambda z, a: 1.0 - a * a + 1e-3)
    jax.clear_caches()
    monkeypatch.setitem(activations._REGISTRY, "tanh", broken)
    try:
        code = main(["verify", "--trials", "12", "--seed", "0", "--max-depth", "3", "--quiet"])
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    out = capsys.readouterr().out
    assert code == 1
    assert "MISMATCH" in out and "replay: purebp.testing.make_case(CaseSpec(" in out and "FAIL" in out


def test_verify_rejects_zero_trials():
    with pytest.raises(SystemExit, match="--trials must be at least 1"):
        main(["verify", "--trials", "0"])


def test_assert_gradients_match_raises_with_the_table(monkeypatch):
    case = make_case(CaseSpec(sizes=(3, 4, 2), activations=("sigmoid", "identity"), loss="mse"))
    assert assert_gradients_match(case.net, case.x, case.y, loss="mse").passed
    broken = activations.Activation("sigmoid", activations._sigmoid, lambda z, a: a * (1.0 - a) * 1.0001)
    jax.clear_caches()
    monkeypatch.setitem(activations._REGISTRY, "sigmoid", broken)
    try:
        with pytest.raises(AssertionError, match=r"(?s)differs from jax.grad.*layer param.*NO"):
            assert_gradients_match(case.net, case.x, case.y, loss="mse")
    finally:
        monkeypatch.undo()
        jax.clear_caches()


def test_case_spec_round_trips_through_its_repr():
    spec = CaseSpec(sizes=(3, 1, 2), activations=("gelu", "softmax"), loss="cross_entropy", batch=1, one_hot=True)
    assert eval(repr(spec)) == spec
    case = make_case(spec)
    assert case.net.sizes == (3, 1, 2) and case.x.shape == (1, 3) and case.y.shape == (1, 2)


@settings(max_examples=25)
@given(cases(max_depth=3, max_width=5, max_batch=3))
def test_cases_strategy_draws_valid_cases(case):
    assert (case.loss, case.net.activations[-1]) in LOSS_OUTPUT_PAIRS
    assert case.x.shape == (case.spec.batch, case.net.sizes[0]) and str(case.x.dtype) == case.spec.dtype
    pb.forward(case.net, case.x)  # validates shapes and dtypes without raising
    assert "softmax" not in case.net.activations[:-1]


def test_version_prints_the_package_version(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"purebp {getattr(pb, '__version__', None) or metadata.version('purebp')}"


def test_bench_is_gone(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bench'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "bench" not in capsys.readouterr().out


def test_top_level_help_says_what_train_trains(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "train an MLP (or, with --model cnn, MNIST-1D's CNN)" in text


def test_errors_name_the_public_builders_not_their_classes():
    with pytest.raises(
        ValueError, match=r"layer 0 \(pb\.residual\(pb\.dense\(5, 'relu'\)\)\): residual: its body"
    ) as error:
        pb.init_network(jax.random.key(0), (3,), [pb.residual(pb.dense(5, "relu"))])
    assert "Init" not in str(error.value)
    # each builder's repr is the call that builds it, defaults left out
    built = [pb.dense(4), pb.conv1d(3, 2, stride=2, activation="relu"), pb.dropout(0.25), pb.layer_norm(),
             pb.layer_norm(eps=1e-6), pb.residual(pb.dense(4), pb.layer_norm())]  # fmt: skip
    assert [repr(builder) for builder in built] == [
        "pb.dense(4)",
        "pb.conv1d(3, 2, stride=2, activation='relu')",
        "pb.dropout(0.25)",
        "pb.layer_norm()",
        "pb.layer_norm(eps=1e-06)",
        "pb.residual(pb.dense(4), pb.layer_norm())",
    ]
    assert [eval(repr(builder), {"pb": pb}) for builder in built] == built  # the repr rebuilds the builder
