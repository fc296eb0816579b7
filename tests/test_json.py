"""One JSON convention for every command (issue 21), checked against the schema docs/cli.md writes down.

For every command of ``COMMANDS`` (a new command fails here until it has its scenarios and its row in
docs/cli.md's "JSON output" table), with ``--json``: success and failure, one file and several, and a usage
error. Each run's stdout must be exactly one JSON document whose keys are the documented ones; failures carry
``error``, ``hint`` and ``exit_code``; the input is ``disk`` everywhere; stderr keeps the human line.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st
from support.nbdlab import require_nbd

from ubdcow.cli.app import COMMANDS
from ubdcow.cli.base import indented_json

DOC = Path(__file__).parent.parent / "docs" / "cli.md"
ERROR_KEYS = {"error", "hint", "exit_code"}


def schema() -> dict[str, tuple[set[str], set[str]]]:
    """docs/cli.md's table: command -> (the success document's keys, the keys of each element of ``disks``)."""
    text = DOC.read_text()
    section = text[text.index("\n## JSON output\n"):]
    section = section[: section.index("\n## ", 5)]
    table = {}
    for row in re.findall(r"^\| `(\w+)` \| (.*?) \| (.*?) \|$", section, re.M):
        name, top, disks = row
        table[name] = (set(re.findall(r"`(\w+)`", top)), set(re.findall(r"`(\w+)`", disks)))
    return table


@dataclass
class Scenario:
    """The command lines of one command (``{d}``: the demo folder); ``several``: it takes several COW files."""

    ok: list[str]
    fail: list[str] | None
    several: bool = False
    ok_code: int = 0
    needs: tuple[str, ...] = ()
    fail_shape: str = "error"  # "error": {error, hint, exit_code}; "document": the success shape, exit 1
    stream: str = "stdout"  # where the document goes ("stderr": cat, whose stdout carries the bytes)
    extra: dict[str, Any] = field(default_factory=dict)


SCENARIOS: dict[str, Scenario] = {
    "info": Scenario(["info", "{d}/overlay.cow"], ["info", "{d}/missing.cow"], several=True),
    "create": Scenario(["create", "{d}/new.cow", "{d}/backing.img"], ["create", "{d}/overlay.cow", "{d}/backing.img"]),
    "merge": Scenario(["merge", "{d}/overlay.cow", "-o", "{d}/flat.img"], ["merge", "{d}/missing.cow"]),
    "map": Scenario(["map", "{d}/overlay.cow"], ["map", "{d}/missing.cow"], several=True),
    "check": Scenario(["check", "{d}/overlay.cow"], ["check", "{d}/missing.cow"], several=True),
    "compare": Scenario(["compare", "{d}/overlay.cow", "{d}/merged.img"],
                        ["compare", "{d}/missing.cow", "{d}/merged.img"]),
    "rebase": Scenario(["rebase", "--unsafe", "{d}/overlay.cow", "--backing", "{d}/backing.img"],
                       ["rebase", "{d}/missing.cow", "--backing", "{d}/backing.img"]),
    "diff": Scenario(["diff", "{d}/backing.img", "{d}/merged.img", "-o", "{d}/thin.cow"],
                     ["diff", "{d}/backing.img", "{d}/missing.img", "-o", "{d}/thin2.cow"]),
    "convert": Scenario(["convert", "{d}/overlay.cow", "-o", "{d}/v2.cow", "--layout", "v2"],
                        ["convert", "{d}/missing.cow", "-o", "{d}/v2b.cow"]),
    "serve": Scenario(["serve", "{d}/overlay.cow", "--run", "true"], ["serve", "{d}/missing.cow"],
                      needs=("nbdkit",)),
    "du": Scenario(["du", "{d}"], ["du", "{d}", "{d}/missing"], fail_shape="document"),
    "compact": Scenario(["compact", "--dry-run", "{d}/overlay.cow"], ["compact", "{d}/missing.cow"], several=True),
    "changes": Scenario(["changes", "{d}/overlay.cow"], ["changes", "{d}/missing.cow"], several=True,
                        extra={"prepare": "filesystem"}),
    "demo": Scenario(["demo"], None),
    "ls": Scenario(["ls", "{d}/fs.img", "/etc"], ["ls", "{d}/missing.cow"]),
    "cat": Scenario(["cat", "{d}/fs.img", "/etc/hostname"], ["cat", "{d}/missing.cow", "/etc/hostname"],
                    stream="stderr"),
    "get": Scenario(["get", "{d}/fs.img", "/etc", "-o", "{d}/etc-copy"],
                    ["get", "{d}/missing.cow", "/", "-o", "{d}/x"]),
    "mount": Scenario(["mount", "{d}/fs.img", "{d}/mnt"], ["mount", "{d}/missing.img", "{d}/mnt"],
                      extra={"setup": lambda d: _fs_lab(d), "cleanup": lambda d: _fs_lab_down(d)}),
    "umount": Scenario(["umount", "{d}/mnt-u"], ["umount", "{d}/missing"],
                       extra={"setup": lambda d: _fs_lab(d, mounted="mnt-u"), "cleanup": lambda d: _fs_lab_down(d),
                              "disks": ["{d}/fs.img"]}),
}


def _fs_lab(folder: Path, mounted: str | None = None) -> None:
    """mount and umount: a filesystem image in the lab, an empty folder for it (and one mounted already)."""
    from support.fuselab import require_fuse, small_image

    require_fuse()
    shutil.move(small_image(folder / "fs-tree", {"etc/hostname": (b"pc1\n", 0o644)}), folder / "fs.img")
    (folder / "mnt").mkdir()
    if mounted is not None:
        (folder / mounted).mkdir()
        assert run_cli("mount", folder / "fs.img", folder / mounted).returncode == 0


def _fs_lab_down(folder: Path) -> None:
    from support.fuselab import take_down

    for name in ("mnt", "mnt-u"):
        take_down(folder / name)


def filesystem_overlay(folder: Path) -> None:
    """For ``changes``: overlay.cow becomes an overlay on the lab's ext4 model ``fs.img`` (mkfs.ext4 -d)."""
    import ubdcow

    (folder / "overlay.cow").unlink()
    ubdcow.create(folder / "overlay.cow", folder / "fs.img")


def test_every_command_has_scenarios_and_a_documented_schema() -> None:
    names = {c.name for c in COMMANDS}
    assert set(SCENARIOS) == names, "a command without JSON scenarios here"
    assert set(schema()) == names, "a command without its row in docs/cli.md's JSON output table"


def _json(argv: list[str], folder: Path, code: int | None = None, stream: str = "stdout") -> tuple[dict[str, Any], str]:
    proc = run_cli(*[a.format(d=folder) for a in argv], "--json")
    text = proc.stdout.decode()
    if stream == "stderr":  # the human lines, then the document
        lines = proc.stderr.decode().splitlines(keepends=True)
        start = next(i for i, line in enumerate(lines) if line.startswith("{"))
        text, err = "".join(lines[start:]), "".join(lines[:start])
        proc = subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, err.encode())
    doc = json.loads(text)  # exactly one document: json.loads refuses anything after it
    assert isinstance(doc, dict), doc
    if not (argv[0] == "serve" and "uri" in doc):  # serve's ready line is printed before it knows its exit code
        assert doc["exit_code"] == proc.returncode, (doc, proc.returncode)
    if code is not None:
        assert proc.returncode == code, (argv, proc.returncode, proc.stderr)
    return doc, proc.stderr.decode()


@pytest.fixture
def lab(tmp_path: Path) -> Path:
    assert run_cli("demo", "--keep", tmp_path).returncode == 0
    (tmp_path / "tree" / "etc").mkdir(parents=True)  # and a filesystem, for the file-level commands
    (tmp_path / "tree" / "etc" / "hostname").write_text("pc1\n")
    subprocess.run([require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-d", tmp_path / "tree", tmp_path / "fs.img", "4M"],
                   check=True, capture_output=True)  # fmt: skip
    return tmp_path


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_json_documents_follow_the_schema(name: str, lab: Path, request: pytest.FixtureRequest) -> None:
    scenario = SCENARIOS[name]
    for tool in scenario.needs:
        require_nbd(tool)
    if scenario.extra.get("prepare") == "filesystem":
        filesystem_overlay(lab)
    if "setup" in scenario.extra:  # (mount and umount: a filesystem image, and mounts taken away afterwards)
        request.addfinalizer(lambda: scenario.extra["cleanup"](lab))
        scenario.extra["setup"](lab)
    top, per_disk = schema()[name]
    error_code = {c.name: c.error_code for c in COMMANDS}[name]

    def check_success(doc: dict[str, Any], count: int) -> None:
        assert set(doc) == top, (name, set(doc) ^ top)
        if "disks" in top:
            assert len(doc["disks"]) == count
            for element in doc["disks"]:
                assert set(element) == per_disk, (name, set(element) ^ per_disk)
                assert element["disk"] == str(lab / "overlay.cow")
        elif "disk" in top:
            assert doc["disk"] in {a.format(d=lab) for a in [*scenario.ok, *scenario.extra.get("disks", [])]}
        for key in ("seconds",):  # durations are unrounded floats, sizes integers
            if key in doc:
                assert isinstance(doc[key], float)
        for key, value in doc.items():
            if key.endswith(("_bytes", "_size")) and value is not None:
                assert isinstance(value, int) and not isinstance(value, bool), (key, value)

    doc, _ = _json(scenario.ok, lab, scenario.ok_code, scenario.stream)
    check_success(doc, 1)
    if scenario.several:
        doc, _ = _json(scenario.ok + [scenario.ok[-1]], lab, scenario.ok_code)
        check_success(doc, 2)
    if scenario.fail is not None:
        doc, err = _json(scenario.fail, lab, stream=scenario.stream)
        assert doc["exit_code"] != 0
        assert err.startswith("ubdcow: "), err  # stderr keeps the one-line human message
        if scenario.several:  # one failing file: the same shape as several
            assert set(doc) == {"disks", "exit_code"}
            (element,) = doc["disks"]
            assert set(element) == {"disk"} | ERROR_KEYS
            assert element["disk"] == str(lab / "missing.cow")
            assert "missing.cow" not in element["error"], "the error repeats the file name"
            assert element["error"] in err
            # and several, one of them failing: each file its element, the worst exit code
            doc, err = _json(scenario.ok + [scenario.fail[-1]], lab)
            assert [set(e) for e in doc["disks"]] == [per_disk, {"disk"} | ERROR_KEYS]
            assert doc["exit_code"] == doc["disks"][1]["exit_code"] == error_code
        elif scenario.fail_shape == "document":
            assert set(doc) == top and doc["exit_code"] == 1
        else:
            assert set(doc) == ERROR_KEYS, doc
            assert f"ubdcow: {doc['error']}" == err.splitlines()[0]
            assert doc["hint"] is None or f"hint: {doc['hint']}" in err
    # a usage error under --json: the error document too, exit 2, and the command's own usage on stderr
    doc, err = _json([*scenario.ok, "--no-such-option"], lab, 2)
    assert set(doc) == ERROR_KEYS and doc["error"] == f"ubdcow {name}: unrecognized arguments: --no-such-option"
    assert err.startswith(f"usage: ubdcow {name} ")


def test_serve_json_goes_to_stdout_even_with_run(lab: Path) -> None:
    require_nbd("nbdkit")
    proc = run_cli("serve", lab / "overlay.cow", "--json", "--run", "echo from-the-command")
    assert proc.returncode == 0, proc.stderr
    first, rest = proc.stdout.decode().split("\n", 1)
    ready = json.loads(first)
    assert ready["disk"] == str(lab / "overlay.cow") and ready["uri"].startswith("nbd+unix://")
    assert rest == "from-the-command\n"  # the command's output follows the one document
    assert proc.stderr == b""


def test_demo_json_names_no_deleted_folder(lab: Path, tmp_path: Path) -> None:
    doc, _ = _json(["demo"], lab, 0)
    assert doc["folder"] is None and doc["ok"] is True
    kept = tmp_path / "kept"
    doc, _ = _json(["demo", "--keep", str(kept)], lab, 0)
    assert doc["folder"] == str(kept) and (kept / "overlay.cow").exists()


def test_compact_seconds_are_not_rounded(lab: Path) -> None:
    shutil.copy(lab / "overlay.cow", lab / "c.cow")
    doc, _ = _json(["compact", "{d}/c.cow"], lab, 0)
    seconds = doc["disks"][0]["seconds"]
    assert isinstance(seconds, float) and seconds > 0 and seconds != round(seconds, 3)


_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.sampled_from([2**80, -0.0, "é\u2028\"\\"])
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=4)
    | st.tuples(inner, inner)
    | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    | st.dictionaries(st.integers(), inner, min_size=1, max_size=2),
    max_leaves=30,
)


@settings(max_examples=400)
@given(_VALUES)
def test_every_document_is_written_as_json_dumps_indent_2_writes_it(value: Any) -> None:
    """Output.dump's encoder (the fast one, or json.dumps for what it leaves to it) writes what json.dumps does."""
    assert indented_json(value) == json.dumps(value, indent=2)
