"""Every command against every file of the bad-input corpus (tests/data/bad/, made by tests/support/bad_corpus.py).

Each run must end with the documented exit code, never a traceback, one
``ubdcow: <file>: <problem>`` line on stderr when it fails, and no output or
temporary file left behind.
"""

from __future__ import annotations

import io
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from support.bad_corpus import BAD, SIZE, build, load_manifest, setup_environment
from conftest import assert_one_line_error, run_cli
from support.nbdlab import require_nbd

from ubdcow.cli import main

MANIFEST = load_manifest()
NAMES = sorted(MANIFEST)
COMMANDS = ["info", "map", "check", "merge", "compare", "rebase", "rebase-unsafe", "diff", "convert", "serve"]
#: the commands that never read the backing file, or only report on it
BACKING_OPTIONAL = {"info", "map", "convert", "rebase-unsafe"}


def test_the_corpus_is_current_and_large_enough():
    files = build()
    assert len(files) >= 40
    assert sorted(files) == NAMES
    for name, (content, kind, words) in files.items():
        assert (BAD / name).read_bytes() == content, f"{name}: rerun python tests/support/bad_corpus.py"
        assert MANIFEST[name] == {"kind": kind, "words": words}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    for name in NAMES:
        shutil.copy(BAD / name, folder / name)
    setup_environment(folder)
    good = folder / "good.img"
    good.write_bytes(os.urandom(2 * SIZE))  # a raw image of another size than the corpus's disks
    (folder / "fit.img").write_bytes(os.urandom(SIZE))  # a backing file that fits them
    return folder


def argv(command: str, name: str) -> list[str]:
    return {
        "info": ["info", name],
        "map": ["map", name],
        "check": ["check", name],
        "merge": ["merge", name, "-o", "out.img"],
        "compare": ["compare", name, "good.img"],
        "rebase": ["rebase", name, "--backing", "fit.img"],
        "rebase-unsafe": ["rebase", name, "--backing", "fit.img", "--unsafe"],
        "diff": ["diff", "good.img", name, "-o", "out.cow"],
        "convert": ["convert", name, "-o", "out.cow"],
        "serve": ["serve", name, "--run", "true"],  # refused before nbdkit starts: nothing served, nothing left
    }[command]


def run_inline(folder: Path, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = main(args)
    finally:
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def raw_by_magic(name: str) -> bool:
    """compare/diff read a file without the COW magic as a raw image, by design."""
    return (BAD / name).read_bytes()[:4] not in (b"OOOM", b"MOOO")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_file(corpus, name, command):
    if command == "serve":
        require_nbd("nbdkit")
    kind, words = MANIFEST[name]["kind"], MANIFEST[name]["words"]
    before = listing(corpus)
    original = (corpus / name).read_bytes()
    code, out, err = run_inline(corpus, argv(command, name))
    assert "Traceback" not in out + err
    produced = listing(corpus) - before
    for extra in produced:  # a success leaves its output; clean it for the next run
        (corpus / extra).unlink()

    if (name, command) == ("backing-empty-path.cow", "convert"):  # a v3 file cannot record an empty path
        assert code == 1 and "needs a backing file path" in err and produced == set()
        return
    if kind == "backing" and command in BACKING_OPTIONAL:
        assert code == 0, err
        if command == "info":
            assert words in out
        if command == "rebase-unsafe":  # the repair: now it points at fit.img; restore the file
            (corpus / name).write_bytes(original)
        return
    if command == "compare" and raw_by_magic(name):
        assert code == 1 and "differ" in out  # a raw image that differs from good.img
        assert produced == set()
        return

    assert code != 0
    assert produced == set(), f"left behind: {produced}"
    assert (corpus / name).read_bytes() == original
    if command == "check" and code in (2, 3):  # findings are the output, on stdout
        assert code == (3 if kind == "backing" else 2)
        assert words in out
        return
    expected_code = {"compare": 2}.get(command, 1)
    assert code == expected_code, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("ubdcow: "), err
    assert len([line for line in lines if not line.startswith("hint: ")]) == 1, err
    if command == "diff" and raw_by_magic(name):
        assert "sizes must match" in lines[0] or words in lines[0]
        return
    assert name in lines[0], lines[0]
    assert words in lines[0], (words, lines[0])


@pytest.mark.parametrize("problem", ["backing-directory.d", "backing-fifo.pipe", "/dev/zero", "backing-dangling.link",
                                     "backing-loop-a.link", "backing-missing.img", "empty.cow"])
def test_create_refuses_unusable_backing_files(corpus, problem):
    before = listing(corpus)
    code, _out, err = run_inline(corpus, ["create", "new.cow", problem])
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"ubdcow: {problem}: ")
    assert listing(corpus) == before


@pytest.mark.parametrize("name", ["magic-qcow2.cow", "truncated-v3-at-36.cow", "backing-fifo.cow",
                                  "short-inside-bitmap.cow"])
def test_the_real_process_prints_one_line_and_no_traceback(corpus, name):
    command = "merge" if name != "magic-qcow2.cow" else "info"
    proc = run_cli(*argv(command, name), cwd=corpus, timeout=30)
    assert proc.returncode == 1
    assert_one_line_error(proc, name, MANIFEST[name]["words"])
