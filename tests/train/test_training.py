"""fit and the pure train step: determinism, hand-written vs autodiff trajectories, resume, divergence, bad input.

Tolerances: trajectories are compared per parameter leaf by relative L2 error,
||a - b||_2 / ||b||_2, at 1e-11 in float64 after >= 100 steps (each step's
gradients agree to ~1e-15; the bound leaves room for that to grow along the
run); "bit-identical" means np.array_equal on every leaf.
"""

from __future__ import annotations

import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import purebp as pb
from purebp import engine as backprop
from purebp.testing import CaseSpec, make_case, random_spec
from purebp.train import fit as training


def _leaves(net):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(net)]


def _assert_identical(a, b):
    for i, (x, y) in enumerate(zip(_leaves(a), _leaves(b), strict=True)):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"leaf {i} differs"


def _max_relative_error(a, b) -> float:
    pairs = zip(_leaves(a), _leaves(b), strict=True)
    return max(float(np.linalg.norm(np.subtract(x, y, dtype=np.float64)) / np.linalg.norm(y.astype(np.float64)))
               for x, y in pairs)  # fmt: skip


def _classification(dtype="float32", n=96, sizes=(6, 12, 4), seed=0):
    spec = CaseSpec(sizes=sizes, activations=("tanh", "identity"), loss="softmax_cross_entropy", dtype=dtype, batch=n)
    case = make_case(dataclasses.replace(spec, seed=seed))
    return case.net, case.x, case.y


# ---------------------------------------------------------------- determinism


@pytest.mark.slow
def test_same_key_gives_bit_identical_parameters_and_history():
    net, x, y = _classification()
    options = dict(loss="softmax_cross_entropy", optimizer=optax.adam(1e-2), epochs=4, batch_size=16, eval=(x, y))
    first, history_1 = pb.fit(net, (x, y), key=jax.random.key(3), **options)
    second, history_2 = pb.fit(net, (x, y), key=jax.random.key(3), **options)
    other, _ = pb.fit(net, (x, y), key=jax.random.key(4), **options)
    _assert_identical(first, second)
    for name in ("train_loss", "eval_loss", "eval_accuracy", "step"):
        assert history_1[name] == history_2[name]
    assert not np.array_equal(_leaves(first)[0], _leaves(other)[0]), "the key must change the shuffling"


def test_input_network_is_untouched_and_training_lowers_the_loss():
    net, x, y = _classification()
    before = _leaves(net)
    trained, history = pb.fit(net, (x, y), loss="softmax_cross_entropy", learning_rate=0.5, epochs=200, eval=(x, y))
    for old, new in zip(before, _leaves(net)):
        assert np.array_equal(old, new)
    assert history["train_loss"][-1] < 0.6 * history["train_loss"][0]  # random labels: memorising takes a while
    assert history["eval_accuracy"][-1] > history["eval_accuracy"][0]
    assert trained.activations == net.activations and trained.sizes == net.sizes


# ---------------------------------------------------------------- the step is the notes' update


@pytest.mark.slow
def test_full_batch_fit_is_plain_gradient_descent():
    """fit with the default optimizer and no batch_size is theta <- theta - eta grad L, step by step (jitted loop)."""
    net, x, y = _classification(dtype="float64")
    eta, steps = 0.3, 12
    trained, history = pb.fit(net, (x, y), loss="softmax_cross_entropy", learning_rate=eta, steps=steps)

    @jax.jit
    def gd_step(params):
        value, grads = backprop._value_and_grad_jit(params, x, y, "softmax_cross_entropy", "mean")
        return jax.tree.map(lambda p, g: p - eta * g, params, grads), value

    params, losses = net, []
    for _ in range(steps):
        params, value = gd_step(params)
        losses.append(float(value))
    assert _max_relative_error(trained, params) <= 1e-12
    assert history["step"] == list(range(1, steps + 1))  # full batch: one step per epoch
    np.testing.assert_allclose(history["train_loss"], losses, rtol=1e-12)


def test_make_train_step_is_pure_and_jittable():
    net, x, y = _classification(dtype="float64")
    optimizer = optax.sgd(0.1, momentum=0.9)
    step = jax.jit(pb.make_train_step(optimizer, loss="softmax_cross_entropy"))
    state = optimizer.init(net)
    first = step(net, state, (x, y))
    second = step(net, state, (x, y))
    _assert_identical(first[0], second[0])
    expected_loss, _ = pb.value_and_grad(net, x, y, loss="softmax_cross_entropy")
    np.testing.assert_allclose(float(first[2]["loss"]), float(expected_loss), rtol=1e-12)


@pytest.mark.slow
def test_steps_mode_runs_exactly_that_many_steps():
    net, x, y = _classification(n=50)
    _, history = pb.fit(net, (x, y), loss="softmax_cross_entropy", steps=10, batch_size=16, key=jax.random.key(0))
    # 50 // 16 = 3 steps per epoch; the last epoch is cut short
    assert history["step"] == [3, 6, 9, 10]
    assert history["epoch"] == [0, 1, 2, 3]


# ---------------------------------------------------------------- hand-written vs autodiff over a run


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_handwritten_and_autodiff_trajectories_agree_in_float64(seed):
    rng = np.random.default_rng(100 + seed)
    spec = dataclasses.replace(random_spec(rng, dtype="float64", max_depth=4, max_width=16), batch=48, seed=seed)
    case = make_case(spec)
    options = dict(
        loss=spec.loss,
        reduction=spec.reduction,
        # a step size well inside the stable range (per example for "sum"): in an unstable
        # run any rounding difference grows exponentially, whichever gradient is right
        optimizer=optax.sgd(0.05 if spec.reduction == "mean" else 0.05 / 16, momentum=0.5),
        steps=120,
        batch_size=16,
        key=jax.random.key(seed),
    )
    handwritten, history_h = pb.fit(case.net, (case.x, case.y), gradient="handwritten", **options)
    autodiff, history_a = pb.fit(case.net, (case.x, case.y), gradient="autodiff", **options)
    assert history_h["step"][-1] == 120
    error = _max_relative_error(handwritten, autodiff)
    assert error <= 1e-11, f"trajectories differ by {error:.2e} after 120 steps for {spec}"
    np.testing.assert_allclose(history_h["train_loss"], history_a["train_loss"], rtol=1e-11, err_msg=str(spec))


# ---------------------------------------------------------------- verify before trusting


@dataclasses.dataclass(frozen=True)
class WrongDense(pb.Dense):
    """A dense layer whose backward returns its parameter gradients 1% too large: a wrong rule."""

    def backward(self, cache, grad_out):
        grad_in, grads = super().backward(cache, grad_out)
        return grad_in, WrongDense(1.01 * grads.w, 1.01 * grads.b, grads.activation)


jax.tree_util.register_dataclass(WrongDense)


def test_fit_refuses_to_train_when_the_gradient_is_wrong():
    net, x, y = _classification(dtype="float64")
    last = net.layers[-1]
    net = dataclasses.replace(net, layers=(*net.layers[:-1], WrongDense(last.w, last.b, last.activation)))
    with pytest.raises(pb.GradientMismatchError, match="refusing to train") as error:
        pb.fit(net, (x, y), loss="softmax_cross_entropy", epochs=1)
    assert not error.value.report.passed
    assert "FAIL" in str(error.value)
    pb.fit(net, (x, y), loss="softmax_cross_entropy", epochs=1, verify=False)  # the flag turns it off


# ---------------------------------------------------------------- divergence


@pytest.mark.slow
def test_divergence_names_step_and_epoch_and_returns_the_last_finite_parameters(tmp_path):
    spec = CaseSpec(sizes=(4, 8, 3), activations=("identity", "identity"), loss="mse", dtype="float32", batch=40)
    case = make_case(spec)
    options = dict(loss="mse", learning_rate=50.0, batch_size=10, key=jax.random.key(0))
    path = str(tmp_path / "run.ckpt")
    with pytest.raises(pb.DivergenceError, match=r"non-finite at step \d+ \(epoch \d+\)") as caught:
        pb.fit(case.net, (case.x, case.y), epochs=50, checkpoint=path, **options)
    error = caught.value
    assert error.step >= 2 and error.epoch == error.step // 4  # 40 // 10 = 4 steps per epoch
    assert str(error.step) in str(error) and f"epoch {error.epoch}" in str(error)
    assert all(np.all(np.isfinite(leaf)) for leaf in _leaves(error.net))
    # the loss at step s was computed on the parameters after s updates: steps 0..s-1 were
    # finite, so training for s steps runs clean and one more step raises ...
    _, history = pb.fit(case.net, (case.x, case.y), steps=error.step, **options)
    assert np.all(np.isfinite(history["train_loss"]))
    with pytest.raises(pb.DivergenceError, match=f"step {error.step} "):
        pb.fit(case.net, (case.x, case.y), steps=error.step + 1, **options)
    # ... and the parameters returned are those whose loss (at step s - 1) was the last finite one
    before, _ = pb.fit(case.net, (case.x, case.y), steps=error.step - 1, **options)
    assert _max_relative_error(error.net, before) <= 1e-6
    saved = pb.load_checkpoint(path + ".diverged")
    _assert_identical(saved.net, error.net)
    assert saved.metadata["diverged_at_step"] == error.step


def test_non_finite_parameters_diverge_at_step_zero_and_keep_the_initial_network():
    net, x, y = _classification(dtype="float64")
    first = dataclasses.replace(net.layers[0], w=net.layers[0].w.at[0, 0].set(jnp.nan))
    net = dataclasses.replace(net, layers=(first, *net.layers[1:]))
    with pytest.raises(pb.DivergenceError, match=r"step 0 \(epoch 0\)") as caught:
        pb.fit(net, (x, y), loss="softmax_cross_entropy", epochs=2, verify=False)
    for kept, initial in zip(_leaves(caught.value.net), _leaves(net), strict=True):
        np.testing.assert_array_equal(kept, initial)  # NaN where the initial network has it


@pytest.mark.parametrize("part, where", [("x", (3, 0)), ("x", (95, 5)), ("y", (7, 2))])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_is_named_before_anything_compiles(monkeypatch, part, where, bad):
    net, x, y = _classification(dtype="float64")
    y = jax.nn.one_hot(y, 4, dtype=jnp.float64)  # float targets, so y can hold a NaN too
    x, y = np.array(x), np.array(y)
    (x if part == "x" else y)[where] = bad
    monkeypatch.setattr(training, "run_epoch", lambda *args, **kwargs: pytest.fail("compiled before the check"))
    message = f"the training data is not finite: {part}[{where[0]}, {where[1]}] is {bad} (row {where[0]}, column"
    with pytest.raises(ValueError, match=re.escape(message)):
        pb.fit(net, (x, y), loss="softmax_cross_entropy", epochs=1)
    with pytest.raises(ValueError, match=re.escape(message.replace("training", "eval"))):
        clean = _classification(dtype="float64")
        pb.fit(net, clean[1:], loss="softmax_cross_entropy", epochs=1, eval=(x, y))


# ---------------------------------------------------------------- checkpoints and resume


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    net, x, y = _classification()
    options = dict(
        loss="softmax_cross_entropy",
        optimizer=optax.adam(1e-2),
        steps=40,  # 96 // 16 = 6 steps per epoch: 7 epochs, the last one of 4 steps
        batch_size=16,
        key=jax.random.key(5),
        eval=(x, y),
    )
    uninterrupted, history = pb.fit(net, (x, y), **options)

    path = str(tmp_path / "run.ckpt")

    def interrupt(epoch, row):
        if epoch == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pb.fit(net, (x, y), checkpoint=path, checkpoint_every=2, callback=interrupt, **options)
    saved = pb.load_checkpoint(path)
    assert saved.metadata["epoch"] == 3 and saved.step == 24  # epoch 4 ran but was not saved
    resumed_epochs = []
    resumed, resumed_history = pb.fit(
        net, (x, y), checkpoint=path, resume=True, callback=lambda epoch, row: resumed_epochs.append(epoch), **options
    )
    assert resumed_epochs == [4, 5, 6]
    _assert_identical(resumed, uninterrupted)
    for name in ("epoch", "step", "train_loss", "eval_loss", "eval_accuracy"):
        assert resumed_history[name] == history[name]
    # the final checkpoint holds the final parameters and optimizer state
    final = pb.load_checkpoint(path, opt_state_template=optax.adam(1e-2).init(net))
    _assert_identical(final.net, uninterrupted)
    assert final.step == 40


def test_resume_without_a_checkpoint_file_starts_fresh_and_refuses_a_different_run(tmp_path):
    net, x, y = _classification()
    path = str(tmp_path / "run.ckpt")
    options = dict(loss="softmax_cross_entropy", epochs=2, batch_size=16, key=jax.random.key(0))
    fresh, _ = pb.fit(net, (x, y), checkpoint=path, resume=True, **options)
    plain, _ = pb.fit(net, (x, y), **options)
    _assert_identical(fresh, plain)
    with pytest.raises(ValueError, match="different run.*batch_size"):
        pb.fit(net, (x, y), loss="softmax_cross_entropy", epochs=2, batch_size=8, key=jax.random.key(0),
               checkpoint=path, resume=True)  # fmt: skip
    with pytest.raises(ValueError, match="different key"):
        pb.fit(net, (x, y), checkpoint=path, resume=True, **(options | {"key": jax.random.key(1)}))
    assert os.path.exists(path)


@pytest.mark.slow  # default tier budget (5 minutes on 2 cores)
def test_a_finished_run_extends_to_more_epochs_exactly_like_the_longer_run(tmp_path):
    net, x, y = _classification()
    options = dict(
        loss="softmax_cross_entropy", optimizer=optax.adam(1e-2), batch_size=16, key=jax.random.key(5), eval=(x, y)
    )
    longer, history = pb.fit(net, (x, y), epochs=5, **options)
    path = str(tmp_path / "run.ckpt")
    pb.fit(net, (x, y), epochs=3, checkpoint=path, **options)
    epochs_run = []
    extended, extended_history = pb.fit(
        net, (x, y), epochs=5, checkpoint=path, resume=True, callback=lambda e, row: epochs_run.append(e), **options
    )
    assert epochs_run == [3, 4]
    _assert_identical(extended, longer)
    for name in ("epoch", "step", "train_loss", "eval_loss", "eval_accuracy"):
        assert extended_history[name] == history[name]
    assert pb.load_checkpoint(path).step == 30
    with pytest.raises(ValueError, match="already holds 30 steps, more than the 12 asked for"):
        pb.fit(net, (x, y), epochs=2, checkpoint=path, resume=True, **options)
    # 20 steps of 6 per epoch end 2 steps into epoch 3: extending finishes that epoch first
    # (tests/train/test_training_resume.py checks such extensions bit for bit)
    partial = str(tmp_path / "partial.ckpt")
    pb.fit(net, (x, y), steps=20, checkpoint=partial, **options)
    forty, _ = pb.fit(net, (x, y), steps=40, **options)
    _assert_identical(pb.fit(net, (x, y), steps=40, checkpoint=partial, resume=True, **options)[0], forty)


def test_only_process_zero_writes_the_checkpoint(tmp_path, monkeypatch):
    """In a multi-process run every process holds the same parameters; one writer, or they race on one file."""
    net, x, y = _classification()
    options = dict(loss="softmax_cross_entropy", epochs=1, batch_size=16, key=jax.random.key(0))
    monkeypatch.setattr(jax, "process_index", lambda *args, **kwargs: 1)
    pb.fit(net, (x, y), checkpoint=str(tmp_path / "worker.ckpt"), **options)
    assert not (tmp_path / "worker.ckpt").exists()
    monkeypatch.setattr(jax, "process_index", lambda *args, **kwargs: 0)
    pb.fit(net, (x, y), checkpoint=str(tmp_path / "writer.ckpt"), **options)
    assert (tmp_path / "writer.ckpt").exists()


# ---------------------------------------------------------------- bad input, before anything compiles


def _bad_arguments():
    _, x, y = _classification(n=20)
    good = dict(loss="softmax_cross_entropy", epochs=1, batch_size=4, key=jax.random.key(0))
    yield "lr 0", dict(good, learning_rate=0.0), ValueError, "learning rate must be finite and > 0, got 0.0"
    yield "lr < 0", dict(good, learning_rate=-0.1), ValueError, "learning rate must be finite and > 0"
    yield "lr nan", dict(good, learning_rate=float("nan")), ValueError, "learning rate must be finite"
    yield "lr inf", dict(good, learning_rate=float("inf")), ValueError, "learning rate must be finite"
    yield "lr str", dict(good, learning_rate="0.1"), TypeError, "learning rate must be a number"
    yield "batch 0", dict(good, batch_size=0), ValueError, "batch_size must be a positive int, got 0"
    yield "batch < 0", dict(good, batch_size=-2), ValueError, "batch_size must be a positive int"
    yield "batch > N", dict(good, batch_size=21), ValueError, "batch_size 21 is larger than the training set (20"
    yield "batch float", dict(good, batch_size=4.0), TypeError, "batch_size must be a positive int"
    yield "epochs 0", dict(good, epochs=0), ValueError, "epochs must be a positive int, got 0"
    yield "steps 0", dict(good, epochs=None, steps=0), ValueError, "steps must be a positive int"
    yield "both", dict(good, steps=3), ValueError, "exactly one of epochs or steps"
    yield "neither", dict(good, epochs=None), ValueError, "exactly one of epochs or steps"
    yield "no key", dict(good, key=None), ValueError, "pass key=jax.random.key"
    yield "bad key", dict(good, key=7), TypeError, "key must be one JAX random key"
    yield "gradient", dict(good, gradient="numeric"), ValueError, "gradient must be one of"
    yield "optimizer", dict(good, optimizer=optax.sgd), TypeError, "optax.GradientTransformation"
    yield "lr with optimizer", dict(good, optimizer=optax.sgd(0.1), learning_rate=0.1), ValueError, "default optim"
    yield "resume", dict(good, resume=True), ValueError, "resume=True needs a checkpoint"
    yield "checkpoint_every", dict(good, checkpoint_every=0), ValueError, "checkpoint_every must be a positive"
    yield "checkpoint dir", dict(good, checkpoint="/nonexistent/run.ckpt"), ValueError, "/nonexistent does not exist"
    yield "loss", dict(good, loss="hinge"), ValueError, "unknown loss 'hinge'"
    yield "train width", dict(good, train=(x[:, :5], y)), ValueError, "x has 5 features per example but the net"
    yield "eval width", dict(good, eval=(x[:, :5], y)), ValueError, "x has 5 features per example but the net"
    yield "empty", dict(good, train=(x[:0], y[:0])), ValueError, "empty batch"
    yield "label", dict(good, train=(x, y.at[2].set(9))), ValueError, "class label 9 at index 2 is outside [0, 4)"
    yield "train pair", dict(good, train=x), TypeError, "train must be a pair (x, y)"
    yield "dtype", dict(good, train=(x.astype(jnp.float64), y)), TypeError, "x has dtype float64"


BAD = list(_bad_arguments())


@pytest.mark.parametrize(("arguments", "error", "message"), [case[1:] for case in BAD], ids=[c[0] for c in BAD])
def test_bad_arguments_are_rejected_before_compiling(monkeypatch, arguments, error, message):
    net, x, y = _classification(n=20)

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started despite bad arguments")

    monkeypatch.setattr(training, "run_epoch", must_not_run)
    monkeypatch.setattr(training._check, "check_gradients", must_not_run)
    arguments = dict(arguments)
    train = arguments.pop("train", (x, y))
    with pytest.raises(error, match=re.escape(message)):
        pb.fit(net, train, **arguments)


def test_make_optimizer_validates_and_names_the_choices():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; valid optimizers: gd, sgd, momentum, adam"):
        pb.make_optimizer("rmsprop", 0.1)
    with pytest.raises(ValueError, match="learning rate must be finite and > 0"):
        pb.make_optimizer("adam", -1.0)


def test_evaluate_accuracy_is_the_argmax_agreement():
    net, x, y = _classification(dtype="float64")
    metrics = pb.evaluate(net, x, y, loss="softmax_cross_entropy")
    predicted = np.argmax(np.asarray(pb.forward(net, x)), axis=1)
    assert metrics["accuracy"] == pytest.approx(np.mean(predicted == np.asarray(y)), abs=1e-12)
    one_hot = jax.nn.one_hot(y, 4, dtype=jnp.float64)
    assert pb.evaluate(net, x, one_hot, loss="softmax_cross_entropy") == pytest.approx(metrics, rel=1e-12)
