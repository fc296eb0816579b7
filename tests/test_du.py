"""``du``: a lab folder of 58 overlays on three backing files (and one that changed size), with files that
are not overlays and one that cannot be read. Every figure ``du`` gives is checked against the sum of the
``info`` facts of the files it groups, and every overlay that will not boot against ``info``'s verdict.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_cli

import ubdcow
from ubdcow import du

MiB = 1 << 20


@dataclass
class Lab:
    root: Path
    model: Path  # A: 30 overlays, named through the path, a symbolic link and a hard link; 6 moved away
    other: Path  # B: touched after 15 overlays were made on it, 5 made after
    small: Path  # D: grew after 2 overlays were made on it
    gone: str  # C: deleted after 6 overlays were made on it
    overlays: list[Path]
    broken: Path  # COW magic, header cut short: cannot be read


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Lab:
    root = tmp_path_factory.mktemp("lab")
    models, vms = root / "models", root / "vms"
    for d in (models, vms / "group2", vms / "deep" / "a" / "b", root / "moved"):
        d.mkdir(parents=True)
    model, other, gone, small = models / "model.img", models / "other.img", models / "gone.img", models / "small.img"
    for path, size in ((model, 8 * MiB), (other, 4 * MiB), (gone, 2 * MiB), (small, 1 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
            f.write(os.urandom(64 << 10))  # some data: an allocated size that is not 0
        os.utime(path, (1_700_000_000, 1_700_000_000))
    (models / "link.img").symlink_to("model.img")
    os.link(model, models / "model-hard.img")
    overlays: list[Path] = []

    def make(path: Path, backing: Path, written: int = 0) -> None:
        ubdcow.create(path, backing)
        if written:
            with ubdcow.open(path, "r+") as disk:
                disk.pwrite(os.urandom(written), 3 * MiB // 2 - written // 3)
        overlays.append(path)

    for i in range(30):  # names like a lab's: the VM's name, no suffix rule
        folder = vms if i < 15 else vms / "group2" if i < 25 else vms / "deep" / "a" / "b"
        name = ("pc", "router", "sw")[i % 3] + f"{i}" + (".disk" if i % 4 else "")
        backing = model if i % 3 == 0 else models / "link.img" if i % 3 == 1 else models / "model-hard.img"
        make(folder / name, backing, written=(i % 5) * 40_000)
    for path in overlays[:6]:  # moved after they were made: the recorded backing path still holds
        new = root / "moved" / path.name
        os.rename(path, new)
        overlays[overlays.index(path)] = new
    for i in range(15):
        make(vms / f"old{i}.disk", other, written=(i % 2) * 9000)
    os.utime(other, (1_700_000_500, 1_700_000_500))  # "vpackage" rewrote the model: these will not boot
    for i in range(5):
        make(vms / "group2" / f"new{i}", other)
    for i in range(6):
        make(vms / f"orphan{i}.cow", gone)
    os.unlink(gone)
    for i in range(2):
        make(vms / f"grown{i}.cow", small)
    os.truncate(small, 2 * MiB)
    os.utime(small, (1_700_000_000, 1_700_000_000))
    # beside them: files that are not overlays (skipped silently) and one overlay that cannot be read
    (vms / "README").write_text("the lab's notes\n")
    (vms / "raw.img").write_bytes(bytes(8192))
    (vms / "qcow.img").write_bytes(b"QFI\xfb" + bytes(100))
    (vms / "empty").write_bytes(b"")
    os.mkfifo(vms / "console.fifo")  # never opened (a FIFO would block a read)
    (vms / "dangling").symlink_to("nowhere")
    (vms / "alias.disk").symlink_to(overlays[10].name)  # a link inside a folder: not followed, not counted twice
    broken = vms / "deep" / "broken.disk"
    broken.write_bytes(b"OOOM\0\0\0\3" + bytes(20))  # the magic, then the header ends
    return Lab(root, model, other, small, str(gone), overlays, broken)


def run_json(*args: str | Path, cwd: Path | None = None) -> tuple[int, dict, str]:
    proc = run_cli("du", "--json", *args, cwd=cwd)
    return proc.returncode, json.loads(proc.stdout), proc.stderr.decode()


def real(p: str | Path) -> str:
    return os.path.realpath(p)


def expected_reason(facts: dict) -> str | None:
    problem = facts["backing"]["problem"]
    if problem is None:
        return None
    if "mtime mismatch" in problem:
        return "mtime mismatch"
    if "Size mismatch" in problem:
        return "size mismatch"
    assert "not found" in problem, problem
    return "backing file missing"


def test_du_totals_are_the_sums_of_each_files_info(lab: Lab) -> None:
    code, report, err = run_json(lab.root)
    assert code == 1  # the unreadable file
    assert err.splitlines() == [f"ubdcow: {lab.broken}: header truncated: the file is only 28 bytes"]
    assert report["unreadable"] == [{"path": str(lab.broken), "error": err.splitlines()[0][len("ubdcow: "):]}]
    facts = {real(p): ubdcow.info(p) for p in lab.overlays}
    listed = [real(f["disk"]) for g in report["groups"] for f in g["files"]]
    assert sorted(listed) == sorted(facts)  # every overlay once; nothing else
    assert report["overlays"] == len(lab.overlays) == 58
    for g in report["groups"]:
        members = [facts[real(f["disk"])] for f in g["files"]]
        assert g["overlays"] == len(members)
        assert g["overlays_allocated"] == sum(m["allocated_size"] for m in members)
        assert g["overlays_apparent"] == sum(m["apparent_size"] for m in members)
        assert g["flat_size"] == sum(m["size"] for m in members)
        reasons = {expected_reason(m) for m in members}
        assert reasons == {g["reason"]}, (g["backing"], reasons)
        assert g["boots"] == (g["reason"] is None)
        for f in g["files"]:
            m = facts[real(f["disk"])]
            assert (f["allocated_size"], f["apparent_size"], f["size"]) == (
                m["allocated_size"], m["apparent_size"], m["size"])
            assert f["reason"] == expected_reason(m)
        if g["device"] is not None:
            st = os.stat(g["backing"])
            assert (g["device"], g["inode"]) == (st.st_dev, st.st_ino)
            assert g["allocated_size"] == st.st_blocks * 512 and g["apparent_size"] == st.st_size
            assert g["saved"] == g["flat_size"] - g["allocated_size"] - g["overlays_allocated"]
    # one group per backing file however it is named (path, symbolic link, hard link), stale ones apart
    shape = sorted((Path(g["backing"]).name, g["reason"] or "", g["overlays"]) for g in report["groups"])
    assert shape == [("gone.img", "backing file missing", 6), ("model.img", "", 30), ("other.img", "", 5),
                     ("other.img", "mtime mismatch", 15), ("small.img", "size mismatch", 2)]
    backings = {real(lab.model): lab.model, real(lab.other): lab.other, real(lab.small): lab.small}
    assert report["backing_files"] == 3
    assert report["backing_allocated"] == sum(os.stat(p).st_blocks * 512 for p in backings.values())
    assert report["overlays_allocated"] == sum(m["allocated_size"] for m in facts.values())
    assert report["allocated"] == report["backing_allocated"] + report["overlays_allocated"]
    assert report["flat_size"] == sum(m["size"] for m in facts.values())
    assert report["saved"] == report["flat_size"] - report["allocated"]
    assert report["will_not_boot"] == {"mtime mismatch": 15, "backing file missing": 6, "size mismatch": 2}


def test_du_human_output_marks_what_will_not_boot_with_safe_hints_only(lab: Lab) -> None:
    proc = run_cli("du", lab.root)
    assert proc.returncode == 1
    lines = proc.stdout.decode().splitlines()
    assert lines[0].split() == ["ALLOCATED", "APPARENT", "OVERLAYS", "OVL", "ALLOC", "FLAT", "SAVED", "BACKING"]
    summary = "23 overlays will not boot: mtime mismatch (15), backing file missing (6), size mismatch (2)"
    assert summary in lines
    stale = [x for x in lines if "[will not boot:" in x]
    assert len(stale) == 3
    assert any(x.endswith(f"{lab.other}  [will not boot: mtime mismatch]") for x in stale)
    hints = [x for x in lines if x.startswith("hint: ")]
    assert len(hints) == 3
    mtime_hint = next(h for h in hints if str(lab.other) in h and "mtime" in h)
    assert f"ubdcow rebase --unsafe COW --backing {lab.other}" in mtime_hint and "if its content is unchanged" in mtime_hint
    # no rebase for a file that is not the one the overlays were made on, nor for one that is gone
    assert not [h for h in hints if "rebase --unsafe" in h and h is not mtime_hint]
    assert any("do not rebase" in h and str(lab.small) in h for h in hints)
    assert lines[-1] == "1 file could not be read (listed on stderr)"
    _, report, _ = run_json(lab.root)
    exact = run_cli("du", "--bytes", lab.root).stdout.decode().splitlines()
    total = next(x for x in exact if x.split()[-5:-4] == ["total"] or " total (" in x)
    assert total.split()[:5] == [str(report["allocated"]), str(report["overlays"]), str(report["overlays_allocated"]),
                                 str(report["flat_size"]), str(report["saved"])]
    assert total.endswith(" total (3 backing files, each counted once)")


def test_du_all_lists_every_overlay_with_the_kernels_reason(lab: Lab) -> None:
    text = run_cli("du", "--all", lab.root).stdout.decode()
    rows = [x for x in text.splitlines() if x.startswith(" " * 30)]  # under their group's row, indented
    assert len(rows) == 58
    for p in lab.overlays:
        row = next(x for x in rows if x.split()[2] == str(p))  # size, unit, path
        facts = ubdcow.info(p)
        if facts["backing"]["problem"] is None:
            assert "[" not in row
        elif "mtime" in facts["backing"]["problem"]:
            assert "[mtime mismatch (1700000000 vs 1700000500) of COW header vs backing file" in row
        elif "Size" in facts["backing"]["problem"]:
            assert "[Size mismatch (1048576 vs 2097152)" in row
        else:
            assert f"[backing file {lab.gone} not found]" in row


def test_du_written_counts_the_set_bits(lab: Lab) -> None:
    _, plain, _ = run_json(lab.root)
    assert all(f["written_bytes"] is None for g in plain["groups"] for f in g["files"])
    _, report, _ = run_json("--written", lab.root)
    for g in report["groups"]:
        for f in g["files"]:
            assert f["written_bytes"] == ubdcow.info(f["disk"])["cow_bytes"]
        assert g["written_bytes"] == sum(f["written_bytes"] for f in g["files"])
    assert sum(g["written_bytes"] for g in report["groups"]) > 0
    text = run_cli("du", "--written", "--bytes", lab.root).stdout.decode()
    assert f"written: {sum(g['written_bytes'] for g in report['groups'])} of the overlays' disks" in text


def test_du_reads_headers_only_unless_written(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    import ubdcow.bitmap

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a bitmap was read")

    monkeypatch.setattr(ubdcow.bitmap.Bitmap, "__init__", refuse)
    report = du([lab.root])
    assert report.overlays == 58
    with pytest.raises(AssertionError, match="a bitmap was read"):
        du([lab.root], written=True)


def test_du_paths_files_folders_default_and_each_file_once(lab: Lab) -> None:
    vms = lab.root / "vms"
    code, here, _ = run_json(cwd=vms / "group2")  # default: the current folder
    assert code == 0
    assert sorted(f["disk"] for g in here["groups"] for f in g["files"]) == sorted(
        f"./{p.name}" for p in lab.overlays if p.parent == vms / "group2")
    one = lab.overlays[20]
    assert one.parent == vms / "group2"
    code, single, _ = run_json(one, one, vms / "group2")  # the same file by three paths: once
    assert code == 0 and single["overlays"] == len(here["groups"][0]["files"]) + len(here["groups"][1]["files"]) == 15
    code, _, err = run_json(lab.root / "nope")
    assert code == 1 and err == f"ubdcow: {lab.root / 'nope'}: No such file or directory\n"
    code, none, _ = run_json(lab.root / "models")  # backing files are not overlays
    assert code == 0 and none["overlays"] == 0 and none["groups"] == []
    assert run_cli("du", "--quiet", lab.root / "models").stdout == b""
