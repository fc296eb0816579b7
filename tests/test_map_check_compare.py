"""``map``, ``check`` and ``compare``: the library calls and the CLI, on real files and hand-damaged copies.

The truth is the conformance corpus: the manifest's ``effective_extents`` (the
bits the kernel honours) and ``expected.img`` (the bytes a real guest read).
Damaged files are built from those real files, or with ``ubdcow.create`` /
``ubdcow.format.make_header``, with the damage placed by hand at offsets the
spec gives.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import assert_one_line_error, require, require_tool, run_cli, unpack_case
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import ubdcow
from ubdcow._io import punch_hole
from ubdcow.check import check
from ubdcow.cli import main
from ubdcow.compare import WINDOW, compare
from ubdcow.format import make_header
from ubdcow.inspect import map_image

SECTOR = 512
HEALTH = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


# -- helpers ---------------------------------------------------------------------------
def cli(*args: Any, real: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI; whatever happens, never a traceback.

    ``real``: ``python -m ubdcow`` in a subprocess. Otherwise ``ubdcow.cli.main`` in
    this process with stdout/stderr captured (the same code past the entry point, a
    hundred times faster); an exception escaping it is a test failure here.
    """
    argv = [str(a) for a in args]
    if real:
        proc = run_cli(*argv)
    else:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        proc = subprocess.CompletedProcess(argv, code, out.getvalue().encode(), err.getvalue().encode())
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert b"internal error" not in proc.stderr, proc.stderr.decode(errors="replace")
    return proc


def extent(start: int, length: int, source: str, offset: int) -> dict[str, Any]:
    return {"start": start, "length": length, "source": source, "offset": offset}


def expected_map(meta: dict[str, Any], zero_sectors: set[int] = frozenset()) -> list[dict[str, Any]]:  # type: ignore[assignment]
    """The map the manifest implies: honoured bits -> cow (or zero over a hole), the rest -> backing.

    Built sector by sector, then coalesced and clipped to ``size``.
    """
    size, data_offset = meta["size"], meta["data_offset"]
    labels = ["backing"] * meta["sectors"]
    for first, count in meta["effective_extents"]:
        for s in range(first, first + count):
            labels[s] = "zero" if s in zero_sectors else "cow"
    out: list[dict[str, Any]] = []
    s = 0
    while s < len(labels):
        e = s
        while e < len(labels) and labels[e] == labels[s]:
            e += 1
        start, end = s * SECTOR, min(size, e * SECTOR)
        offset = start if labels[s] == "backing" else data_offset + start
        out.append(extent(start, end - start, labels[s], offset))
        s = e
    return out


def assert_tiles(extents: list[dict[str, Any]], size: int) -> None:
    """Extents cover [0, size) exactly, in order, contiguous, non-empty, coalesced."""
    assert extents, "a disk of at least one byte has at least one extent"
    pos = 0
    for i, e in enumerate(extents):
        assert set(e) == {"start", "length", "source", "offset"}, e
        assert e["start"] == pos, (i, e)
        assert e["length"] > 0, (i, e)
        assert e["source"] in ("cow", "zero", "backing"), e
        if i:
            assert e["source"] != extents[i - 1]["source"], ("not coalesced", extents[i - 1], e)
        pos += e["length"]
    assert pos == size
    assert sum(e["length"] for e in extents) == size


def set_bit(path: Path, bitmap_offset: int, sector: int, on: bool = True) -> None:
    """Set (or clear) sector's bit by hand: bit ``1 << (i % 8)`` of byte ``i // 8``."""
    with open(path, "r+b") as f:
        f.seek(bitmap_offset + sector // 8)
        byte = f.read(1)[0]
        byte = byte | (1 << (sector % 8)) if on else byte & ~(1 << (sector % 8))
        f.seek(bitmap_offset + sector // 8)
        f.write(bytes([byte]))


def check_cli(cow: Path, *args: Any, real: bool = False) -> dict[str, Any]:
    """``check --json``: well-formed findings, exit code = the report's, and the same as the library's."""
    proc = cli("check", cow, "--json", *args, real=real)
    assert proc.stderr == b"", proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc) == {"disks", "exit_code"} and len(doc["disks"]) == 1 and doc["exit_code"] == proc.returncode
    data = doc["disks"][0]
    assert set(data) == {
        "disk", "status", "exit_code", "findings", "stats", "mixed_pages", "mixed_page_offsets", "repaired_pages"
    }
    assert data["mixed_pages"] >= len(data["mixed_page_offsets"]) and len(data["mixed_page_offsets"]) <= 16
    assert data["disk"] == str(cow)
    assert proc.returncode == data["exit_code"]
    assert data["status"] == {0: "clean", 2: "corrupt", 3: "backing-mismatch"}[data["exit_code"]]
    for f in data["findings"]:
        assert set(f) == {"code", "severity", "message"}, f
        assert f["severity"] in ("error", "warning", "info"), f
        assert f["message"] and "\n" not in f["message"] and f["message"] == f["message"].strip(), f
    backing = args[args.index("--backing") + 1] if "--backing" in args else None
    lib = check(cow, backing=backing).as_dict()
    assert lib.pop("file") == data["disk"] and {"disk": data["disk"], **lib} == data
    return data


def problems(data: dict[str, Any], *, pages: bool = False) -> list[dict[str, Any]]:
    """The findings; the mixed-pages warning only with ``pages`` (most conformance files have mixed pages,
    and test_check_every_conformance_case checks that warning against a model)."""
    return [f for f in data["findings"] if pages or f["code"] != "mixed-pages"]


def codes(data: dict[str, Any], *, pages: bool = False) -> list[tuple[str, str]]:
    return [(f["code"], f["severity"]) for f in problems(data, pages=pages)]


def finding(data: dict[str, Any], code: str) -> dict[str, Any]:
    found = [f for f in data["findings"] if f["code"] == code]
    assert len(found) == 1, (code, data["findings"])
    return found[0]


def make_cow_file(path: Path, header: ubdcow.CowHeader, length: int | None = None) -> None:
    """A COW file from a header: header bytes, zero bitmap, sparse data area."""
    with open(path, "wb") as f:
        f.write(header.to_bytes())
        f.truncate(header.file_size if length is None else length)


def make_backing(path: Path, size: int, mtime: int = 1_600_000_000, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).integers(1, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))
    return data


# == map ===============================================================================
def test_map_of_every_case_is_the_manifests_effective_extents(case):
    meta = case.meta
    extents = map_image(case.cow)
    assert_tiles(extents, meta["size"])
    # gzip wrote every byte of the data area, so there is no hole: no "zero" extent yet
    assert extents == expected_map(meta)
    # in sector units, the non-backing extents are exactly the honoured bits
    runs = [[e["start"] // SECTOR, -(-e["length"] // SECTOR)] for e in extents if e["source"] != "backing"]
    assert runs == meta["effective_extents"]
    # offset semantics, checked against the real bytes: the guest read [start, start+length)
    # from the COW file at offset for cow, from the backing file at offset for backing
    expected = case.expected_bytes
    cow = case.cow.read_bytes()
    backing = case.backing.read_bytes()
    for e in extents:
        a, n = e["start"], e["length"]
        if e["source"] == "backing":
            assert e["offset"] == a
            assert backing[a : a + n] == expected[a : a + n], e
        else:
            assert e["offset"] == meta["data_offset"] + a
            assert cow[e["offset"] : e["offset"] + n] == expected[a : a + n], e


def test_map_cli_json_is_map_image(case):
    proc = cli("map", case.cow, "--json")
    assert proc.returncode == 0 and proc.stderr == b""
    assert json.loads(proc.stdout) == {"disks": [{"disk": str(case.cow), "extents": map_image(case.cow), "exit_code": 0}],
                                       "exit_code": 0}


def fs_punches_holes(folder: Path) -> bool:
    """Whether the filesystem of ``folder`` deallocates a punched range, asked through util-linux's
    ``fallocate --punch-hole`` (not ubdcow's code) on a scratch file."""
    probe = folder / "punch-probe"
    probe.write_bytes(os.urandom(64 * 1024))
    before = probe.stat().st_blocks
    proc = subprocess.run([require_tool("fallocate", "util-linux"), "--punch-hole", "--offset", "0", "--length",
                           str(64 * 1024), str(probe)], capture_output=True)
    after = probe.stat().st_blocks
    probe.unlink()
    return proc.returncode == 0 and after < before


def discard_holes(c) -> tuple[set[int], int]:  # type: ignore[no-untyped-def]
    """Punch holes over the sectors the v3-discard guest discarded; return the sectors now over a hole.

    The discarded sectors are the set ones whose data is all zeros. A punch only
    deallocates whole filesystem blocks; a partial block is zeroed but stays data.
    """
    meta = c.meta
    d = meta["data_offset"]
    data = c.cow.read_bytes()
    zeros = sorted(
        s
        for first, count in meta["effective_extents"]
        for s in range(first, first + count)
        if data[d + s * SECTOR : d + (s + 1) * SECTOR] == bytes(SECTOR)
    )
    runs: list[list[int]] = []
    for s in zeros:
        if runs and runs[-1][0] + runs[-1][1] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    block = os.stat(c.cow).st_blksize
    holes: set[int] = set()
    fd = os.open(c.cow, os.O_RDWR)
    try:
        for first, count in runs:
            if not punch_hole(fd, d + SECTOR * first, SECTOR * count):
                # punch_hole is the code under test: it may say "unsupported" only where the filesystem
                # really is (util-linux's fallocate says so too); otherwise that is a failure
                require(fs_punches_holes(c.cow.parent), "this filesystem cannot punch holes")
                pytest.fail(f"punch_hole returned False, but {c.cow.parent}'s filesystem punches holes")
            lo = -(-(d + SECTOR * first) // block) * block
            hi = (d + SECTOR * (first + count)) // block * block
            holes |= {s for s in range(first, first + count) if lo <= d + s * SECTOR and d + (s + 1) * SECTOR <= hi}
    finally:
        os.close(fd)
    return holes, len(zeros)


def test_map_of_discarded_sectors_is_zero_runs_at_cow_file_offsets(unpack):
    c = unpack("v3-discard")
    meta = c.meta
    holes, discarded = discard_holes(c)
    assert discarded == 128 + 16 + 2  # the guest discarded 128-255, 512-527 and 1028-1029
    # 128-255 and 512-527 start and end on 4 KiB boundaries of the file: holes on any filesystem here
    assert set(range(128, 256)) | set(range(512, 528)) <= holes
    extents = map_image(c.cow)
    assert_tiles(extents, meta["size"])
    assert extents == expected_map(meta, holes)
    zero = [e for e in extents if e["source"] == "zero"]
    assert extent(128 * SECTOR, 128 * SECTOR, "zero", meta["data_offset"] + 128 * SECTOR) in zero
    assert extent(512 * SECTOR, 16 * SECTOR, "zero", meta["data_offset"] + 512 * SECTOR) in zero
    for e in zero:
        assert e["offset"] == meta["data_offset"] + e["start"]
        # what the guest read there is zeros, not the backing file's pattern
        assert c.expected_bytes[e["start"] : e["start"] + e["length"]] == bytes(e["length"])
    # the honoured bits are unchanged: cow + zero still cover exactly the effective extents
    covered = sorted(
        s
        for e in extents
        if e["source"] != "backing"
        for s in range(e["start"] // SECTOR, (e["start"] + e["length"]) // SECTOR)
    )
    assert covered == sorted(s for a, n in meta["effective_extents"] for s in range(a, a + n))
    # and the CLI says the same
    proc = cli("map", c.cow, "--json", real=True)
    assert proc.returncode == 0 and proc.stderr == b"" and json.loads(proc.stdout)["disks"][0]["extents"] == extents


TABLE_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+(cow|zero|backing)\s+(\d+)$")


@pytest.mark.parametrize("name", ["v3-discard", "v3-odd-size", "v1-rounding-tail"])
def test_map_human_output_is_a_table_with_totals(unpack, name):
    c = unpack(name)
    if name == "v3-discard":
        discard_holes(c)
    extents = map_image(c.cow)
    proc = cli("map", c.cow, "--bytes", real=name == "v3-discard")
    assert proc.returncode == 0 and proc.stderr == b""
    lines = proc.stdout.decode().splitlines()
    assert lines[0].split() == ["start", "length", "source", "offset"]
    rows = []
    for line in lines[1:]:
        m = TABLE_ROW.match(line)
        if not m:
            break
        rows.append(extent(int(m[1]), int(m[2]), m[3], int(m[4])))
    assert rows == extents
    rest = [line for line in lines[1 + len(rows) :] if line.strip()]
    assert len(rest) == 1, rest
    totals = {src: sum(e["length"] for e in extents if e["source"] == src) for src in ("cow", "zero", "backing")}
    assert rest[0] == f"totals: {totals['cow']} cow, {totals['zero']} zero, {totals['backing']} backing"
    if name == "v3-discard":
        assert totals["zero"] > 0
    # without --bytes: the same table, human sizes in the totals
    human = cli("map", c.cow).stdout.decode().splitlines()
    assert human[: 1 + len(rows)] == lines[: 1 + len(rows)]
    assert re.fullmatch(
        r"totals: [\d.]+ (B|KiB|MiB) cow, [\d.]+ (B|KiB|MiB) zero, [\d.]+ (B|KiB|MiB) backing", human[-1]
    )


def test_map_of_a_fresh_cow_file_is_one_backing_extent_then_written_runs(tmp_path):
    backing = tmp_path / "disk.img"
    make_backing(backing, 1_000_000)
    cow = tmp_path / "c.cow"
    header = ubdcow.create(cow, backing)
    assert map_image(cow) == [extent(0, 1_000_000, "backing", 0)]
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"x" * 700, 1000)  # sectors 1-3: their page, sectors 0-7
        img.pwrite(b"y", 999_999)  # the partial last sector 1953: the short last page, sectors 1952-1953
    d = header.data_offset
    assert map_image(cow) == [
        extent(0, 4096, "cow", d),
        extent(4096, 1952 * 512 - 4096, "backing", 4096),
        extent(1952 * 512, 1_000_000 - 1952 * 512, "cow", d + 1952 * 512),  # clipped to size
    ]


def test_map_errors_are_one_line(tmp_path, unpack):
    proc = cli("map", tmp_path / "missing.cow", real=True)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(tmp_path / "missing.cow"))
    c = unpack("v3-kernel-written")
    os.truncate(c.cow, 10_000)  # shorter than data_offset
    proc = cli("map", c.cow, real=True)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(c.cow), "truncated")


# == check =============================================================================
def model_mixed_pages(extents: list[list[int]], sectors: int) -> list[int]:
    """Pages (8 sectors; the last one maybe short) that written-sector extents cover only in part."""
    written = {s for first, n in extents for s in range(first, first + n)}
    pages = {s // 8 for s in written}
    return sorted(p for p in pages if any(s not in written for s in range(8 * p, min(8 * p + 8, sectors))))


def test_check_every_conformance_case(case):
    data = check_cli(case.cow, "--backing", case.backing, real=case.name in ("v1-rounding-tail", "v3-discard"))
    mixed = model_mixed_pages(case.meta["effective_extents"], min(case.meta["sectors"], 8 * case.meta["bitmap_len"]))
    assert (data["mixed_pages"], data["mixed_page_offsets"]) == (len(mixed), [4096 * p for p in mixed[:16]])
    assert data["repaired_pages"] == 0
    # the kernel's own 512-byte O_DIRECT writes made mixed pages in most of these files: a warning, not corruption
    warned = [("mixed-pages", "warning")] if mixed else []
    if case.name == "v1-rounding-tail":
        assert data["exit_code"] == 2
        assert codes(data, pages=True) == [("rounding-short", "info"), ("rounding-lost", "error"), *warned]
    else:
        assert data["exit_code"] == 0
        assert codes(data, pages=True) == warned
    if mixed:
        message = finding(data, "mixed-pages")["message"]
        assert message.startswith(f"{len(mixed)} mixed page") and f"{4096 * mixed[0]}" in message
    assert data["stats"] == {
        "sectors": case.meta["sectors"],
        "written_sectors": sum(n for _, n in case.meta["effective_extents"]),
        "hole_sectors": 0,  # gzip wrote every byte
    }


def test_check_human_output(unpack):
    c = unpack("v3-kernel-written")
    proc = cli("check", c.cow, "--backing", c.backing, real=True)
    assert proc.returncode == 0 and proc.stderr == b""
    assert proc.stdout.decode().splitlines() == [
        "69 of 2048 sectors written (3.4%), 0 of them holes in the data area (discarded: they read as zeros)",
        "warning: 6 mixed pages (4 KiB pages of the disk with some sectors in the COW file and some in the backing "
        "file), at byte offsets 0, 4096, 24576, 49152, ...: the Linux ubd driver returns wrong data for the pages "
        "after a mixed page in a multi-page read, so a guest's filesystem can see corrupt data [mixed-pages]",
        f"{c.cow}: clean (the warnings above do not make it corrupt)",
        # the user's --backing is kept (issue 21, item 2)
        f"hint: make the mixed pages whole (the content stays the same): ubdcow check {c.cow} --backing {c.backing} "
        "--repair",
    ]
    t = unpack("v1-rounding-tail")
    proc = cli("check", t.cow, "--backing", t.backing, real=True)
    assert proc.returncode == 2 and proc.stderr == b""
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith("4 of 1954 sectors written")  # 1948-1951; 1952-1953 have no bit
    assert lines[-2:] == [
        f"{t.cow}: corruption found",
        f"hint: make the mixed pages whole (the content stays the same): ubdcow check {t.cow} --backing {t.backing} "
        "--repair",
    ]
    found = [FINDING_LINE.match(line) for line in lines[1:-2]]
    assert all(found), lines
    shown = [(m[1], m[3]) for m in found]  # type: ignore[index]
    assert shown == [("info", "rounding-short"), ("error", "rounding-lost"), ("warning", "mixed-pages")]
    report = check(t.cow, backing=t.backing)
    assert [m[2] for m in found] == [f.message for f in report.findings]  # type: ignore[index]


FINDING_LINE = re.compile(r"^(error|warning|info): (.+) \[([a-z-]+)\]$")


def test_check_stats_count_written_sectors_and_holes(unpack):
    c = unpack("v3-discard")
    written = sum(n for _, n in c.meta["effective_extents"])
    data = check_cli(c.cow, "--backing", c.backing)
    assert data["stats"] == {"sectors": 2048, "written_sectors": written, "hole_sectors": 0}
    holes, _ = discard_holes(c)
    data = check_cli(c.cow, "--backing", c.backing)
    assert data["exit_code"] == 0 and data["findings"] == []
    assert data["stats"] == {"sectors": 2048, "written_sectors": written, "hole_sectors": len(holes)}


@pytest.mark.parametrize("length, where", [(10_000, "before its data"), (8_300, "inside the bitmap")])
def test_check_truncated(unpack, length, where):
    c = unpack("v3-kernel-written")
    meta = c.meta
    assert meta["bitmap_offset"] + meta["bitmap_len"] < 10_000 < meta["data_offset"]
    assert meta["bitmap_offset"] < 8_300 < meta["bitmap_offset"] + meta["bitmap_len"]
    os.truncate(c.cow, length)
    data = check_cli(c.cow, "--backing", c.backing)
    assert data["exit_code"] == 2
    f = finding(data, "truncated")
    assert f["severity"] == "error"
    assert where in f["message"] and str(length) in f["message"]
    # every written sector's data is now past EOF
    assert finding(data, "data-past-eof")["severity"] == "error"


def test_check_truncated_inside_the_header_is_a_header_finding(unpack):
    c = unpack("v3-kernel-written")
    os.truncate(c.cow, 100)
    data = check_cli(c.cow, "--backing", c.backing)
    assert data["exit_code"] == 2
    assert codes(data) == [("header", "error")]
    assert "truncated" in problems(data)[0]["message"]


@pytest.mark.parametrize(
    "name, length, lost, first",
    [
        ("v3-kernel-written", 12288 + 512 * 2000, 1, 2000),  # only 2047 lost
        ("v3-kernel-written", 12288 + 512 * 2047 + 1, 1, 2047),  # 2047's data is cut short
        ("v3-kernel-written", 12288 + 512 * 120 + 7, 1 + 44, 120),  # 120-163 and 2047
        ("v3-align512", 5120 + 512 * 10, 2 + 8, 10),  # 10-11, 2040-2047
    ],
)
def test_check_data_past_eof(unpack, name, length, lost, first):
    c = unpack(name)
    os.truncate(c.cow, length)
    data = check_cli(c.cow, "--backing", c.backing)
    assert data["exit_code"] == 2
    assert codes(data) == [("data-past-eof", "error")]
    msg = problems(data)[0]["message"]
    assert f"{lost} written sectors (from sector {first} on)" in msg and str(length) in msg


def test_data_past_eof_reads_as_zeros_in_map_and_compare(unpack):
    """check, map and compare agree on a truncated file: the lost sector 2047 is zeros."""
    c = unpack("v3-kernel-written")
    d = c.meta["data_offset"]
    os.truncate(c.cow, d + 512 * 2000)
    assert map_image(c.cow)[-1] == extent(2047 * SECTOR, SECTOR, "zero", d + 2047 * SECTOR)
    assert c.expected_bytes[2047 * SECTOR :] != bytes(SECTOR)
    result = compare(c.cow, c.expected, backing_a=c.backing)
    assert (result.identical, result.first_difference) == (False, 2047 * SECTOR)


def test_check_short_file_without_written_sectors_past_eof_is_clean(unpack):
    c = unpack("v1-native")  # written: 2-3, 1999-2038
    os.truncate(c.cow, c.meta["data_offset"] + 512 * 2039)
    assert problems(check_cli(c.cow, "--backing", c.backing)) == []


@given(cut=st.integers(0, 2048 * SECTOR - 1))
@example(cut=0)
@example(cut=512 * 2047)
@example(cut=512 * 164 - 1)
@example(cut=512 * 164)
@settings(max_examples=25, deadline=None, suppress_health_check=HEALTH)
def test_check_data_past_eof_counts_exactly_the_cut_sectors(tmp_path, cut):
    c = CASE_CACHE.get("kw") or CASE_CACHE.setdefault("kw", unpack_case("v3-kernel-written", tmp_path / "kw"))
    meta = c.meta
    work = tmp_path / f"cut-{cut}.cow"
    shutil.copyfile(c.cow, work)
    length = meta["data_offset"] + cut
    os.truncate(work, length)
    written = [s for a, n in meta["effective_extents"] for s in range(a, a + n)]
    lost = [s for s in written if meta["data_offset"] + (s + 1) * SECTOR > length]
    report = check(work, backing=c.backing)
    found = [f for f in report.findings if f.code != "mixed-pages"]  # checked in test_check_every_conformance_case
    got = [(f.code, f.severity) for f in found]
    if lost:
        assert got == [("data-past-eof", "error")]
        assert found[0].message.startswith(f"{len(lost)} written sectors (from sector {cut // SECTOR} on)")
        assert report.exit_code == 2
    else:
        assert got == [] and report.exit_code == 0
    work.unlink()


CASE_CACHE: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _forget_cached_cases():
    yield
    CASE_CACHE.clear()


@pytest.mark.parametrize("extra", [1, 4096])
def test_check_trailing_data(unpack, extra):
    c = unpack("v3-kernel-written")
    end = c.meta["data_offset"] + c.meta["sectors"] * SECTOR
    assert c.cow.stat().st_size == end
    os.truncate(c.cow, end + extra)
    data = check_cli(c.cow, "--backing", c.backing)
    assert codes(data) == [("trailing-data", "warning")]
    assert f"{extra} bytes past" in problems(data)[0]["message"] and str(end) in problems(data)[0]["message"]
    assert data["exit_code"] == 0  # a warning is harmless: the image is not corrupt


def test_check_odd_size_may_hold_the_whole_last_sector(unpack):
    """The kernel writes whole 512-byte sectors: data up to data_offset + sectors*512 is not trailing."""
    c = unpack("v3-odd-size")
    end = c.meta["data_offset"] + c.meta["sectors"] * SECTOR
    assert c.cow.stat().st_size == c.meta["data_offset"] + c.meta["size"] < end
    os.truncate(c.cow, end)
    assert problems(check_cli(c.cow, "--backing", c.backing)) == []
    os.truncate(c.cow, end + 1)
    data = check_cli(c.cow, "--backing", c.backing)
    assert codes(data) == [("trailing-data", "warning")]
    assert "1 bytes past" in problems(data)[0]["message"]


def test_check_bits_past_end(unpack):
    c = unpack("v3-odd-size")
    meta = c.meta
    assert (meta["sectors"], meta["bitmap_len"]) == (1954, 245)  # bits 1954-1959 belong to no sector
    before = map_image(c.cow)
    set_bit(c.cow, meta["bitmap_offset"], 1953)  # the real last sector: fine
    assert problems(check_cli(c.cow, "--backing", c.backing)) == []
    set_bit(c.cow, meta["bitmap_offset"], 1953, on=False)
    for s in (1956, 1959):
        set_bit(c.cow, meta["bitmap_offset"], s)
    data = check_cli(c.cow, "--backing", c.backing)
    assert codes(data) == [("bits-past-end", "warning")]
    msg = problems(data)[0]["message"]
    assert "sector 1956" in msg and "sector 1959" in msg and "1953" in msg
    assert "1957" not in msg and "1954" not in msg
    assert data["exit_code"] == 0  # ignored bits: a warning, not corruption
    assert map_image(c.cow) == before  # the stray bits are ignored
    for s in range(1954, 1960):
        set_bit(c.cow, meta["bitmap_offset"], s)
    msg = problems(check_cli(c.cow, "--backing", c.backing))[0]["message"]
    assert "sectors 1954-1959" in msg


def test_check_rounding_lost_on_the_real_file(unpack):
    c = unpack("v1-rounding-tail")
    data = check_cli(c.cow, "--backing", c.backing)
    assert data["exit_code"] == 2
    assert codes(data) == [("rounding-short", "info"), ("rounding-lost", "error")]
    assert "sectors 1952-1953" in finding(data, "rounding-short")["message"]
    lost = finding(data, "rounding-lost")["message"]
    assert "sectors 1952-1953" in lost
    assert str(c.meta["bitmap_offset"] + c.meta["bitmap_len"]) in lost  # where the stray bits are: 524
    assert str(c.meta["data_offset"] + 1952 * SECTOR) in lost  # where their data went


def test_check_rounding_short_alone_is_info_only(tmp_path):
    backing = tmp_path / "disk.img"
    make_backing(backing, 1_000_000)
    cow = tmp_path / "v1.cow"
    header = ubdcow.create(cow, backing, layout="v1")
    assert header.mapped_sectors == 1952 < header.sectors == 1954
    data = check_cli(cow)
    assert codes(data) == [("rounding-short", "info")]
    assert data["exit_code"] == 0 and data["status"] == "clean"


@pytest.mark.parametrize("sector0_written", [True, False])
def test_check_rounding_alias(tmp_path, sector0_written):
    size = 953_856
    backing = tmp_path / "disk.img"
    make_backing(backing, size)
    header = make_header("v1", str(backing), 1_600_000_000, size, byteorder="little")
    # geometry first: the bitmap ends exactly on a sector boundary, so the byte for
    # sectors 1856-1863 (past the bitmap) is the first byte of sector 0's data
    assert (header.bitmap_offset, header.bitmap_len, header.data_offset) == (280, 232, 512)
    assert header.bitmap_offset + header.bitmap_len == header.data_offset
    assert (header.sectors, header.mapped_sectors) == (1863, 1856)
    cow = tmp_path / "alias.cow"
    make_cow_file(cow, header)
    if sector0_written:
        set_bit(cow, header.bitmap_offset, 0)
        with open(cow, "r+b") as f:
            f.seek(header.data_offset)
            f.write(b"\x00" + b"S" * 511)
    set_bit(cow, header.bitmap_offset, 1860)  # the kernel's stray bit: byte 232 = offset 512
    with open(cow, "rb") as f:
        f.seek(header.data_offset)
        assert f.read(1)[0] == 1 << (1860 % 8)
    data = check_cli(cow)
    alias = finding(data, "rounding-alias")["message"]
    assert "first 1 bytes" in alias and "sector 0" in alias
    if sector0_written:
        # the byte is also sector 0's data: a set bit there cannot be told from data, so it is
        # reported as ambiguous, never as corruption
        assert codes(data) == [("rounding-short", "info"), ("rounding-alias", "warning")]
        assert "cannot be told apart" in alias
        assert data["exit_code"] == 0
    else:
        assert codes(data) == [("rounding-short", "info"), ("rounding-alias", "warning"), ("rounding-lost", "error")]
        assert "sector 1860" in finding(data, "rounding-lost")["message"]
        assert data["exit_code"] == 2


def test_check_does_not_call_ordinary_sector_0_data_stray_bits(tmp_path):
    """A v1 file whose bitmap ends where the data starts, with sector 0 written through ubdcow: clean."""
    size = 953_856
    backing = tmp_path / "disk.img"
    make_backing(backing, size)
    cow = tmp_path / "mbr.cow"
    ubdcow.create(cow, backing, layout="v1")
    with ubdcow.open(cow, "r+") as disk:
        disk.pwrite(b"\xeb\x63\x90" + bytes(509), 0)  # an MBR starts like this
    data = check_cli(cow)
    assert data["exit_code"] == 0, data
    assert ("rounding-lost", "error") not in codes(data)


def test_check_stray_bits_in_the_last_padding_byte_do_not_alias(tmp_path):
    """The boundary case: the stray byte is the last byte before data_offset, not sector 0's data."""
    size = 949_760
    backing = tmp_path / "disk.img"
    make_backing(backing, size)
    header = make_header("v1", str(backing), 1_600_000_000, size, byteorder="little")
    assert (header.bitmap_offset, header.bitmap_len, header.data_offset) == (280, 231, 512)
    assert (header.sectors, header.mapped_sectors) == (1855, 1848)
    cow = tmp_path / "edge.cow"
    make_cow_file(cow, header)
    set_bit(cow, header.bitmap_offset, 0)
    set_bit(cow, header.bitmap_offset, 1850)  # byte 231: offset 511, the last padding byte
    data = check_cli(cow)
    assert codes(data) == [("rounding-short", "info"), ("rounding-lost", "error")]
    assert "sector 1850" in finding(data, "rounding-lost")["message"]


HEADER_DAMAGE = {
    # v3 field offsets (big-endian): version @4, size @12, sectorsize @20, alignment @24, cow_format @28
    "version 7": (4, (7).to_bytes(4, "big"), "version 7"),
    "sector size 1000": (20, (1000).to_bytes(4, "big"), "sector size 1000"),
    "alignment 3": (24, (3).to_bytes(4, "big"), "alignment 3"),
    "cow_format 1": (28, (1).to_bytes(4, "big"), "cow_format 1"),
    "size 0": (12, bytes(8), "size is 0"),
}


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_check_corrupt_header_is_a_finding_exit_2(unpack, damage):
    c = unpack("v3-kernel-written")
    offset, raw, needle = HEADER_DAMAGE[damage]
    with open(c.cow, "r+b") as f:
        f.seek(offset)
        f.write(raw)
    data = check_cli(c.cow, "--backing", c.backing)
    assert data["exit_code"] == 2
    assert codes(data) == [("header", "error")]
    assert needle in problems(data)[0]["message"]


def test_check_path_field_without_nul_is_a_header_finding(unpack):
    c = unpack("v2-bigendian")  # path field: 4096 bytes at offset 8
    with open(c.cow, "r+b") as f:
        f.seek(8)
        f.write(b"a" * 4096)
    data = check_cli(c.cow, "--backing", c.backing)
    assert codes(data) == [("header", "error")] and data["exit_code"] == 2


@pytest.mark.parametrize("what", ["raw image", "missing", "empty", "directory"])
def test_check_cannot_run_exit_1(unpack, tmp_path, what):
    c = unpack("v3-kernel-written")
    target = {
        "raw image": c.backing,
        "missing": tmp_path / "nope.cow",
        "empty": tmp_path / "empty.cow",
        "directory": tmp_path,
    }[what]
    if what == "empty":
        target.write_bytes(b"")
    for json_flag in ((), ("--json",)):
        proc = cli("check", target, *json_flag, real=not json_flag)
        assert proc.returncode == 1
        if json_flag:  # the JSON document: this disk's error (docs/cli.md, "JSON output")
            (element,) = json.loads(proc.stdout)["disks"]
            assert element["disk"] == str(target) and element["exit_code"] == 1 and element["error"]
        else:
            assert proc.stdout == b""
        assert_one_line_error(proc, str(target))
    with pytest.raises(ubdcow.UbdCowError):
        check(target)


def test_check_sector_size(tmp_path):
    backing = tmp_path / "disk.img"
    make_backing(backing, 1 << 20)
    header = make_header("v3", str(backing), 1_600_000_000, 1 << 20, sectorsize=4096)
    cow = tmp_path / "ss4096.cow"
    make_cow_file(cow, header, header.data_offset + (1 << 20) // 8)  # every bit's data area present
    data = check_cli(cow)
    assert data["exit_code"] == 2
    assert codes(data) == [("sector-size", "error")]
    assert "4096" in problems(data)[0]["message"]


def test_check_sector_size_file_as_created_reports_no_trailing_data(tmp_path):
    """``ubdcow.create(sectorsize=4096)`` makes a file of data_offset + size bytes, as uml_mkcow would.

    The only problem is the sector size; its data area is not "trailing data".
    """
    backing = tmp_path / "disk.img"
    make_backing(backing, 1 << 20)
    cow = tmp_path / "ss4096.cow"
    header = ubdcow.create(cow, backing, sectorsize=4096)
    assert cow.stat().st_size == header.data_offset + header.size
    data = check_cli(cow)
    assert codes(data) == [("sector-size", "error")]


def test_check_backing_missing(unpack, tmp_path):
    c = unpack("v3-mkcow-written")
    data = check_cli(c.cow)  # the recorded /srv/... path does not exist here
    assert data["exit_code"] == 3 and data["status"] == "backing-mismatch"
    assert codes(data) == [("backing-missing", "error")]
    assert c.meta["backing_file_in_header"] in problems(data)[0]["message"]
    data = check_cli(c.cow, "--backing", tmp_path / "nope.img")
    assert data["exit_code"] == 3 and codes(data) == [("backing-missing", "error")]
    assert str(tmp_path / "nope.img") in problems(data)[0]["message"]
    proc = cli("check", c.cow, real=True)
    assert proc.returncode == 3 and proc.stderr == b""
    verdict = [line for line in proc.stdout.decode().splitlines() if not line.startswith("hint: ")][-1]
    assert verdict.endswith("UML would refuse it")


def test_check_backing_size(unpack):
    c = unpack("v3-mkcow-written")
    other = c.dir / "short.img"
    shutil.copyfile(c.backing, other)
    os.truncate(other, c.meta["size"] - SECTOR)
    os.utime(other, (c.meta["mtime"], c.meta["mtime"]))
    data = check_cli(c.cow, "--backing", other)
    assert data["exit_code"] == 3
    assert codes(data) == [("backing-size", "error")]
    assert f"({c.meta['size']} vs {c.meta['size'] - SECTOR})" in problems(data)[0]["message"]


def test_check_backing_mtime(unpack):
    c = unpack("v3-mkcow-written")
    t = c.meta["mtime"]
    os.utime(c.backing, (t + 0.9, t + 0.9))  # same whole second: the kernel accepts it
    assert check_cli(c.cow, "--backing", c.backing)["exit_code"] == 0
    os.utime(c.backing, (t + 1, t + 1))  # touched
    data = check_cli(c.cow, "--backing", c.backing)
    assert data["exit_code"] == 3
    assert codes(data) == [("backing-mtime", "error")]
    assert f"({t} vs {t + 1})" in problems(data)[0]["message"]


def test_check_backing_problem_with_corruption_is_exit_2(unpack):
    c = unpack("v3-mkcow-written")
    os.utime(c.backing, (1, 1))
    os.truncate(c.cow, c.meta["data_offset"] + SECTOR)
    data = check_cli(c.cow, "--backing", c.backing)
    assert {code for code, _ in codes(data)} == {"data-past-eof", "backing-mtime"}
    assert data["exit_code"] == 2


HOLDERS = {
    # another ubdcow writing the file: an open-file-description lock
    "ubdcow": "import sys, ubdcow\nimg = ubdcow.open(sys.argv[1], 'r+', backing=sys.argv[2])\n",
    # a running guest: the kernel takes a POSIX write lock over the whole file
    "posix": (
        "import fcntl, os, sys\nfd = os.open(sys.argv[1], os.O_RDWR)\nfcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    ),
}


@pytest.mark.parametrize("kind", sorted(HOLDERS))
def test_check_in_use_names_the_pid_and_stays_clean(unpack, kind):
    c = unpack("v3-kernel-written")
    code = HOLDERS[kind] + "print('LOCKED', flush=True)\nsys.stdin.read()\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(c.cow), str(c.backing)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"LOCKED"
        data = check_cli(c.cow, "--backing", c.backing)
        assert codes(data) == [("in-use", "info")]
        assert f"process {holder.pid}" in problems(data)[0]["message"]
        assert data["exit_code"] == 0
        proc = cli("check", c.cow, "--backing", c.backing, real=kind == "posix")
        assert proc.returncode == 0
        assert "[in-use]" in proc.stdout.decode() and str(holder.pid) in proc.stdout.decode()
    finally:
        holder.kill()
        holder.wait()
    assert problems(check_cli(c.cow, "--backing", c.backing)) == []


# == compare ===========================================================================
def test_compare_cow_with_the_guests_bytes_is_identical(case):
    proc = cli("compare", case.cow, case.expected, "--backing-a", case.backing, real=case.name == "v3-odd-size")
    assert proc.returncode == 0 and proc.stderr == b""
    assert proc.stdout.decode() == "identical\n"
    # the other way round, B the COW file
    result = compare(case.expected, case.cow, backing_b=case.backing)
    assert result.identical and result.first_difference is None
    assert result.size_a == result.size_b == case.meta["size"]


@given(data=st.data())
@settings(max_examples=30, deadline=None, suppress_health_check=HEALTH)
def test_compare_finds_a_random_one_byte_change(tmp_path, data):
    name = data.draw(st.sampled_from(["v3-odd-size", "v1-rounding-tail", "v3-kernel-written"]), label="case")
    c = CASE_CACHE.get(name) or CASE_CACHE.setdefault(name, unpack_case(name, tmp_path / name))
    size = c.meta["size"]
    offset = data.draw(st.one_of(st.integers(0, size - 1), st.sampled_from([0, size - 1])), label="offset")
    delta = data.draw(st.integers(1, 255), label="xor")
    original = c.expected_bytes
    changed = bytearray(original)
    changed[offset] ^= delta
    raw = tmp_path / f"{name}-changed.img"
    raw.write_bytes(changed)
    for a, b, kw in ((c.cow, raw, {"backing_a": c.backing}), (raw, c.cow, {"backing_b": c.backing})):
        result = compare(a, b, **kw)
        assert not result.identical
        assert result.first_difference == offset
        assert result.size_a == result.size_b == size


def test_compare_one_byte_change_in_the_cow_side(tmp_path):
    """The change made through the COW file (a write of one byte), not in the raw file."""
    c = unpack_case("v3-odd-size", tmp_path / "c")
    expected = c.expected_bytes
    for offset in (0, 1535, 1536, 4095, 500_000, 999_999):
        with ubdcow.open(c.cow, "r+", backing=c.backing) as img:
            img.pwrite(bytes([expected[offset] ^ 0x5A]), offset)
        result = compare(c.cow, c.expected, backing_a=c.backing)
        assert (result.identical, result.first_difference) == (False, offset)
        with ubdcow.open(c.cow, "r+", backing=c.backing) as img:
            img.pwrite(expected[offset : offset + 1], offset)  # set bit, same bytes: identical again
        assert compare(c.cow, c.expected, backing_a=c.backing).identical


BIG = 9 * (1 << 20) + 123  # three 4 MiB windows, the last one partial, odd size


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A COW file over a 9 MiB backing, written across the window boundaries, and its raw image."""
    d = tmp_path_factory.mktemp("big")
    backing = d / "backing.img"
    content = bytearray(make_backing(backing, BIG, seed=7))
    cow = d / "big.cow"
    ubdcow.create(cow, backing)
    rng = np.random.default_rng(8)
    writes = [(WINDOW - 1000, 3000), (2 * WINDOW - 700, 1400), (0, 10), (BIG - 5000, 5000), (12345, 4096)]
    with ubdcow.open(cow, "r+") as img:
        for off, n in writes:
            blob = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
            img.pwrite(blob, off)
            content[off : off + n] = blob
    raw = d / "big.img"
    raw.write_bytes(content)
    return cow, raw, backing, bytes(content)


def flip(path: Path, offset: int) -> int:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([old ^ 0xFF]))
    return old


def unflip(path: Path, offset: int, old: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes([old]))


def test_compare_big_pair_is_identical_both_ways(big_pair):
    cow, raw, _, _ = big_pair
    for a, b in ((cow, raw), (raw, cow)):
        proc = cli("compare", a, b, real=True)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"identical\n", b"")


@pytest.mark.parametrize(
    "offset",
    [0, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW - 1, 2 * WINDOW, 2 * WINDOW + 1, BIG - 1],
)
def test_compare_first_difference_at_window_boundaries(big_pair, offset):
    cow, raw, _, _ = big_pair
    old = flip(raw, offset)
    try:
        proc = cli("compare", cow, raw, real=offset == WINDOW)
        assert proc.returncode == 1 and proc.stderr == b""
        assert proc.stdout.decode() == f"differ: first difference at byte offset {offset}\n"
        result = compare(raw, cow)
        assert (result.identical, result.first_difference, result.size_a, result.size_b) == (False, offset, BIG, BIG)
    finally:
        unflip(raw, offset, old)


@given(offset=st.integers(0, BIG - 1), later=st.integers(1, 3 * WINDOW))
@example(offset=WINDOW - 1, later=2)
@example(offset=WINDOW, later=WINDOW)
@settings(max_examples=10, deadline=None, suppress_health_check=HEALTH)
def test_compare_reports_the_first_of_two_changes(big_pair, offset, later):
    cow, raw, _, _ = big_pair
    second = min(BIG - 1, offset + later)
    olds = [(o, flip(raw, o)) for o in sorted({offset, second})]
    try:
        result = compare(cow, raw)
        assert (result.identical, result.first_difference) == (False, offset)
    finally:
        for o, old in olds:
            unflip(raw, o, old)


def test_compare_json(big_pair):
    cow, raw, _, _ = big_pair
    proc = cli("compare", cow, raw, "--json")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"disk": str(cow), "against": str(raw), "identical": True,
                                       "first_difference": None, "size_a": BIG, "size_b": BIG, "exit_code": 0}
    old = flip(raw, WINDOW + 1)
    try:
        proc = cli("compare", raw, cow, "--json")
        assert proc.returncode == 1
        assert json.loads(proc.stdout) == {
            "disk": str(raw),
            "against": str(cow),
            "identical": False,
            "first_difference": WINDOW + 1,
            "size_a": BIG,
            "size_b": BIG,
            "exit_code": 1,
        }
    finally:
        unflip(raw, WINDOW + 1, old)


def test_compare_different_sizes(tmp_path, unpack):
    c = unpack("v3-odd-size")
    size = c.meta["size"]
    longer = tmp_path / "longer.img"
    longer.write_bytes(c.expected_bytes + b"\0")
    shorter = tmp_path / "shorter.img"
    shorter.write_bytes(c.expected_bytes[:-1])
    for a, b, sa, sb in (
        (c.cow, longer, size, size + 1),
        (longer, c.cow, size + 1, size),
        (shorter, c.expected, size - 1, size),
    ):
        kw = ("--backing-a", c.backing) if a == c.cow else ("--backing-b", c.backing) if b == c.cow else ()
        proc = cli("compare", a, b, *kw)
        assert proc.returncode == 1 and proc.stderr == b""
        assert proc.stdout.decode() == f"differ: sizes {sa} and {sb}; identical up to the shorter one\n"
        proc = cli("compare", a, b, "--json", *kw)
        assert proc.returncode == 1
        assert json.loads(proc.stdout) == {
            "disk": str(a),
            "against": str(b),
            "identical": False,
            "first_difference": min(sa, sb),
            "size_a": sa,
            "size_b": sb,
            "exit_code": 1,
        }
    # a difference before the shorter one ends is reported as such
    changed = bytearray(c.expected_bytes[:-1])
    changed[777] ^= 1
    shorter.write_bytes(changed)
    proc = cli("compare", c.cow, shorter, "--backing-a", c.backing)
    assert proc.returncode == 1
    assert proc.stdout.decode() == "differ: first difference at byte offset 777\n"
    # an empty raw file against a disk
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    result = compare(empty, c.cow, backing_b=c.backing)
    assert (result.identical, result.first_difference, result.size_a, result.size_b) == (False, 0, 0, size)


def test_compare_cow_with_cow_on_the_same_backing(tmp_path):
    backing = tmp_path / "disk.img"
    content = make_backing(backing, 3 * (1 << 20) + 5)
    one, two = tmp_path / "one.cow", tmp_path / "two.cow"
    ubdcow.create(one, backing)
    ubdcow.create(two, backing)
    assert cli("compare", one, two).returncode == 0
    # a write that does not change the content sets bits but the disks stay identical
    with ubdcow.open(two, "r+") as img:
        img.pwrite(content[4096:8192], 4096)
    assert ubdcow.info(two)["cow_sectors"] == 8
    proc = cli("compare", one, two)
    assert (proc.returncode, proc.stdout) == (0, b"identical\n")
    offset = 1_234_567
    with ubdcow.open(one, "r+") as img:
        img.pwrite(b"changed", offset)
    for a, b in ((one, two), (two, one)):
        proc = cli("compare", a, b)
        assert proc.returncode == 1 and proc.stderr == b""
        assert proc.stdout.decode() == f"differ: first difference at byte offset {offset}\n"
    with ubdcow.open(two, "r+") as img:
        img.pwrite(b"changed", offset)
    assert cli("compare", two, one).returncode == 0
    # COW against a COW file of another layout on the same backing
    v1 = tmp_path / "v1.cow"
    ubdcow.create(v1, backing, layout="v1")
    with ubdcow.open(v1, "r+") as img:
        img.pwrite(b"changed", offset)
    assert compare(v1, one).identical and compare(one, v1).identical


def test_compare_backing_options(unpack, tmp_path):
    a = unpack("v3-mkcow-written", "a")
    b = unpack("v3-kernel-written", "b")
    # the recorded /srv/... backing paths do not exist: without the options, an error
    proc = cli("compare", a.cow, a.expected)
    assert proc.returncode == 2
    assert_one_line_error(proc, a.meta["backing_file_in_header"], "not found")
    proc = cli("compare", a.expected, a.cow)
    assert proc.returncode == 2
    assert_one_line_error(proc, a.meta["backing_file_in_header"])
    # --backing-a belongs to A: given for the wrong side it does not help
    proc = cli("compare", a.expected, a.cow, "--backing-a", a.backing)
    assert proc.returncode == 2
    assert_one_line_error(proc, a.meta["backing_file_in_header"])
    proc = cli("compare", a.expected, a.cow, "--backing-b", a.backing)
    assert (proc.returncode, proc.stdout) == (0, b"identical\n")
    # both COW files, each told its own backing: 3 MiB against 1 MiB
    proc = cli("compare", a.cow, b.cow, "--backing-a", a.backing, "--backing-b", b.backing)
    assert proc.returncode == 1 and proc.stderr == b""
    first = next(i for i, (x, y) in enumerate(zip(a.expected_bytes, b.expected_bytes, strict=False)) if x != y)
    assert proc.stdout.decode() == f"differ: first difference at byte offset {first}\n"


def test_compare_two_cows_with_their_own_backing_files(unpack):
    a = unpack("v3-kernel-written", "a")
    b = unpack("v3-discard", "b")
    assert a.meta["size"] == b.meta["size"]
    first = next(i for i, (x, y) in enumerate(zip(a.expected_bytes, b.expected_bytes, strict=False)) if x != y)
    proc = cli("compare", a.cow, b.cow, "--backing-a", a.backing, "--backing-b", b.backing)
    assert proc.returncode == 1 and proc.stderr == b""
    assert proc.stdout.decode() == f"differ: first difference at byte offset {first}\n"
    # the same COW file through two names, each told its backing: identical
    proc = cli("compare", a.cow, a.cow, "--backing-a", a.backing, "--backing-b", a.backing)
    assert (proc.returncode, proc.stdout) == (0, b"identical\n")
    # a's overlay on b's backing (same size and mtime, so accepted) is not a's disk: it differs
    # first where a's disk reads the backing file and the two backing files differ
    written = {s for x, n in a.meta["effective_extents"] for s in range(x, x + n)}
    backing_b = b.backing.read_bytes()
    first = next(
        i
        for i, (x, y) in enumerate(zip(a.expected_bytes, backing_b, strict=True))
        if x != y and i // SECTOR not in written
    )
    proc = cli("compare", a.cow, a.expected, "--backing-a", b.backing)
    assert proc.returncode == 1 and proc.stderr == b""
    assert proc.stdout.decode() == f"differ: first difference at byte offset {first}\n"


@pytest.mark.parametrize(
    "what", ["missing A", "missing B", "bad COW", "truncated COW", "mtime mismatch", "directory", "sector size 4096"]
)
def test_compare_errors_are_exit_2_and_one_line(unpack, tmp_path, what):
    c = unpack("v3-kernel-written")
    bad = tmp_path / "bad.cow"
    args: tuple[Any, ...]
    if what == "missing A":
        args, needle = (tmp_path / "nope.cow", c.expected), str(tmp_path / "nope.cow")
    elif what == "missing B":
        args, needle = (c.expected, tmp_path / "nope.img"), str(tmp_path / "nope.img")
    elif what == "bad COW":
        data = bytearray(c.cow.read_bytes())
        data[20:24] = (1000).to_bytes(4, "big")  # sector size 1000
        bad.write_bytes(data)
        args, needle = (bad, c.expected, "--backing-a", c.backing), str(bad)
    elif what == "truncated COW":
        shutil.copyfile(c.cow, bad)
        os.truncate(bad, 9000)
        args, needle = (c.expected, bad, "--backing-b", c.backing), str(bad)
    elif what == "mtime mismatch":
        os.utime(c.backing, (1, 1))
        args, needle = (c.cow, c.expected, "--backing-a", c.backing), "mtime mismatch"
    elif what == "directory":
        args, needle = (c.expected, tmp_path), str(tmp_path)
    else:
        ss = tmp_path / "ss4096.cow"
        ubdcow.create(ss, c.expected, sectorsize=4096)
        args, needle = (ss, c.expected), "sector size 4096"
    for extra in ((), ("--json",)):
        proc = cli("compare", *args, *extra, real=not extra)
        assert proc.returncode == 2
        if extra:  # the JSON error document
            doc = json.loads(proc.stdout)
            assert set(doc) == {"error", "hint", "exit_code"} and doc["exit_code"] == 2 and needle in doc["error"]
        else:
            assert proc.stdout == b""
        assert_one_line_error(proc, needle)
