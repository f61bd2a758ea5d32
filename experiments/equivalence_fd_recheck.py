"""Recheck the two finite-difference 'mismatches' of the 2000-architecture equivalence run.

Both are layer 0 of one depth-8 network (mostly sigmoid, mse, float64, batch 59) whose first-layer
gradient is 3e-4 to 4e-3 of the whole gradient while L ~ 20: a central difference with step 1e-5 carries
rounding error ~eps L / h ~ 4e-10, i.e. ~2e-5 of that leaf. jax.grad and the NumPy oracle agree with
the hand-written gradient to ~1e-15 on the same leaves; a larger step and a 4-point stencil agree too.

    python -m experiments.equivalence_fd_recheck
"""

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import purebp as pb  # noqa: E402
from purebp.testing import CaseSpec, make_case  # noqa: E402
from reference import numpy_matrix  # noqa: E402

SPEC = CaseSpec(
    sizes=(39, 24, 36, 32, 56, 8, 20, 19, 40),
    activations=("sigmoid", "sigmoid", "softplus", "softplus", "sigmoid", "leaky_relu", "tanh", "softmax"),
    loss="mse",
    reduction="mean",
    dtype="float64",
    batch=59,
    seed=1851254610,
)

if __name__ == "__main__":
    case = make_case(SPEC)
    weights = [np.asarray(layer.w) for layer in case.net.layers]
    biases = [np.asarray(layer.b) for layer in case.net.layers]
    grads = pb.grad(case.net, case.x, case.y, loss=SPEC.loss)
    total = np.sqrt(sum(float(np.sum(np.asarray(leaf) ** 2)) for leaf in jax.tree.leaves(grads)))
    x, y = np.asarray(case.x), np.asarray(case.y)
    for name, index in (("w", 0), ("b", 1)):
        leaf = np.asarray(jax.tree.leaves(grads)[index])
        direction = np.random.default_rng(0).standard_normal(leaf.shape)
        direction /= np.linalg.norm(direction)

        def loss(t, name=name, direction=direction):
            w = [weights[0] + t * direction if name == "w" else weights[0], *weights[1:]]
            b = [biases[0] + t * direction if name == "b" else biases[0], *biases[1:]]
            return numpy_matrix.loss_and_gradients(w, b, SPEC.activations, x, y, SPEC.loss)[0]

        exact, scale = float(np.sum(leaf * direction)), max(float(np.linalg.norm(leaf)), 1e-6 * total)
        for h in (1e-5, 1e-3, 1e-2):
            central = (loss(h) - loss(-h)) / (2 * h)
            four_point = (-loss(2 * h) + 8 * loss(h) - 8 * loss(-h) + loss(-2 * h)) / (12 * h)
            print(
                f"layer 0 {name}: h={h:g} central {abs(central - exact) / scale:.1e}, "
                f"4-point {abs(four_point - exact) / scale:.1e} (L = {loss(0.0):.3g}, ||g_leaf|| = {scale:.2e})"
            )
