"""Whole pages: finding mixed pages, ``check --repair``, and ``convert`` filling them from the backing file.

A mixed page is a 4 KiB page of the virtual disk (sectors 8p..8p+7, one bitmap
byte) whose bits are partly set, partly clear; the Linux ubd driver misreads
the pages after it in a multi-page read. The files here get their mixed pages
from the real kernel (the conformance cases were written with 512-byte direct
writes) or from a writer in this file that puts sectors and bits in place by
hand, following the format, independently of ubdcow's engine.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import hypothesis.strategies as st
import numpy as np
import pytest
from conftest import MANIFEST, Case, assert_one_line_error, run_cli
from hypothesis import given, settings

import ubdcow
from ubdcow.bitmap import Bitmap

SECTOR = 512
PAGE = 4096
MIXED_CASES = [c["name"] for c in MANIFEST if c["name"] not in ("v3-mkcow-empty", "v3-discard")]


# -- an independent model of the bitmap ------------------------------------------------------


def honoured(path: Path) -> np.ndarray:
    """The honoured bits of a COW file as a bool array, read from its bytes."""
    h = ubdcow.read_header(path)
    with open(path, "rb") as f:
        f.seek(h.bitmap_offset)
        raw = f.read(h.bitmap_len)
    nbits = min(h.sectors, 8 * h.bitmap_len)
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")[:nbits].astype(bool)


def model_mixed(bits: np.ndarray) -> list[int]:
    """Pages whose bits disagree (the last page has only the bits that exist)."""
    return [p for p in range(-(-len(bits) // 8)) if 0 < bits[8 * p : 8 * p + 8].sum() < len(bits[8 * p : 8 * p + 8])]


def whole_pages_of(bits: np.ndarray) -> np.ndarray:
    """Every page that has a set bit, all set."""
    out = bits.copy()
    for p in range(-(-len(bits) // 8)):
        if bits[8 * p : 8 * p + 8].any():
            out[8 * p : 8 * p + 8] = True
    return out


def raw_write(cow: Path, sectors: dict[int, bytes]) -> None:
    """Put sector data into the data area, then set their bits: by hand, from the format."""
    h = ubdcow.read_header(cow)
    with open(cow, "r+b") as f:
        for s, data in sectors.items():
            f.seek(h.data_offset + s * SECTOR)
            f.write(data)
        f.flush()
        for s in sectors:
            f.seek(h.bitmap_offset + s // 8)
            byte = f.read(1)[0] | 1 << (s % 8)
            f.seek(h.bitmap_offset + s // 8)
            f.write(bytes([byte]))


def mixed_file(folder: Path, size: int, rng: random.Random, pages: int) -> tuple[Path, Path, bytearray]:
    """A backing file, a COW file on it with ``pages`` mixed pages (and a few whole ones); the model."""
    folder.mkdir(parents=True, exist_ok=True)
    backing = folder / "backing.img"
    content = bytearray(rng.randbytes(size))
    backing.write_bytes(content)
    cow = folder / "overlay.cow"
    ubdcow.create(cow, backing)
    nsect = -(-size // SECTOR)
    chosen: dict[int, bytes] = {}
    picked = rng.sample(range(nsect // 8), pages + 3)
    for p in picked[:pages]:
        for s in rng.sample(range(8 * p, 8 * p + 8), rng.randrange(1, 8)):
            chosen[s] = rng.randbytes(SECTOR)
    for p in picked[pages:]:  # and a few whole pages
        chosen.update({s: rng.randbytes(SECTOR) for s in range(8 * p, 8 * p + 8)})
    raw_write(cow, chosen)
    for s, data in chosen.items():
        content[s * SECTOR : s * SECTOR + SECTOR] = data[: max(0, min(SECTOR, size - s * SECTOR))]
    return cow, backing, content


def disk_bytes(cow: Path, backing: Path | None = None) -> bytes:
    with ubdcow.open(cow, backing=backing) as disk:
        return disk.read()


def stamp(path: Path) -> tuple[int, int, bytes]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_mode, path.read_bytes()


# -- finding them -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(nbits=st.integers(1, 3000), seed=st.integers(0, 2**32 - 1), density=st.sampled_from([0.0, 0.02, 0.5, 0.98, 1.0]))
def test_count_mixed_agrees_with_a_model(tmp_path_factory, nbits, seed, density):
    rng = np.random.default_rng(seed)
    bits = rng.random(nbits) < density
    # whole pages of both kinds too, so "mixed" is not just "not all equal"
    for p in rng.choice(-(-nbits // 8), size=min(5, -(-nbits // 8)), replace=False).tolist():
        bits[8 * p : 8 * p + 8] = bool(p % 2)
    raw = np.packbits(bits, bitorder="little")
    raw[-1] |= np.uint8(0xFF << (nbits % 8) & 0xFF) if nbits % 8 else np.uint8(0)  # bits past the end are ignored
    path = tmp_path_factory.mktemp("bm") / "bitmap"
    path.write_bytes(b"\xaa" * 7 + raw.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        count, first = Bitmap(fd, 7, len(raw), nbits).count_mixed(limit=5)
    finally:
        os.close(fd)
    want = model_mixed(bits)
    assert (count, first) == (len(want), want[:5])


def test_mixed_pages_across_bitmap_windows(tmp_path, monkeypatch):
    """Windows of the scan are whole bytes: a mixed page on either side of a window edge counts once."""
    import ubdcow.bitmap as bitmap_module

    monkeypatch.setattr(bitmap_module, "WINDOW", 3)
    bits = np.zeros(8 * 10 + 5, dtype=bool)
    for s in (17, 23, 24, 31, 40, 83):  # pages 2 (window 0), 3 (window 1, whole when both set), 5, 10 (last)
        bits[s] = True
    bits[24:32] = True
    raw = np.packbits(bits, bitorder="little")
    path = tmp_path / "bitmap"
    path.write_bytes(raw.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        assert Bitmap(fd, 0, len(raw), len(bits)).count_mixed() == (3, [2, 5, 10])
    finally:
        os.close(fd)


# -- check reports, check --repair mends ---------------------------------------------------------


@pytest.mark.parametrize("name", MIXED_CASES)
def test_check_repair_makes_every_page_whole_keeping_the_content(unpack, name):
    c: Case = unpack(name)
    before_bits = honoured(c.cow)
    mixed = model_mixed(before_bits)
    assert mixed, "every case here has mixed pages (the kernel made them)"
    backing_before = stamp(c.backing)
    report = json.loads(run_cli("check", c.cow, "--backing", c.backing, "--json").stdout)["disks"][0]
    assert (report["mixed_pages"], report["mixed_page_offsets"]) == (len(mixed), [PAGE * p for p in mixed[:16]])

    proc = run_cli("check", "--repair", c.cow, "--backing", c.backing, "--json")
    assert proc.returncode == (2 if name == "v1-rounding-tail" else 0), proc.stderr
    after = json.loads(proc.stdout)["disks"][0]
    assert (after["repaired_pages"], after["mixed_pages"], after["mixed_page_offsets"]) == (len(mixed), 0, [])
    assert "mixed-pages" not in {f["code"] for f in after["findings"]}
    bits = honoured(c.cow)
    assert model_mixed(bits) == []
    assert (bits == whole_pages_of(before_bits)).all(), "repair set bits outside the mixed pages"
    # the same virtual disk, byte for byte, as the real guest read it before
    assert disk_bytes(c.cow, c.backing)[: c.meta["size"]] == c.expected_bytes
    # the newly set sectors hold the backing file's bytes in the data area
    h = ubdcow.read_header(c.cow)
    raw, back = c.cow.read_bytes(), c.backing.read_bytes()
    for s in np.flatnonzero(bits & ~before_bits).tolist():
        n = min(SECTOR, h.size - s * SECTOR)
        assert raw[h.data_offset + s * SECTOR : h.data_offset + s * SECTOR + n] == back[s * SECTOR : s * SECTOR + n]
    assert stamp(c.backing) == backing_before, "the backing file changed"

    again = run_cli("check", "--repair", c.cow, "--backing", c.backing)
    assert again.stdout.decode().splitlines()[0] == "repaired 0 mixed pages"


def test_check_repair_human_output(unpack):
    c = unpack("v3-kernel-written")
    proc = run_cli("check", "--repair", c.cow, "--backing", c.backing)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "repaired 6 mixed pages (made whole, same content)"
    assert lines[-1] == f"{c.cow}: clean" and not any(line.startswith("hint: ") for line in lines)
    assert ubdcow.check(c.cow, backing=c.backing).mixed_pages == 0


def test_check_repair_refuses_without_a_matching_backing_file_and_changes_nothing(unpack, tmp_path):
    c = unpack("v3-kernel-written")
    before = stamp(c.cow)
    # the recorded /srv/... path does not exist here
    proc = run_cli("check", "--repair", c.cow)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(c.cow), "not found")
    assert b"hint: " in proc.stderr
    os.utime(c.backing, (c.meta["mtime"] + 10, c.meta["mtime"] + 10))
    proc = run_cli("check", "--repair", c.cow, "--backing", c.backing)
    assert proc.returncode == 1
    assert_one_line_error(proc, "mtime mismatch")
    assert b"rebase --unsafe" in proc.stderr
    short = tmp_path / "short.img"
    short.write_bytes(c.backing.read_bytes()[:-SECTOR])
    proc = run_cli("check", "--repair", c.cow, "--backing", short)
    assert proc.returncode == 1
    assert_one_line_error(proc, "Size mismatch")
    assert stamp(c.cow) == before
    with pytest.raises(ubdcow.BackingMismatchError):
        ubdcow.check(c.cow, backing=c.backing, repair=True)
    assert stamp(c.cow) == before


def test_check_repair_refuses_a_locked_file_naming_the_holder(unpack):
    c = unpack("v3-kernel-written")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, ubdcow; d = ubdcow.open(sys.argv[1], 'r+', backing=sys.argv[2]); "
         "print('R', flush=True); sys.stdin.read()", str(c.cow), str(c.backing)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout.readline() == b"R\n"
        before = stamp(c.cow)
        proc = run_cli("check", "--repair", c.cow, "--backing", c.backing)
        assert proc.returncode == 1
        assert_one_line_error(proc, "locked by", f"process {holder.pid}")
        assert stamp(c.cow) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)


def test_check_repair_of_a_file_without_mixed_pages_touches_nothing(unpack):
    c = unpack("v3-discard")  # whole pages only
    before = stamp(c.cow)
    proc = run_cli("check", "--repair", c.cow)  # no backing needed when there is nothing to do
    assert proc.returncode == 3, proc.stdout  # the recorded backing is missing: reported, not a repair error
    assert proc.stdout.decode().splitlines()[0] == "repaired 0 mixed pages"
    assert stamp(c.cow) == before


REPAIR_CHILD = """
import os, sys, ubdcow, ubdcow._pagewrite
ubdcow._pagewrite._FILL_BATCH = 250  # many batches (data, fsync, bits): many points to be killed between
img = ubdcow.open(sys.argv[1], "r+")
set_durably = img._writer._set_durably
def announced(spans):
    set_durably(spans)
    os.write(1, b"B")  # one batch's bits are set
img._writer._set_durably = announced
os.write(1, b"R")
img.fill_mixed_pages()
os.write(1, b"D")
"""


def test_kill_9_during_repair_never_changes_the_content(tmp_path):
    rng = random.Random(0xFA11)
    size = 128 << 20
    # 20,000 mixed pages: 80 batches of data + fsync + bits; each kill lands after 0-2 of them, at a random moment
    cow, backing, model = mixed_file(tmp_path, size, rng, pages=20000)
    original = backing.read_bytes()
    mixed_before = len(model_mixed(honoured(cow)))
    assert mixed_before == 20000
    partial = []  # mixed pages left after kills that landed inside the repair
    for trial in range(40):
        child = subprocess.Popen([sys.executable, "-c", REPAIR_CHILD, str(cow)], stdout=subprocess.PIPE)
        assert child.stdout.read(1) == b"R"
        batches = rng.randrange(3)
        assert child.stdout.read(batches) == b"B" * batches
        time.sleep(rng.uniform(0.0, 0.01))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdout.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                got = disk_bytes(cow)
                break
            except ubdcow.ImageLockedError:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert got == model, f"trial {trial}: the content changed"
        report = ubdcow.check(cow)
        assert report.exit_code == 0, report.as_dict()
        if not report.mixed_pages:
            break
        assert report.mixed_pages <= mixed_before
        if report.mixed_pages < mixed_before:
            partial.append(report.mixed_pages)
    final = ubdcow.check(cow, repair=True)
    assert final.mixed_pages == 0 and disk_bytes(cow) == model
    assert len(partial) >= 10, f"too few kills landed inside the repair: {partial}"
    assert backing.read_bytes() == original


# -- convert fills them ----------------------------------------------------------------------


# v1-rounding-tail: converting to v3 keeps v1's bitless tail sectors reading from the backing; tested below
@pytest.mark.parametrize("name", [n for n in MIXED_CASES if n != "v1-rounding-tail"])
def test_convert_with_the_backing_file_makes_pages_whole(unpack, name):
    c = unpack(name)
    before_bits = honoured(c.cow)
    mixed = model_mixed(before_bits)
    out = c.dir / "whole.cow"
    proc = run_cli("convert", c.cow, "-o", out, "--backing", c.backing, "--json")
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    result = json.loads(proc.stdout)
    assert (result["filled_pages"], result["mixed_pages"], result["backing_problem"]) == (len(mixed), 0, None)
    bits = honoured(out)
    assert model_mixed(bits) == [] and (bits == whole_pages_of(before_bits)).all()
    assert disk_bytes(out, c.backing)[: c.meta["size"]] == c.expected_bytes


def test_convert_of_the_v1_rounding_tail_file_fills_its_honoured_pages(unpack):
    c = unpack("v1-rounding-tail")
    out = c.dir / "whole.cow"
    result = ubdcow.convert(c.cow, out, backing=c.backing)
    assert (result.filled_pages, result.mixed_pages) == (1, 0)
    assert np.flatnonzero(honoured(out)).tolist() == list(range(1944, 1952))
    assert disk_bytes(out, c.backing) == c.expected_bytes


def test_convert_without_a_usable_backing_file_keeps_the_pages_and_warns_once(unpack):
    c = unpack("v3-kernel-written")  # its recorded /srv/... backing does not exist here
    out = c.dir / "as-is.cow"
    proc = run_cli("convert", c.cow, "-o", out)
    assert proc.returncode == 0
    err = proc.stderr.decode().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: {out}: 6 mixed pages carried over as they are"), err
    assert "not found" in err[0] and f"make them whole: ubdcow check {out} --repair" in err[0]
    assert (honoured(out) == honoured(c.cow)).all()
    assert disk_bytes(out, c.backing) == c.expected_bytes
    result = ubdcow.convert(c.cow, c.dir / "as-is-2.cow")
    assert (result.filled_pages, result.mixed_pages) == (0, 6) and "not found" in (result.backing_problem or "")
    # a recorded backing file that was touched (mtime mismatch) is not used either, and the result says so
    assert run_cli("rebase", "--unsafe", c.cow, "--backing", c.backing).returncode == 0  # record the real path
    os.utime(c.backing, (c.meta["mtime"] + 1, c.meta["mtime"] + 1))
    result = ubdcow.convert(c.cow, c.dir / "as-is-3.cow")
    assert result.mixed_pages == 6 and "mtime mismatch" in (result.backing_problem or "")


def test_convert_refuses_a_named_backing_file_that_does_not_match(unpack, tmp_path):
    c = unpack("v3-kernel-written")
    other = tmp_path / "other.img"
    other.write_bytes(c.backing.read_bytes())  # a copy: new mtime
    out = c.dir / "never.cow"
    proc = run_cli("convert", c.cow, "-o", out, "--backing", other)
    assert_one_line_error(proc, "mtime mismatch", "fill the mixed pages")
    assert not out.exists()


def test_convert_of_a_file_without_mixed_pages_needs_no_backing_file(unpack):
    c = unpack("v3-discard")
    proc = run_cli("convert", c.cow, "-o", c.dir / "v3.cow", "--json")
    assert proc.returncode == 0 and proc.stderr == b""
    assert json.loads(proc.stdout)["mixed_pages"] == json.loads(proc.stdout)["filled_pages"] == 0


# -- writers leave whole pages -----------------------------------------------------------------


def test_writes_make_only_the_pages_they_touch_whole(tmp_path):
    rng = random.Random(77)
    size = 1 << 20
    cow, backing, model = mixed_file(tmp_path, size, rng, pages=40)
    before = honoured(cow)
    mixed = model_mixed(before)
    target, other = mixed[0], mixed[1]
    with ubdcow.open(cow, "r+") as disk:
        disk.pwrite(b"\x01", target * PAGE + 100)  # one byte inside a mixed page
        model[target * PAGE + 100] = 1
        disk.write_zeroes(other * PAGE + 1000, 10)
        model[other * PAGE + 1000 : other * PAGE + 1010] = bytes(10)
    after = honoured(cow)
    assert model_mixed(after) == [p for p in mixed if p not in (target, other)]
    changed = np.flatnonzero(after != before) // 8
    assert set(changed.tolist()) == {target, other}
    assert disk_bytes(cow) == model
