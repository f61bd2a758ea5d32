"""Layer kinds, one file each: a forward rule and its hand-written backward rule side by side.

The layer contract, once: a layer is an immutable pytree (its arrays are
leaves, everything else is static) with

    out, cache = layer.forward(a, key=None)
    grad_in, grads = layer.backward(cache, grad_out)

where ``cache`` is what the backward rule needs from the forward pass (the
notes' "dz/dw = a"), ``grad_out`` is dC/d(out), ``grad_in`` is dC/da and
``grads`` holds dC/d(parameters) as a layer of the same type (so gradients
line up leaf for leaf with the parameters). ``a`` is batch-first of any rank,
(N, ...); ``key`` is None (inference) or one PRNG key per example, shape (N,),
so that random layers draw the same numbers for an example however the batch
is split (see ``example_keys``).

Built-in kinds: ``Dense`` (the notes' four equations), ``Residual`` (the chain
rule's Case 2), ``LayerNorm``, ``Dropout``, ``Conv1d`` (the four equations in
convolution form), ``MaxPool1d``, ``AvgPool1d`` and ``Flatten``. Each has a lower-case builder
(``dense(100, "relu")``) that ``purebp.init_network`` initialises once the input
shape is known. Optional methods used where present: ``output_shape(shape)``
(static shape check), ``per_example_grads(cache, grad_out)`` and
``per_example_squared_norms(cache, grad_out)`` (per-example gradients and
their norms, for ``purebp.per_example_grads`` and DP-SGD).

Every kind's file also registers its row in the table of layer kinds
(``purebp.layers.kinds``: its checkpoint description, its notation and random
draw for tests, the quantities it supports); checkpoints, ``purebp.testing``
and ``purebp.check`` read that table. A new kind is one new file plus its row.
"""

from purebp.layers.base import example_keys, layer_keys, per_example_squared_norms
from purebp.layers.conv import Conv1d, ConvCache, conv1d
from purebp.layers.dense import Dense, DenseCache, dense
from purebp.layers.dropout import Dropout, dropout
from purebp.layers.flatten import Flatten, flatten
from purebp.layers.kinds import Kind, all_kinds, kind_named, kind_of, register_kind
from purebp.layers.layer_norm import LayerNorm, LayerNormCache, layer_norm
from purebp.layers.pool import AvgPool1d, MaxPool1d, avg_pool1d, max_pool1d
from purebp.layers.residual import Residual, residual

__all__ = [
    "AvgPool1d",
    "Conv1d",
    "ConvCache",
    "Dense",
    "DenseCache",
    "Dropout",
    "Flatten",
    "Kind",
    "LayerNorm",
    "LayerNormCache",
    "MaxPool1d",
    "Residual",
    "all_kinds",
    "avg_pool1d",
    "conv1d",
    "dense",
    "dropout",
    "example_keys",
    "flatten",
    "kind_named",
    "kind_of",
    "layer_keys",
    "layer_norm",
    "max_pool1d",
    "per_example_squared_norms",
    "register_kind",
    "residual",
]
