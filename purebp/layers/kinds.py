"""One table of layer kinds: each kind's file declares its row, and everything that lists kinds reads the table.

A row (``Kind``) says, for one initialised layer type:

- ``name``: the kind's name in checkpoints and layer descriptions (``"dense"``);
- ``describe(layer, where, describe_inner) -> dict`` and ``rebuild(fields, rebuild_inner) -> layer``: its
  static fields as JSON for a checkpoint, and the layer rebuilt from them with ``LEAF`` for every parameter
  (the checkpoint's arrays fill them in); ``*_inner`` handle a body of layers (a residual block's);
- the plain-tuple description random architectures use (``("dense", n_out, activation)``): ``form`` (its
  shape in words, for error messages), ``validate(description, where, validate_inner)``,
  ``shape_after(description, shape)`` (the per-example shape out), and ``draw(description, shape, rng,
  dtype, scale, draw_inner)`` (an initialised layer with parameters drawn from a NumPy generator);
- ``notation(description, notate_inner) -> str`` and ``parse(text, parse_inner) -> description | None``:
  its compact text (``d5t``) in ``StackSpec.notation``, and back; ``help`` explains the text in a phrase;
- ``example``: a small (description, per-example input shape) that the generic test runs;
- ``supports``: the quantities defined for it, among ``QUANTITIES``.

Adding a kind is one new file: the layer, its builder, and ``register_kind(Kind(...))`` at the bottom
(imported from ``purebp/layers/__init__.py``, so the row exists once ``purebp`` is imported).
``purebp.train.checkpoint``, ``purebp.testing`` and ``purebp.check`` consult the table only; the generic test
(tests/layers/test_kinds.py) runs every row through autodiff equivalence, a checkpoint round trip and a notation
round trip. Your own layer kinds may register a row the same way (``builtin=False``, the default: purebp's
``fit(verify=True)`` then still checks their backward layer by layer).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

# what a kind may declare in ``supports``:
# per_example:  purebp.per_example_grads / per_example_grad_norms / DP-SGD
# curvature:    sum_grad_squared, grad_variance, diag_ggn (exact and MC), ggn_vector_product
# diag_hessian: diag_hessian (needs the kind's second derivative)
# kronecker:    kflr, kfac (a Kronecker-factored block, or no parameters)
# rules:        the learning rules of purebp.extras.rules (feedback alignment, ...)
QUANTITIES = ("per_example", "curvature", "diag_hessian", "kronecker", "rules")

# StackSpec.notation's activation letters: d5t is dense(5, "tanh"); d3 (no letter) is the identity
ACTIVATION_CODES = {
    "identity": "",
    "sigmoid": "s",
    "tanh": "t",
    "relu": "r",
    "leaky_relu": "lr",
    "elu": "e",
    "softplus": "sp",
    "gelu": "g",
    "softmax": "sm",
}
_ACTIVATION_NAMES = {code: name for name, code in ACTIVATION_CODES.items()}


@dataclasses.dataclass(frozen=True)
class Kind:
    """One row of the table of layer kinds (see the module docstring for each field's contract)."""

    name: str
    type: type
    describe: Callable[[Any, str, Callable], dict]
    rebuild: Callable[[dict, Callable], Any]
    form: str
    validate: Callable[[tuple, str, Callable], None]
    shape_after: Callable[[tuple, tuple], tuple]
    draw: Callable[..., Any]
    notation: Callable[[tuple, Callable], str]
    parse: Callable[[str, Callable], tuple | None]
    help: str
    example: tuple[tuple, tuple[int, ...]]
    supports: frozenset = frozenset()
    builtin: bool = False  # purebp's own kinds, proven by its tests; fit(verify=True) checks the others per layer

    def __post_init__(self) -> None:
        unknown = set(self.supports) - set(QUANTITIES)
        if unknown:
            known = ", ".join(QUANTITIES)
            raise ValueError(f"kind {self.name!r}: unknown quantities {sorted(unknown)}; known: {known}")
        if not isinstance(self.type, type):
            raise TypeError(f"kind {self.name!r}: type must be the layer class, got {self.type!r}")


_BY_NAME: dict[str, Kind] = {}
_BY_TYPE: dict[type, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    """Add ``kind``'s row to the table (a kind's own file calls this once); return it.

    A name or type already registered is refused (ValueError), unless it is the same row again (a module
    reloaded). Names are what checkpoints store, so ``"custom"`` is reserved.
    """
    if not isinstance(kind, Kind):
        raise TypeError(f"register_kind takes a purebp.layers.kinds.Kind, got {type(kind).__name__}")
    if kind.name == "custom" or not re.fullmatch(r"[a-z][a-z0-9_]*", kind.name):
        raise ValueError(f"kind name {kind.name!r}: expected lower-case letters, digits and _, not 'custom'")
    for table, key in ((_BY_NAME, kind.name), (_BY_TYPE, kind.type)):
        old = table.get(key)
        if old is not None and (old.name, old.type.__qualname__) != (kind.name, kind.type.__qualname__):
            raise ValueError(f"layer kind {key!r} is already registered (as {old.name!r}, {old.type.__name__})")
    _BY_NAME[kind.name] = kind
    _BY_TYPE[kind.type] = kind
    return kind


def all_kinds() -> tuple[Kind, ...]:
    """Every registered row, in registration order."""
    return tuple(_BY_NAME.values())


def kind_named(name: object) -> Kind | None:
    """The row called ``name``, or None."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def kind_of(layer: object) -> Kind | None:
    """The row of ``layer``'s exact type (a subclass may add fields, so it is not that kind), or None."""
    return _BY_TYPE.get(type(layer))


def builtin_types() -> tuple[type, ...]:
    """The layer types of purebp's own kinds."""
    return tuple(kind.type for kind in _BY_NAME.values() if kind.builtin)


# ---------------------------------------------------------------- helpers the rows share


class _Leaf:
    """Stands for a parameter array while a layer is rebuilt from its description (a pytree leaf)."""

    def __repr__(self) -> str:
        return "*"


LEAF = _Leaf()


def static_field(layer: object, field: str, types: tuple[type, ...], where: str) -> object:
    """``layer.field``, refused (TypeError) unless its exact type is one of ``types``.

    Exact types only: the value must come back from JSON as the same type, or the rebuilt tree structure
    (which holds the static fields) would differ (a numpy scalar prints differently from a Python float).
    """
    value = getattr(layer, field)
    if type(value) not in types:
        expected = " or ".join(t.__name__ for t in types)
        raise TypeError(
            f"{where}: {field} is {value!r} ({type(value).__name__}); a checkpoint needs a Python {expected}"
        )
    return value


def activation_code(name: str) -> str:
    """The notation's code for an activation: a letter or two, or ``[name]`` for one without a letter."""
    return ACTIVATION_CODES.get(name, f"[{name}]")


def activation_named(code: str) -> str | None:
    """The activation a notation code stands for, or None."""
    if code.startswith("[") and code.endswith("]") and len(code) > 2:
        return code[1:-1]
    return _ACTIVATION_NAMES.get(code)


def positive_ints(values: tuple, least: tuple[int, ...]) -> bool:
    """True when every value is a plain int (not a bool) at least its bound."""
    return len(values) == len(least) and all(
        not isinstance(value, bool) and isinstance(value, int) and value >= low for value, low in zip(values, least)
    )


def malformed(kind: Kind, where: str, description: object) -> ValueError:
    """The error for a description of ``kind`` that does not have its form."""
    return ValueError(f"{where}: expected {kind.form}, got {description!r}")


def host_array(values: Any, dtype: Any) -> Any:
    """A JAX array of ``values`` in ``dtype``, cast on the host.

    ``jnp.asarray(float64 values, dtype=float32)`` would compile a conversion per shape.
    """
    import jax.numpy as jnp
    import numpy as np

    return jnp.asarray(np.asarray(values, dtype=dtype))
