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
