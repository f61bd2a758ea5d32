"""`purebp train`: a short run end to end, its JSON/plot/checkpoint outputs, exit codes on bad input."""

from __future__ import annotations

import json
import os
import sys

import pytest

import purebp as pb
from purebp.cli import main

SHORT = ["train", "--dataset", "synthetic", "--sizes", "20,16,4", "--steps", "40", "--batch-size", "50"]


@pytest.mark.slow
def test_train_writes_json_plot_and_checkpoint(tmp_path, capsys):
    out, plot, checkpoint = tmp_path / "run.json", tmp_path / "curves.png", tmp_path / "run.ckpt"
    code = main(SHORT + ["--optimizer", "adam", "--lr", "0.01", "--json", str(out), "--plot", str(plot),
                         "--checkpoint", str(checkpoint)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "wall time" in printed
    report = json.loads(out.read_text())
    assert 0.0 <= report["metrics"]["test_accuracy"] <= 1.0
    assert report["metrics"]["steps"] == 40 and report["metrics"]["epochs"] == 1.25  # 1600 // 50: 32 steps per epoch
    assert report["config"]["sizes"] == [20, 16, 4] and report["config"]["optimizer"] == "adam"
    assert len(report["history"]["eval_accuracy"]) == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    net = pb.init_mlp(pb.load_checkpoint(checkpoint).key, (20, 16, 4), ("relu", "identity"), dtype="float32")
    saved = pb.load_checkpoint(checkpoint, opt_state_template=pb.make_optimizer("adam", 0.01).init(net))
    assert saved.step == 40 and saved.net.sizes == (20, 16, 4)
    # resuming a finished run trains nothing more and reports the same accuracy
    resumed_out = tmp_path / "resumed.json"
    code = main(SHORT + ["--optimizer", "adam", "--lr", "0.01", "--json", str(resumed_out),
                         "--checkpoint", str(checkpoint), "--resume"])  # fmt: skip
    assert code == 0
    resumed = json.loads(resumed_out.read_text())
    assert resumed["metrics"]["test_accuracy"] == report["metrics"]["test_accuracy"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--sizes", "5,16,4"], "does not fit synthetic: it has 20 inputs and 4 outputs"),
        (["--lr", "0"], "learning rate must be finite and > 0, got 0.0"),
        (["--lr", "nan"], "learning rate must be finite and > 0, got nan"),
        (["--batch-size", "0"], "batch_size must be a positive int, got 0"),
        (["--batch-size", "100000"], "batch_size 100000 is larger than the training set (1600 examples)"),
        (["--resume"], "--resume needs --checkpoint PATH"),
        (["--optimizer", "gd", "--batch-size", "10"], "full-batch gradient descent"),
        (["--sizes", "20,x,4"], "--sizes must be comma-separated integers"),
    ],
)
def test_bad_arguments_exit_with_code_2_and_a_message(capsys, arguments, message):
    base = ["train", "--dataset", "synthetic", "--steps", "5"]
    assert main(base + arguments) == 2
    assert message in capsys.readouterr().err


def test_divergence_exits_with_code_1_and_names_the_step(capsys):
    code = main(["train", "--dataset", "synthetic-regression", "--sizes", "8,8,2", "--activation", "identity",
                 "--lr", "1e6", "--steps", "50"])  # fmt: skip
    assert code == 1
    assert "loss became non-finite at step" in capsys.readouterr().err


FRESH_PROCESS = dict(
    command=[sys.executable, "-m", "purebp.cli"] + SHORT + ["--json", "{out}/run.json", "--gradient", "autodiff"],
    env={name: value for name, value in os.environ.items() if not name.startswith("JAX_")},
    timeout=300,
)


@pytest.mark.background("purebp train in a fresh process", **FRESH_PROCESS)  # beside the in-process tests
def test_the_installed_command_runs_in_a_fresh_process(background):
    """The real entry point, outside pytest's JAX settings: exit code 0 and the metrics in the JSON."""
    run = background.result("purebp train in a fresh process", **FRESH_PROCESS)
    result, out = run.process, run.out / "run.json"
    assert result.returncode == 0, result.stderr
    assert "test accuracy" in result.stdout
    assert result.stderr == ""  # not a terminal: no progress bar
    assert json.loads(out.read_text())["config"]["gradient"] == "autodiff"


@pytest.mark.slow
def test_resume_continues_says_so_and_names_a_changed_flag(tmp_path, capsys):
    checkpoint = str(tmp_path / "run.ckpt")
    first = ["train", "--dataset", "synthetic", "--sizes", "20,16,4", "--batch-size", "50", "--checkpoint", checkpoint]
    assert main(first + ["--steps", "40", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "40 steps = 1.25 epochs, 32 steps per epoch" in printed
    assert f"no checkpoint at {checkpoint}: starting fresh" in printed
    assert "gradient check passed: hand-written vs JAX autodiff on 16 training examples, max relative error" in printed
    assert main(first + ["--steps", "80", "--resume"]) == 0  # 40 steps end mid-epoch: refused before
    printed = capsys.readouterr().out
    assert f"resumed from step 40 of {checkpoint}; training on to step 80" in printed
    assert "trained for 2.50 epochs (80 steps)" in printed
    assert main(first + ["--steps", "80", "--resume"]) == 0
    assert f"{checkpoint} already holds all 80 steps: nothing to do" in capsys.readouterr().out
    assert main(first + ["--steps", "100", "--resume", "--lr", "0.2"]) == 2
    assert "--lr: checkpoint 0.1, now 0.2" in capsys.readouterr().err
    assert main(first + ["--steps", "100", "--resume", "--optimizer", "adam"]) == 2
    error = capsys.readouterr().err
    assert "--optimizer: checkpoint 'sgd', now 'adam'" in error and "PyTreeDef" not in error


def test_header_says_one_epoch_and_mse_on_labels_trains_on_one_hot_targets(capsys):
    arguments = ["train", "--dataset", "synthetic", "--sizes", "20,16,4", "--batch-size", "50", "--epochs", "1"]
    assert main(arguments + ["--loss", "mse"]) == 0
    printed = capsys.readouterr().out
    assert "32 steps = 1 epoch, 32 steps per epoch" in printed
    assert "test accuracy" in printed  # argmax of the output against the label
    # the run description, once: at the start, not again with the result
    assert printed.count("synthetic: sizes 20,16,4 relu,identity, mse") == 1, printed
    assert "trained for 1 epoch (32 steps)" in printed


def test_help_states_the_real_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "n_in,256,n_out" in text and "(default 32;" in text
    assert "--model mlp (default), a fully connected MLP" in text and "--model cnn, MNIST-1D's convolutional" in text


@pytest.mark.parametrize("flag", ["--json", "--plot", "--checkpoint"])
def test_an_output_path_that_is_a_directory_or_has_no_parent_exits_2_before_anything_loads(
    tmp_path, capsys, monkeypatch, flag
):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the dataset was loaded: the output path was not checked first")

    monkeypatch.setattr("purebp.data.load", must_not_run)
    for path, message in ((tmp_path, "is a directory"), (tmp_path / "missing" / "out", "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            main(SHORT + [flag, str(path)])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err
        assert f"argument {flag}: " in error and message in error and "usage: purebp train" in error, error
    assert list(tmp_path.iterdir()) == []  # nothing written
