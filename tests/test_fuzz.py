"""Fuzzing: mutated real COW files never make the library raise anything but UbdCowError.

The hypothesis test flips bytes in the header and bitmap of real conformance
files and truncates them. The atheris harnesses in tests/fuzz/ run for a
bounded number of iterations; atheris is required in CI (``make test`` fails to
install without it under UBDCOW_REQUIRE_UML=1, and the test fails), and skipped
elsewhere when it cannot be installed. Their fuzz targets (``test_one_input``)
also run here through hypothesis, on mutated seed files, with or without
atheris: the targets are always exercised.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import DATA, MANIFEST, run_atheris
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ubdcow
from ubdcow.check import check
from ubdcow.format import make_header
from ubdcow.inspect import map_image
from ubdcow.merge import merge

FUZZ = Path(__file__).parent / "fuzz"
SOURCES = {c["name"]: gzip.decompress((DATA / c["name"] / "overlay.cow.gz").read_bytes()) for c in MANIFEST}
BACKINGS = {c["name"]: gzip.decompress((DATA / c["name"] / "backing.img.gz").read_bytes()) for c in MANIFEST}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(SOURCES)))
    data = bytearray(SOURCES[name])
    h = ubdcow.parse_header(bytes(data))
    region_end = h.data_offset + 16  # header, bitmap, padding and the first data bytes
    for _ in range(draw(st.integers(0, 8))):
        where = draw(st.one_of(st.integers(0, 40), st.integers(0, region_end - 1)))
        data[where] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return name, bytes(data)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_real_files_raise_only_library_errors(sample):
    name, data = sample
    with tempfile.TemporaryDirectory() as folder:
        cow, backing, out = Path(folder, "f.cow"), Path(folder, "b.img"), Path(folder, "out.img")
        cow.write_bytes(data)
        backing.write_bytes(BACKINGS[name])
        try:
            ubdcow.parse_header(data)
        except ubdcow.UbdCowError:
            pass
        try:
            ubdcow.info(cow, backing=backing)
        except ubdcow.UbdCowError:
            pass
        try:
            with ubdcow.open(cow, backing=backing, check_backing=False) as img:
                if img.size <= 4 << 20:
                    assert len(img.read()) == img.size
        except ubdcow.UbdCowError:
            pass
        try:
            extents = map_image(cow)
            assert sum(e["length"] for e in extents) == ubdcow.read_header(cow).size
        except ubdcow.UbdCowError:
            pass
        try:
            report = check(cow, backing=backing)
            assert report.exit_code in (0, 2, 3)
        except ubdcow.UbdCowError:
            pass
        try:
            if ubdcow.read_header(cow).size <= 4 << 20:
                merge(cow, out, backing=backing, force=True)
                assert out.stat().st_size == ubdcow.read_header(cow).size
        except ubdcow.UbdCowError:
            assert not out.exists()
        assert not [p for p in Path(folder).iterdir() if "ubdcow-tmp" in p.name]


def seeds(folder: Path) -> None:
    """Small valid COW files of every layout as a starting corpus."""
    folder.mkdir(exist_ok=True)
    for layout in ("v1", "v2", "v3", "v3-broken"):
        for size in (4096, 1000, 70_000):
            h = make_header(layout, "/b.img", 1_700_000_000, size, alignment=512)
            data = bytearray(h.to_bytes().ljust(h.data_offset, b"\0"))
            data[h.bitmap_offset] = 0b1011
            data += os.urandom(min(size, 4096))
            (folder / f"{layout}-{size}.cow").write_bytes(bytes(data))


def seed_files() -> list[bytes]:
    with tempfile.TemporaryDirectory() as folder:
        seeds(Path(folder))
        return [p.read_bytes() for p in sorted(Path(folder).iterdir())]


SEEDS = seed_files()


@st.composite
def harness_inputs(draw: st.DrawFn) -> bytes:
    """What a fuzzer feeds a harness: a seed file with bytes flipped, inserted or cut, or arbitrary bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=20000))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        where = draw(st.one_of(st.integers(0, 48), st.integers(0, len(data) - 1), st.integers(264, 290),
                               st.integers(4100, 4140)))
        where = min(where, len(data) - 1)
        data[where] ^= draw(st.integers(1, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def load_harness(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), FUZZ / name)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("harness,examples", [("fuzz_header.py", 400), ("fuzz_open_read.py", 300)])
def test_harness_targets_through_hypothesis(harness, examples):
    """The atheris targets themselves, fed mutated seed files by hypothesis (atheris or not)."""
    module = load_harness(harness)

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow],
              database=None)
    @given(harness_inputs())
    def run(data: bytes) -> None:
        module.test_one_input(data)

    try:
        run()
    finally:
        for fd in getattr(module, "_fds", []):  # the harness's files, already unlinked (nothing left in /tmp)
            os.close(fd)


@pytest.mark.parametrize("harness,runs", [("fuzz_header.py", 50_000), ("fuzz_open_read.py", 3_000)])
def test_atheris_harness(tmp_path, harness, runs):
    corpus = tmp_path / "corpus"
    seeds(corpus)
    work = tmp_path / "work"
    shutil.copytree(corpus, work)
    run_atheris(FUZZ / harness, work, runs, "-seed=12345", "-max_len=20000", artifacts=tmp_path)
