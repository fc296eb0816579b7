"""The suite cleans up after itself (issue 21, item 14): its temporary files go to one folder per run, and a
run that leaves anything there fails."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from test_fuzz import load_harness

TESTS = Path(__file__).parent


def _pytest(folder: Path, body: str) -> subprocess.CompletedProcess[str]:
    """Run one test file with the suite's conftest as a plugin (its run folder and its check)."""
    (folder / "test_one.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           f"--basetemp={folder / 'basetemp'}",
                           "test_one.py"], cwd=folder, capture_output=True, text=True, timeout=300, env=env)


def test_a_run_that_leaves_a_temporary_file_fails(tmp_path: Path) -> None:
    leak = _pytest(tmp_path, "import os, tempfile\n\ndef test_leak():\n"
                             "    open(os.path.join(tempfile.gettempdir(), 'leak.txt'), 'w').close()\n"
                             "    assert os.environ['TMPDIR'] == tempfile.gettempdir()\n")
    assert leak.returncode != 0, leak.stdout
    assert "the tests left files in the temporary folder" in leak.stdout and "leak.txt" in leak.stdout, leak.stdout
    clean = _pytest(tmp_path, "import subprocess, tempfile\n\ndef test_clean():\n"
                              "    with tempfile.TemporaryDirectory():\n        pass\n"
                              "    subprocess.run(['mktemp', '-d'], check=True)  # a subprocess's too\n")
    assert clean.returncode != 0 and "tmp." in clean.stdout, clean.stdout  # mktemp's folder is seen
    tidy = _pytest(tmp_path, "import tempfile\n\ndef test_tidy():\n    with tempfile.TemporaryDirectory():\n"
                             "        pass\n")
    assert tidy.returncode == 0, tidy.stdout


def test_this_run_has_its_own_temporary_folder() -> None:
    assert os.environ["TMPDIR"] == tempfile.gettempdir()
    assert os.path.basename(tempfile.gettempdir()).startswith("ubdcow-tests-")


def test_the_fuzz_harness_leaves_no_folder() -> None:
    before = set(os.listdir(tempfile.gettempdir()))
    module = load_harness("fuzz_open_read.py")
    try:
        module.test_one_input(b"not a cow file")
        assert set(os.listdir(tempfile.gettempdir())) == before  # its files are unlinked from the start
    finally:
        for fd in module._fds:
            os.close(fd)
