"""The house's structure: floors of imports, an engine that knows no wing, autodiff only in the witnesses.

Each module of purebp has a floor; a module may import only modules on its own floor or below. The engine
imports only layers, activations, losses, the network, the input checks (and the program cache). Autodiff
(jax.grad, vjp, jvp, ...) is called only by the witnesses: check.py, testing.py and kit/.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "purebp"

# floor of each module (dotted, without the leading "purebp."); a package's modules share its floor
FLOORS = {
    "programs": 0,
    "version": 0,
    "data": 0,
    "activations": 1,
    "losses": 2,
    "layers": 3,
    "network": 4,
    "inputs": 5,
    "engine": 6,
    "check": 7,
    "registry": 8,
    "extras": 9,
    "kit": 9,
    "testing": 10,  # re-exports the kit: from purebp.testing import check_backprop
    "train": 10,
    "cli": 11,
    "__init__": 12,
}
ENGINE_MAY_IMPORT = {"activations", "losses", "layers", "network", "inputs", "programs"}
WITNESSES = ("check.py", "testing.py")
AUTODIFF = {"grad", "vjp", "jvp", "value_and_grad", "linearize", "jacrev", "jacfwd", "hessian", "custom_vjp",
            "custom_jvp"}  # fmt: skip


def _modules() -> list[pathlib.Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: pathlib.Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _floor(module: str) -> int:
    head = module.split(".")[0]
    if head not in FLOORS:
        raise AssertionError(f"purebp.{module} has no floor in tests/core/test_structure.py: give it one")
    return FLOORS[head]


def _imports(path: pathlib.Path) -> list[tuple[str, int]]:
    """(imported purebp module, line) for every import of purebp in the file, module-level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "purebp":
            base = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:
                target = f"{base}.{alias.name}" if base else alias.name
                if not base and target not in FLOORS:  # from purebp import __version__ and the like
                    target = "__init__"
                found.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("purebp."):
                    found.append((alias.name.split(".", 1)[1], node.lineno))
    return found


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_module_imports_a_higher_floor(path):
    module = _name(path)
    here = _floor(module)
    for target, line in _imports(path):
        assert _floor(target) <= here, (
            f"purebp/{path.relative_to(PACKAGE)}:{line} (floor {here}) imports purebp.{target} (floor {_floor(target)})"
        )


def test_the_engine_knows_no_wing():
    imported = {target.split(".")[0] for target, _ in _imports(PACKAGE / "engine.py")}
    assert imported <= ENGINE_MAY_IMPORT, f"the engine imports {sorted(imported - ENGINE_MAY_IMPORT)}"


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_autodiff_only_in_the_witnesses(path):
    relative = path.relative_to(PACKAGE)
    if (relative.name in WITNESSES and len(relative.parts) == 1) or relative.parts[0] == "kit":
        pytest.skip("a witness: autodiff is its job")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr in AUTODIFF:
            value = node.value
            assert not (isinstance(value, ast.Name) and value.id == "jax"), (
                f"purebp/{relative}:{node.lineno} calls jax.{node.attr}: backward rules are written by hand"
            )
        if isinstance(node, ast.ImportFrom) and node.module == "jax":
            names = {alias.name for alias in node.names} & AUTODIFF
            assert not names, f"purebp/{relative}:{node.lineno} imports {sorted(names)} from jax"


def test_the_floors_cover_every_module():
    for path in _modules():
        _floor(_name(path))


def test_a_higher_import_is_caught(tmp_path):
    # the checker itself can fail: an engine that imports a wing is reported
    fake = tmp_path / "engine.py"
    fake.write_text("from purebp.extras import rules as _rules\n")
    assert [target for target, _ in _imports(fake)] == ["extras.rules"]
    assert _floor("extras.rules") > _floor("engine")
