"""The kit's notation: the notes' four equations, the layouts and dtypes it checks, superscript layer indices."""

from __future__ import annotations

LAYOUTS = ("columns", "rows", "examples")
DTYPES = ("float64", "float32")
EQUATIONS = {
    "BP1": "δᴸ = ∂C/∂aᴸ ⊙ G'(zᴸ)",
    "BP2": "δˡ = ((Wˡ⁺¹)ᵀ δˡ⁺¹) ⊙ G'(zˡ)",
    "BP3": "∂C/∂bˡ = Σₙ δˡ",
    "BP4": "∂C/∂Wˡ = δˡ (aˡ⁻¹)ᵀ",
}
_SUP = str.maketrans("0123456789-+", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻⁺")


def sup(l: int) -> str:
    return str(l).translate(_SUP)
