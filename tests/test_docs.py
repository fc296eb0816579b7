"""The documentation's examples run: docs/api.md's code blocks, in order, and the README's."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def run_blocks(sources: list[str], folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.chdir(folder)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for i, source in enumerate(sources):
            code = compile(source, f"<block {i + 1}>", "exec")
            exec(code, namespace)
    return out.getvalue()


def test_api_examples_run(tmp_path, monkeypatch):
    sources = blocks(ROOT / "docs" / "api.md")
    assert len(sources) >= 8
    printed = run_blocks(sources, tmp_path, monkeypatch)
    assert "v3 8388608 12288" in printed
    assert "not a UML COW file" in printed


def test_readme_library_example_runs(tmp_path, monkeypatch):
    assert run_cli("demo", "--keep", tmp_path).returncode == 0  # leaves overlay.cow and its backing
    sources = blocks(ROOT / "README.md")
    assert sources
    run_blocks(sources, tmp_path, monkeypatch)


def test_readme_quick_start_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M)
    assert "python -m ubdcow demo" in makefile
