"""atheris harness: the header parser raises only UbdCowError, whatever the bytes.

    python tests/fuzz/fuzz_header.py -runs=100000 [CORPUS_DIR]
"""

import contextlib
import sys

try:
    import atheris
except ImportError:  # tests/test_fuzz.py also runs test_one_input through hypothesis, without atheris
    atheris = None

with atheris.instrument_imports() if atheris else contextlib.nullcontext():
    import ubdcow
    from ubdcow.format import parse_header


def test_one_input(data: bytes) -> None:
    try:
        header = parse_header(data, "fuzz.cow")
    except ubdcow.UbdCowError:
        return
    # a header that parses is self-consistent and rebuilds to something that parses the same
    assert header.size > 0 and header.data_offset >= header.bitmap_offset + header.bitmap_len
    if header.layout != "v3-broken" or header.backing_file_raw[:4] != b"":
        try:
            rebuilt = parse_header(header.to_bytes())
        except ValueError:
            return
        assert rebuilt.size == header.size and rebuilt.bitmap_len == header.bitmap_len


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
