"""Training on the engine: ``fit`` and its pieces (``step``: the step and the scanned epoch; ``schedule``;
``optimizers``; ``gradients``: how the gradient is made; ``resume``: ``Checkpointing``; ``progress``),
checkpoints, mixed precision and data parallelism over a mesh."""

from purebp.train import (
    checkpoint,
    distributed,
    fit,
    gradients,
    optimizers,
    precision,
    progress,
    resume,
    schedule,
    step,
)

__all__ = [
    "checkpoint",
    "distributed",
    "fit",
    "gradients",
    "optimizers",
    "precision",
    "progress",
    "resume",
    "schedule",
    "step",
]
