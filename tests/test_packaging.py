"""``python -m build`` makes a wheel and an sdist that install into a clean venv and run the demo."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

import ubdcow

ROOT = Path(__file__).parent.parent


def test_the_version_lives_in_one_place():
    assert re.search(r'^__version__ = "[0-9]+\.[0-9]+\.[0-9]+"$', (ROOT / "ubdcow" / "__init__.py").read_text(), re.M)
    assert "version = attr: ubdcow.__version__" in (ROOT / "setup.cfg").read_text()
    assert f"## {ubdcow.__version__}" in (ROOT / "docs" / "changelog.md").read_text()
    assert (ROOT / "ubdcow" / "py.typed").exists()


@pytest.mark.slow
def test_wheel_and_sdist_install_into_a_clean_venv_and_run_the_demo(tmp_path):
    try:
        import build
    except ImportError:  # in the [test] extra: ``make test`` installs it
        build = None
    require(build, "the 'build' package is not installed (pip install build)")
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], check=True,
                   capture_output=True, timeout=600)
    wheel = next(dist.glob("ubdcow-*.whl"))
    sdist = next(dist.glob("ubdcow-*.tar.gz"))
    for artifact in (wheel, sdist):
        venv = tmp_path / f"venv-{artifact.suffix.strip('.')}"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(artifact)],
                             capture_output=True, text=True, timeout=900)
        assert pip.returncode == 0, pip.stderr[-3000:]
        demo = subprocess.run([str(venv / "bin" / "python"), "-m", "ubdcow", "demo"], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert demo.returncode == 0, demo.stderr
        assert "all checks passed" in demo.stdout
        version = subprocess.run([str(venv / "bin" / "ubdcow"), "--version"], capture_output=True, text=True)
        assert version.stdout.strip() == f"ubdcow {ubdcow.__version__}"


def test_python_m_ubdcow_without_its_dependencies_says_what_to_do_in_one_line(tmp_path):
    """Issue 21, item 11: the source folder run by a Python that lacks construct and numpy: one line, exit 1."""
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=300)
    python = bare / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import construct"], capture_output=True)
    assert probe.returncode != 0  # a Python without ubdcow's dependencies
    for cwd, env in ((ROOT, None), (tmp_path, {"PYTHONPATH": str(ROOT)})):
        proc = subprocess.run([str(python), "-m", "ubdcow", "info", "overlay.cow"], cwd=cwd, capture_output=True,
                              text=True, timeout=60, env=env)
        assert proc.returncode == 1 and proc.stdout == ""
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("ubdcow: the Python packages construct, numpy, tqdm that ubdcow needs are not "
                                   f"installed for {python}")
        assert ".venv/bin/ubdcow" in lines[0] and "pip install ." in lines[0]
    # imported as a library, it is an ImportError with the same words
    proc = subprocess.run([str(python), "-c", "import ubdcow"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "ImportError: the Python packages construct" in proc.stderr


@pytest.mark.slow
def test_make_demo_installs_only_what_the_library_needs(tmp_path):
    """Issue 21, item 12: make demo installs ubdcow and its runtime dependencies, not the test and lint extras."""
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-C", str(ROOT), "demo", f"VENV={venv}", f"PYTHON={sys.executable}"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "demo: all checks passed" in proc.stdout
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
                            capture_output=True, text=True, check=True).stdout.lower()
    names = {line.split("==")[0] for line in listed.splitlines()}
    assert {"ubdcow", "construct", "numpy", "tqdm"} <= names
    assert not names & {"pytest", "hypothesis", "pytest-benchmark", "build", "ruff", "mypy", "atheris"}, names
