"""Independent oracles for purebp's gradients; they share no code with purebp.

- ``numpy_matrix``: the notes' matrix form, NumPy float64, column-major.
- ``numpy_layers``: dense, residual, layer norm and dropout stacks in NumPy float64, dC/da formed first,
  softmax and layer norm through their full per-example Jacobians.
- ``scalar_chain_rule``: the slides' per-neuron chain rule in Python loops.
- ``finite_differences``: central differences in float64, fixed-step and adaptive (Ridders' Richardson
  extrapolation with an error estimate).
"""
