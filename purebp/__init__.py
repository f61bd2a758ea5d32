"""purebp: backpropagation written by hand from the delta equations, proven equal to jax.grad."""

from purebp.activations import register_activation
from purebp.backprop import BackpropTrace, backprop_trace, forward, grad, value_and_grad
from purebp.check import GradientReport, autodiff_value_and_grad, check_gradients
from purebp.network import Layer, Network, init_mlp

__version__ = "0.1.0"

__all__ = [
    "BackpropTrace",
    "GradientReport",
    "Layer",
    "Network",
    "autodiff_value_and_grad",
    "backprop_trace",
    "check_gradients",
    "forward",
    "grad",
    "init_mlp",
    "register_activation",
    "value_and_grad",
]
