"""What the image-preparation tests set for themselves stays with them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_numba_disable_jit_does_not_leak_into_the_rest_of_the_session(tmp_path: Path) -> None:
    """The prep tests run pymatting without numba's JIT; a test collected after them in the
    same session (here a probe outside tests/prep) must see the environment it was given.
    Was: tests/prep/conftest.py set it at import, i.e. for the whole session."""
    probe = tmp_path / "test_probe.py"
    probe.write_text("import os\n\n\ndef test_probe():\n    assert 'NUMBA_DISABLE_JIT' not in os.environ\n")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_DISABLE_JIT"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
         "-c", str(REPO / "pyproject.toml"), "--basetemp", str(tmp_path / "session"),
         "tests/prep/test_session_isolation.py::test_prep_tests_run_numba_without_jit", str(probe)],
        cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout


def test_prep_tests_run_numba_without_jit() -> None:
    assert os.environ.get("NUMBA_DISABLE_JIT") == "1"
