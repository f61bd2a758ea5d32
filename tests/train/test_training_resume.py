"""Resuming always continues; changed settings are named; sweeps compile once.

"Bit-identical" means np.array_equal on every parameter leaf. Compiles are
counted with jax.monitoring's backend-compile events, by function name.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from compile_log import compiles

import purebp as pb
from purebp.testing import CaseSpec, make_case


def _classification(n=96, seed=0):
    spec = CaseSpec(sizes=(6, 12, 4), activations=("tanh", "identity"), loss="softmax_cross_entropy",
                    dtype="float32", batch=n, seed=seed)  # fmt: skip
    case = make_case(spec)
    return case.net, case.x, case.y


def _assert_identical(a, b):
    for i, (x, y) in enumerate(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"leaf {i} differs"


OPTIONS = dict(loss="softmax_cross_entropy", batch_size=16, key=jax.random.key(5))  # 96 // 16: 6 steps per epoch


# ---------------------------------------------------------------- resume always continues


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [(20, 40), (4, 5), (3, 9), (6, 13), (1, 2)])
def test_a_run_cut_mid_epoch_extends_bit_for_bit_like_the_longer_run(tmp_path, first, then):
    net, x, y = _classification()
    options = OPTIONS | dict(optimizer=optax.adam(1e-2), eval=(x, y))
    longer, history = pb.fit(net, (x, y), steps=then, **options)
    path = str(tmp_path / "run.ckpt")
    pb.fit(net, (x, y), steps=first, checkpoint=path, **options)
    messages = []
    extended, extended_history = pb.fit(net, (x, y), steps=then, checkpoint=path, resume=True, log=messages.append,
                                        **options)  # fmt: skip
    _assert_identical(extended, longer)
    assert extended_history["epoch"] == history["epoch"] and extended_history["step"] == history["step"]
    # the epoch finished by the second run has one row: the step-weighted mean of its two parts
    np.testing.assert_allclose(extended_history["train_loss"], history["train_loss"], rtol=1e-6)
    assert extended_history["eval_loss"] == history["eval_loss"]
    assert any(message.startswith(f"resumed from step {first} of {path}") for message in messages), messages
    assert pb.load_checkpoint(path).step == then


def test_resume_says_when_it_starts_fresh_and_when_there_is_nothing_to_do(tmp_path):
    net, x, y = _classification()
    path = str(tmp_path / "run.ckpt")
    messages = []
    first, _ = pb.fit(net, (x, y), steps=9, checkpoint=path, resume=True, log=messages.append, **OPTIONS)
    assert messages[0] == f"no checkpoint at {path}: starting fresh", messages
    assert re.fullmatch(r"gradient check passed: .* max relative error \S+ \(tolerance 1e-05\)", messages[1])
    messages.clear()
    with compiles() as compiled:
        again, history = pb.fit(net, (x, y), steps=9, checkpoint=path, resume=True, log=messages.append, **OPTIONS)
    assert messages == [f"{path} already holds all 9 steps: nothing to do"]
    assert not any("_run_epoch_jit" in name for name in compiled)
    _assert_identical(again, first)
    assert history["step"] == [6, 9]


def test_resume_refuses_fewer_steps_than_the_checkpoint_holds(tmp_path):
    net, x, y = _classification()
    path = str(tmp_path / "run.ckpt")
    pb.fit(net, (x, y), steps=9, checkpoint=path, **OPTIONS)
    with pytest.raises(ValueError, match=re.escape("already holds 9 steps, more than the 6 asked for")):
        pb.fit(net, (x, y), epochs=1, checkpoint=path, resume=True, **OPTIONS)


def _changed_runs():
    _, x, y = _classification()
    yield (
        "learning rate",
        {"optimizer": pb.make_optimizer("sgd", 0.2)},
        "state.hyperparams['learning_rate']: checkpoint '0.1', now '0.2'",
    )
    yield "optax learning rate", {"optimizer": optax.sgd(0.2)}, "optimizer update"
    yield (
        "optimizer",
        {"optimizer": pb.make_optimizer("adam", 0.1)},
        "optimizer update.inner_factory: checkpoint 'optax._src.alias.sgd', now 'optax._src.alias.adam'",
    )
    yield "batch size", {"batch_size": 8}, "batch_size: checkpoint 16, now 8"
    yield "seed", {"key": jax.random.key(6)}, "key: checkpoint key data"
    yield "data", {"train": (x.at[0, 0].add(1.0), y)}, "data sha256: checkpoint"
    other = make_case(CaseSpec(sizes=(6, 10, 4), activations=("tanh", "identity"), loss="softmax_cross_entropy",
                               dtype="float32", batch=96))  # fmt: skip
    yield "architecture", {"net": other.net}, "sizes: checkpoint [6, 12, 4], now [6, 10, 4]"
    yield "settings", {"settings": {"--lr": 0.2}}, "--lr: checkpoint 0.1, now 0.2"


@pytest.mark.parametrize("what, change, message", list(_changed_runs()), ids=[c[0] for c in _changed_runs()])
def test_a_changed_setting_is_refused_naming_it_and_both_values(tmp_path, what, change, message):
    net, x, y = _classification()
    base = dict(net=net, train=(x, y), optimizer=pb.make_optimizer("sgd", 0.1), settings={"--lr": 0.1}) | OPTIONS
    path = str(tmp_path / "run.ckpt")
    pb.fit(**base, steps=6, checkpoint=path)
    with pytest.raises(ValueError, match="cannot resume from .*different run") as error:
        pb.fit(**(base | change), steps=12, checkpoint=path, resume=True)
    assert message in str(error.value)
    assert "PyTreeDef" not in str(error.value)


# ---------------------------------------------------------------- no repeated compiles


def test_a_learning_rate_sweep_compiles_the_epoch_once():
    net, x, y = _classification()
    options = OPTIONS | dict(epochs=2)
    pb.fit(net, (x, y), optimizer=pb.make_optimizer("adam", 1e-3), **options)  # compiles
    results = []
    with compiles() as compiled:
        for rate in (2e-3, 5e-3, 1e-2):
            results.append(pb.fit(net, (x, y), optimizer=pb.make_optimizer("adam", rate), **options)[0])
            results.append(
                pb.fit(net, (x, y), optimizer=optax.inject_hyperparams(optax.adam)(learning_rate=rate), **options)[0]
            )
    assert compiled == [], compiled
    # the rate really reaches the program: each equals a fresh, separately compiled optax.adam(rate) run
    for index, rate in enumerate((2e-3, 5e-3, 1e-2)):
        plain, _ = pb.fit(net, (x, y), optimizer=optax.adam(rate), **options)
        np.testing.assert_allclose(np.asarray(results[2 * index].layers[0].w), np.asarray(plain.layers[0].w),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip
        _assert_identical(results[2 * index], results[2 * index + 1])


def test_a_seed_sweep_compiles_the_epoch_once():
    net, x, y = _classification()
    pb.fit(net, (x, y), optimizer=pb.make_optimizer("sgd", 0.1), **(OPTIONS | dict(epochs=1)))
    with compiles() as compiled:
        nets = [
            pb.fit(net, (x, y), optimizer=pb.make_optimizer("sgd", 0.1), **(OPTIONS | dict(epochs=1, key=key)))[0]
            for key in (jax.random.key(1), jax.random.key(2))
        ]
    assert compiled == [], compiled
    assert not np.array_equal(np.asarray(nets[0].layers[0].w), np.asarray(nets[1].layers[0].w))


def test_a_different_optimizer_never_reuses_the_old_program():
    net, x, y = _classification()
    options = OPTIONS | dict(epochs=1)
    with compiles() as compiled:
        sgd, _ = pb.fit(net, (x, y), optimizer=optax.sgd(0.137), **options)
        other, _ = pb.fit(net, (x, y), optimizer=optax.sgd(0.311), **options)  # the rate is a constant here
    assert sum("_run_epoch_jit" in name for name in compiled) == 2, compiled
    assert not np.array_equal(np.asarray(sgd.layers[0].w), np.asarray(other.layers[0].w))


@pytest.mark.slow  # default tier budget (5 minutes on 2 cores)
def test_a_default_optimizer_learning_rate_sweep_compiles_the_epoch_once():
    net, x, y = _classification()
    options = OPTIONS | dict(epochs=2)
    pb.fit(net, (x, y), learning_rate=0.05, **options)  # compiles
    rates = (0.01, 0.03, 0.1, 0.3, 1.0)
    with compiles() as compiled:
        swept = [pb.fit(net, (x, y), learning_rate=rate, **options)[0] for rate in rates]
    assert not any("run_epoch" in name for name in compiled), compiled
    # bit for bit the plain optax.sgd(rate) run, whose rate is a constant of its own program
    for rate, got in zip(rates, swept, strict=True):
        _assert_identical(got, pb.fit(net, (x, y), optimizer=optax.sgd(rate), **options)[0])


def test_the_epoch_is_keyed_on_what_the_update_computes():
    from purebp.train.optimizers import program_update

    def injected(rate, **kwargs):
        return optax.inject_hyperparams(optax.adam)(learning_rate=rate, **kwargs).update

    assert program_update(injected(1e-3)) is program_update(injected(5e-2))
    assert program_update(pb.make_optimizer("adam", 0.1).update) is program_update(injected(2e-3))
    assert program_update(injected(1e-3)) is not program_update(injected(1e-3, nesterov=True))
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1).update
    assert program_update(sgd) is not program_update(injected(1e-3))
    # constants in closures: every object is its own program (it may cost a compile, never a stale program)
    plain = optax.adam(1e-3).update
    assert program_update(plain) is plain and program_update(optax.adam(1e-3).update) is not plain
    scheduled = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10)).update
    assert program_update(scheduled) is scheduled
    mask = np.ones(3)
    masked = optax.inject_hyperparams(optax.masked)(inner=optax.sgd(0.1), mask=mask).update
    assert program_update(masked) is masked  # an array setting is not hashable: keyed by identity
    pb.clear_caches()  # a fresh start: the shared function is forgotten with every compiled program
    assert program_update(injected(1e-3)) is not program_update(sgd)


@pytest.mark.slow
def test_a_re_registered_activation_never_reuses_the_old_epoch():
    _, x, y = _classification()
    name = "purebp_test_refit"
    pb.register_activation(name, jnp.tanh, lambda z: 1.0 - jnp.tanh(z) ** 2, overwrite=True)
    other = pb.init_mlp(jax.random.key(0), (6, 12, 4), (name, "identity"))
    first, _ = pb.fit(other, (x, y), learning_rate=0.1, epochs=1, **OPTIONS)
    pb.register_activation(name, jnp.sin, jnp.cos, overwrite=True)
    with compiles() as compiled:
        second, _ = pb.fit(other, (x, y), learning_rate=0.1, epochs=1, **OPTIONS)
    assert any("run_epoch" in name for name in compiled), compiled
    assert not np.array_equal(np.asarray(first.layers[0].w), np.asarray(second.layers[0].w))


# ---------------------------------------------------------------- the data


def test_negative_or_too_large_one_hot_targets_are_refused():
    net, x, y = _classification(n=16)
    one_hot = np.asarray(jax.nn.one_hot(y, 4, dtype=jnp.float32))
    for value, where in ((-1.0, (3, 1)), (1.5, (0, 2))):
        bad = one_hot.copy()
        bad[where] = value
        message = f"must lie in [0, 1]; got {value} at y[{where[0]}, {where[1]}]"
        with pytest.raises(ValueError, match=re.escape(message)):
            pb.value_and_grad(net, x, jnp.asarray(bad), loss="softmax_cross_entropy")
    pb.value_and_grad(net, x, jnp.asarray(0.5 * one_hot + 0.125), loss="softmax_cross_entropy")  # soft labels pass


def test_check_gradients_names_non_finite_inputs_instead_of_a_mismatch():
    net, x, y = _classification(n=8)
    with pytest.raises(ValueError, match=re.escape("check_gradients: the input is not finite: x[2, 4] is nan")):
        pb.check_gradients(net, x.at[2, 4].set(jnp.nan), y, loss="softmax_cross_entropy")
    second = dataclasses.replace(net.layers[1], w=net.layers[1].w.at[1, 0].set(jnp.inf))
    broken = dataclasses.replace(net, layers=(net.layers[0], second))
    with pytest.raises(ValueError, match=re.escape("the network is not finite: layer 1 w[1, 0] is inf")):
        pb.check_gradients(broken, x, y, loss="softmax_cross_entropy")


def test_numpy_inputs_are_cast_to_the_network_dtype_and_jax_arrays_of_another_dtype_refused():
    net, x, y = _classification(n=8)  # float32 parameters
    host = np.asarray(x, dtype=np.float64)
    loss_host, grads_host = pb.value_and_grad(net, host, y, loss="softmax_cross_entropy")
    loss, grads = pb.value_and_grad(net, x, y, loss="softmax_cross_entropy")
    assert loss_host.dtype == jnp.float32 and float(loss_host) == float(loss)
    _assert_identical(grads_host, grads)
    with pytest.raises(TypeError, match="x has dtype float64 but the network's parameters are float32"):
        pb.value_and_grad(net, jnp.asarray(host), y, loss="softmax_cross_entropy")


@pytest.mark.slow  # default tier budget (5 minutes on 2 cores)
def test_fit_trains_in_mixed_precision_and_a_resume_with_another_compute_dtype_is_refused(tmp_path):
    net, x, y = _classification()
    path = str(tmp_path / "run.ckpt")
    options = OPTIONS | dict(optimizer=pb.make_optimizer("adam", 1e-2))
    mixed, history = pb.fit(net, (x, y), steps=30, compute_dtype="bfloat16", checkpoint=path, **options)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(mixed))  # the master copy stays float32
    assert history["train_loss"][-1] < 0.9 * history["train_loss"][0]
    full, _ = pb.fit(net, (x, y), steps=30, **options)
    assert not np.array_equal(np.asarray(mixed.layers[0].w), np.asarray(full.layers[0].w))  # bfloat16 did run
    with pytest.raises(ValueError, match=re.escape("compute_dtype: checkpoint 'bfloat16', now None")):
        pb.fit(net, (x, y), steps=40, checkpoint=path, resume=True, **options)
    with pytest.raises(ValueError, match="compute_dtype needs gradient='handwritten'"):
        pb.fit(net, (x, y), steps=4, compute_dtype="float16", gradient="autodiff", **options)
