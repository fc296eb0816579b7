"""``info``: the library call and the CLI, on real files."""

from __future__ import annotations

import json
import os

import pytest
import test_oracle_model as spec
from conftest import GEOMETRY_KEYS, run_cli

import ubdcow
from ubdcow.format import make_header

KEYS = {
    "file",
    "version",
    "layout",
    "backing_file",
    "backing",
    "mtime",
    "size",
    "sectorsize",
    "alignment",
    "bitmap_offset",
    "bitmap_len",
    "data_offset",
    "sectors",
    "cow_sectors",
    "cow_bytes",
    "apparent_size",
    "allocated_size",
}
BACKING_KEYS = {"path", "exists", "size", "mtime", "size_matches", "mtime_matches"}


def test_info_of_every_conformance_case(case):
    facts = ubdcow.info(case.cow, backing=case.backing)
    meta = case.meta
    assert KEYS <= facts.keys() and BACKING_KEYS <= facts["backing"].keys()
    for key in GEOMETRY_KEYS:
        assert facts[key] == meta[key], key
    assert facts["backing_file"] == meta["backing_file_in_header"]
    assert facts["cow_sectors"] == sum(n for _, n in meta["effective_extents"])
    assert facts["apparent_size"] == meta["cow_file_size"] == case.cow.stat().st_size
    assert facts["allocated_size"] == case.cow.stat().st_blocks * 512
    # the model counts the honoured set bits from the bitmap bytes; a set partial last sector counts its
    # bytes below size (v3-odd-size: sector 1952 of a 1,000,000-byte disk holds 64)
    assert facts["cow_bytes"] == spec.cow_bytes(case.cow)
    tail = meta["size"] - 512 * (meta["sectors"] - 1)
    last_set = any(first + count == meta["sectors"] for first, count in meta["effective_extents"])
    assert facts["cow_bytes"] == 512 * facts["cow_sectors"] - (512 - tail) * last_set
    b = facts["backing"]
    assert b == {
        **b,
        "path": str(case.backing),
        "exists": True,
        "size": meta["size"],
        "mtime": meta["mtime"],
        "size_matches": True,
        "mtime_matches": True,
    }
    proc = run_cli("info", "--json", case.cow, "--backing", case.backing)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"disks": [{"disk": str(case.cow), **{k: v for k, v in facts.items() if k != "file"},
                                                  "exit_code": 0}], "exit_code": 0}


def test_v1_rounding_bits_past_the_bitmap_are_not_counted(unpack):
    c = unpack("v1-rounding-tail")
    assert ubdcow.info(c.cow, backing=c.backing)["cow_sectors"] == 4  # the file holds 6 bits; the kernel honours 4


def test_recorded_backing_path_is_used_and_reported_missing(unpack):
    c = unpack("v3-kernel-written")
    facts = ubdcow.info(c.cow)
    assert facts["backing"]["exists"] is False
    assert "/srv/ubdcow-fixtures/v3-kernel-written/backing.img" in facts["backing"]["problem"]
    proc = run_cli("info", c.cow)
    assert proc.returncode == 0  # reported, not fatal
    assert b"not found" in proc.stdout


def test_mismatched_backing_is_explained_in_the_kernels_terms(unpack):
    c = unpack("v3-mkcow-written")
    os.utime(c.backing, (1_577_836_800, 1_577_836_800))
    facts = ubdcow.info(c.cow, backing=c.backing)
    assert facts["backing"]["mtime_matches"] is False and facts["backing"]["size_matches"] is True
    proc = run_cli("info", c.cow, "--backing", c.backing)
    assert proc.returncode == 0
    text = proc.stdout.decode()
    assert "mtime mismatch (1700000000 vs 1577836800) of COW header vs backing file" in text
    assert "rebase --unsafe" in text
    with open(c.backing, "ab") as f:
        f.write(b"x")
    text = run_cli("info", c.cow, "--backing", c.backing).stdout.decode()
    assert "Size mismatch (3145728 vs 3145729) of COW header vs backing file" in text


def test_human_output_shows_apparent_and_allocated_sizes(unpack):
    c = unpack("v3-kernel-written")
    text = run_cli("info", c.cow, "--backing", c.backing).stdout.decode()
    assert "1.0 MiB" in text and "apparent" in text and "allocated" in text
    exact = run_cli("info", "--bytes", c.cow, "--backing", c.backing).stdout.decode()
    assert str(c.cow.stat().st_size) in exact


@pytest.mark.parametrize("layout", ["v3", "v2"])
def test_counting_a_huge_sparse_bitmap(tmp_path, layout):
    """A 2 TiB virtual disk (a 512 MiB v3 bitmap), bits set at both ends and in the middle."""
    size = 2 << 40
    (tmp_path / "b.img").touch()
    os.truncate(tmp_path / "b.img", size)
    h = make_header(layout, str(tmp_path / "b.img"), int(os.stat(tmp_path / "b.img").st_mtime), size, alignment=4096)
    cow = tmp_path / "big.cow"
    with open(cow, "wb") as f:
        f.write(h.to_bytes())
        f.truncate(h.data_offset + size)
        marks = {0: 0xFF, 1: 0x01, h.bitmap_len // 2: 0x80, h.bitmap_len - 1: 0x80}
        for index, value in marks.items():
            f.seek(h.bitmap_offset + index)
            f.write(bytes([value]))
    facts = ubdcow.info(cow)
    assert 8 * h.bitmap_len == h.sectors == 2**32  # both formulas agree for a multiple of 4 KiB
    assert facts["cow_sectors"] == 8 + 1 + 1 + 1
    assert facts["cow_bytes"] == 11 * 512
    assert facts["sectors"] == size // 512
    assert facts["allocated_size"] < 1 << 20


def test_info_is_a_result_and_reads_as_the_dict_it_was(unpack) -> None:
    """info returns a Result like every other tool (issue 24, item 6): to_dict() is the dict it returned
    before, and the result still reads as that dict."""
    from ubdcow._result import Result

    c = unpack("v3-kernel-written")
    facts = ubdcow.info(c.cow, backing=c.backing)
    record = facts.to_dict()
    assert isinstance(facts, Result) and isinstance(record, dict) and type(record) is dict
    assert list(record) == list(facts) == list(facts.keys())
    assert facts == record and dict(facts) == record and {**facts} == record
    assert facts["cow_sectors"] == facts.cow_sectors == record["cow_sectors"]
    assert facts["backing"]["mtime_matches"] is True and "file" in facts and "nothing" not in facts
    with pytest.raises(KeyError):
        facts["nothing"]
    assert json.loads(json.dumps(record)) == record
