"""Training on the engine: ``fit``, the step and the scanned epoch, schedules, resume, checkpoints,
mixed precision and data parallelism over a mesh."""

from purebp.train import checkpoint, distributed, fit, precision

__all__ = ["checkpoint", "distributed", "fit", "precision"]
