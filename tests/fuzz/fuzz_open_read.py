"""atheris harness: open() + read, map and check of a fuzzed COW file raise only UbdCowError.

    python tests/fuzz/fuzz_open_read.py -runs=5000 [CORPUS_DIR]

The input is written as a COW file next to a 64 KiB backing file; the
harness reads the whole virtual disk (bounded to 1 MiB) through the engine.
"""

import contextlib
import os
import sys
import tempfile

try:
    import atheris
except ImportError:  # tests/test_fuzz.py also runs test_one_input through hypothesis, without atheris
    atheris = None

with atheris.instrument_imports() if atheris else contextlib.nullcontext():
    import ubdcow
    from ubdcow.check import check
    from ubdcow.inspect import map_image

FOLDER = tempfile.mkdtemp(prefix="ubdcow-fuzz-")
COW = os.path.join(FOLDER, "fuzz.cow")
BACKING = os.path.join(FOLDER, "backing.img")
with open(BACKING, "wb") as f:
    f.write(os.urandom(64 * 1024))


def test_one_input(data: bytes) -> None:
    with open(COW, "wb") as f:
        f.write(data)
    try:
        with ubdcow.open(COW, backing=BACKING, check_backing=False, lock=False) as img:
            if img.size <= 1 << 20:
                content = img.read()
                assert len(content) == img.size
            else:
                assert len(img.pread(4096, img.size - 4096)) == 4096
            for start, length, _ in img.extents(0, 1 << 20):
                assert length > 0 and start >= 0
    except ubdcow.UbdCowError:
        pass
    try:
        extents = map_image(COW)
        size = ubdcow.read_header(COW).size
    except ubdcow.UbdCowError:
        pass
    else:  # the map tiles the whole disk, in order, with known sources
        pos = 0
        for e in extents:
            assert e["start"] == pos and e["length"] > 0 and e["source"] in ("cow", "zero", "backing"), e
            pos += e["length"]
        assert pos == size, (pos, size)
    try:
        check(COW, backing=BACKING)
    except ubdcow.UbdCowError:
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
