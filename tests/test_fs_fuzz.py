"""Fuzzing the filesystem reader: mutated mkfs -d images never make it raise anything but UbdCowError, nor hang.

The harness (tests/fuzz/fuzz_fs.py: open, walk, read the start of every file, readlink, xattrs) runs
through hypothesis on every machine, fed seed images (tests/support/fstree.make_fuzz_seeds) with bytes
flipped, words set to extreme values, or cut short; and through atheris where it is installed
(required in CI, as tests/test_fuzz.py's harnesses).
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from pathlib import Path

import pytest
from conftest import run_atheris
from support.fstree import make_fuzz_seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = Path(__file__).parent / "fuzz"
#: seconds one fuzzed image may take, all operations together (a few hundred entries at most)
BOUND = 20.0


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_fuzz_seeds(tmp_path_factory.mktemp("fs-seeds"))


def load_harness():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fuzz_fs", FUZZ / "fuzz_fs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXTREMES = (0, 1, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 0xFFFF, 0x10000)


@st.composite
def mutated(draw: st.DrawFn, images: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(images)))
    for _ in range(draw(st.integers(1, 12))):
        region = draw(st.sampled_from(("superblock", "descriptors", "early", "anywhere")))
        lo, hi = {"superblock": (1024, 1024 + 0x180), "descriptors": (2048, 2048 + 128),
                  "early": (0, 80 * 1024), "anywhere": (0, len(data))}[region]  # fmt: skip
        where = draw(st.integers(lo, hi - 4))
        if draw(st.booleans()):
            data[where] ^= draw(st.integers(1, 255))
        else:
            where -= where % 2 if draw(st.booleans()) else where % 4
            word = draw(st.sampled_from(EXTREMES)).to_bytes(4, "little")
            data[where : where + 4] = word
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def test_mutated_filesystems_raise_only_library_errors(seeds):
    harness = load_harness()
    images = [p.read_bytes() for p in seeds]
    for image in images:  # the seeds themselves read cleanly
        harness.test_one_input(image)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(mutated(images))
    def run(data: bytes) -> None:
        start = time.monotonic()
        harness.test_one_input(data)
        assert time.monotonic() - start < BOUND

    run()


def test_atheris_harness(seeds, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in seeds:
        shutil.copy(seed, corpus)
    run_atheris(FUZZ / "fuzz_fs.py", corpus, 1500, "-seed=2222", "-max_len=300000", "-rss_limit_mb=2048",
                "-timeout=60", artifacts=tmp_path, timeout=1200)  # fmt: skip
