"""Data-parallel gradients on 8 simulated CPU devices equal the single-device ones.

Each test runs in a fresh subprocess: the device count must be set before JAX starts.
"""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_with_devices(code: str, devices: int = 8) -> str:
    prelude = (
        f"import jax\njax.config.update('jax_num_cpu_devices', {devices})\njax.config.update('jax_enable_x64', True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sharded_gradient_equals_single_device_on_random_architectures():
    """12 seeded random architectures x 8 devices: loss and every leaf within 1e-12 (float64) / 1e-5 (float32)
    relative L2 error of the single-device hand-written result (only the order of additions differs)."""
    out = run_with_devices(
        """
        import numpy as np, purebp as pb
        from purebp import distributed
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
        """
    )
    assert out.strip().endswith("ok")


def test_batch_not_divisible_by_devices_is_a_clear_error():
    out = run_with_devices(
        """
        import purebp as pb
        from purebp import distributed
        from purebp.testing import make_case, CaseSpec
        case = make_case(CaseSpec(sizes=(3, 4, 2), activations=("tanh", "identity"), loss="mse", batch=10))
        try:
            distributed.data_parallel_value_and_grad(case.net, case.x, case.y, loss="mse",
                                                     mesh=distributed.make_data_mesh())
        except ValueError as error:
            print(error)
        """
    )
    assert "a batch of 10 examples does not split evenly over the 8 devices" in out
