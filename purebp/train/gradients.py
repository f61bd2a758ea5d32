"""How each training step's gradient is made: one small table of gradient sources.

``fit(gradient=...)``, ``make_train_step(gradient=...)`` and ``run_epoch`` take
one ``Gradient``, built from

==============================  ==========================================================================
``"handwritten"`` (default)     the hand-written backward pass (``purebp.engine``), checked by ``fit``
``handwritten(verify=False)``   the same, unchecked (``fit`` skips its gradient check)
``"autodiff"``                  the witness: jax.grad of the same forward pass and cost (``purebp.check``)
a rule / ``rule(r)``            a learning rule's update instead of the gradient (``purebp.extras.rules``)
``mixed("bfloat16")``           mixed precision: the hand-written pass on copies cast to the compute dtype
a Mesh / ``sharded(mesh)``      data parallel over the mesh's "data" axis (``purebp.train.distributed``)
==============================  ==========================================================================

Sources combine as a tuple (``gradient=(handwritten(verify=False), rule)``), and
``Gradient.check`` refuses, before anything compiles, every combination the
passes cannot run yet: a rule, mixed precision and a mesh each need the
hand-written pass, and none of them combines with another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax

from purebp import check as _check
from purebp import engine as _engine
from purebp.extras import rules as _rules

SOURCES = ("handwritten", "autodiff")


@dataclasses.dataclass(frozen=True)
class Gradient:
    """One gradient source: the pass (``source``), and optionally a compute dtype, a mesh or a learning rule.

    ``verify`` (``fit``): before training, compare the hand-written gradient
    with the autodiff witness on a few training examples and refuse to train
    if they differ (``purebp.train.fit.GradientMismatchError``).

    ``program`` (source, compute dtype, mesh) is what a compiled epoch is keyed
    on; the rule is a traced argument of it, so a new rule of the same shapes
    reuses the program.
    """

    source: str = "handwritten"
    compute_dtype: str | None = None
    mesh: jax.sharding.Mesh | None = None
    rule: Any = None
    verify: bool = True

    @property
    def program(self) -> tuple[str, str | None, jax.sharding.Mesh | None]:
        """The static part: hashable, equal for gradients that trace the same program."""
        return (self.source, self.compute_dtype, self.mesh)

    def check(self) -> Gradient:
        """Raise ValueError naming the refused combination; return the gradient with its compute dtype named."""
        if not isinstance(self.verify, bool):
            raise TypeError(f"verify must be True or False, got {self.verify!r}")
        if self.source not in SOURCES:
            raise ValueError(f"gradient must be one of {SOURCES}, got {self.source!r}")
        if self.rule is not None:
            _check_rule_options(self.rule, self.source, self.mesh, self.compute_dtype)
        if self.mesh is not None and self.source != "handwritten":
            raise ValueError(
                f"a mesh needs gradient='handwritten' (the sharded pass is hand-written), got {self.source!r}"
            )
        if self.compute_dtype is None:
            return self
        if self.source != "handwritten":
            raise ValueError(
                f"compute_dtype needs gradient='handwritten' (the mixed pass is hand-written), got {self.source!r}"
            )
        if self.mesh is not None:
            raise ValueError(
                "compute_dtype cannot be combined with a mesh yet: the data-parallel pass has no mixed mode"
            )
        from purebp.network import supported_dtype

        # a name, so that equal dtypes share a program
        return dataclasses.replace(self, compute_dtype=supported_dtype(self.compute_dtype).name)


def handwritten(*, verify: bool = True) -> Gradient:
    """The hand-written backward pass (the default); ``verify=False`` skips ``fit``'s check against autodiff."""
    return Gradient(verify=verify).check()


def autodiff() -> Gradient:
    """jax.grad of the same forward pass and cost: the witness the hand-written pass is checked against."""
    return Gradient(source="autodiff")


def mixed(compute_dtype: str) -> Gradient:
    """Mixed precision (``purebp.train.precision.mixed_value_and_grad``): "bfloat16" or "float16"."""
    return Gradient(compute_dtype=compute_dtype).check()


def sharded(mesh: jax.sharding.Mesh) -> Gradient:
    """Data parallel over ``mesh``'s "data" axis: one ``psum`` of the per-device hand-written gradients."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"sharded needs a jax.sharding.Mesh (purebp.make_data_mesh()), got {type(mesh).__name__}")
    return Gradient(mesh=mesh)


def rule(learning_rule: object) -> Gradient:
    """Train on a learning rule's update (``purebp.extras.rules``) instead of the gradient."""
    return Gradient(rule=_rules.normalize(learning_rule))


def as_gradient(value: object) -> Gradient:
    """Return the ``Gradient`` that ``value`` names, checked: a ``Gradient``, "handwritten", "autodiff", a learning
    rule, a ``jax.sharding.Mesh``, or a tuple of these combined (each field given at most once)."""
    if isinstance(value, (tuple, list)):
        return combine(*(as_gradient(item) for item in value))
    if isinstance(value, Gradient):
        return value.check()
    if isinstance(value, str):
        return Gradient(source=value).check()
    if isinstance(value, jax.sharding.Mesh):
        return sharded(value)
    try:
        return rule(value)
    except TypeError:
        raise TypeError(
            "gradient must be 'handwritten', 'autodiff', a learning rule (purebp.extras.rules), a jax.sharding.Mesh, "
            f"a purebp.train.gradients.Gradient, or a tuple of these; got {type(value).__name__}"
        ) from None


def combine(*parts: Gradient) -> Gradient:
    """One ``Gradient`` with every field some part sets; a field two parts set differently is refused."""
    fields: dict[str, Any] = {}
    default = Gradient()
    for part in parts:
        for field in dataclasses.fields(Gradient):
            value = getattr(part, field.name)
            if value is getattr(default, field.name) or (field.name == "source" and value == default.source):
                continue
            if field.name in fields and fields[field.name] is not value and fields[field.name] != value:
                raise ValueError(f"gradient: {field.name} given twice ({fields[field.name]!r} and {value!r})")
            fields[field.name] = value
    return Gradient(**fields).check()


def _check_rule_options(rule: Any, source: str, mesh: object, compute_dtype: str | None) -> None:
    if source != "handwritten":
        raise ValueError(
            f"a learning rule ({rule.kind}) replaces the hand-written backward pass's feedback path: it needs "
            f"gradient='handwritten', got {source!r}"
        )
    if mesh is not None:
        raise ValueError(
            f"a learning rule ({rule.kind}) cannot be combined with a mesh yet: the sharded pass is backprop"
        )
    if compute_dtype is not None:
        raise ValueError(
            f"a learning rule ({rule.kind}) cannot be combined with compute_dtype yet: the mixed pass is backprop"
        )


def value_and_grad_function(source: str, compute_dtype: str | None, mesh: jax.sharding.Mesh | None) -> Callable:
    """The jitted ``(net, x, y, loss, reduction, key=None, rule=None) -> (L, grads)`` of a checked gradient's program.

    Called inside another jit it inlines, with no eager validation per step.
    """
    if compute_dtype is not None:
        from purebp.train import precision as _precision

        return _without_rule(_precision.mixed_value_and_grad(compute_dtype))
    if mesh is not None:
        return _without_rule(_data_parallel(mesh))
    if source == "autodiff":
        return _without_rule(_check.compiled_autodiff_value_and_grad)
    return _engine.compiled_value_and_grad


def _without_rule(value_and_grad: Callable) -> Callable:
    def call(net, x, y, loss, reduction, key=None, rule=None):
        return value_and_grad(net, x, y, loss, reduction, key)  # a rule never reaches here: check() refused it

    return call


def _data_parallel(mesh: jax.sharding.Mesh) -> Callable:
    from purebp.train import distributed

    def value_and_grad(net, x, y, loss, reduction, key=None):
        return distributed.sharded_value_and_grad(mesh, distributed.DATA_AXIS, loss, reduction)(net, x, y, key)

    return value_and_grad
