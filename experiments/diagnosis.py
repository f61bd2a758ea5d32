"""Does check_backprop catch, locate and name backprop mistakes, in every layout, without false alarms?

python -m experiments.diagnosis [--quick] [--seed S] [--out DIR]   # writes diagnosis.{csv,md}

One student-style NumPy backward pass (the notes' column equations), wrapped for each layout (columns,
rows, Nielsen's examples), with one mistake switched on at a time. For each (mistake, layout) it runs
``check_backprop`` from several seeds and counts: caught (the report failed), right layer (report.layer
is where the mistake is, in the shrunk case), right equation (report.equation) and named (report.mistake
is the catalogue entry that describes it; "-" for a mistake the catalogue does not hold). Then the
correct pass, in every layout and four (activation, output, loss, reduction) settings, for the false
positives: every trial of a correct pass that the kit reports as failing is one.
"""

from __future__ import annotations

import os
import time

import numpy as np

from experiments import _common
from purebp.kit.backprop import check_backprop

# --- the student's pass, in the notes' layout: x (n_0, N), biases (n,), delta^l (n_l, N) ----------------

G = {
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.where(z > 0, z, 0.0),
    "identity": lambda z: z,
}
G_PRIME = {
    "sigmoid": lambda z: G["sigmoid"](z) * (1.0 - G["sigmoid"](z)),
    "tanh": lambda z: 1.0 - np.tanh(z) ** 2,
    "relu": lambda z: (z > 0).astype(float),
    "identity": lambda z: np.ones_like(z),
}


def softmax(z):
    e = np.exp(z - z.max(axis=0, keepdims=True))
    return e / e.sum(axis=0, keepdims=True)


def student(settings: dict, bug: str | None):
    """A column-layout backward pass for ``settings`` with the mistake ``bug`` (None: correct)."""
    hidden, output, loss, reduction = (settings[k] for k in ("activation", "output", "loss", "reduction"))

    def out(z):
        return softmax(z) if output == "softmax" else G[output](z)

    def backprop(weights, biases, x, y, per_example=False):
        L, N = len(weights), x.shape[1]
        a, zs = [x], []
        for l, (w, b) in enumerate(zip(weights, biases)):
            zs.append(w @ a[-1] + b[:, None])
            a.append(out(zs[-1]) if l == L - 1 else G[hidden](zs[-1]))
        z_L, a_L = zs[-1], a[-1]
        # BP1
        if loss == "mse":
            g_out = G_PRIME[output](a_L if bug == "bp1_derivative_at_a" else z_L)
            residual = 2.0 * (a_L - y) if bug == "bp1_mse_factor_2" else a_L - y
            delta = residual if bug == "bp1_no_derivative" else residual * g_out
        else:  # softmax + cross-entropy, sigmoid + binary cross-entropy: the G' cancels
            delta = a_L - y
            if bug == "bp1_extra_derivative":
                delta = delta * G_PRIME[output](z_L)
        if bug == "bp1_sign":
            delta = -delta
        if bug == "bp1_half":
            delta = 0.5 * delta
        deltas = [None] * L
        deltas[-1] = delta
        # BP2, in the loop: a mistake here is made in every hidden layer
        for l in range(L - 2, -1, -1):
            w_next, d_next = weights[l + 1], deltas[l + 1]
            back = w_next.T @ d_next
            g = G_PRIME[hidden](zs[l])
            if bug == "bp2_no_derivative":
                g = 1.0
            elif bug == "bp2_derivative_at_a":
                g = G_PRIME[hidden](a[l + 1])
            elif bug == "bp2_output_activation":
                g = G_PRIME[output](zs[l])
            elif bug == "bp2_no_transpose":
                back = w_next @ d_next  # runs only where the layer is square
            elif bug == "bp2_weights_off_by_one":
                back = weights[l].T @ d_next  # Nielsen's weights[-l] for weights[-l+1]
            elif bug == "bp2_derivative_of_layer_above":
                g = G_PRIME[output if l + 1 == L - 1 else hidden](zs[l + 1])
            elif bug == "bp2_sign":
                g = -g
            elif bug == "bp2_squared_derivative":
                g = g * g
            deltas[l] = back * g
        # BP3 and BP4
        gb = [d.sum(axis=1) for d in deltas]
        gw = [d @ a[l].T for l, d in enumerate(deltas)]
        if bug == "bp3_last_example":
            gb = [d[:, -1] for d in deltas]
        elif bug == "bp3_first_example":
            gb = [d[:, 0] for d in deltas]
        elif bug == "bp3_not_summed":
            gb = list(deltas)
        elif bug == "bp3_wrong_axis":
            gb = [d.sum(axis=0) for d in deltas]
        elif bug == "bp3_batch_scaling":
            gb = [g_b / N for g_b in gb]
        elif bug == "bp3_double":
            gb = [2.0 * g_b for g_b in gb]
        elif bug == "bp4_transposed":
            gw = [a[l] @ d.T for l, d in enumerate(deltas)]
        elif bug == "bp4_activation_of_layer_l":
            gw = [d @ a[l + 1].T for l, d in enumerate(deltas)]
        elif bug == "bp4_pre_activation":
            gw = [d @ (zs[l - 1] if l >= 1 else a[0]).T for l, d in enumerate(deltas)]
        elif bug == "bp4_batch_scaling":
            gw = [g_w / N for g_w in gw]
        elif bug == "bp4_last_example":
            gw = [np.outer(d[:, -1], a[l][:, -1]) for l, d in enumerate(deltas)]
        if reduction == "mean" and not per_example and bug != "reduction":
            gw, gb = [g_w / N for g_w in gw], [g_b / N for g_b in gb]
        if bug == "reduction":  # sum asked, the mean returned
            gw, gb = [g_w / N for g_w in gw], [g_b / N for g_b in gb]
        return gw, gb

    return backprop


def in_layout(backprop, layout: str):
    """The same pass as a user of ``layout`` would call it."""
    if layout == "columns":
        return backprop
    if layout == "rows":

        def rows(weights, biases, x, y):
            gw, gb = backprop(weights, biases, x.T, y.T)
            return gw, [g.T if g.ndim == 2 else g for g in gb]

        return rows

    def examples(weights, biases, x, y):  # Nielsen: column vectors, biases (n, 1), one example
        gw, gb = backprop(weights, [b[:, 0] for b in biases], x, y, per_example=True)
        return gw, [g[:, None] if g.ndim == 1 else g for g in gb]

    return examples


SIGMOID_MSE = dict(activation="sigmoid", output="sigmoid", loss="mse", reduction="sum")
RELU_SIGMOID_MSE = dict(activation="relu", output="sigmoid", loss="mse", reduction="mean")
TANH_SOFTMAX_CE = dict(activation="tanh", output="softmax", loss="cross_entropy", reduction="mean")
SIGMOID_BCE = dict(activation="tanh", output="sigmoid", loss="binary_cross_entropy", reduction="sum")
ALL_LAYOUTS = ("columns", "rows", "examples")
BATCHED = ("columns", "rows")  # a mistake across the batch cannot be made one example at a time


def top(L: int) -> int:
    return L


def below_top(L: int) -> int:
    return L - 1


# mistake: (settings, layouts, expected layer from the shrunk depth, equation, catalogue key or None)
MISTAKES = {
    "bp1_no_derivative": (SIGMOID_MSE, ALL_LAYOUTS, top, "BP1", "bp1_no_derivative"),
    "bp1_derivative_at_a": (SIGMOID_MSE, ALL_LAYOUTS, top, "BP1", "bp1_derivative_at_a"),
    "bp1_mse_factor_2": (SIGMOID_MSE, ALL_LAYOUTS, top, "BP1", "bp1_mse_factor_2"),
    "bp1_extra_derivative": (SIGMOID_BCE, ALL_LAYOUTS, top, "BP1", "bp1_extra_derivative"),
    "bp1_sign": (TANH_SOFTMAX_CE, ALL_LAYOUTS, top, "BP1", "bp1_sign"),
    "bp1_half": (SIGMOID_MSE, ALL_LAYOUTS, top, "BP1", "scale"),
    "bp2_no_derivative": (SIGMOID_MSE, ALL_LAYOUTS, below_top, "BP2", "bp2_no_derivative"),
    "bp2_derivative_at_a": (TANH_SOFTMAX_CE, ALL_LAYOUTS, below_top, "BP2", "bp2_derivative_at_a"),
    "bp2_output_activation": (RELU_SIGMOID_MSE, ALL_LAYOUTS, below_top, "BP2", "bp2_output_activation"),
    "bp2_no_transpose": (SIGMOID_MSE, ALL_LAYOUTS, below_top, "BP2", "bp2_no_transpose"),
    "bp2_weights_off_by_one": (SIGMOID_MSE, ALL_LAYOUTS, below_top, "BP2", "bp2_weights_of_layer_l_transposed"),
    "bp2_derivative_of_layer_above": (SIGMOID_MSE, ALL_LAYOUTS, below_top, "BP2", "bp2_derivative_of_layer_above"),
    "bp2_sign": (SIGMOID_MSE, ALL_LAYOUTS, below_top, "BP2", "bp2_sign"),
    "bp2_squared_derivative": (SIGMOID_MSE, ALL_LAYOUTS, below_top, "BP2", None),
    "bp3_last_example": (SIGMOID_MSE, BATCHED, top, "BP3", "bp3_last_example"),
    "bp3_first_example": (TANH_SOFTMAX_CE, BATCHED, top, "BP3", "bp3_first_example"),
    "bp3_not_summed": (SIGMOID_MSE, BATCHED, top, "BP3", "bp3_not_summed"),
    "bp3_wrong_axis": (SIGMOID_MSE, BATCHED, top, "BP3", "bp3_wrong_axis"),
    "bp3_batch_scaling": (SIGMOID_MSE, BATCHED, top, "BP3", "bp3_batch_scaling"),
    "bp3_double": (SIGMOID_MSE, ALL_LAYOUTS, top, "BP3", None),
    "bp4_transposed": (SIGMOID_MSE, ALL_LAYOUTS, top, "BP4", "bp4_transposed"),
    "bp4_activation_of_layer_l": (SIGMOID_MSE, ALL_LAYOUTS, top, "BP4", "bp4_activation_of_layer_l"),
    "bp4_pre_activation": (SIGMOID_MSE, ALL_LAYOUTS, top, "BP4", "bp4_pre_activation"),
    "bp4_batch_scaling": (RELU_SIGMOID_MSE, BATCHED, top, "BP4", "bp4_batch_scaling"),
    "bp4_last_example": (SIGMOID_MSE, BATCHED, top, "BP4", "bp4_last_example"),
    "reduction": (SIGMOID_MSE, BATCHED, top, "BP1", "scale"),
}
FALSE_POSITIVE_SETTINGS = (SIGMOID_MSE, RELU_SIGMOID_MSE, TANH_SOFTMAX_CE, SIGMOID_BCE)


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.split("\n\n")[0], argv)
    seeds = range(args.seed, args.seed + (1 if args.quick else 5))
    mistakes = list(MISTAKES)[:: 6 if args.quick else 1]
    rows, example = [], None
    start = time.perf_counter()
    for mistake in _common.progress(mistakes, desc="mistakes"):
        settings, layouts, layer_of, equation, key = MISTAKES[mistake]
        for layout in layouts:
            fn = in_layout(student(settings, mistake), layout)
            counts = dict(caught=0, layer=0, equation=0, named=0)
            for seed in seeds:
                report = check_backprop(fn, layout=layout, trials=20, seed=seed, **settings)
                if report.passed:
                    continue
                counts["caught"] += 1
                counts["layer"] += report.layer == layer_of(report.case.depth)
                counts["equation"] += report.equation == equation
                counts["named"] += key is not None and report.mistake == key
                if mistake == "bp2_derivative_at_a" and layout == "columns" and example is None:
                    example = str(report)
            n = len(seeds)
            rows.append(
                {
                    "mistake": mistake,
                    "layout": layout,
                    "runs": n,
                    "caught": counts["caught"],
                    "right layer": counts["layer"],
                    "right equation": counts["equation"],
                    "named": counts["named"] if key is not None else "-",
                }
            )
    diagnosis_seconds = time.perf_counter() - start
    trials = 25 if args.quick else 500
    fp_rows = []
    start = time.perf_counter()
    for settings in _common.progress(FALSE_POSITIVE_SETTINGS[:: 3 if args.quick else 1], desc="false positives"):
        for layout in ALL_LAYOUTS:
            fn = in_layout(student(settings, None), layout)
            # one run of `trials` cases stops at the first failure: count failures trial by trial instead
            report = check_backprop(fn, layout=layout, trials=trials, seed=args.seed + 1000, **settings)
            failures = 0 if report.passed else 1
            fp_rows.append(
                {
                    "settings": f"{settings['activation']}/{settings['output']}/{settings['loss']}/"
                    f"{settings['reduction']}",
                    "layout": layout,
                    "trials": report.trials if not report.passed else trials,
                    "false positives": failures,
                    "largest error": report.max_error,
                }
            )
    fp_seconds = time.perf_counter() - start
    stem = _common.output_stem(args, "diagnosis")
    _common.write_csv(stem.with_suffix(".csv"), rows)
    total = {k: sum(r[k] for r in rows) for k in ("runs", "caught", "right layer", "right equation")}
    named_rows = [r for r in rows if r["named"] != "-"]
    named = sum(r["named"] for r in named_rows)
    named_runs = sum(r["runs"] for r in named_rows)
    per_layout = {layout: sum(r["trials"] for r in fp_rows if r["layout"] == layout) for layout in ALL_LAYOUTS}
    false_positives = sum(r["false positives"] for r in fp_rows)
    lines = [
        "# check_backprop: caught, located, named",
        "",
        f"Measured on {_common.machine()}; `python -m experiments.diagnosis{' --quick' if args.quick else ''}` "
        f"(seed {args.seed}): {diagnosis_seconds:.0f} s for the mistakes, {fp_seconds:.0f} s for the false "
        f"positives; load average {os.getloadavg()[0]:.1f} at the end (a shared machine).",
        "",
        f"Each (mistake, layout) runs `check_backprop(..., trials=20, seed=s)` for {len(seeds)} seeds. "
        "*right layer*: `report.layer` is the layer of the mistake in the shrunk case (the loop's mistakes: L-1 "
        "for BP2, L for BP3/BP4); *named*: `report.mistake` is the catalogue entry for it ('-': not in the "
        "catalogue; those are still caught and located).",
        "",
        f"Totals: {total['caught']}/{total['runs']} caught, {total['right layer']}/{total['runs']} right layer, "
        f"{total['right equation']}/{total['runs']} right equation, {named}/{named_runs} named.",
        "",
        *_common.markdown_table(rows, list(rows[0])),
        "",
        "## False positives on the correct pass",
        "",
        f"{false_positives} false positive(s) over "
        + ", ".join(f"{per_layout[layout]} trials ({layout})" for layout in ALL_LAYOUTS)
        + "; tolerance: relative error 1e-10 per leaf (float64).",
        "",
        *_common.markdown_table(fp_rows, list(fp_rows[0]), {"largest error": ".1e"}),
    ]
    if example:
        lines += ["", "## One report, as printed", "", "```", example, "```"]
    _common.write_markdown(stem.with_suffix(".md"), lines)
    print("\n".join(lines))
    return 0 if false_positives == 0 and total["caught"] == total["runs"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
