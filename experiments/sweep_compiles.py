"""How many compiles, and how long, does a 10-value learning-rate sweep with ``purebp.fit`` cost?

python -m experiments.sweep_compiles [--quick] [--seed S] [--out DIR]   # writes sweep_compiles.{csv,md}

Four ways a user writes the sweep, each a fresh process-level cache: one
``fit`` per learning rate with (0) ``fit(learning_rate=lr)`` and the default
optimizer, (a) ``pb.make_optimizer("sgd", lr)`` (what
``purebp train --lr`` uses), (b) ``optax.inject_hyperparams(optax.sgd)(learning_rate=lr)``,
(c) plain ``optax.sgd(lr)``, whose rate is a constant baked into the program,
so (c) must compile once per value on any version. Compiles are XLA backend
compiles counted with ``jax.monitoring``; the epoch program is the one named
``run_epoch`` (``_run_epoch_jit`` since the compile-once change). Uses only the
public API, so the same script measures an older checkout (run it there with
``PYTHONPATH=<old checkout>``).
"""

from __future__ import annotations

import time

import jax
import numpy as np
import optax

import purebp as pb
from experiments import _common

RATES = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5)


def _problem(seed: int):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((320, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0).astype(np.int32)  # 3 classes
    net = pb.init_mlp(jax.random.key(seed), (4, 8, 3), ("tanh", "identity"))
    return net, jax.numpy.asarray(x), jax.numpy.asarray(y)


def _sweep(name: str, make, rates, seed: int) -> dict:
    net, x, y = _problem(seed)
    compiles: list[str] = []

    def listener(event, seconds, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(kwargs.get("fun_name", "?"))

    jax.clear_caches()
    jax.monitoring.register_event_duration_secs_listener(listener)
    started = time.perf_counter()
    per_value = []
    try:
        for rate in rates:
            begin = time.perf_counter()
            trained, _ = pb.fit(net, (x, y), loss="softmax_cross_entropy", **make(rate), epochs=5,
                                batch_size=32, key=jax.random.key(seed + 1))  # fmt: skip
            jax.block_until_ready(trained)
            per_value.append(time.perf_counter() - begin)
    finally:
        jax._src.monitoring.unregister_event_duration_listener(listener)
    epoch_compiles = sum("run_epoch" in name for name in compiles)
    return {
        "optimizer": name,
        "values": len(rates),
        "epoch compiles": epoch_compiles,
        "all compiles": len(compiles),
        "total s": round(time.perf_counter() - started, 3),
        "first fit s": round(per_value[0], 3),
        "median later fit s": round(float(np.median(per_value[1:])), 3) if len(per_value) > 1 else None,
        "purebp": pb.__file__,
    }


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    rates = RATES[:3] if args.quick else RATES
    makers = {  # fit's keyword arguments for one value
        "fit(learning_rate=lr), the default optimizer": lambda rate: {"learning_rate": rate},
        'pb.make_optimizer("sgd", lr)': lambda rate: {"optimizer": pb.make_optimizer("sgd", rate)},
        "optax.inject_hyperparams(optax.sgd)(learning_rate=lr)": lambda rate: {
            "optimizer": optax.inject_hyperparams(optax.sgd)(learning_rate=rate)
        },
        "optax.sgd(lr)": lambda rate: {"optimizer": optax.sgd(rate)},
    }
    rows = [_sweep(name, make, rates, args.seed) for name, make in makers.items()]
    stem = _common.output_stem(args, "sweep_compiles")
    _common.write_csv(stem.with_suffix(".csv"), rows)
    table = _common.markdown_table(rows, [key for key in rows[0] if key != "purebp"])
    lines = [
        f"# A {len(rates)}-value learning-rate sweep: compiles and time",
        "",
        f"One `pb.fit` per value (4-8-3 tanh network, 320 examples, 5 epochs of batch 32); "
        f"{_common.machine()}; purebp from `{rows[0]['purebp']}`.",
        "",
        *table,
    ]
    _common.write_markdown(stem.with_suffix(".md"), lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
