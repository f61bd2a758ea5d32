"""Old keyword arguments that still work: each warns once per call and names its replacement."""

from __future__ import annotations

import warnings
from typing import Any

from purebp.train import gradients as _gradients

# old name -> what replaces it (said in the warning)
GRADIENT_ALIASES = {
    "mesh": "gradient=purebp.train.gradients.sharded(mesh) (or gradient=mesh)",
    "rule": "gradient=rule (or purebp.train.gradients.rule(rule))",
    "compute_dtype": 'gradient=purebp.train.gradients.mixed(dtype), e.g. mixed("bfloat16")',
}


def take(options: dict[str, Any], aliases: dict[str, str], caller: str, stacklevel: int = 3) -> dict[str, Any]:
    """Return the deprecated ``options`` given, warning for each (at the user's line); refuse unknown names."""
    unknown = sorted(set(options) - set(aliases))
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword argument(s): {', '.join(unknown)}")
    for name in options:
        warnings.warn(
            f"{caller}({name}=...) is deprecated: use {aliases[name]}", DeprecationWarning, stacklevel=stacklevel
        )
    return dict(options)


def gradient_with(gradient: object, old: dict[str, Any]) -> _gradients.Gradient:
    """``gradient`` combined with the deprecated mesh=, rule= and compute_dtype= values, checked."""
    parts: list[Any] = [gradient]
    if old.get("mesh") is not None:
        parts.append(_gradients.sharded(old["mesh"]))
    if old.get("rule") is not None:
        parts.append(_gradients.rule(old["rule"]))
    if old.get("compute_dtype") is not None:
        parts.append(_gradients.Gradient(compute_dtype=old["compute_dtype"]))
    return _gradients.as_gradient(tuple(parts) if len(parts) > 1 else gradient)
