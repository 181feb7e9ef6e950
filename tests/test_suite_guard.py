"""The suite cannot go green without running anything (the guard in tests/conftest.py)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def run_suite(tmp_path: Path, test_source: str, *args: str) -> int:
    """Run pytest on a one-file suite that uses our conftest; return its exit code."""
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(test_source)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            "-c",
            "/dev/null",
            str(tmp_path),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result.returncode


PASSING = "def test_ok():\n    assert 1 + 1 == 2\n"
SKIPPING = "import pytest\n\n@pytest.mark.skip(reason='x')\ndef test_skipped():\n    pass\n"


def test_a_passing_suite_is_green(tmp_path):
    assert run_suite(tmp_path, PASSING) == 0


def test_nothing_collected_fails(tmp_path):
    assert run_suite(tmp_path, PASSING, "-k", "no_test_has_this_name") == pytest.ExitCode.NO_TESTS_COLLECTED


def test_everything_skipped_fails(tmp_path):
    assert run_suite(tmp_path, SKIPPING) == pytest.ExitCode.TESTS_FAILED
