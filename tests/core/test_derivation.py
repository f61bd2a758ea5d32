"""The map from the notes to the code stays true, and the oracles stay independent."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_every_equation_tag_in_derivation_is_on_a_line_of_the_backward_pass():
    tags = set(re.findall(r"\(BP\d\)", (ROOT / "reference" / "DERIVATION.md").read_text()))
    assert tags == {"(BP1)", "(BP2)", "(BP3)", "(BP4)"}
    # the backward pass is the engine (backprop.py: the output delta, BP1) and the dense layer's rule (BP1-BP4)
    code = "\n".join((ROOT / "purebp" / name).read_text() for name in ("engine.py", "layers/dense.py"))
    for tag in tags:
        assert re.search(rf"#.*{re.escape(tag)}", code), f"{tag} is no longer named in the backward pass"


def test_oracles_share_no_code_with_purebp():
    for path in (ROOT / "reference").glob("*.py"):
        assert not imported_modules(path) & {"purebp", "jax"}, path


def test_library_never_imports_reference_tests_or_experiments():
    for path in (ROOT / "purebp").rglob("*.py"):
        assert not imported_modules(path) & {"reference", "tests", "experiments"}, path
