"""``purebp train``: verify the hand-written gradient, then train an MLP (or MNIST-1D's CNN) on a bundled dataset.

``add_train_parser`` registers the arguments; ``run_train`` checks them, loads the data, builds the network
and hands it to ``purebp.train.fit``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types

from purebp.cli.arguments import enable_x64_if, output_path

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


def _cnn_notation(net) -> str:
    """The CNN's layers in one short line, e.g. ``conv1d 25 k5 s2 p1 relu, ..., flatten, dense 10``."""
    parts = []
    for layer in net.layers:
        w = getattr(layer, "w", None)
        if w is not None and w.ndim == 3:
            parts.append(f"conv1d {w.shape[0]} k{w.shape[2]} s{layer.stride} p{layer.padding} {layer.activation}")
        elif w is not None:
            parts.append(f"dense {w.shape[0]}")
        else:
            parts.append(type(layer).__name__.lower())
    return ", ".join(parts)


def add_train_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train an MLP (or, with --model cnn, MNIST-1D's CNN) on a bundled dataset with the hand-written gradient",
        description="Verify the hand-written gradient against JAX autodiff, then train a network with it (one "
        "jit-compiled lax.scan per epoch) and print the test accuracy and wall time. The network: --model mlp "
        "(default), a fully connected MLP of dense layers with the widths --sizes and the hidden activation "
        "--activation; --model cnn, MNIST-1D's convolutional network (three conv1d layers, flatten, dense). "
        f"Defaults (mlp): digits, sizes n_in,{TRAIN_DEFAULTS['hidden']},n_out, relu, minibatch SGD lr "
        f"{TRAIN_DEFAULTS['lr']}, batch {TRAIN_DEFAULTS['batch_size']}, {TRAIN_DEFAULTS['epochs']} epochs. "
        "Output paths (--checkpoint, --json, --plot) are checked before anything loads.",
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
    parser.add_argument("--checkpoint", metavar="PATH", type=output_path, help="save a checkpoint here (atomically)")
    parser.add_argument("--checkpoint-every", type=int, default=1, metavar="K", help="every K epochs (default 1)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint if it exists (to more steps or epochs too; a changed setting is refused)",
    )
    parser.add_argument(
        "--json", metavar="PATH", type=output_path, help="write the final metrics, config and history as JSON"
    )
    parser.add_argument("--plot", metavar="PATH", type=output_path, help="write loss and accuracy curves as a PNG")
    _add_process_arguments(parser)
    parser.set_defaults(handler=run_train, dataset="digits")


def _add_process_arguments(parser: argparse.ArgumentParser) -> None:
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
    import jax

    from purebp.inputs import digest

    return digest(*jax.tree.leaves(net))


def _start_processes(args: argparse.Namespace) -> bool:
    """Join the multi-process run the flags ask for (before the first JAX operation); return whether it is one."""
    multi_process = (args.num_processes or 1) > 1 or args.coordinator is not None
    if multi_process:
        from purebp.train import distributed

        if args.coordinator is None:
            raise ValueError("--num-processes > 1 needs --coordinator HOST:PORT (process 0's address)")
        if args.coordinator != distributed.AUTO and args.process_id is None:
            raise ValueError("a multi-process run needs --process-id I (0 for the coordinator's process)")
        distributed.initialize(
            args.num_processes, args.process_id, args.coordinator, heartbeat_timeout=args.heartbeat_timeout
        )
    return multi_process


def _prepare(args: argparse.Namespace) -> types.SimpleNamespace:
    """Load the data and build the network; everything the run needs, or TypeError/ValueError/ImportError."""
    import jax

    from purebp.network import init_mlp, init_network

    dataset, sizes, activations, loss, optimizer, schedule, length = _train_setup(args)
    init_key, shuffle_key = jax.random.split(jax.random.key(args.seed))
    if args.model == "cnn":
        net = init_network(init_key, (1, sizes[0]), cnn_layers(sizes[-1], args.activation), dtype=args.dtype)
        if activations[-1] != "identity":
            raise ValueError(f"--model cnn ends in a dense identity output (logits); --loss {loss} needs another")
    else:
        net = init_mlp(init_key, sizes, activations, dtype=args.dtype)
    bar, _ = _progress_bar(0, "eval_accuracy")  # fails early if tqdm is missing
    bar.close()
    architecture = (
        f"cnn {_cnn_notation(net)}"
        if args.model == "cnn"
        else f"sizes {','.join(map(str, sizes))} {','.join(activations)}"
    )
    return types.SimpleNamespace(
        dataset=dataset, sizes=sizes, activations=activations, loss=loss, optimizer=optimizer, schedule=schedule,
        length=length, net=net, shuffle_key=shuffle_key, architecture=architecture,
    )  # fmt: skip


def _settings(args: argparse.Namespace, run: types.SimpleNamespace) -> dict:
    """What shapes the trajectory, compared when a run resumes."""
    return {
        "--dataset": args.dataset,
        "--model": args.model,
        "--standardize": not args.no_standardize,
        "--sizes": ",".join(map(str, run.sizes)),
        "--activation": args.activation,
        "--output": run.activations[-1],
        "--loss": run.loss,
        "--optimizer": args.optimizer,
        "--lr": args.lr,
        "--batch-size": run.schedule.batch_size,
        "--seed": args.seed,
        "--dtype": args.dtype,
        "--gradient": args.gradient,
    }


class _PrefixedLines(logging.Handler):
    """Prints each log record as one line with a prefix (nothing on processes other than 0)."""

    def __init__(self, prefix: str, quiet: bool):
        super().__init__(logging.INFO)
        self.prefix, self.quiet = prefix, quiet

    def emit(self, record: logging.LogRecord) -> None:
        if not self.quiet:
            print(f"{self.prefix}{record.getMessage()}", flush=True)


def _train(args: argparse.Namespace, run: types.SimpleNamespace, multi_process: bool, stop) -> tuple:
    """``fit`` with the command's settings, a progress bar and its log lines; return (trained, history)."""
    import jax

    from purebp.train.fit import fit
    from purebp.train.gradients import Gradient
    from purebp.train.resume import Checkpointing

    bar, on_epoch = _progress_bar(run.schedule.num_epochs, "eval_accuracy")
    mesh = None
    if multi_process:
        from purebp.train import distributed

        mesh = distributed.make_data_mesh()
    net, dataset, loss, optimizer, batch_size = run.net, run.dataset, run.loss, run.optimizer, run.schedule.batch_size
    shuffle_key, settings, length = run.shuffle_key, _settings(args, run), run.length

    gradient = Gradient(source=args.gradient, mesh=mesh, verify=not args.no_verify)
    checkpoint = Checkpointing(args.checkpoint, every=args.checkpoint_every, resume=args.resume, stop=stop,
                               settings=settings)  # fmt: skip
    handler = _PrefixedLines("purebp train: ", quiet=multi_process and jax.process_index() != 0)
    logger = logging.getLogger("purebp.train.fit")  # fit's messages (resumed from where, the gradient check)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        trained, history = fit(net, dataset.train, loss=loss, optimizer=optimizer, batch_size=batch_size,
                               key=shuffle_key, eval=dataset.test, gradient=gradient, checkpoint=checkpoint,
                               callback=on_epoch, **length)  # fmt: skip
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        bar.close()
    return trained, history


def _report(args: argparse.Namespace, run: types.SimpleNamespace, trained, history: dict, started: float) -> tuple:
    """Print how long it trained, the test metrics and the wall time; return (test metrics, wall seconds)."""
    import time

    import jax

    from purebp.train.fit import evaluate, format_epochs

    dataset, schedule = run.dataset, run.schedule
    test = evaluate(trained, *dataset.test, loss=run.loss, accuracy=dataset.is_classification)
    wall = time.perf_counter() - started
    steps_done = history["step"][-1] if history["step"] else 0
    print(f"trained for {format_epochs(steps_done, schedule.steps_per_epoch)} ({steps_done} steps)")
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
    return test, wall


def _write_outputs(args: argparse.Namespace, run: types.SimpleNamespace, test: dict, history: dict, wall: float):
    """--json (metrics, config, history) and --plot (the curves); their paths were checked when parsed."""
    import json

    steps_done = history["step"][-1] if history["step"] else 0
    config = {name: value for name, value in vars(args).items() if name not in ("handler", "command")} | {
        "sizes": list(run.sizes) if args.model == "mlp" else None,
        "activations": list(run.activations),
        "loss": run.loss,
        "batch_size": run.schedule.batch_size,
    }
    if args.json:
        metrics = {f"test_{name}": value for name, value in test.items()}
        metrics |= {"train_loss": history["train_loss"][-1] if history["train_loss"] else None}
        metrics |= {"wall_time_s": wall, "epochs": steps_done / run.schedule.steps_per_epoch, "steps": steps_done}
        with open(args.json, "w") as file:
            json.dump({"metrics": metrics, "config": config, "history": history}, file, indent=2)
    if args.plot:
        _plot(args.plot, history, f"{args.dataset}: {run.architecture}")


def run_train(args: argparse.Namespace) -> int:
    """Check the arguments, build the run, train it with ``fit``, report and write the outputs; the exit status."""
    import time

    started = time.perf_counter()
    enable_x64_if((args.dtype,))
    try:
        multi_process = _start_processes(args)
    except (TypeError, ValueError, RuntimeError) as error:
        print(f"purebp train: error: {error}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("purebp train: error: --plot needs matplotlib: pip install 'purebp[plot]'", file=sys.stderr)
            return 2
    stop = _stop_on_sigterm() if args.checkpoint else None
    import jax

    from purebp.train.fit import DivergenceError, GradientMismatchError

    try:
        run = _prepare(args)
    except (ImportError, TypeError, ValueError) as error:
        print(f"purebp train: error: {error}", file=sys.stderr)
        return 2
    description = (
        f"{args.dataset}: {run.architecture}, {run.loss}, "
        f"{args.optimizer} lr {args.lr}, batch {run.schedule.batch_size}, {args.gradient} gradient"
    )
    print(f"purebp train: {description}; {run.schedule.describe()}", flush=True)  # the only time it is printed
    try:
        trained, history = _train(args, run, multi_process, stop)
    except _process_failure_error() as error:
        # exit now: JAX's own shutdown would wait for the dead process until the heartbeat timeout, then abort
        print(f"purebp train: error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)
    except (GradientMismatchError, DivergenceError) as error:
        print(f"purebp train: {error}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as error:
        print(f"purebp train: error: {error}", file=sys.stderr)
        return 2
    test, wall = _report(args, run, trained, history, started)
    if multi_process:
        print(f"process {jax.process_index()} of {jax.process_count()}: parameters sha256 {_digest(trained)}")
        if jax.process_index() != 0:  # one writer for the shared outputs
            return 0
    _write_outputs(args, run, test, history, wall)
    return 0
