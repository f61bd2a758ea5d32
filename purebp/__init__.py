"""purebp: backpropagation written by hand from the delta equations, proven equal to jax.grad."""

from purebp.backprop import BackpropTrace, backprop_trace, forward, grad, value_and_grad
from purebp.check import GradientReport, autodiff_value_and_grad, check_gradients
from purebp.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from purebp.distributed import ProcessFailureError, data_parallel_value_and_grad, make_data_mesh
from purebp.network import Layer, Network, init_mlp
from purebp.per_example import dp_sgd_step, dp_value_and_grad, per_example_grad_norms, per_example_grads
from purebp.precision import cast_network, mixed_value_and_grad
from purebp.programs import clear_caches
from purebp.registry import register_activation, register_loss
from purebp.training import (
    DivergenceError,
    GradientMismatchError,
    evaluate,
    fit,
    make_optimizer,
    make_train_step,
)

__version__ = "0.1.0"

__all__ = [
    "BackpropTrace",
    "Checkpoint",
    "CheckpointError",
    "DivergenceError",
    "GradientMismatchError",
    "GradientReport",
    "Layer",
    "Network",
    "ProcessFailureError",
    "autodiff_value_and_grad",
    "backprop_trace",
    "cast_network",
    "check_gradients",
    "clear_caches",
    "data_parallel_value_and_grad",
    "dp_sgd_step",
    "dp_value_and_grad",
    "evaluate",
    "fit",
    "forward",
    "grad",
    "init_mlp",
    "load_checkpoint",
    "make_data_mesh",
    "make_optimizer",
    "make_train_step",
    "mixed_value_and_grad",
    "per_example_grad_norms",
    "per_example_grads",
    "register_activation",
    "register_loss",
    "save_checkpoint",
    "value_and_grad",
]
