"""Data-parallel gradients on 8 simulated CPU devices equal the single-device ones.

Each test runs in a fresh subprocess: the device count must be set before JAX starts. The subprocesses start
with the session, beside the in-process tests (tests/conftest.py, ``Background``).
"""

import re
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # 8-device runs in fresh processes: `python -m pytest -m slow`


def devices_run(code: str, devices: int = 8) -> dict:
    """``python -c <code>`` with ``devices`` simulated CPU devices and x64 set before anything else."""
    prelude = (
        f"import jax\njax.config.update('jax_num_cpu_devices', {devices})\njax.config.update('jax_enable_x64', True)\n"
    )
    return dict(command=[sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, timeout=300)


RUNS: dict[str, dict] = {}


def on_devices(name: str, code: str) -> pytest.MarkDecorator:
    """Register ``code``'s run under ``name``; the mark has it run beside the in-process tests (conftest.Background)."""
    RUNS[name] = devices_run(code)
    return pytest.mark.background(name, **RUNS[name])


def run_with_devices(background, name: str) -> str:
    result = background.result(name, **RUNS[name]).process
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@on_devices(
    "test_sharded_gradient_equals_single_device_on_random_architectures",
    """
    import numpy as np, purebp as pb
    from purebp.train import distributed
    from purebp.check import compare_gradients
    from purebp.testing import make_case, random_spec
    mesh = distributed.make_data_mesh()
    assert mesh.shape["data"] == 8
    rng = np.random.default_rng(0)
    for trial in range(12):
        dtype = ("float32", "float64")[trial % 2]
        spec = random_spec(rng, dtype=dtype, max_depth=4, max_width=16, max_batch=8)
        spec = type(spec)(**{**spec.__dict__, "batch": 8 * spec.batch})
        case = make_case(spec)
        single = pb.value_and_grad(case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction)
        sharded = distributed.data_parallel_value_and_grad(
            case.net, case.x, case.y, loss=spec.loss, reduction=spec.reduction, mesh=mesh)
        tolerance = 1e-12 if dtype == "float64" else 1e-5
        leaves = compare_gradients(sharded[1], single[1], tolerance=tolerance, floor=1e-6)
        assert all(leaf.passed for leaf in leaves), (spec, leaves)
        assert abs(float(sharded[0]) - float(single[0])) <= tolerance * abs(float(single[0])), spec
    print("ok")
""",
)
def test_sharded_gradient_equals_single_device_on_random_architectures(background):
    """12 seeded random architectures x 8 devices: loss and every leaf within 1e-12 (float64) / 1e-5 (float32)
    relative L2 error of the single-device hand-written result (only the order of additions differs)."""
    out = run_with_devices(background, "test_sharded_gradient_equals_single_device_on_random_architectures")
    assert out.strip().endswith("ok")


@on_devices(
    "test_batch_not_divisible_by_devices_is_a_clear_error",
    """
    import purebp as pb
    from purebp.train import distributed
    from purebp.testing import make_case, CaseSpec
    case = make_case(CaseSpec(sizes=(3, 4, 2), activations=("tanh", "identity"), loss="mse", batch=10))
    try:
        distributed.data_parallel_value_and_grad(case.net, case.x, case.y, loss="mse",
                                                 mesh=distributed.make_data_mesh())
    except ValueError as error:
        print(error)
""",
)
def test_batch_not_divisible_by_devices_is_a_clear_error(background):
    out = run_with_devices(background, "test_batch_not_divisible_by_devices_is_a_clear_error")
    assert "a batch of 10 examples does not split evenly over the 8 devices" in out


@on_devices(
    "test_fit_on_a_mesh_equals_fit_on_one_device",
    """
    import numpy as np, optax, purebp as pb
    from purebp.train import distributed
    from purebp.train import fit as training
    mesh = distributed.make_data_mesh()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)); y = rng.integers(0, 3, size=200).astype(np.int32)
    net = pb.init_mlp(jax.random.key(1), (5, 7, 3), ("tanh", "identity"), dtype="float64")
    options = dict(loss="softmax_cross_entropy", optimizer=optax.adam(0.01), epochs=3, batch_size=40,
                   key=jax.random.key(2), eval=(x[:50], y[:50]), verify=False)

    def close(a, b):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            error = np.linalg.norm(np.asarray(u) - np.asarray(v)) / np.linalg.norm(np.asarray(v))
            assert error <= 1e-10, error

    single, history = pb.fit(net, (x, y), **options)
    sharded, sharded_history = pb.fit(net, (x, y), mesh=mesh, **options)
    close(sharded, single)
    assert sharded_history["step"] == history["step"] == [5, 10, 15]
    np.testing.assert_allclose(sharded_history["train_loss"], history["train_loss"], rtol=1e-12)

    calls = []
    stop = lambda: len(calls) == 1 or calls.append(1) or False  # True on the 2nd call
    stopped, stopped_history = pb.fit(net, (x, y), mesh=mesh, stop=stop, **options)
    assert stopped_history["step"] == [5, 10], stopped_history

    state = training.initial_state(net, optax.sgd(0.1).init(net))
    epoch = dict(optimizer=optax.sgd(0.1), loss="softmax_cross_entropy", reduction="mean",
                 gradient="handwritten", batch_size=40, num_batches=5, shuffle=True)
    one, _ = training.run_epoch(state, jax.random.key(3), x, y, **epoch)
    eight, _ = training.run_epoch(state, jax.random.key(3), x, y, mesh=mesh, **epoch)
    close(eight.net, one.net)

    for bad, message in (({"batch_size": 60}, "a batch of 60 examples does not split evenly over the 8"),
                         ({"gradient": "autodiff"}, "a mesh needs gradient='handwritten'")):
        try:
            pb.fit(net, (x, y), mesh=mesh, **{**options, **bad})
        except ValueError as error:
            assert message in str(error), error
        else:
            raise AssertionError(bad)
    print("ok")
""",
)
def test_fit_on_a_mesh_equals_fit_on_one_device(background):
    """fit(mesh=8 devices) with minibatches, shuffling and Adam, and run_epoch(mesh=...): every leaf within
    relative L2 error 1e-10 (float64) of the single-device run (same batches; only the order of additions
    differs). Also: stop() ends both at the same epoch; a batch that does not divide, or gradient="autodiff"
    with a mesh, is a ValueError before compiling."""
    out = run_with_devices(background, "test_fit_on_a_mesh_equals_fit_on_one_device")
    assert out.strip().endswith("ok")


def readme_scaling_out() -> dict:
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text[text.index("## Scaling out") :], re.S).group(1)
    return dict(command=[sys.executable, "-c", code], cwd=ROOT, timeout=300)


@pytest.mark.background("README: Scaling out", **readme_scaling_out())
def test_readme_scaling_out_example_runs(background):
    """The README's "Scaling out" Python example, as written, in a fresh process (it sets 8 devices itself)."""
    result = background.result("README: Scaling out", **readme_scaling_out()).process
    assert result.returncode == 0, result.stderr
    assert 0.0 < float(result.stdout.split()[-1]) < 2.0  # the final mean training loss, finite and below log 4 + 0.6


@on_devices(
    "test_fit_on_a_mesh_with_dropout_equals_one_device",
    """
    import numpy as np, optax, purebp as pb
    from purebp.train import distributed
    mesh = distributed.make_data_mesh()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 5)); y = rng.integers(0, 3, size=96).astype(np.int32)
    net = pb.init_network(jax.random.key(1), (5,), [pb.dense(8, "relu"), pb.residual(pb.dense(8, "tanh")),
                          pb.layer_norm(), pb.dropout(0.3), pb.dense(3)], dtype="float64")

    def close(a, b):
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            error = np.linalg.norm(np.asarray(u) - np.asarray(v)) / np.linalg.norm(np.asarray(v))
            assert error <= 1e-10, error

    k = jax.random.key(5)
    _, one = pb.value_and_grad(net, x[:16], y[:16], loss="softmax_cross_entropy", key=k)
    _, eight = pb.data_parallel_value_and_grad(net, x[:16], y[:16], loss="softmax_cross_entropy", mesh=mesh, key=k)
    close(eight, one)
    options = dict(loss="softmax_cross_entropy", optimizer=optax.adam(0.01), epochs=2, batch_size=16,
                   key=jax.random.key(2))
    single, _ = pb.fit(net, (x, y), **options)
    sharded, _ = pb.fit(net, (x, y), mesh=mesh, **options)
    close(sharded, single)
    no_key, _ = pb.fit(net, (x, y), mesh=mesh, **{**options, "key": jax.random.key(3)})
    assert not np.allclose(jax.tree.leaves(no_key)[0], jax.tree.leaves(single)[0])
    print("ok")
""",
)
def test_fit_on_a_mesh_with_dropout_equals_one_device(background):
    """A residual + layer-norm + dropout network: fit(mesh=8 devices) draws on each device the masks of its own
    examples, so it ends where fit on one device ends (float64, relative L2 error <= 1e-10 per leaf); the
    data-parallel gradient with a key equals value_and_grad with that key."""
    out = run_with_devices(background, "test_fit_on_a_mesh_with_dropout_equals_one_device")
    assert out.strip().endswith("ok")
