"""Built on the engine: per-example gradients, curvature, preconditioning, learning rules other than backprop.

Nothing in the engine imports these; each one calls the engine's public functions.
"""

from purebp.extras import curvature, per_example, preconditioning, rules

__all__ = ["curvature", "per_example", "preconditioning", "rules"]
