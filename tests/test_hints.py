"""Every hint names a command line that works (issue 21, items 1 and 2).

Each error path of the command line that prints a hint is driven here, in process (``ubdcow.cli.main``), on
real files. Every ``ubdcow COMMAND ...`` line in a hint is parsed by that command's real parser (no
"ambiguous option", no unknown option); no option is named outside such a line; a hint for the command that
failed carries every option the user gave. And every place the library makes a hint is reached by some
scenario here: a new hint without a scenario fails the test.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool, run_cli, unpack_case
from support.nbdlab import require_nbd

import ubdcow
import ubdcow.errors
from ubdcow.cli.app import ArgumentError, build_parser, main

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "ubdcow"
#: hint sites no command line reaches (the library's API only), with the reason
API_ONLY = {
    ("_pagewrite.py", "UnrecordableWriteError"): "CowImage.pwrite past a v1/v2 bitmap: the CLI's writers (rebase, "
    "check --repair, compact, serve) refuse such files before writing, with their own hint",
}
COMMAND = re.compile(r"ubdcow ([a-z]+)((?: [^\s;()]+)*)")


def hint_sites() -> dict[tuple[str, int, int], str]:
    """Every call in ubdcow/ that passes a ``hint=`` or ``fixes=``: (file, first line, last line) -> the callee."""
    sites = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and any(k.arg in ("hint", "fixes") for k in node.keywords):
                if any(k.arg == "hint" and isinstance(k.value, ast.Constant) and k.value.value is None
                       for k in node.keywords) and not any(k.arg == "fixes" for k in node.keywords):
                    continue
                callee = ast.unparse(node.func)
                if callee in ("super().__init__", "type(exc)") and path.name == "errors.py":
                    continue
                sites[(str(path.relative_to(PACKAGE)), node.lineno, node.end_lineno or node.lineno)] = callee
    return sites


@contextlib.contextmanager
def recording() -> Iterator[set[tuple[str, int]]]:
    """The (file, line) in ubdcow/ of every UbdCowError made with a hint while the block runs."""
    hit: set[tuple[str, int]] = set()
    original = ubdcow.errors.UbdCowError.__init__

    def init(self, filename, message, *, hint=None, fixes=()):  # type: ignore[no-untyped-def]
        if hint or fixes:
            for frame in reversed(traceback.extract_stack()[:-1]):
                path = Path(frame.filename)
                if PACKAGE in path.parents and path.name != "errors.py":
                    hit.add((str(path.relative_to(PACKAGE)), frame.lineno or 0))
                    break
        original(self, filename, message, hint=hint, fixes=fixes)

    ubdcow.errors.UbdCowError.__init__ = init  # type: ignore[method-assign]
    try:
        yield hit
    finally:
        ubdcow.errors.UbdCowError.__init__ = original  # type: ignore[method-assign]


def run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def hints_of(stdout: str, stderr: str) -> list[str]:
    """The hints a run printed: ``hint:`` lines, compact's ``note:``, convert's ``warning:``, JSON ``hint``s."""
    found = [line for text in (stdout, stderr) for line in text.splitlines()
             if line.startswith(("hint: ", "note: ", "warning: "))]
    with contextlib.suppress(ValueError):
        doc = json.loads(stdout)

        def walk(value: object) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    if key == "hint" and isinstance(item, str):
                        found.append("hint: " + item)
                    walk(item)
            elif isinstance(value, list):
                for item in value:
                    walk(item)

        walk(doc)
    return found


def parse(words: list[str]) -> object:
    """``ubdcow WORDS`` through the real parser: a usage error fails the test."""
    try:
        return build_parser().parse_args(words)
    except ArgumentError as exc:
        raise AssertionError(f"the hinted command line does not parse: ubdcow {shlex.join(words)}: {exc}") from None


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    assert run_cli("demo", "--keep", tmp_path).returncode == 0
    monkeypatch.chdir(tmp_path)
    ubdcow.create("lost.cow", "backing.img")  # then its backing file moves away
    shutil.copy2("backing.img", "elsewhere.img")
    ubdcow.rebase("lost.cow", "elsewhere.img", unsafe=True)
    os.mkdir("moved")
    os.rename("elsewhere.img", "moved/root.img")
    shutil.copy2("backing.img", "touched.img")  # an mtime mismatch
    ubdcow.create("stale.cow", "touched.img")
    os.utime("touched.img", (1, 1))
    unpack_case("v3-kernel-written", tmp_path / "mixed")  # a real guest's file, with mixed pages
    unpack_case("v1-rounding-tail", tmp_path / "v1")  # bits past its v1 bitmap
    shutil.copy(ROOT / "tests" / "data" / "bad" / "backing-empty-path.cow", "nopath.cow")
    shutil.copy2("backing.img", "other.img")
    with open("other.img", "r+b") as f:  # one differing sector, at 3 MiB
        f.seek(3 << 20)
        f.write(b"changed")
    shutil.copy2("backing.img", "touched2.img")
    for n in (1, 2):  # two overlays on a touched file, for du's group hint
        ubdcow.create(f"lab{n}.cow", "touched2.img")
    os.utime("touched2.img", (2, 2))
    filesystems(tmp_path)
    return tmp_path


def filesystems(lab: Path) -> None:
    """For the file-level commands: fs.img (/etc/hostname; etc-copy exists), two.img (two ext4 partitions),
    journal.img (needs recovery, its journal's superblock zeroed), ext.img (needs recovery, journal on a device)."""
    import functools
    import subprocess

    from test_fs_partitions import blank, mkfs_at, sfdisk

    mkfs, debugfs = require_tool("mkfs.ext4", "e2fsprogs"), require_tool("debugfs", "e2fsprogs")
    (lab / "tree" / "etc").mkdir(parents=True)
    (lab / "tree" / "etc" / "hostname").write_text("pc1\n")
    run = functools.partial(subprocess.run, check=True, capture_output=True)
    run([mkfs, "-q", "-b", "4096", "-d", lab / "tree", lab / "fs.img", "8M"])
    (lab / "etc-copy").write_text("already here\n")
    run([mkfs, "-q", "-b", "4096", lab / "journal.img", "16M"])
    run([debugfs, "-w", "-R", "feature needs_recovery", lab / "journal.img"])
    first = int(subprocess.run([debugfs, "-R", "blocks <8>", lab / "journal.img"], check=True, capture_output=True,
                               text=True).stdout.split()[0])  # fmt: skip
    with open(lab / "journal.img", "r+b") as f:
        f.seek(first * 4096)
        f.write(bytes(1024))
    run([mkfs, "-q", "-b", "4096", lab / "ext.img", "16M"])
    for request in ("feature needs_recovery", "ssv journal_dev 0x801"):  # an external journal, on /dev/sda1
        run([debugfs, "-w", "-R", request, lab / "ext.img"])
    disk = blank(lab / "two.img", 48 << 20)
    for p in sfdisk(disk, "label: dos\nsize=16MiB, type=83\nsize=16MiB, type=83\n"):
        mkfs_at(disk, int(p["start"]) * 512, 16 << 20)  # type: ignore[call-overload]


def scenarios(lab: Path) -> list[list[str]]:
    """Command lines that print hints (each with and without --json)."""
    mixed, v1 = "mixed/overlay.cow", "v1/overlay.cow"
    lines = [
        ["compare", "lost.cow", "backing.img"],
        ["compare", "backing.img", "lost.cow"],
        ["diff", "backing.img", "lost.cow", "-o", "thin.cow"],
        ["merge", "lost.cow", "-o", "lost.img"],
        ["merge", "nopath.cow", "-o", "nopath.img"],
        ["convert", "lost.cow", "-o", "merged.img"],
        ["rebase", "lost.cow", "--backing", "moved/root.img"],
        ["info", "lost.cow"],
        ["info", "nopath.cow"],
        ["info", "stale.cow", "lost.cow"],
        ["check", "stale.cow"],
        ["check", "stale.cow", "--backing", "touched.img"],
        ["check", mixed, "--backing", "mixed/backing.img"],
        ["check", "overlay.cow", mixed, "--backing", "mixed/backing.img", "--bytes"],
        ["merge", "stale.cow", "-o", "stale.img"],
        ["create", "overlay.cow", "backing.img"],
        ["merge", "overlay.cow", "-o", "merged.img"],
        ["diff", "backing.img", "merged.img", "-o", "overlay.cow"],
        ["compact", v1, "--backing", "v1/backing.img"],
        ["compact", mixed, "--backing", "mixed/backing.img"],
        ["convert", mixed, "-o", "mixed/v2.cow", "--layout", "v2"],  # its recorded backing file is not here
        ["rebase", v1, "--backing", "v1/changed.img", "--old-backing", "v1/backing.img"],
        ["du", "."],
        ["du", ".", "--all"],
        ["serve", "lost.cow"],
        ["create", "new.cow", "old.img"],
        ["ls", "two.img"],
        ["ls", "fs.img", "/etc", "--partition", "1"],
        ["ls", "journal.img", "-R"],
        ["cat", "journal.img", "/etc/hostname"],
        ["get", "fs.img", "/etc/hostname", "-o", "etc-copy"],
        ["get", "ext.img", "/", "-o", "ext-copy"],
        ["get", "two.img", "/", "/lost+found", "-o", "parts"],
        ["changes", "backing.img"],
        ["changes", "backing.img", "--path", "/etc", "--all"],
    ]
    shutil.copy2(lab / "backing.img", lab / "old.img")
    os.utime(lab / "old.img", (-10, -10))  # before 1970: a COW header cannot record it
    data = bytearray((lab / "v1" / "backing.img").read_bytes())
    data[1952 * 512 + 10] ^= 0x55  # a sector the v1 bitmap has no bit for
    (lab / "v1" / "changed.img").write_bytes(data)
    shutil.copy(lab / "mixed" / "backing.img", lab / "mixed" / "copy.img")  # the same bytes, another mtime
    return lines


def locked_scenarios() -> list[list[str]]:
    return [["merge", "overlay.cow", "-o", "busy.img"], ["compact", "overlay.cow"],
            ["rebase", "--unsafe", "overlay.cow", "--backing", "backing.img"], ["compare", "overlay.cow", "merged.img"],
            ["check", "--repair", "mixed/overlay.cow", "--backing", "mixed/backing.img"],
            ["convert", "overlay.cow", "-o", "busy.cow"]]


def mount_scenarios(lab: Path) -> int:
    """mount: the disk's own hints (a moved backing file), before anything is mounted; umount: a busy folder (a
    process's current folder is there), whose hint detaches it."""
    import subprocess

    from support.fuselab import require_fuse, small_image, take_down

    require_fuse()
    checked = 0
    for extra in ([], ["--json"]):  # (the hints leave --json out, as every command's do)
        code, out, err = run(["mount", "lost.cow", "mnt", *extra])
        assert code == 1 and hints_of(out, err), (extra, out, err)
        checked += check_hints(["mount", "lost.cow", "mnt"], hints_of(out, err))
    image = small_image(lab / "fs", {"etc/hostname": (b"pc1\n", 0o644)})
    os.mkdir("busy")
    try:
        assert run_cli("mount", image, "busy", cwd=lab).returncode == 0
        holder = subprocess.Popen(["sleep", "60"], cwd=lab / "busy" / "etc")
        try:
            for extra in ([], ["--json"]):
                code, out, err = run(["umount", "busy", *extra])
                assert code == 1 and any("--lazy" in h for h in hints_of(out, err)), (extra, out, err)
                checked += check_hints(["umount", "busy"], hints_of(out, err))
        finally:
            holder.kill()
            holder.wait()
    finally:
        take_down(lab / "busy")
    return checked


def check_hints(argv: list[str] | None, printed: list[str]) -> int:
    """Every command line in the hints parses, no option is named outside one, and a hint for the same command
    keeps the user's options; returns the number of command lines checked."""
    given = vars(parse(argv)) if argv is not None else {}
    checked = 0
    for hint in printed:
        rest = hint
        for match in COMMAND.finditer(hint):
            words = [match.group(1), *shlex.split(match.group(2))]
            ns = vars(parse(words))
            checked += 1
            rest = rest.replace(match.group(0), "")
            if argv is not None and words[0] == argv[0]:  # the user's command, changed by the fix: every option the user gave is kept
                for key, value in given.items():
                    if key in ("cows",):
                        assert set(ns[key]) <= set(value), (argv, hint)
                    elif value not in (None, False) and key not in ("func", "error_code", "option_for"):
                        assert ns[key] == value, (f"the hint drops {key}={value!r}", argv, hint)
        assert not re.search(r"(?<![\w/])--?[a-z]", rest), f"an option named outside a command line: {hint!r}"
    return checked


def test_every_hint_names_a_command_line_that_parses(lab: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    with recording() as hit:
        for argv in scenarios(lab):
            for extra in ([], ["--json"]):
                code, out, err = run(argv + extra)
                printed = hints_of(out, err)
                if not extra:
                    assert printed, f"no hint from: ubdcow {shlex.join(argv)} (exit {code})\n{out}{err}"
                checked += check_hints(argv, printed)
        # a holder of the write lock: the --no-lock hints
        import subprocess

        holder = subprocess.Popen([sys.executable, "-c", "import sys, ubdcow\nimg = ubdcow.open('overlay.cow', 'r+')\n"
                                   "img2 = ubdcow.open('mixed/overlay.cow', 'r+', backing='mixed/backing.img')\n"
                                   "print('LOCKED', flush=True)\nsys.stdin.read()\n"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=lab)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == b"LOCKED"
            for argv in locked_scenarios():
                code, out, err = run(argv)
                assert code != 0 and "locked by" in err, (argv, err)
                printed = hints_of(out, err)
                assert any("--no-lock" in h for h in printed), (argv, printed)
                checked += check_hints(argv, printed)
            os.mkdir("mnt")
            code, out, err = run(["mount", "overlay.cow", "mnt"])  # mount takes the read lock: refused too
            assert code == 1 and "locked by" in err and hints_of(out, err), err
            checked += check_hints(["mount", "overlay.cow", "mnt"], hints_of(out, err))
        finally:
            holder.kill()
            holder.wait()
        checked += mount_scenarios(lab)
        # serve before nbdkit starts: nbdkit missing, its Python plugin of another version
        empty = lab / "empty-path"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
        code, out, err = run(["serve", "overlay.cow"])
        assert code == 1 and hints_of(out, err)
        fake = lab / "fake"
        fake.mkdir()
        for name, dump, status in (("noplugin", "nbdkit: error", 1), ("old", "python_version=3.9.2", 0),
                                   ("broken", None, 0)):
            (fake / name).mkdir()
            script = "\x7fELF not a program" if dump is None else f"#!/bin/sh\nprintf '%s\\n' '{dump}'\nexit {status}\n"
            (fake / name / "nbdkit").write_text(script)
            (fake / name / "nbdkit").chmod(0o755)
            monkeypatch.setenv("PATH", str(fake / name))
            code, out, err = run(["serve", "overlay.cow"])
            assert code == 1 and hints_of(out, err), err
            checked += check_hints(["serve", "overlay.cow"], hints_of(out, err))
        (lab / "bad.psk").write_text("alice:nothex\n")
        monkeypatch.undo()
        monkeypatch.chdir(lab)
        require_nbd("nbdkit")
        code, out, err = run(["serve", "overlay.cow", "--tls-psk", "bad.psk"])
        assert code == 1 and hints_of(out, err), err
    assert checked >= 30, checked
    # every place the library makes a hint was reached
    missed = []
    for (file, first, last), callee in hint_sites().items():
        if not any(f == file and first <= line <= last for f, line in hit):
            if (Path(file).name, callee) not in API_ONLY:
                missed.append(f"{file}:{first} ({callee})")
    assert not missed, f"hint sites no scenario here reaches: {missed}"


def test_the_issues_examples() -> None:
    """The two lines of issue 21 that sent the user the wrong way, as they read now."""
    parser = build_parser()
    for line in ("ubdcow compare lost.cow backing.img --backing-a PATH",
                 "ubdcow check overlay.cow --backing backing.img --repair"):
        parser.parse_args(shlex.split(line)[1:])
    with pytest.raises(ArgumentError, match="ambiguous option"):
        parser.parse_args(["compare", "a", "b", "--backing", "x"])


def test_the_docs_hints_parse_too() -> None:
    """Every ``hint:`` line the docs show names command lines that parse, and no option outside one."""
    count = 0
    for doc in ("cli.md", "serve.md"):
        for line in (ROOT / "docs" / doc).read_text().splitlines():
            if line.startswith(("hint: ", "note: ")):
                count += check_hints(None, [line])
    assert count >= 12, count


def test_following_the_hints_works(lab: Path) -> None:
    """The moved-backing hints of issue 21, run as given with PATH filled in: the command works."""
    for argv in (["compare", "lost.cow", "backing.img"], ["compare", "backing.img", "lost.cow"],
                 ["diff", "backing.img", "lost.cow", "-o", "thin.cow"], ["merge", "lost.cow", "-o", "lost.img"],
                 ["info", "lost.cow"], ["rebase", "lost.cow", "--backing", "backing.img"]):  # rebase: last
        code, out, err = run(argv)
        (hint,) = [line for line in (out + err).splitlines() if line.startswith("hint: ")]
        lines = [m for m in COMMAND.finditer(hint)]
        words = [lines[0].group(1), *shlex.split(lines[0].group(2))]
        words = ["moved/root.img" if w == "PATH" else w for w in words]
        code, out, err = run(words)
        assert code in ((0, 1) if argv[0] == "compare" else (0,)) and "ubdcow:" not in err, (words, err)
        if argv[0] == "info":
            assert "found at moved/root.img; size and mtime match" in out
    # check keeps --backing in its --repair hint, and the hinted repair runs
    code, out, err = run(["check", "mixed/overlay.cow", "--backing", "mixed/backing.img"])
    (hint,) = [line for line in out.splitlines() if line.startswith("hint: make the mixed pages whole")]
    words = shlex.split(hint.split(": ", 2)[2])
    assert words == ["ubdcow", "check", "mixed/overlay.cow", "--backing", "mixed/backing.img", "--repair"]
    code, out, err = run(words[1:])
    assert code == 0 and "repaired" in out, (out, err)
