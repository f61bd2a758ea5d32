"""Recheck the two finite-difference 'mismatches' of the previous 2000-architecture equivalence run.

Both were layer 0 (w and b) of one depth-8 network (mostly sigmoid, mse, float64, batch 59) whose
first-layer gradient is 3e-4 to 4e-3 of the whole gradient while L ~ 20: the central difference with the
old fixed step 1e-5 carries rounding error ~eps L / h ~ 4e-10, i.e. ~1e-6 to 1e-5 of that leaf. This script
replays the run's random directions for that network (same seed, same draw order as
``python -m experiments.equivalence``, no other architecture needs computing) and prints, per leaf, the
old fixed-step error, the adaptive (Ridders) oracle's error, its error estimate and step, and the
hand-written gradient against the NumPy oracle.

    python -m experiments.equivalence_fd_recheck
"""

import jax

jax.config.update("jax_enable_x64", True)

import math  # noqa: E402

import numpy as np  # noqa: E402

import purebp as pb  # noqa: E402
from experiments.equivalence import FD_FIRST_STEP, FD_TOLERANCE, OLD_FD_STEP  # noqa: E402
from purebp.testing import CaseSpec, make_case, random_spec  # noqa: E402
from reference import finite_differences, numpy_matrix  # noqa: E402

SPEC = CaseSpec(
    sizes=(39, 24, 36, 32, 56, 8, 20, 19, 40),
    activations=("sigmoid", "sigmoid", "softplus", "softplus", "sigmoid", "leaky_relu", "tanh", "softmax"),
    loss="mse",
    reduction="mean",
    dtype="float64",
    batch=59,
    one_hot=True,  # as drawn by the run (the earlier version of this script left it out)
    seed=1851254610,
)


def run_directions(spec: CaseSpec, seed: int = 0, trials: int = 2000) -> list[np.ndarray]:
    """The unit directions the equivalence run drew for ``spec``'s leaves (w^1, b^1, w^2, ...)."""
    rng = np.random.default_rng(seed)
    specs = [random_spec(rng, dtype=("float32", "float64")[i % 2]) for i in range(trials)]
    if spec not in specs:
        raise ValueError(f"{spec} is not one of the {trials} architectures of seed {seed}")
    for current in specs:  # one standard-normal draw per leaf, architecture after architecture
        directions = []
        for n_in, n_out in zip(current.sizes[:-1], current.sizes[1:]):
            for shape in ((n_out, n_in), (n_out,)):
                direction = rng.standard_normal(shape)
                directions.append(direction / np.linalg.norm(direction.ravel()))
        if current == spec:
            return directions
    raise AssertionError("unreachable")


if __name__ == "__main__":
    case = make_case(SPEC)
    weights = [np.asarray(layer.w) for layer in case.net.layers]
    biases = [np.asarray(layer.b) for layer in case.net.layers]
    x, y = np.asarray(case.x), np.asarray(case.y)
    with jax.default_matmul_precision("highest"):
        grads = [np.asarray(leaf) for leaf in jax.tree.leaves(pb.grad(case.net, x, y, loss=SPEC.loss))]
    loss0, oracle_w, oracle_b = numpy_matrix.loss_and_gradients(weights, biases, SPEC.activations, x, y, SPEC.loss)
    total = math.sqrt(sum(float(np.sum(g * g)) for g in oracle_w + oracle_b))
    directions = run_directions(SPEC)
    print(f"L = {loss0:.4g}, ||g_all|| = {total:.3g}; tolerance {FD_TOLERANCE:g}")
    for name, index, oracle in (("w", 0, oracle_w[0]), ("b", 1, oracle_b[0])):
        leaf, direction = grads[index], directions[index]

        def loss(t, name=name, direction=direction):
            w = [weights[0] + t * direction if name == "w" else weights[0], *weights[1:]]
            b = [biases[0] + t * direction if name == "b" else biases[0], *biases[1:]]
            return numpy_matrix.loss_and_gradients(w, b, SPEC.activations, x, y, SPEC.loss)[0]

        exact = float(np.sum(leaf * direction))  # <h, v>, h the hand-written gradient
        scale = max(float(np.linalg.norm(oracle)), 1e-6 * total)
        fixed = (loss(OLD_FD_STEP) - loss(-OLD_FD_STEP)) / (2 * OLD_FD_STEP)
        adaptive = finite_differences.directional_derivative(loss, FD_FIRST_STEP)
        print(
            f"layer 0 {name}: ||g_leaf|| = {scale:.2e}; hand-written vs NumPy oracle "
            f"{np.linalg.norm(leaf - oracle) / scale:.1e}\n"
            f"  fixed step {OLD_FD_STEP:g}: error {abs(fixed - exact) / scale:.1e}\n"
            f"  adaptive (Ridders from {FD_FIRST_STEP:g}): error {abs(adaptive.value - exact) / scale:.1e}, "
            f"estimate {adaptive.error / scale:.1e}, step {adaptive.step:.1e}, {adaptive.evaluations} evaluations"
        )
