"""Every row of the table of layer kinds, run through the same three checks: a new kind is tested by being added.

For each kind (``purebp.layers.kinds.all_kinds()``), on its row's small ``example`` drawn in float64 by its row's
``draw``: (1) its hand-written backward equals autodiff of its forward (``check_layer``, 1e-10 relative per
piece); (2) a network holding it survives a checkpoint round trip from the file alone, bit for bit; (3) its
notation reads back to the same description, alone and inside a residual body. A kind of this file's own
(``Scale``, registered below as a user would) goes through the same checks.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kind_examples import example_layer, inner_draw

import purebp as pb
from purebp.layers import kinds as _kinds
from purebp.network import Sequential
from purebp.testing import StackSpec, make_stack_case, parse_notation
from purebp.train.checkpoint import describe_network, load_checkpoint, save_checkpoint


@dataclasses.dataclass(frozen=True)
class Scale:
    """A user's own kind: out = a (.) s over the last axis, s (n,) learned. dC/da = g (.) s, dC/ds = sum g (.) a."""

    s: jax.Array

    def forward(self, a, key=None):
        return a * self._along(a), a

    def backward(self, a, grad_out):
        return grad_out * self._along(a), Scale(jnp.sum(jnp.reshape(grad_out * a, (-1, a.shape[-1])), axis=0))

    def _along(self, a):
        return jnp.reshape(self.s, (1,) * (a.ndim - 1) + self.s.shape)  # no implicit rank promotion

    def output_shape(self, input_shape):
        return tuple(input_shape)


jax.tree_util.register_dataclass(Scale)

SCALE_KIND = _kinds.register_kind(
    _kinds.Kind(
        name="test_scale",
        type=Scale,
        describe=lambda layer, where, inner: {"n": int(np.shape(layer.s)[0])},
        rebuild=lambda fields, inner: Scale(_kinds.LEAF),
        form="('test_scale',)",
        validate=lambda description, where, inner: None,
        shape_after=lambda description, shape: shape,
        draw=lambda description, shape, rng, dtype, scale, inner: Scale(
            _kinds.host_array(1.0 + rng.standard_normal(shape[-1]), dtype)
        ),
        notation=lambda description, inner: "sc",
        parse=lambda text, inner: ("test_scale",) if text == "sc" else None,
        help="sc = a learned elementwise scale (the test's own kind)",
        example=(("test_scale",), (4,)),
    )
)

KINDS = _kinds.all_kinds()
IDS = [kind.name for kind in KINDS]


def _drawn(kind: _kinds.Kind, seed: int = 0):
    """The row's example layer with float64 parameters drawn by its own ``draw``, and its input shape."""
    description, _ = kind.example
    kind.validate(description, kind.name, lambda *args: None)
    return example_layer(kind, seed)


def test_the_table_names_every_built_in_layer_type_once():
    exported = {
        getattr(pb.layers, name)
        for name in pb.layers.__all__
        if isinstance(getattr(pb.layers, name), type) and hasattr(getattr(pb.layers, name), "backward")
    }
    builtin = {kind.type for kind in KINDS if kind.builtin}
    assert builtin == exported, "every layer type purebp.layers exports needs its row in the table (and no more)"
    assert len(IDS) == len(set(IDS))
    assert set(pb.check.BUILTIN_LAYERS) == builtin
    assert Scale not in pb.check.BUILTIN_LAYERS  # a user's row is still checked layer by layer by fit(verify=True)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_backward_equals_autodiff(kind):
    layer, shape = _drawn(kind)
    x = jnp.asarray(np.random.default_rng(7).standard_normal((3, *shape)))
    assert kind.shape_after(kind.example[0], shape) == tuple(layer.output_shape(shape))
    report = pb.check_layer(layer, x, key=jax.random.key(3))
    assert report.passed, str(report)


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_checkpoint_round_trip_from_the_file_alone(kind, tmp_path):
    layer, shape = _drawn(kind)
    net = Sequential(layers=(layer,), input_shape=shape)
    path = tmp_path / "net.npz"
    save_checkpoint(path, net, step=3)
    loaded = load_checkpoint(path).net  # no template: the row's rebuild makes the structure
    assert describe_network(loaded) == describe_network(net)
    assert describe_network(net)["layers"][0]["kind"] == kind.name
    assert jax.tree.structure(loaded) == jax.tree.structure(net)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(net), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.asarray(a).tobytes() == np.asarray(b).tobytes()


@pytest.mark.parametrize("kind", KINDS, ids=IDS)
def test_notation_round_trip(kind):
    description, shape = kind.example
    text = kind.notation(description, lambda inner: _kinds.kind_named(inner[0]).notation(inner, None))
    spec = StackSpec(shape[0], (description,), "mse", input_length=shape[1] if len(shape) > 1 else 0)
    assert spec.notation.endswith(">" + text)
    assert parse_notation(spec.notation) == (spec.input_shape, spec.layers)
    if len(shape) == 1 and kind.shape_after(description, shape) == shape:  # also inside a block, after a comma
        nested = StackSpec(shape[0], (("residual", (("dense", shape[0], "tanh"), description)),), "mse")
        assert parse_notation(nested.notation) == (nested.input_shape, nested.layers)
    with pytest.raises(ValueError, match="no layer kind reads it"):
        parse_notation(spec.notation + ">zz9")


def test_a_stack_spec_draws_each_kind_through_its_row():
    """make_stack_case builds every kind through its row's draw: the seeded parameters come out as drawn."""
    for kind in KINDS:
        description, shape = kind.example
        spec = StackSpec(shape[0], (description,), "mse", input_length=shape[1] if len(shape) > 1 else 0, seed=5)
        case = make_stack_case(spec)
        rng = np.random.default_rng(5)
        expected = kind.draw(description, shape, rng, np.float64, 1.0, inner_draw(rng))
        assert jax.tree.structure(case.net.layers[0]) == jax.tree.structure(expected), kind.name
        for a, b in zip(jax.tree.leaves(case.net.layers[0]), jax.tree.leaves(expected), strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b)), kind.name


def test_declared_support_matches_the_methods_it_needs():
    """A kind that declares per-example gradients has the rule for them; Kronecker factors need an affine rule or
    no parameters of its own (a residual block defers to its body)."""
    for kind in KINDS:
        layer, _ = _drawn(kind)
        if "per_example" in kind.supports:
            assert hasattr(kind.type, "per_example_grads"), kind.name
        own_parameters = kind.type is not pb.Residual and jax.tree.leaves(layer)
        if "kronecker" in kind.supports and own_parameters:
            assert hasattr(kind.type, "kronecker_factors"), kind.name
        assert set(kind.supports) <= set(_kinds.QUANTITIES)


def test_a_row_is_refused_when_it_clashes_or_declares_an_unknown_quantity():
    with pytest.raises(ValueError, match="already registered"):
        _kinds.register_kind(dataclasses.replace(SCALE_KIND, type=type("Other", (), {})))
    with pytest.raises(ValueError, match=re.escape("unknown quantities ['hessian']")):
        dataclasses.replace(SCALE_KIND, supports=frozenset({"hessian"}))
    with pytest.raises(ValueError, match="not 'custom'"):
        _kinds.register_kind(dataclasses.replace(SCALE_KIND, name="custom"))
    assert _kinds.register_kind(SCALE_KIND) is SCALE_KIND  # the same row again (a module reloaded) is fine
