"""A randomized differential: ``ubdcow merge`` against the real ``uml_moo``, and both against the model.

Each case makes a COW file with the model's builder (a random layout uml_moo
reads: v1, v2, v3, broken v3; alignment 512 or 4096; a size that is a multiple
of 512), writes into it through ubdcow's API at random (pwrite aligned or not,
write_zeroes, discard, file-style writes), then merges it with both tools. The
two outputs must be byte-identical and equal the model: the backing bytes with
the same writes replayed. uml_moo uses the header's sector size and drops a
partial last sector, so sizes stay multiples of 512; v1/v2 sizes are multiples
of 4 KiB, where their bitmap has a bit for every sector (elsewhere the rounding
bug makes uml_moo read bits past the bitmap, which the kernel ignores).

``UBDCOW_ORACLE_SEED`` changes the cases (the default keeps CI reproducible)
and ``UBDCOW_ORACLE_CASES`` their number (64 by default, about 3 s; a campaign:
``UBDCOW_ORACLE_CASES=5000 UBDCOW_ORACLE_SEED=$RANDOM pytest tests/test_oracle_moo.py``).
"""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest
from conftest import require_tool
from test_oracle_model import SECTOR, Model, api_writes, bits, cow_bytes, disk, make_cow, where_differs

import ubdcow
from ubdcow.merge import merge

pytestmark = pytest.mark.uml
SEED = int(os.environ.get("UBDCOW_ORACLE_SEED", "20240615"))
CASES = int(os.environ.get("UBDCOW_ORACLE_CASES", "64"))


def random_backing(path: Path, size: int, rng: random.Random) -> bytes:
    """Random bytes with zero pages and constant runs, sometimes a hole at the end."""
    data = bytearray(rng.randbytes(size))
    for _ in range(rng.randrange(4)):
        a = rng.randrange(size)
        n = min(rng.choice((SECTOR, 4096, 3 * 4096 + 100)), size - a)
        data[a : a + n] = bytes([rng.choice((0, 0, 0xFF))]) * n
    with open(path, "wb") as f:
        if rng.random() < 0.3:  # a sparse tail: zeros the file does not store
            cut = rng.randrange(size // 2, size + 1)
            data[cut:] = bytes(size - cut)
            f.write(data[:cut])
            f.truncate(size)
        else:
            f.write(data)
    return bytes(data)


def random_case(folder: Path, rng: random.Random) -> tuple[Path, Path, bytes, str]:
    """A COW file written at random; returns (cow, backing, the model's content, a description)."""
    layout = rng.choice(("v1", "v2", "v3", "v3", "v3-broken"))
    alignment = rng.choice((512, 4096))
    if layout in ("v1", "v2"):
        size = 4096 * rng.randrange(1, 512)
    else:
        size = SECTOR * rng.choice((rng.randrange(1, 64), rng.randrange(1, 4096)))
    backing, cow = folder / "backing.img", folder / "overlay.cow"
    model = Model(random_backing(backing, size, rng))
    os.utime(backing, (1_600_000_000 + rng.randrange(10**8),) * 2)
    make_cow(cow, layout, backing, alignment=alignment)
    with ubdcow.open(cow, "r+") as img:
        ops = api_writes(img, model, rng, rng.randrange(1, 40))
    what = f"{layout} alignment {alignment} size {size}, ops {ops}"
    return cow, backing, bytes(model), what


def differential(folder: Path, seed: int) -> None:
    moo = require_tool("uml_moo")
    rng = random.Random(seed)
    folder.mkdir()
    cow, backing, expected, what = random_case(folder, rng)
    by_model = disk(cow, backing)
    assert by_model == expected, f"seed {seed}: the file does not hold the writes: {where_differs(by_model, expected)}"
    theirs, ours = folder / "moo.img", folder / "ours.img"
    proc = subprocess.run([moo, "-b", str(backing), str(cow), str(theirs)], capture_output=True, timeout=120)
    assert proc.returncode == 0, f"seed {seed}: uml_moo failed: {proc.stderr!r} ({what})"
    result = merge(cow, ours)
    moo_bytes, our_bytes = theirs.read_bytes(), ours.read_bytes()
    assert our_bytes == moo_bytes, f"seed {seed}: merge vs uml_moo: {where_differs(our_bytes, moo_bytes)} ({what})"
    assert our_bytes == expected, f"seed {seed}: merge vs model: {where_differs(our_bytes, expected)} ({what})"
    assert (result.size, result.cow_bytes) == (len(expected), cow_bytes(cow)), (seed, what)
    assert result.backing_bytes == len(expected) - result.cow_bytes
    # every write kept whole pages: no page mixes COW and backing sectors
    set_bits = set(bits(cow))
    assert all({s in set_bits for s in range(p, min(p + 8, len(expected) // SECTOR))} != {True, False}
               for p in range(0, len(expected) // SECTOR, 8)), (seed, what)


@pytest.mark.parametrize("index", range(CASES))
def test_merge_matches_uml_moo_on_random_writes(tmp_path, index):
    differential(tmp_path / "case", SEED * 100_000 + index)
