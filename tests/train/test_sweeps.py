"""A sweep over seeds and learning rates as one vmapped program (the README's recipe) equals the runs one by one.

Tolerance: float64, relative L2 error per parameter leaf <= 1e-12 after 25
full-batch steps (vmap batches the same dots, so only rounding may differ).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import purebp as pb
from purebp.testing import CaseSpec, make_case


@pytest.mark.slow
def test_vmapped_sweep_over_seeds_and_rates_equals_separate_fits():
    case = make_case(CaseSpec(sizes=(5, 9, 3), activations=("tanh", "identity"), loss="softmax_cross_entropy",
                              dtype="float64", batch=40))  # fmt: skip
    x, y, steps = case.x, case.y, 25
    keys = jax.random.split(jax.random.key(0), 4)
    rates = jnp.asarray([0.05, 0.1, 0.3, 0.7], dtype=jnp.float64)

    # the recipe: one network and one optimizer state per (seed, rate), a vmapped step inside one scan
    def init(key, rate):
        return pb.init_mlp(key, (5, 9, 3), ("tanh", "identity"), dtype=jnp.float64), rate

    nets, _ = jax.vmap(init)(keys, rates)
    optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    states = jax.vmap(lambda net, rate: optax.inject_hyperparams(optax.sgd)(learning_rate=rate).init(net))(nets, rates)
    step = pb.make_train_step(optimizer, loss="softmax_cross_entropy")

    @jax.jit
    def train(nets, states):
        def body(carry, _):
            nets, states = carry
            nets, states, metrics = jax.vmap(step, in_axes=(0, 0, None))(nets, states, (x, y))
            return (nets, states), metrics["loss"]

        return jax.lax.scan(body, (nets, states), None, length=steps)

    (swept, _), losses = train(nets, states)
    assert losses.shape == (steps, 4)
    for member in range(4):
        net = pb.init_mlp(keys[member], (5, 9, 3), ("tanh", "identity"), dtype=jnp.float64)
        alone, _ = pb.fit(net, (x, y), loss="softmax_cross_entropy", steps=steps,
                          optimizer=pb.make_optimizer("sgd", float(rates[member])))  # fmt: skip
        for got, want in zip(jax.tree.leaves(swept), jax.tree.leaves(alone), strict=True):
            got, want = np.asarray(got[member]), np.asarray(want)
            assert np.linalg.norm(got - want) <= 1e-12 * np.linalg.norm(want), member
