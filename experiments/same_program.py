"""Is an ``init_mlp`` network's compiled gradient program the same one as before the layer engine?

The layer engine (``purebp/layers``, ``purebp/engine.py``) runs an MLP as a
stack of ``Dense`` layers. The claim is that this costs nothing: XLA receives
the same computation. This script checks it without timing anything: it
compiles ``purebp.value_and_grad``'s program for several MLPs with the
current tree and with a baseline git revision (by default the last commit
before the engine), in two fresh processes, and compares the optimized HLO
after removing what only names things (source locations, instruction and
computation names, stack frames). Equal text means the same kernels in the
same order: the same speed on any machine, whatever its load.

    python -m experiments.same_program                      # baseline 2332618, writes results/same_program.md
    python -m experiments.same_program --baseline HEAD~3    # any revision with engine (or backprop)._value_and_grad_jit
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import jax

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BASELINE = "2332618"  # the last commit before the layer engine

CONFIGS = [
    ("784-256-256-10 relu, softmax CE", (784, 256, 256, 10), ("relu", "relu", "identity"), "softmax_cross_entropy"),
    ("64-128-10 tanh, softmax output, CE", (64, 128, 10), ("tanh", "softmax"), "cross_entropy"),
    ("20-30-30-30-5 mixed, sigmoid output, BCE", (20, 30, 30, 30, 5), ("sigmoid", "gelu", "elu", "sigmoid"),
     "binary_cross_entropy"),
    ("8-16-3 leaky_relu, mse", (8, 16, 3), ("leaky_relu", "identity"), "mse"),
]  # fmt: skip

# Runs in the child process: compile each config's program, print {name: normalized HLO} as JSON.
CHILD = r"""
import json, re, sys
import jax, jax.numpy as jnp
import purebp as pb
try:
    from purebp import engine as backprop
except ImportError:  # revisions before the layout: purebp/backprop.py
    from purebp import backprop
configs = json.loads(sys.argv[1])
out = {}
# the control: the first network with reduction "sum", one multiply fewer: the comparison must see it
control = [["control: " + configs[0][0] + ", reduction sum"] + configs[0][1:]]
for name, sizes, activations, loss in configs + control:
    reduction = "sum" if name.startswith("control") else "mean"
    net = pb.init_mlp(jax.random.key(0), tuple(sizes), tuple(activations))
    x = jnp.ones((128, sizes[0]), jnp.float32)
    classes = loss in ("softmax_cross_entropy", "cross_entropy")
    y = jnp.zeros((128,), jnp.int32) if classes else jnp.zeros((128, sizes[-1]), jnp.float32)
    program = jax.jit(lambda n, x, y: backprop._value_and_grad_jit(n, x, y, loss, reduction))
    text = program.lower(net, x, y).compile().as_text()
    lines = []
    for line in text.splitlines():
        if re.match(r"^\d+ ", line) or line.startswith(("FileNames", "FunctionNames", "FileLocations", "StackFrames")):
            continue  # the tables of source files, functions and frames
        line = re.sub(r", metadata=\{[^}]*\}", "", line)
        line = re.sub(r",? ?stack_frame_id=\d+", "", line)
        line = re.sub(r"%[A-Za-z_0-9.-]+", "%v", line)  # instruction and computation names
        line = re.sub(r"([(,] ?)([a-z_]+)\.\d+:", r"\1\2:", line)  # parameter names in signatures
        line = re.sub(r"^[a-z_0-9.]+ ", "name ", line)
        lines.append(line)
    out[name] = "\n".join(line for line in lines if line.strip())
print(json.dumps(out))
"""


def compile_in(source: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(source), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(CONFIGS)], capture_output=True, text=True, env=env, cwd=source
    )
    if result.returncode != 0:
        raise RuntimeError(f"compiling in {source} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def export(revision: str, directory: Path) -> None:
    archive = subprocess.run(["git", "archive", revision, "purebp"], capture_output=True, cwd=ROOT, check=True)
    with tarfile.open(fileobj=__import__("io").BytesIO(archive.stdout)) as tar:
        tar.extractall(directory, filter="data")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare with (default %(default)s)")
    parser.add_argument("--out", default=str(RESULTS / "same_program.md"))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    with tempfile.TemporaryDirectory() as tmp:
        export(args.baseline, Path(tmp))
        before = compile_in(Path(tmp))
    now = compile_in(ROOT)
    control = next(name for name in now if name.startswith("control"))
    control_differs = now[control] != now[CONFIGS[0][0]]
    rows, all_same = [], control_differs
    for name, *_ in CONFIGS:
        same = before[name] == now[name]
        all_same &= same
        digest = hashlib.sha256(now[name].encode()).hexdigest()[:12]
        rows.append(f"| {name} | {len(before[name].splitlines())} | {len(now[name].splitlines())} | "
                    f"{'identical' if same else 'DIFFERENT'} | {digest} |")  # fmt: skip
    text = "\n".join(
        [
            "# The MLP's compiled gradient program, before and after the layer engine",
            "",
            f"Machine: {platform.machine()} {platform.processor() or ''}, jax {jax.__version__}, backend cpu. "
            f"Baseline {args.baseline}, now {commit.strip()} (working tree). Command: "
            "`python -m experiments.same_program`.",
            "",
            "Optimized HLO of `purebp.value_and_grad`'s program (float32, batch 128), compiled in two fresh "
            "processes, compared after removing names, source locations and stack frames.",
            "",
            "| network | HLO lines before | HLO lines now | program | sha256 (now, normalized) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Control: the first network with reduction='sum' instead of 'mean' compiles to a "
            f"{'different' if control_differs else 'SAME (the comparison is blind)'} program "
            f"({len(now[control].splitlines())} lines), so the normalization keeps real changes visible.",
            "",
            "Verdict: " + ("the same program for every network." if all_same else "NOT the same programs."),
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
