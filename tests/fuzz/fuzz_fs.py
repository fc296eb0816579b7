"""atheris harness: the filesystem reader over a fuzzed disk raises only UbdCowError, in bounded time.

    python tests/fuzz/fuzz_fs.py -runs=2000 CORPUS_DIR      # seeds: tests/support/fstree.make_fuzz_seeds

The input is the whole disk (a few hundred KiB: mutated mkfs -d images). The harness opens it, walks
it, reads the start of every file, every symlink target and every file's extended attributes.
"""

import contextlib
import sys

try:
    import atheris
except ImportError:  # tests/test_fs_fuzz.py also runs test_one_input through hypothesis, without atheris
    atheris = None

with atheris.instrument_imports() if atheris else contextlib.nullcontext():
    from ubdcow.errors import UbdCowError
    from ubdcow.fs import open_volume

READ = 65536


def _each(fs, st):
    if st.type == "file":
        with fs.open(st.path) as f:
            data = f.read(READ)
            assert len(data) == min(READ, st.size), (len(data), st.size)
    elif st.type == "symlink":
        assert fs.readlink(st.path) == st.target
        with contextlib.suppress(UbdCowError):
            fs.stat(st.path, follow_symlinks=True)
    elif st.type == "dir":
        assert len(fs.listdir(st.path)) >= 0
    fs.xattrs(st.path)


def test_one_input(data: bytes) -> None:
    def pread(length: int, offset: int) -> bytes:
        return data[offset : offset + length]

    try:
        fs = open_volume(pread, len(data), name="fuzz.img")
    except UbdCowError:
        return
    errors = []
    with fs:
        try:
            for st in fs.walk(b"/", onerror=errors.append):
                try:
                    _each(fs, st)
                except UbdCowError as exc:
                    errors.append(exc)
        except UbdCowError as exc:
            errors.append(exc)
    for exc in errors:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.img: "), str(exc)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
