"""The documentation's examples run: docs/api.md's code blocks, in order, and the README's."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

import pytest
import test_oracle_model as spec
from conftest import run_cli

from ubdcow.cli.app import build_parser

ROOT = Path(__file__).parent.parent
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def run_blocks(sources: list[str], folder: Path, monkeypatch: pytest.MonkeyPatch,
               namespace: dict[str, object] | None = None) -> str:
    """Run the blocks in order in one namespace (``namespace``, if given, keeps their variables)."""
    monkeypatch.chdir(folder)
    namespace = {} if namespace is None else namespace
    namespace["__name__"] = "__docs__"
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
    for line in ("['etc', 'lost+found', 'name']", "symlink etc/hostname 0o777", "b'pc1\\n'", "b'c1'",
                 "pc1.cow: /etc/passwd: no such file or directory",  # the filesystem reader's example
                 "modified file /etc/hostname ('content',)", "[1, 0]"):  # changes
        assert line in printed.splitlines(), line


def test_readme_library_example_runs(tmp_path, monkeypatch):
    assert run_cli("demo", "--keep", tmp_path).returncode == 0  # leaves overlay.cow and its backing
    sources = blocks(ROOT / "README.md")
    assert sources
    namespace: dict[str, object] = {}
    printed = run_blocks(sources, tmp_path, monkeypatch, namespace).splitlines()
    # judged by the model (tests/test_oracle_model.py: the spec's offsets and bits, no ubdcow code)
    cow = tmp_path / "overlay.cow"
    header = spec.read_header(cow)
    backing = Path(header.backing_file)
    cow_bytes = spec.cow_bytes(cow)
    expected = spec.disk(cow, backing)
    assert 0 < cow_bytes < header.size
    assert printed[0] == f"{cow_bytes} True"  # facts["cow_bytes"], facts["backing"]["mtime_matches"]
    merged_cow, merged_backing, holes = map(int, printed[1].split())
    assert (merged_cow, merged_backing) == (cow_bytes, header.size - cow_bytes)
    flat = tmp_path / "flat.img"
    assert flat.read_bytes() == expected
    assert holes == sum(b - a for a, b in spec.hole_ranges(flat))
    assert len(printed) == 2
    assert namespace["mbr"] == expected[:512]
    set_bits = spec.bits(cow)
    assert namespace["written"] == [(512 * first, min(512 * count, header.size - 512 * first), "cow")
                                    for first, count in spec.runs(set_bits)]


def test_readme_quick_start_commands_exist():
    readme = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, re.M)
    assert "/ubdcow demo" in makefile


def test_readme_qcow2_line_backs_holes():
    """Issue 21, item 9: a thin qcow2 needs --backing-holes (docs/serve.md), so the README's line has it."""
    lines = [line for line in (ROOT / "README.md").read_text().splitlines() if "convert -O qcow2" in line]
    assert lines and all("--backing-holes" in line and "-B " in line for line in lines), lines


def test_serve_docs_say_what_agrees_with_map():
    """Issue 21, item 10: NBD's extents are not map's ranges; the docs say what agrees, and name the test."""
    text = (ROOT / "docs" / "serve.md").read_text()
    assert "They agree with `ubdcow map`" not in text
    assert "map's `zero` extents plus the holes of the\n  backing file" in text
    for test in re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", text):
        assert f"def {test[1]}(" in (ROOT / test[0]).read_text(), test


def test_readme_says_how_to_run_the_installed_command_line():
    """Issue 21, item 11: the README's command lines name the installed ubdcow, and say where it is."""
    readme = (ROOT / "README.md").read_text()
    assert ".venv/bin/ubdcow" in readme and ". .venv/bin/activate" in readme
    block = readme[readme.index("## The command line at a glance"):readme.index("## The library")]
    commands = [line.strip() for line in block.splitlines() if line.startswith("    ")]
    assert len(commands) == 19 and all(line.startswith("ubdcow ") for line in commands), commands
    assert "python -m ubdcow" not in block
    parser = build_parser()
    for line in commands:  # each parses with the real parser (the shell's quoting and pipes aside)
        words = shlex.split(line.split("#")[0].split("|")[0])
        parser.parse_args(words[1:])


def test_merge_json_keys_are_all_documented(tmp_path):
    """Issue 21, item 15: docs/cli.md's list of merge's JSON keys names every key merge --json prints."""
    assert run_cli("demo", "--keep", tmp_path).returncode == 0
    proc = run_cli("merge", tmp_path / "overlay.cow", "-o", tmp_path / "flat.img", "--json")
    assert proc.returncode == 0, proc.stderr
    printed = set(json.loads(proc.stdout))
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text[text.index("\n## merge\n"):text.index("\n## compare\n")]
    listed = section[section.index("**JSON** keys:"):]
    documented = set(re.findall(r"`([a-z_]+)`", listed)) & printed
    assert printed - {"exit_code"} <= documented, printed - documented
