"""The suite's two tiers: `python -m pytest` leaves `slow` tests out and never starts their background runs;
`python -m pytest -m slow` runs them (a command-line -m replaces the one in addopts).

Checked on a scratch project that has this repository's pytest settings (pyproject.toml's
[tool.pytest.ini_options], verbatim) and its tests/conftest.py, with one slow test whose background run
leaves a file behind and one default test.
"""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import sys
from pathlib import Path

import pytest

RAN = Path(__file__).resolve().parents[1] / "slow run ran"
RUN = dict(command=[sys.executable, "-c", f"open({str(RAN)!r}, 'w').close()"], timeout=60)


@pytest.mark.slow
@pytest.mark.background("a slow run", **RUN)
def test_slow(background):
    assert background.result("a slow run", **RUN).process.returncode == 0
    assert RAN.exists()


def test_default(background):
    assert "a slow run" not in background._specs, "a deselected slow test's run was queued"
"""


def pytest_settings() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r"^\[tool\.pytest\.ini_options\]\n.*?(?=^\[)", text, re.S | re.M).group(0)


def run_pytest(project: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    return subprocess.run(command, cwd=project, capture_output=True, text=True, timeout=300)


def test_default_tier_leaves_slow_out_and_dash_m_slow_runs_it(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "pyproject.toml").write_text(pytest_settings())
    (tmp_path / "tests" / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "tests" / "test_probe.py").write_text(PROBE)

    default = run_pytest(tmp_path)
    assert default.returncode == 0, default.stdout + default.stderr
    assert "1 passed, 1 deselected" in default.stdout, default.stdout
    assert not (tmp_path / "slow run ran").exists(), "the default tier started a slow test's background run"

    slow = run_pytest(tmp_path, "-m", "slow")
    assert slow.returncode == 0, slow.stdout + slow.stderr
    assert "1 passed, 1 deselected" in slow.stdout, slow.stdout
    assert (tmp_path / "slow run ran").exists(), "-m slow did not run the slow test's background run"
