"""The header layer against real files, hand-made bad headers and hypothesis."""

from __future__ import annotations

import gzip
import struct

import pytest
import test_oracle_model as spec
from support.bad_corpus import v3
from conftest import DATA, GEOMETRY_KEYS, MANIFEST, assert_one_line_error, run_cli
from hypothesis import given, settings
from hypothesis import strategies as st

import ubdcow
from ubdcow.errors import (
    CorruptHeaderError,
    NotACowFileError,
    UbdCowError,
    UnsupportedSectorSizeError,
    UnsupportedVersionError,
)
from ubdcow.format import LAYOUTS, MAX_HEADER_SIZE, geometry, header_size, make_header, parse_header


def raw_cow(name: str) -> bytes:
    return gzip.decompress((DATA / name / "overlay.cow.gz").read_bytes())


@pytest.mark.parametrize("meta", MANIFEST, ids=[c["name"] for c in MANIFEST])
def test_conformance_header_and_geometry(meta):
    raw = raw_cow(meta["name"])
    h = parse_header(raw)
    for key in GEOMETRY_KEYS:
        assert getattr(h, key) == meta[key], key
    assert h.backing_file == meta["backing_file_in_header"]
    assert h.cow_format == 0
    assert len(raw) == meta["cow_file_size"]
    # made as data_offset + size; a guest's write of a partial last sector extends it to the sector's end
    assert h.file_size <= len(raw) <= h.data_offset + h.sectors * 512


@pytest.mark.parametrize("name", ["v3-kernel-written", "v3-discard", "v3-odd-size"])
def test_garbage_after_the_paths_nul_is_ignored(name):
    data = raw_cow(name)
    field = data[32 : 32 + 4096]
    path_end = field.index(b"\0")
    assert field[path_end:].strip(b"\0"), "these kernel-made files are known to carry garbage after the NUL"
    assert parse_header(data).backing_file_raw == field[:path_end]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_garbage_after_the_nul_in_every_layout(layout):
    h = make_header(layout, "/b.img", 5, 1 << 20)
    data = bytearray(h.to_bytes())
    start = data.index(b"/b.img\0") + len(b"/b.img\0")
    width = 256 if layout == "v1" else 4096
    field_start = start - len(b"/b.img\0")
    data[start : field_start + width] = bytes(range(1, 256)) * ((field_start + width - start) // 255) + bytes(
        (field_start + width - start) % 255
    )
    assert parse_header(bytes(data)) == h


def test_v1_is_read_in_the_byte_order_of_its_magic():
    little = raw_cow("v1-native")
    assert little[:4] == b"MOOO"
    h = parse_header(little)
    assert h.byteorder == "little"
    swapped = make_header("v1", h.backing_file, h.mtime, h.size, byteorder="big")
    data = swapped.to_bytes()
    assert data[:4] == b"OOOM"
    again = parse_header(data)
    assert (again.byteorder, again.size, again.mtime, again.backing_file) == ("big", h.size, h.mtime, h.backing_file)


def test_v1_v2_rounding_formula_is_reproduced():
    # size 1,000,000: 1954 sectors but only 244 bitmap bytes (1952 bits)
    for layout in ("v1", "v2"):
        _, bitmap_len, _ = geometry(layout, 1_000_000, 512, 512)
        assert bitmap_len == 244
    assert geometry("v3", 1_000_000, 512, 4096)[1] == 245
    h = parse_header(raw_cow("v1-rounding-tail"))
    assert (h.sectors, h.mapped_sectors) == (1954, 1952)


def test_v3_broken_is_told_apart_by_the_zero_cow_format():
    data = raw_cow("v3-broken-64bit")
    assert data[32:36] == b"\0\0\0\0"
    assert parse_header(data).layout == "v3-broken"
    assert parse_header(raw_cow("v3-mkcow-empty")).layout == "v3"


def test_header_sizes():
    assert [header_size(x) for x in LAYOUTS] == [280, 4120, 4128, 4136]


# -- round trips -----------------------------------------------------------------
paths = st.binary(min_size=1, max_size=255).filter(lambda b: b"\0" not in b)
pow2 = st.sampled_from([512, 1024, 2048, 4096, 8192, 16384, 32768, 65536])


@settings(max_examples=300)
@given(
    layout=st.sampled_from(LAYOUTS),
    byteorder=st.sampled_from(["little", "big"]),
    path=paths,
    mtime=st.integers(0, 2**32 - 1),
    size=st.integers(1, 2**50),
    sectorsize=pow2,
    alignment=st.sampled_from([1, 8, 512, 4096, 65536, 1 << 20]),
)
def test_build_then_parse_round_trips(layout, byteorder, path, mtime, size, sectorsize, alignment):
    h = make_header(layout, path, mtime, size, sectorsize=sectorsize, alignment=alignment, byteorder=byteorder)
    data = h.to_bytes()
    assert len(data) == header_size(layout)
    # the builder writes what the spec's offsets give (the model packs each field itself)
    assert data == spec.build_header(layout, path, mtime, size, sectorsize=sectorsize, alignment=alignment,
                                     byteorder=byteorder)
    if layout == "v3":  # the path is non-empty: never the four zeros that mark the broken layout
        assert data[32:36] != bytes(4)
    assert parse_header(data) == h


def assert_agrees_with_the_model(data: bytes) -> None:
    """parse_header and the spec model (tests/test_oracle_model.py) accept the same headers, with the same
    fields and geometry; ubdcow may also refuse a disk whose data area would end past 2^63 bytes."""
    try:
        model = spec.parse(data)
    except spec.SpecError:
        model = None
    try:
        ours = parse_header(data)
    except UbdCowError as exc:
        if model is not None:
            sectors = -(-model.size // model.sectorsize)
            assert "too large" in str(exc) and model.data_offset + 512 * sectors > 2**63 - 1, (exc, model)
        return
    assert model is not None, f"ubdcow accepted a header the spec rejects: {ours}"
    assert (ours.layout, ours.byteorder, ours.version, ours.backing_file_raw, ours.mtime, ours.size) == (
        model.layout, model.byteorder, model.version, model.backing, model.mtime, model.size)
    assert (ours.sectorsize, ours.alignment, ours.cow_format, ours.header_size) == (
        model.sectorsize, model.alignment, model.cow_format, model.header_size)
    assert (ours.bitmap_offset, ours.bitmap_len, ours.data_offset) == (
        model.bitmap_offset, model.bitmap_len, model.data_offset)


@settings(max_examples=500)
@given(st.binary(max_size=MAX_HEADER_SIZE + 16))
def test_arbitrary_bytes_parse_as_the_model_does(data):
    assert_agrees_with_the_model(data)


@settings(max_examples=500)
@given(
    magic=st.sampled_from([b"OOOM", b"MOOO"]),
    version=st.integers(0, 5),
    rest=st.binary(max_size=MAX_HEADER_SIZE),
)
def test_magic_plus_arbitrary_bytes_parse_as_the_model_does(magic, version, rest):
    order = "big" if magic == b"OOOM" else "little"
    assert_agrees_with_the_model(magic + version.to_bytes(4, order) + rest)


@st.composite
def assembled_headers(draw: st.DrawFn) -> bytes:
    """Headers hand-assembled at the spec's offsets, with valid and invalid field values, garbage after the
    path's NUL, sometimes a byte flipped or the end cut off."""
    layout = draw(st.sampled_from(LAYOUTS))
    field = st.one_of(st.sampled_from([0, 1, 3, 256, 511, 512, 1000, 4096, 65536, 131072, 2**31, 2**32 - 1]),
                      st.integers(0, 2**32 - 1))
    size = st.one_of(st.integers(0, 2**40), st.sampled_from([0, 1, 511, 512, 1_000_000, 2**63 - 512, 2**64 - 1]))
    data = bytearray(spec.build_header(
        layout, draw(st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"x"))), draw(st.integers(0, 2**32 - 1)),
        draw(size), sectorsize=draw(st.one_of(pow2, pow2, field.map(lambda n: n % 2**31))),
        alignment=draw(st.one_of(st.sampled_from([1, 8, 512, 4096, 65536]), field)),
        byteorder=draw(st.sampled_from(["little", "big"])), cow_format=draw(st.sampled_from([0, 0, 0, 1])),
        tail=draw(st.binary(max_size=64))))
    if draw(st.booleans()):
        data[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=1000)
@given(assembled_headers())
def test_hand_assembled_headers_parse_as_the_model_does(data):
    assert_agrees_with_the_model(data)


# -- validation: one hand-made bad header per rule (v3() patches a valid header) ---------
BAD = {
    "wrong-magic": (b"QFI\xfb" + bytes(5000), NotACowFileError, "not a UML COW file"),
    "zeros": (bytes(8192), NotACowFileError, "not a UML COW file"),
    "too-short": (b"OO", NotACowFileError, "not a UML COW file"),
    "version-0": (bytes(v3(version=0)), UnsupportedVersionError, "unsupported COW version 0"),
    "version-4": (bytes(v3(version=4)), UnsupportedVersionError, "unsupported COW version 4"),
    "truncated-v3": (bytes(v3())[:4000], CorruptHeaderError, "truncated"),
    "truncated-magic-only": (b"OOOM\0\0", CorruptHeaderError, "truncated"),
    "sectorsize-0": (bytes(v3(sectorsize=0)), CorruptHeaderError, "invalid sector size 0"),
    "sectorsize-3": (bytes(v3(sectorsize=3)), CorruptHeaderError, "invalid sector size 3"),
    "sectorsize-256": (bytes(v3(sectorsize=256)), CorruptHeaderError, "invalid sector size 256"),
    "sectorsize-2^31": (bytes(v3(sectorsize=2**31)), CorruptHeaderError, "invalid sector size"),
    "alignment-0": (bytes(v3(alignment=0)), CorruptHeaderError, "alignment is 0"),
    "alignment-3000": (bytes(v3(alignment=3000)), CorruptHeaderError, "not a power of two"),
    "cow-format-1": (bytes(v3(cow_format=1)), CorruptHeaderError, "cow_format"),
    "size-0": (bytes(v3(size=0)), CorruptHeaderError, "size is 0"),
    "size-overflow": (bytes(v3(size=2**63 - 4096)), CorruptHeaderError, "too large"),
    "size-2^64-1": (bytes(v3(size=2**64 - 1)), CorruptHeaderError, "too large"),
}


def no_nul_v3() -> bytes:
    data = v3()
    data[32:4128] = b"A" * 4096
    return bytes(data)


BAD["path-without-nul"] = (no_nul_v3(), CorruptHeaderError, "no NUL")
BAD["v1-path-without-nul"] = (
    b"MOOO" + struct.pack("<I", 1) + b"B" * 256 + struct.pack("<IQi", 0, 1 << 20, 512),
    CorruptHeaderError,
    "no NUL",
)


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_validation_rule_raises_its_error(name):
    data, error, words = BAD[name]
    with pytest.raises(error) as info:
        parse_header(data, "bad.cow")
    assert words in str(info.value)
    assert str(info.value).startswith("bad.cow: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name",
    [
        "wrong-magic",
        "version-4",
        "truncated-v3",
        "sectorsize-3",
        "alignment-0",
        "cow-format-1",
        "path-without-nul",
        "size-overflow",
        "size-0",
    ],
)
def test_cli_reports_bad_headers_in_one_line(tmp_path, name):
    data, _, words = BAD[name]
    path = tmp_path / f"{name}.cow"
    path.write_bytes(data)
    proc = run_cli("info", path)
    assert proc.returncode == 1
    assert_one_line_error(proc, str(path), words)
    assert proc.stdout == b""


def test_a_valid_non_512_sector_size_parses_but_refuses_io(tmp_path):
    h = make_header("v3", str(tmp_path / "b.img"), 0, 1 << 20, sectorsize=4096)
    assert parse_header(h.to_bytes()).sectorsize == 4096
    (tmp_path / "b.img").write_bytes(bytes(1 << 20))
    cow = tmp_path / "s4096.cow"
    cow.write_bytes(h.to_bytes())
    with open(cow, "r+b") as f:
        f.truncate(h.file_size)
    with pytest.raises(UnsupportedSectorSizeError, match="unsupported sector size 4096"):
        ubdcow.open(cow, check_backing=False)
    assert run_cli("info", cow).returncode == 0  # info still reports it


def test_path_longer_than_the_field_cannot_be_built():
    with pytest.raises(ValueError):
        make_header("v1", "/" + "x" * 300, 0, 1 << 20)
    with pytest.raises(ValueError):
        make_header("v2", "/" + "x" * 4096, 0, 1 << 20)
    for width in (300, 4095):  # a v2 field holds up to 4095 bytes and the NUL
        h = make_header("v2", "/" + "x" * (width - 1), 0, 1 << 20)
        assert spec.parse(h.to_bytes()).backing == b"/" + b"x" * (width - 1)
        assert parse_header(h.to_bytes()) == h
