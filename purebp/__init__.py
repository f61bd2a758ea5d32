"""purebp: backpropagation written by hand from the delta equations, proven equal to jax.grad."""

import sys

from purebp.check import GradientReport, LayerReport, autodiff_value_and_grad, check_gradients, check_layer
from purebp.engine import BackpropTrace, backprop_trace, forward, grad, value_and_grad
from purebp.extras import curvature, preconditioning, rules
from purebp.extras.curvature import (
    KroneckerFactors,
    diag_ggn,
    diag_hessian,
    ggn_vector_product,
    grad_variance,
    kfac,
    kflr,
    sum_grad_squared,
)
from purebp.extras.per_example import dp_sgd_step, dp_value_and_grad, per_example_grad_norms, per_example_grads
from purebp.extras.rules import alignment_angles
from purebp.layers import (
    AvgPool1d,
    Conv1d,
    Dense,
    Dropout,
    Flatten,
    LayerNorm,
    MaxPool1d,
    Residual,
    avg_pool1d,
    conv1d,
    dense,
    dropout,
    flatten,
    layer_norm,
    max_pool1d,
    residual,
)
from purebp.layers.kinds import Kind, register_kind
from purebp.network import Layer, Network, Sequential, init_mlp, init_network
from purebp.programs import clear_caches
from purebp.registry import register_activation, register_loss
from purebp.train import distributed, gradients
from purebp.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriteError,
    describe_network,
    load_checkpoint,
    save_checkpoint,
)
from purebp.train.distributed import ProcessFailureError, data_parallel_value_and_grad, make_data_mesh
from purebp.train.fit import (
    DivergenceError,
    GradientMismatchError,
    evaluate,
    fit,
    make_optimizer,
    make_train_step,
)
from purebp.train.precision import cast_network, mixed_value_and_grad
from purebp.train.resume import Checkpointing
from purebp.version import __version__ as __version__

# the module paths of earlier versions, for ``import purebp.curvature`` and the like
for _name, _module in {
    "curvature": curvature,
    "distributed": distributed,
    "preconditioning": preconditioning,
    "rules": rules,
}.items():
    sys.modules[f"purebp.{_name}"] = _module


__all__ = [
    "AvgPool1d",
    "BackpropTrace",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWriteError",
    "Checkpointing",
    "Conv1d",
    "Dense",
    "DivergenceError",
    "Dropout",
    "Flatten",
    "GradientMismatchError",
    "GradientReport",
    "Kind",
    "KroneckerFactors",
    "Layer",
    "LayerNorm",
    "LayerReport",
    "MaxPool1d",
    "Network",
    "ProcessFailureError",
    "Residual",
    "Sequential",
    "alignment_angles",
    "autodiff_value_and_grad",
    "avg_pool1d",
    "backprop_trace",
    "cast_network",
    "check_gradients",
    "check_layer",
    "clear_caches",
    "conv1d",
    "curvature",
    "data_parallel_value_and_grad",
    "dense",
    "describe_network",
    "diag_ggn",
    "diag_hessian",
    "distributed",
    "dp_sgd_step",
    "dp_value_and_grad",
    "dropout",
    "evaluate",
    "fit",
    "flatten",
    "forward",
    "ggn_vector_product",
    "grad",
    "grad_variance",
    "gradients",
    "init_mlp",
    "init_network",
    "kfac",
    "kflr",
    "layer_norm",
    "load_checkpoint",
    "make_data_mesh",
    "make_optimizer",
    "make_train_step",
    "max_pool1d",
    "mixed_value_and_grad",
    "per_example_grad_norms",
    "per_example_grads",
    "preconditioning",
    "register_activation",
    "register_kind",
    "register_loss",
    "residual",
    "rules",
    "save_checkpoint",
    "sum_grad_squared",
    "value_and_grad",
]
