"""``info``, ``check`` and ``map`` on several COW files: a section (or JSON array element) per file, a file
that cannot be read reported on its line without stopping the others, and the worst exit code."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

import ubdcow


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """COW files with each ``check`` verdict, and two files that are not usable COW files."""
    assert run_cli("demo", "--keep", tmp_path).returncode == 0
    clean = tmp_path / "overlay.cow"
    stale_backing = tmp_path / "stale-backing.img"
    shutil.copyfile(tmp_path / "backing.img", stale_backing)
    stale = tmp_path / "stale.cow"
    ubdcow.create(stale, stale_backing)
    os.utime(stale_backing, (1_800_000_000, 1_800_000_000))  # touched: UML would refuse it (exit 3)
    corrupt = tmp_path / "corrupt.cow"
    shutil.copyfile(clean, corrupt)
    h = ubdcow.read_header(corrupt)
    os.truncate(corrupt, h.data_offset + 8192)  # written sectors past the end: corrupt (exit 2)
    notcow = tmp_path / "notes.txt"
    notcow.write_text("not an overlay\n")
    return {"clean": clean, "stale": stale, "corrupt": corrupt, "notcow": notcow, "missing": tmp_path / "nope.cow"}


def test_the_files_have_the_verdicts_the_tests_rely_on(files):
    codes = {name: run_cli("check", path).returncode for name, path in files.items()}
    assert codes == {"clean": 0, "stale": 3, "corrupt": 2, "notcow": 1, "missing": 1}


@pytest.mark.parametrize(
    "names, code",
    [
        (["clean", "clean"], 0),
        (["clean", "stale"], 3),
        (["stale", "missing"], 1),  # could not run is worse than a backing mismatch
        (["missing", "stale", "clean"], 1),
        (["corrupt", "missing"], 2),  # corruption is the worst
        (["clean", "notcow", "stale", "corrupt"], 2),
        (["stale", "stale"], 3),
    ],
)
def test_check_exit_code_is_the_worst_of_the_files(files, names, code):
    paths = [files[n] for n in names]
    proc = run_cli("check", *paths)
    assert proc.returncode == code, proc.stderr
    out = proc.stdout.decode()
    unusable = [n for n in names if n in ("notcow", "missing")]
    verdicts = [line for line in out.splitlines() if line.startswith(str(files["clean"].parent))]
    assert len(verdicts) == len(names) - len(unusable)  # one verdict line per file that could be checked
    err = [line for line in proc.stderr.decode().splitlines() if line.startswith("ubdcow: ")]
    assert err == [next(x for x in err if str(files[n]) in x) for n in unusable]
    doc = json.loads(run_cli("check", "--json", *paths).stdout)
    assert doc["exit_code"] == code
    data = doc["disks"]
    assert [d["disk"] for d in data] == [str(p) for p in paths]
    assert [d["exit_code"] for d in data] == [run_cli("check", p).returncode for p in paths]
    assert all(("error" in d) == (n in unusable) for d, n in zip(data, names))


def test_info_on_several_files_sections_and_json(files):
    clean, stale, notcow = files["clean"], files["stale"], files["notcow"]
    one = run_cli("info", clean)
    assert one.returncode == 0
    proc = run_cli("info", clean, notcow, stale)
    assert proc.returncode == 1
    assert proc.stderr.decode() == f"ubdcow: {notcow}: not a UML COW file (bad magic)\n"
    # the sections are the single-file outputs, a blank line between them
    assert proc.stdout == one.stdout + b"\n" + run_cli("info", stale).stdout
    assert run_cli("info", clean, stale).returncode == 0
    doc = json.loads(run_cli("info", "--json", clean).stdout)
    assert set(doc) == {"disks", "exit_code"} and doc["exit_code"] == 0  # one file: the same shape as several
    (single,) = doc["disks"]
    assert single["disk"] == str(clean) and single["exit_code"] == 0
    doc = json.loads(run_cli("info", "--json", clean, notcow, clean).stdout)
    many = doc["disks"]
    assert many[0] == many[2] == single and doc["exit_code"] == 1
    assert many[1] == {"disk": str(notcow), "error": "not a UML COW file (bad magic)", "hint": None, "exit_code": 1}
    bad = run_cli("info", "--json", notcow)  # one file that fails: its element, the error on stderr too
    assert bad.returncode == 1 and json.loads(bad.stdout) == {"disks": [many[1]], "exit_code": 1}
    assert bad.stderr.decode() == f"ubdcow: {notcow}: not a UML COW file (bad magic)\n"


def test_map_on_several_files(files):
    clean, stale, missing = files["clean"], files["stale"], files["missing"]
    (single,) = json.loads(run_cli("map", "--json", clean).stdout)["disks"]
    assert single["extents"][0]["start"] == 0
    proc = run_cli("map", "--json", clean, missing, stale)
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    data = doc["disks"]
    assert doc["exit_code"] == 1 and data[0] == single
    assert data[1]["disk"] == str(missing) and "No such file" in data[1]["error"] and data[1]["exit_code"] == 1
    assert data[2] == json.loads(run_cli("map", "--json", stale).stdout)["disks"][0]
    human = run_cli("map", clean, stale)
    assert human.returncode == 0
    text = human.stdout.decode()
    alone = run_cli("map", clean).stdout.decode()
    assert text.startswith(f"{clean}:\n" + alone + "\n" + f"{stale}:\n")


def test_help_documents_the_order_of_exit_codes():
    text = run_cli("check", "--help").stdout.decode()
    assert "worst" in text and "0 clean, 3 backing mismatch, 1 could not run, 2 corrupt" in " ".join(text.split())
    for command in ("info", "map", "compact"):
        assert "worst" in run_cli(command, "--help").stdout.decode()
