"""The ``purebp`` command.

Each subcommand is an ``add_<name>_parser(subparsers)`` function that
registers its arguments and sets ``handler``; ``main`` dispatches.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _enable_x64_if(dtypes: Sequence[str]) -> None:
    # must run before any array exists
    if "float64" in dtypes:
        import jax

        jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------- purebp verify


def add_verify_parser(subparsers: argparse._SubParsersAction) -> None:
    from purebp.testing import NOTATION_HELP  # light: no array is created on import

    parser = subparsers.add_parser(
        "verify",
        help="random architectures through check_gradients (hand-written vs JAX autodiff)",
        description="Draw random architectures and compare the hand-written gradient with JAX autodiff on each; "
        "one row per architecture as soon as it is checked. --layers mlp (default): MLPs of depth 1-8, widths "
        "1-64, any activation per hidden layer, every valid output/cost pair, batch 1-64, both reductions. "
        "--layers all: stacks over every layer kind (dense layers, residual blocks, layer norm, dropout, with "
        "or without a dropout key; half of them behind a conv1d / pooling / residual-conv front and a flatten) and "
        "every cost, printed compactly: " + NOTATION_HELP + " (e.g. "
        "in4>d5t>r(d5r,ln)>do.25>d3). Each architecture is a new program, compiled once and run once, so by "
        "default its two gradients are compiled together, on CPU at XLA's quick settings (LLVM -O0: the same "
        "ops, less optimised kernels). Exit code 1 on any mismatch.",
    )
    parser.add_argument("--trials", type=int, default=200, help="number of random architectures (default 200)")
    parser.add_argument(
        "--layers",
        choices=("mlp", "all"),
        default="mlp",
        help="mlp: dense layers only (default); all: dense, residual, layer norm, dropout, conv1d, pooling and "
        "flatten stacks",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "both"), default="float64", help="parameter dtype (default float64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the architecture generator (default 0)")
    parser.add_argument(
        "--max-depth", type=int, default=8, help="most layers (with --layers all: top-level layers) (default 8)"
    )
    parser.add_argument("--max-width", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument(
        "--full-compile",
        action="store_true",
        help="compile each gradient as its own program with XLA's default optimisations, as "
        "purebp.value_and_grad runs (several times slower)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only failures and the summary")
    parser.set_defaults(handler=run_verify)


# jax.clear_caches() after every so many architectures: each one is a new program, and with
# --full-compile thousands of cached executables exhaust the process's memory mappings (LLVM 'Cannot
# allocate memory', seen after some hundreds of trials); the fast path caches no executable, only traces
_VERIFY_CLEAR_EVERY = 32


def _verify_sizes_width(max_depth: int, max_width: int) -> int:
    # the longest sizes cell this run can draw (depth + 1 widths, the output at least 2 wide),
    # so the column is never cut
    return max(len("sizes"), (max_depth + 1) * (len(str(max(max_width, 2))) + 1) - 1)


def _verify_row(columns: Sequence[str], sizes_width: int) -> str:
    # the activation list comes last, unpadded: it is never cut, however deep the network
    trial, sizes, loss, reduction, dtype, batch, error, verdict, activations = columns
    return (
        f"{trial:>5}  {sizes:<{sizes_width}}  {loss:<22} {reduction:<4} {dtype:<7} {batch:>3}  {error:>9}  "
        f"{verdict:<8}  {activations}"
    )


def _verify_stack_row(columns: Sequence[str]) -> str:
    # --layers all: the architecture comes last, unpadded, so it is never cut
    trial, loss, reduction, dtype, batch, key, error, verdict, architecture = columns
    return (
        f"{trial:>5}  {loss:<22} {reduction:<4} {dtype:<7} {batch:>3}  {key:<3}  {error:>9}  {verdict:<8}  "
        f"{architecture}"
    )


def _verify_draw(args: argparse.Namespace, rng, dtype: str):
    """Draw one architecture; return (case, the table row without its error and verdict cells, replay line)."""
    from purebp import testing

    bounds = {"max_depth": args.max_depth, "max_width": args.max_width, "max_batch": args.max_batch}
    if args.layers == "all":
        spec = testing.random_stack_spec(rng, dtype=dtype, conv=None, **bounds)
        cells = (spec.loss, spec.reduction, dtype, str(spec.batch), "yes" if spec.with_key else "no")
        return testing.make_stack_case(spec), (cells, spec.notation), f"purebp.testing.make_stack_case({spec!r})"
    spec = testing.random_spec(rng, dtype=dtype, **bounds)
    cells = (",".join(map(str, spec.sizes)), spec.loss, spec.reduction, dtype, str(spec.batch))
    return testing.make_case(spec), (cells, ",".join(spec.activations)), f"purebp.testing.make_case({spec!r})"


def run_verify(args: argparse.Namespace) -> int:
    for flag, value in (("--trials", args.trials), ("--max-depth", args.max_depth),
                        ("--max-width", args.max_width), ("--max-batch", args.max_batch)):  # fmt: skip
        if value < 1:
            raise SystemExit(f"purebp verify: {flag} must be at least 1, got {value}")
    dtypes = ("float32", "float64") if args.dtype == "both" else (args.dtype,)
    _enable_x64_if(dtypes)
    import jax
    import numpy as np

    from purebp.check import check_gradients

    rng = np.random.default_rng(args.seed)
    sizes_width = _verify_sizes_width(args.max_depth, args.max_width)
    if args.layers == "all":
        header = ("#", "loss", "red", "dtype", "N", "key", "max rel", "verdict", "architecture")

        def format_row(columns: Sequence[str]) -> str:
            return _verify_stack_row(columns)
    else:
        header = ("#", "sizes", "loss", "red", "dtype", "N", "max rel", "verdict", "activations")

        def format_row(columns: Sequence[str]) -> str:
            return _verify_row(columns, sizes_width)

    if not args.quiet:
        print(format_row(header), flush=True)
    worst: dict[str, float] = {}
    failures = []
    for trial in range(args.trials):
        dtype = dtypes[trial % len(dtypes)]
        case, (cells, last), replay = _verify_draw(args, rng, dtype)
        report = check_gradients(
            case.net,
            case.x,
            case.y,
            loss=case.loss,
            reduction=case.reduction,
            key=case.key,
            fast_compile=not args.full_compile,
        )
        if (trial + 1) % _VERIFY_CLEAR_EVERY == 0:
            jax.clear_caches()
        worst[dtype] = max(worst.get(dtype, 0.0), report.max_relative_error)
        row = (
            str(trial), *cells, f"{report.max_relative_error:.2e}", "ok" if report.passed else "MISMATCH", last,
        )  # fmt: skip
        if not report.passed:
            failures.append((replay, report))
        if not report.passed or not args.quiet:
            # flushed: `purebp verify | cat` shows each row as soon as its architecture is checked
            print(format_row(row), flush=True)
    summary = ", ".join(f"worst relative error {dtype} {error:.2e}" for dtype, error in worst.items())
    print(
        f"purebp verify: {args.trials} architectures, {len(failures)} mismatches; {summary} "
        f"(tolerance 1e-10 float64, 1e-5 float32)",
        flush=True,
    )
    for replay, report in failures:
        print(f"\nreplay: {replay}\n{report}", flush=True)
    return 1 if failures else 0


# ---------------------------------------------------------------- purebp train

TRAIN_DEFAULTS = {"hidden": 256, "optimizer": "sgd", "lr": 0.1, "batch_size": 32, "epochs": 30}
# --model cnn: MNIST-1D's CNN as its authors train it (greydanus/mnist1d: Adam 1e-2, batch 100, 6000 steps)
CNN_DEFAULTS = {"optimizer": "adam", "lr": 0.01, "batch_size": 100, "steps": 6000}
CNN_CHANNELS = 25


def cnn_layers(n_outputs: int, activation: str = "relu") -> list:
    """MNIST-1D's ConvBase (notebooks/models.py): three conv1d of 25 channels (k5 s2 p1, k3 s2 p1, k3 s2 p1), flatten,
    dense to the outputs."""
    from purebp.layers import conv1d, dense, flatten

    return [
        conv1d(CNN_CHANNELS, 5, stride=2, padding=1, activation=activation),
        conv1d(CNN_CHANNELS, 3, stride=2, padding=1, activation=activation),
        conv1d(CNN_CHANNELS, 3, stride=2, padding=1, activation=activation),
        flatten(),
        dense(n_outputs),
    ]


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an MLP on a bundled dataset with the hand-written gradient",
        description="Verify the hand-written gradient against JAX autodiff, then train an MLP with it (one "
        "jit-compiled lax.scan per epoch) and print the test accuracy and wall time. Defaults: "
        f"digits, sizes n_in,{TRAIN_DEFAULTS['hidden']},n_out, relu, minibatch SGD lr {TRAIN_DEFAULTS['lr']}, "
        f"batch {TRAIN_DEFAULTS['batch_size']}, {TRAIN_DEFAULTS['epochs']} epochs.",
    )
    parser.add_argument("--dataset", choices=("digits", "mnist1d", "mnist5k", "synthetic", "synthetic-regression"))
    parser.add_argument(
        "--model",
        choices=("mlp", "cnn"),
        default="mlp",
        help="mlp (default): init_mlp with --sizes; cnn: MNIST-1D's CNN (conv1d 25 k5 s2 p1, 25 k3 s2 p1, 25 k3 s2 p1, "
        "--activation after each, flatten, dense), inputs as one channel; its defaults are the authors' training: "
        f"adam lr {CNN_DEFAULTS['lr']}, batch {CNN_DEFAULTS['batch_size']}, {CNN_DEFAULTS['steps']} steps",
    )
    parser.add_argument(
        "--sizes",
        help=f"layer widths, e.g. 64,128,10 (default: n_in,{TRAIN_DEFAULTS['hidden']},n_out of the dataset)",
    )
    parser.add_argument("--activation", default="relu", help="hidden-layer activation (default relu)")
    parser.add_argument("--output", help="output activation (default: the one the loss is defined on)")
    parser.add_argument(
        "--loss", help="softmax_cross_entropy (default for classification), cross_entropy, binary_cross_entropy, mse"
    )
    parser.add_argument(
        "--optimizer",
        choices=("gd", "sgd", "momentum", "adam"),
        help="gd: full-batch gradient descent; sgd: minibatch; momentum: sgd with momentum 0.9; adam (default sgd; "
        "adam for --model cnn)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default {TRAIN_DEFAULTS['lr']}; {CNN_DEFAULTS['lr']} for --model cnn)",
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help=f"epochs (default {TRAIN_DEFAULTS['epochs']})")
    length.add_argument("--steps", type=int, help="optimizer steps instead of epochs")
    parser.add_argument(
        "--batch-size",
        type=int,
        help=f"minibatch size (default {TRAIN_DEFAULTS['batch_size']}; gd uses the whole training set)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the shuffling (default 0)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--gradient", choices=("handwritten", "autodiff"), default="handwritten")
    parser.add_argument("--no-standardize", action="store_true", help="keep the dataset's raw input scale")
    parser.add_argument("--no-verify", action="store_true", help="skip the gradient check before training")
    parser.add_argument("--checkpoint", metavar="PATH", help="save a checkpoint here (atomically)")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="K", help="every K epochs (default 1)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint if it exists (to more steps or epochs too; a changed setting is refused)",
    )
    parser.add_argument("--json", metavar="PATH", help="write the final metrics, config and history as JSON")
    parser.add_argument("--plot", metavar="PATH", help="write loss and accuracy curves as a PNG")
    scale = parser.add_argument_group(
        "multi-process (data-parallel over jax.distributed; see 'purebp launch' to start them on one machine)"
    )
    scale.add_argument("--num-processes", type=int, metavar="N", help="processes in the run (default 1)")
    scale.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    scale.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help="address of process 0's coordinator service, or 'auto': let jax.distributed detect the cluster "
        "(SLURM, Open MPI, Cloud TPU, Kubernetes) and with it N and I",
    )
    scale.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=100,
        metavar="S",
        help="seconds without a heartbeat before a process is declared dead and the others stop (default 100)",
    )
    parser.set_defaults(handler=run_train, dataset="digits")


def _parse_sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers such as 64,128,10, got {text!r}") from None


def _with_channel_axis(dataset):
    import dataclasses

    return dataclasses.replace(dataset, x_train=dataset.x_train[:, None, :], x_test=dataset.x_test[:, None, :])


def _train_setup(args: argparse.Namespace):
    """Check the arguments and load the data; return (dataset, sizes, activations, loss, optimizer, batch, length)."""
    import jax

    from purebp import data, losses
    from purebp.train.fit import make_optimizer, make_schedule

    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint PATH")
    defaults = CNN_DEFAULTS if args.model == "cnn" else TRAIN_DEFAULTS
    if args.model == "cnn" and args.sizes:
        raise ValueError("--sizes sets an MLP's widths; --model cnn has fixed layers (drop --sizes)")
    args.optimizer = args.optimizer or defaults["optimizer"]
    args.lr = args.lr if args.lr is not None else defaults["lr"]
    if args.optimizer == "gd" and args.batch_size is not None:
        raise ValueError("--optimizer gd is full-batch gradient descent: drop --batch-size (or use sgd)")
    optimizer = make_optimizer(args.optimizer, args.lr)
    dataset = data.load(args.dataset, dtype=args.dtype, standardized=not args.no_standardize)
    loss = args.loss or ("softmax_cross_entropy" if dataset.is_classification else "mse")
    cost = losses.get(loss)  # ValueError listing the valid names
    if dataset.is_classification and not cost.classification:
        dataset = _one_hot_targets(dataset, args.dtype)  # these costs take one target per output
    elif not dataset.is_classification and (cost.classification or cost.targets_in_unit_interval):
        raise ValueError(f"--loss {loss} needs class labels, but {args.dataset} is a regression dataset: use mse")
    sizes = (
        _parse_sizes(args.sizes) if args.sizes else (dataset.n_features, TRAIN_DEFAULTS["hidden"], dataset.n_outputs)
    )
    if sizes[0] != dataset.n_features or sizes[-1] != dataset.n_outputs:
        raise ValueError(
            f"--sizes {','.join(map(str, sizes))} does not fit {args.dataset}: it has {dataset.n_features} inputs "
            f"and {dataset.n_outputs} outputs"
        )
    # default output: the one the cost is defined on (identity for a cost on any output)
    activations = (args.activation,) * (len(sizes) - 2) + (args.output or cost.output_activation or "identity",)
    n_train = len(dataset.x_train)
    batch_size = (
        n_train
        if args.optimizer == "gd"
        else (args.batch_size if args.batch_size is not None else defaults["batch_size"])
    )
    if args.steps is not None:
        length = {"steps": args.steps}
    elif args.epochs is None and "steps" in defaults:
        length = {"steps": defaults["steps"]}
    else:
        length = {"epochs": args.epochs if args.epochs is not None else TRAIN_DEFAULTS["epochs"]}
    if args.model == "cnn":  # one input channel: (N, n_features) -> (N, 1, n_features)
        dataset = _with_channel_axis(dataset)
    schedule = make_schedule(n_train, batch_size, length.get("epochs"), length.get("steps"), jax.random.key(args.seed))
    return dataset, sizes, activations, loss, optimizer, schedule, length


def _one_hot_targets(dataset, dtype: str):
    """The same dataset with one-hot float targets (N, C) in place of integer labels."""
    import dataclasses

    import numpy as np

    def one_hot(labels):
        return np.eye(dataset.num_classes, dtype=dtype)[labels]

    return dataclasses.replace(dataset, y_train=one_hot(dataset.y_train), y_test=one_hot(dataset.y_test))


def _progress_bar(total: int, metric: str):
    # quiet when stderr is not a terminal; appears only on runs longer than a second
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("purebp train's progress bar needs tqdm: pip install 'purebp[cli]'") from None
    bar = tqdm(total=total, unit="epoch", disable=not sys.stderr.isatty(), delay=1.0, dynamic_ncols=True)

    def update(epoch: int, row: dict) -> None:
        postfix = {"loss": f"{row['train_loss']:.4f}"}
        if metric in row:
            postfix["test_acc"] = f"{100 * row[metric]:.2f}%"
        bar.set_postfix(postfix, refresh=False)
        bar.update(epoch + 1 - bar.n)

    return bar, update


def _plot(path: str, history: dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if "eval_accuracy" in history else 1
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    epochs = [epoch + 1 for epoch in history["epoch"]]
    axes[0, 0].plot(epochs, history["train_loss"], label="train (mean minibatch loss)")
    if "eval_loss" in history:
        axes[0, 0].plot(epochs, history["eval_loss"], label="test")
    axes[0, 0].set(xlabel="epoch", ylabel="loss", yscale="log", title=title)
    axes[0, 0].legend()
    if panels == 2:
        axes[0, 1].plot(epochs, [100 * a for a in history["eval_accuracy"]], color="C1")
        axes[0, 1].set(xlabel="epoch", ylabel="test accuracy (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _stop_on_sigterm():
    """Install a SIGTERM handler that only records the signal; return the ``stop`` callable ``fit`` polls."""
    import signal
    import threading

    requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    return requested.is_set


def _process_failure_error() -> type:
    from purebp.train.distributed import ProcessFailureError

    return ProcessFailureError


def _digest(net) -> str:
    import hashlib

    import jax
    import numpy as np

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(net):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()


def run_train(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()
    _enable_x64_if((args.dtype,))
    multi_process = (args.num_processes or 1) > 1 or args.coordinator is not None
    if multi_process:  # before the first JAX operation
        from purebp.train import distributed

        try:
            if args.coordinator is None:
                raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT (process 0's address)")
            if args.coordinator != distributed.AUTO and args.process_id is None:
                raise ValueError("a multi-process run needs --process-id I (0 for the coordinator's process)")
            distributed.initialize(
                args.num_processes, args.process_id, args.coordinator, heartbeat_timeout=args.heartbeat_timeout
            )
        except (TypeError, ValueError, RuntimeError) as error:
            print(f"purebp train: error: {error}", file=sys.stderr)
            return 2
    stop = _stop_on_sigterm() if args.checkpoint else None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("purebp train: error: --plot needs matplotlib: pip install 'purebp[plot]'", file=sys.stderr)
            return 2
    import json

    import jax

    from purebp.network import init_mlp, init_network
    from purebp.train.fit import DivergenceError, GradientMismatchError, evaluate, fit, format_epochs

    try:
        dataset, sizes, activations, loss, optimizer, schedule, length = _train_setup(args)
        init_key, shuffle_key = jax.random.split(jax.random.key(args.seed))
        if args.model == "cnn":
            net = init_network(init_key, (1, sizes[0]), cnn_layers(sizes[-1], args.activation), dtype=args.dtype)
            if activations[-1] != "identity":
                raise ValueError(f"--model cnn ends in a dense identity output (logits); --loss {loss} needs another")
        else:
            net = init_mlp(init_key, sizes, activations, dtype=args.dtype)
        bar, on_epoch = _progress_bar(0, "eval_accuracy")  # fails early if tqdm is missing
        bar.close()
    except (ImportError, TypeError, ValueError) as error:
        print(f"purebp train: error: {error}", file=sys.stderr)
        return 2
    batch_size = schedule.batch_size
    architecture = (
        f"cnn {net.layers!r}" if args.model == "cnn" else f"sizes {','.join(map(str, sizes))} {','.join(activations)}"
    )
    description = (
        f"{args.dataset}: {architecture}, {loss}, "
        f"{args.optimizer} lr {args.lr}, batch {batch_size}, {args.gradient} gradient"
    )
    print(f"purebp train: {description}; {schedule.describe()}", flush=True)
    bar, on_epoch = _progress_bar(schedule.num_epochs, "eval_accuracy")
    mesh = None
    if multi_process:
        from purebp.train import distributed

        mesh = distributed.make_data_mesh()
    # what shapes the trajectory, compared when a run resumes
    settings = {
        "--dataset": args.dataset,
        "--model": args.model,
        "--standardize": not args.no_standardize,
        "--sizes": ",".join(map(str, sizes)),
        "--activation": args.activation,
        "--output": activations[-1],
        "--loss": loss,
        "--optimizer": args.optimizer,
        "--lr": args.lr,
        "--batch-size": batch_size,
        "--seed": args.seed,
        "--dtype": args.dtype,
        "--gradient": args.gradient,
    }

    def log(message: str) -> None:
        if not multi_process or jax.process_index() == 0:
            print(f"purebp train: {message}", flush=True)

    try:
        trained, history = fit(
            net,
            dataset.train,
            loss=loss,
            optimizer=optimizer,
            batch_size=batch_size,
            key=shuffle_key,
            eval=dataset.test,
            gradient=args.gradient,
            verify=not args.no_verify,
            checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            callback=on_epoch,
            mesh=mesh,
            stop=stop,
            settings=settings,
            log=log,
            **length,
        )
    except _process_failure_error() as error:
        # exit now: JAX's own shutdown would wait for the dead process until the heartbeat timeout, then abort
        print(f"purebp train: error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)
    except GradientMismatchError as error:
        print(f"purebp train: {error}", file=sys.stderr)
        return 1
    except DivergenceError as error:
        print(f"purebp train: {error}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as error:
        print(f"purebp train: error: {error}", file=sys.stderr)
        return 2
    finally:
        bar.close()
    test = evaluate(trained, *dataset.test, loss=loss, accuracy=dataset.is_classification)
    wall = time.perf_counter() - started
    steps_done = history["step"][-1] if history["step"] else 0
    trained_for = f"{format_epochs(steps_done, schedule.steps_per_epoch)} ({steps_done} steps)"
    print(f"{description}: trained for {trained_for}")
    if "accuracy" in test:
        correct = round(test["accuracy"] * len(dataset.x_test))
        accuracy = f"{100 * test['accuracy']:.2f}% ({correct}/{len(dataset.x_test)})"
        print(f"test accuracy {accuracy}, test loss {test['loss']:.4g}")
    else:
        print(f"test loss {test['loss']:.4g}")
    print(f"wall time {wall:.1f} s (data, gradient check, compile and training; {jax.devices()[0].platform})")
    if steps_done < schedule.total_steps:
        print(
            f"stopped by SIGTERM after step {steps_done} of {schedule.total_steps}; checkpoint {args.checkpoint} "
            "written (rerun the same command with --resume to continue)"
        )
    if multi_process:
        print(f"process {jax.process_index()} of {jax.process_count()}: parameters sha256 {_digest(trained)}")
        if jax.process_index() != 0:  # one writer for the shared outputs
            return 0
    config = {name: value for name, value in vars(args).items() if name not in ("handler", "command")} | {
        "sizes": list(sizes) if args.model == "mlp" else None,
        "activations": list(activations),
        "loss": loss,
        "batch_size": batch_size,
    }
    if args.json:
        metrics = {f"test_{name}": value for name, value in test.items()}
        metrics |= {"train_loss": history["train_loss"][-1] if history["train_loss"] else None}
        metrics |= {"wall_time_s": wall, "epochs": steps_done / schedule.steps_per_epoch, "steps": steps_done}
        with open(args.json, "w") as file:
            json.dump({"metrics": metrics, "config": config, "history": history}, file, indent=2)
    if args.plot:
        _plot(args.plot, history, f"{args.dataset}: {architecture}")
    return 0


# ---------------------------------------------------------------- purebp bench

_BENCH_MOVED = (
    "purebp bench: the benchmark moved out of the library to experiments/ in the repository; from a checkout run: "
    'pip install -e ".[bench]" && python -m experiments.benchmark [--quick] [--configs tiny,mid] [--rounds N] '
    "[--no-peers] [--out STEM]"
)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="moved: prints how to run the benchmark (python -m experiments.benchmark from a checkout)",
        description="The benchmark is a script of the repository, not part of the library: from a checkout, "
        'pip install -e ".[bench]" and run python -m experiments.benchmark (same options as this command had). '
        "This command only says so and exits with code 2.",
    )
    # the options the command used to take still parse, so an old invocation gets the pointer, not a usage error
    for flag in ("--configs", "--rounds", "--train-steps", "--threads", "--out"):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--no-peers", "--quick"):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    parser.set_defaults(handler=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    print(_BENCH_MOVED, file=sys.stderr)
    return 2


# ---------------------------------------------------------------- purebp launch


def add_launch_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "launch",
        help="run N processes of a purebp command on this machine (loopback only), e.g. multi-process training",
        description="Start N copies of 'purebp COMMAND ...' on 127.0.0.1 with --num-processes, --process-id and "
        "--coordinator (a free loopback port) added; the coordinator binds to loopback only. Forwards "
        "SIGTERM/SIGINT to its children, enforces a deadline, kills only its own process group, and exits with "
        "the first failing child's code (124 on the deadline). Example: purebp launch -n 2 -- train --dataset "
        "digits --checkpoint run.ckpt --resume",
    )
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="number of processes")
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds before SIGTERM (default 3600)")
    parser.add_argument(
        "--grace", type=float, default=30.0, help="seconds between a failure or SIGTERM and SIGKILL (default 30)"
    )
    parser.add_argument("worker", nargs=argparse.REMAINDER, help="-- then the purebp command, e.g. -- train ...")
    parser.set_defaults(handler=run_launch)


def run_launch(args: argparse.Namespace) -> int:
    from purebp.cli.launch import launch

    command = args.worker[1:] if args.worker[:1] == ["--"] else args.worker
    try:
        return launch(
            command,
            args.num_processes,
            deadline=args.deadline,
            grace=args.grace,
            log=lambda message: print(message, file=sys.stderr, flush=True),
        )
    except ValueError as error:
        print(f"purebp launch: error: {error}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- purebp check-backprop


def add_check_backprop_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-backprop",
        add_help=False,  # its own parser (purebp.kit.backprop.main_check_backprop) answers --help
        help="check your own backward pass fn(weights, biases, x, y) against autodiff: MODULE:FUNCTION --activation "
        "sigmoid --loss mse --layout columns (exit 1 on a mismatch)",
    )
    parser.add_argument("arguments", nargs=argparse.REMAINDER)
    parser.set_defaults(handler=run_check_backprop)


def run_check_backprop(args: argparse.Namespace) -> int:
    from purebp.kit.backprop import main_check_backprop

    return main_check_backprop(args.arguments)


# ---------------------------------------------------------------- entry point

PARSERS = [add_verify_parser, add_train_parser, add_bench_parser, add_launch_parser, add_check_backprop_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="purebp", description="Backpropagation by hand, proven equal to jax.grad.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for add_parser in PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check-backprop"]:  # its own parser takes everything after the name, --help included
        from purebp.kit.backprop import main_check_backprop

        return main_check_backprop(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
