"""fit's arguments: one gradient source, one Checkpointing, callbacks, progress, and the deprecated spellings.

"Bit-identical" means np.array_equal on every parameter leaf.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import purebp as pb
from purebp.extras import rules
from purebp.testing import CaseSpec, make_case
from purebp.train import fit as training
from purebp.train import gradients
from purebp.train import step as step_module
from purebp.train.resume import Checkpointing

OPTIONS = dict(loss="softmax_cross_entropy", batch_size=8, key=jax.random.key(3))


def _case(n=32):
    spec = CaseSpec(sizes=(5, 7, 3), activations=("tanh", "identity"), loss="softmax_cross_entropy",
                    dtype="float32", batch=n, seed=1)  # fmt: skip
    case = make_case(spec)
    return case.net, case.x, case.y


def _identical(a, b):
    return all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture
def no_training(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("training started despite bad arguments")

    monkeypatch.setattr(training, "run_epoch", must_not_run)
    monkeypatch.setattr(training._check, "check_gradients", must_not_run)


# ---------------------------------------------------------------- shape of the code


def _named(function) -> list[str]:
    # the **deprecated catch-all takes only the old names (each warns): not a parameter of the API
    parameters = inspect.signature(function).parameters.values()
    assert [p.name for p in parameters if p.kind is p.VAR_KEYWORD] == ["deprecated"]
    return [p.name for p in parameters if p.kind is not p.VAR_KEYWORD]


def test_fit_has_at_most_15_parameters_and_train_functions_at_most_80_lines():
    assert len(_named(pb.fit)) <= 15
    assert _named(pb.make_train_step) == ["optimizer", "loss", "reduction", "gradient"]
    assert len(_named(training.run_epoch)) <= 13
    root = Path(training.__file__).parent
    modules = [root / f"{name}.py" for name in ("fit", "step", "schedule", "optimizers", "gradients", "resume",
                                                 "progress", "deprecated")] + [root.parent / "programs.py"]  # fmt: skip
    long = []
    for module in modules:
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{module.name}:{node.name}")
    assert long == []
    import purebp.programs as programs

    assert not hasattr(programs, "program_key") and not hasattr(programs, "Static")


# ---------------------------------------------------------------- checkpoint paths, before any training


def test_a_checkpoint_directory_or_missing_parent_is_refused_before_training(tmp_path, no_training):
    net, x, y = _case()
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {tmp_path} is a directory: give a file path")):
        pb.fit(net, (x, y), epochs=1, checkpoint=tmp_path, **OPTIONS)
    missing = tmp_path / "missing" / "run.ckpt"
    with pytest.raises(ValueError, match=re.escape(f"the directory {tmp_path / 'missing'} does not exist")):
        pb.fit(net, (x, y), epochs=1, checkpoint=Checkpointing(missing, resume=True), **OPTIONS)
    with pytest.raises(ValueError, match="checkpoint_every must be a positive int"):
        pb.fit(net, (x, y), epochs=1, checkpoint=Checkpointing(tmp_path / "a.ckpt", every=0), **OPTIONS)
    with pytest.raises(TypeError, match="stop must be a callable"):
        pb.fit(net, (x, y), epochs=1, checkpoint=Checkpointing(None, stop=True), **OPTIONS)
    with pytest.raises(TypeError, match="checkpoint must be a path or a Checkpointing, got int"):
        pb.fit(net, (x, y), epochs=1, checkpoint=3, **OPTIONS)
    with pytest.raises(TypeError, match="give resume inside the Checkpointing"):
        pb.fit(net, (x, y), epochs=1, checkpoint=Checkpointing(tmp_path / "a.ckpt"), resume=True, **OPTIONS)


def test_checkpointing_resumes_and_stops_like_the_deprecated_arguments(tmp_path):
    net, x, y = _case()
    straight, _ = pb.fit(net, (x, y), epochs=3, **OPTIONS)
    calls = []
    stopper = Checkpointing(tmp_path / "run.ckpt", stop=lambda: calls.append(1) or True, settings={"--lr": 1})
    _, history = pb.fit(net, (x, y), epochs=3, checkpoint=stopper, **OPTIONS)
    assert history["epoch"] == [0] and calls == [1]  # stopped after the first epoch, saved there
    resuming = Checkpointing(tmp_path / "run.ckpt", resume=True, settings={"--lr": 1})
    resumed, history = pb.fit(net, (x, y), epochs=3, checkpoint=resuming, **OPTIONS)
    assert _identical(resumed, straight) and history["epoch"] == [0, 1, 2]
    with pytest.warns(DeprecationWarning, match=re.escape("fit(resume=...) is deprecated")):
        again, _ = pb.fit(net, (x, y), epochs=3, checkpoint=str(tmp_path / "run.ckpt"), resume=True,
                          settings={"--lr": 1}, **OPTIONS)  # fmt: skip
    assert _identical(again, straight)


# ---------------------------------------------------------------- the gradient table


def test_gradient_sources_are_read_from_strings_rules_meshes_and_tuples():
    net, _, _ = _case()
    rule = rules.feedback_alignment(jax.random.key(1), net)
    mesh = pb.make_data_mesh()
    assert gradients.as_gradient("autodiff") == gradients.autodiff()
    assert gradients.as_gradient(mesh) == gradients.sharded(mesh)
    assert gradients.as_gradient(rule).rule is rule
    assert gradients.as_gradient(rules.backprop()) == gradients.handwritten()  # backprop is the default pass
    assert gradients.as_gradient(("handwritten", gradients.mixed("bfloat16"))).compute_dtype == "bfloat16"
    assert gradients.as_gradient((gradients.handwritten(verify=False), rule)).verify is False
    refused = [
        (("autodiff", gradients.mixed("bfloat16")), "compute_dtype needs gradient='handwritten'"),
        (("autodiff", mesh), "a mesh needs gradient='handwritten'"),
        ((mesh, gradients.mixed("float16")), "compute_dtype cannot be combined with a mesh yet"),
        ((rule, "autodiff"), "a learning rule (feedback_alignment) replaces"),
        ((rule, mesh), "a learning rule (feedback_alignment) cannot be combined with a mesh yet"),
        ((rule, gradients.mixed("bfloat16")), "cannot be combined with compute_dtype yet"),
        ((gradients.mixed("bfloat16"), gradients.mixed("float16")), "compute_dtype given twice"),
        ("numeric", "gradient must be one of ('handwritten', 'autodiff'), got 'numeric'"),
    ]
    for value, message in refused:
        with pytest.raises(ValueError, match=re.escape(message)):
            gradients.as_gradient(value)
    with pytest.raises(TypeError, match="gradient must be 'handwritten', 'autodiff', a learning rule"):
        gradients.as_gradient(3)
    with pytest.raises(TypeError, match="sharded needs a jax.sharding.Mesh"):
        gradients.sharded("data")


def test_a_refused_combination_fails_before_anything_compiles(no_training):
    net, x, y = _case()
    with pytest.raises(ValueError, match="compute_dtype needs gradient='handwritten'"):
        pb.fit(net, (x, y), epochs=1, gradient=("autodiff", gradients.mixed("bfloat16")), **OPTIONS)
    with pytest.raises(ValueError, match="needs gradient='handwritten'"):
        pb.fit(net, (x, y), epochs=1, gradient=("autodiff", rules.sign_symmetry()), **OPTIONS)
    with pytest.raises(ValueError, match="compute_dtype needs gradient='handwritten'"):
        pb.make_train_step(optax.sgd(0.1), loss="mse", gradient=("autodiff", gradients.mixed("bfloat16")))


@pytest.mark.slow  # default tier budget (5 minutes on 2 cores)
def test_the_new_gradient_argument_trains_bit_for_bit_like_the_deprecated_options():
    net, x, y = _case()
    rule = rules.feedback_alignment(jax.random.key(1), net)
    pairs = [
        (dict(gradient=gradients.mixed("bfloat16")), dict(compute_dtype="bfloat16")),
        (dict(gradient=rule), dict(rule=rule)),
        (dict(gradient=pb.make_data_mesh()), dict(mesh=pb.make_data_mesh())),
        (dict(gradient=gradients.handwritten(verify=False)), dict(verify=False)),
    ]
    for new, old in pairs:
        got, _ = pb.fit(net, (x, y), epochs=2, **new, **OPTIONS)
        with pytest.warns(DeprecationWarning, match=f"fit\\({next(iter(old))}=...\\) is deprecated"):
            want, _ = pb.fit(net, (x, y), epochs=2, **old, **OPTIONS)
        assert _identical(got, want), new


def test_unknown_keywords_are_refused_by_name_and_each_alias_warns():
    net, x, y = _case()
    with pytest.raises(TypeError, match=re.escape("fit() got unexpected keyword argument(s): lr, momentum")):
        pb.fit(net, (x, y), epochs=1, lr=0.1, momentum=0.9, **OPTIONS)
    with pytest.raises(TypeError, match=re.escape("make_train_step() got unexpected keyword argument(s): mash")):
        pb.make_train_step(optax.sgd(0.1), loss="mse", mash=None)
    with pytest.warns(DeprecationWarning, match=re.escape("make_train_step(compute_dtype=...) is deprecated")):
        pb.make_train_step(optax.sgd(0.1), loss="mse", compute_dtype="bfloat16")
    with pytest.raises(TypeError, match="log_alignment must be True or False"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        pb.fit(net, (x, y), epochs=1, log_alignment="yes", **OPTIONS)


# ---------------------------------------------------------------- callbacks and progress


def test_the_alignment_callback_adds_the_angles_the_deprecated_flag_added():
    net, x, y = _case()
    rule = rules.feedback_alignment(jax.random.key(1), net)
    seen = []
    callbacks = [rules.alignment_callback(x, y, loss="softmax_cross_entropy", rule=rule), lambda e, r: seen.append(r)]
    _, history = pb.fit(net, (x, y), epochs=2, gradient=rule, callback=callbacks, **OPTIONS)
    assert len(history["update_angles"]) == 2 and len(history["feedback_angles"][0]) == 2
    assert seen[-1]["update_angles"] == history["update_angles"][-1]  # measured before the row is recorded
    with pytest.warns(DeprecationWarning, match="log_alignment"):
        _, old = pb.fit(net, (x, y), epochs=2, rule=rule, log_alignment=True, **OPTIONS)
    assert old["update_angles"] == history["update_angles"]
    np.testing.assert_array_equal(old["feedback_angles"], history["feedback_angles"])
    with pytest.raises(TypeError, match=r"callback must be a callable \(epoch, row\)"):
        pb.fit(net, (x, y), epochs=1, callback=[3], **OPTIONS)


def test_progress_prints_the_messages_and_one_line_per_epoch(capsys, monkeypatch):
    net, x, y = _case()
    pb.fit(net, (x, y), epochs=2, eval=(x, y), progress=True, **OPTIONS)
    out = capsys.readouterr().out
    assert "gradient check passed" in out
    assert re.search(r"epoch 1: step 8, train_loss \d\.\d{4}, eval_loss \d\.\d{4}, eval_accuracy [\d.]+%", out), out
    pb.fit(net, (x, y), epochs=1, **OPTIONS)
    assert capsys.readouterr().out == ""  # silent unless asked
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # without the cli extra: printed lines alone
    pb.fit(net, (x, y), epochs=2, progress=True, **OPTIONS)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[1:]] == ["epoch 0", "epoch 1"], lines
    with pytest.raises(TypeError, match="progress must be True or False"):
        pb.fit(net, (x, y), epochs=1, progress="yes", **OPTIONS)


def test_run_epoch_takes_the_rule_as_a_traced_argument_through_gradient():
    net, x, y = _case()
    optimizer = optax.sgd(0.1)
    state = training.initial_state(net, optimizer.init(net))
    options = dict(optimizer=optimizer, loss="softmax_cross_entropy", batch_size=8, num_batches=4, shuffle=True)
    training.run_epoch(state, jax.random.key(0), x, y, gradient=rules.feedback_alignment(jax.random.key(1), net),
                       **options)  # fmt: skip
    size = step_module._run_epoch_jit._cache_size()
    other, _ = training.run_epoch(state, jax.random.key(0), x, y,
                                  gradient=rules.feedback_alignment(jax.random.key(2), net), **options)  # fmt: skip
    assert step_module._run_epoch_jit._cache_size() == size
    with pytest.warns(DeprecationWarning, match=re.escape("run_epoch(rule=...) is deprecated")):
        rule = rules.feedback_alignment(jax.random.key(2), net)
        old, _ = training.run_epoch(state, jax.random.key(0), x, y, rule=rule, **options)
    assert _identical(other.net, old.net)
