"""atheris harness: open() + read, map and check of a fuzzed COW file raise only UbdCowError.

    python tests/fuzz/fuzz_open_read.py -runs=5000 [CORPUS_DIR]

The input is written as a COW file next to a 64 KiB backing file; the
harness reads the whole virtual disk (bounded to 1 MiB) through the engine.
"""

import contextlib
import os
import shutil
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

# The two files are made in a new folder, opened, and the folder removed at once: the harness works through
# /proc/self/fd/N paths, so nothing is left behind however it ends (libFuzzer exits without Python's atexit).
_folder = tempfile.mkdtemp(prefix="ubdcow-fuzz-")
try:
    with open(os.path.join(_folder, "backing.img"), "wb") as f:
        f.write(os.urandom(64 * 1024))
    _fds = [os.open(os.path.join(_folder, name), os.O_RDWR | os.O_CREAT) for name in ("fuzz.cow", "backing.img")]
finally:
    shutil.rmtree(_folder, ignore_errors=True)
COW, BACKING = (f"/proc/self/fd/{fd}" for fd in _fds)


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
