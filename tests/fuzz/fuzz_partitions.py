"""atheris harness: find_volume on a fuzzed disk raises only PartitionError or
UnsupportedFilesystemError, and a volume it returns lies inside the disk.

    python tests/fuzz/fuzz_partitions.py -runs=20000 [CORPUS_DIR]

The input is the whole disk (tables, EBRs, the GPT backup at its end); the first byte also picks
``partition`` (0: none). tests/test_fs_partitions.py also runs test_one_input through hypothesis.
"""

import contextlib
import sys

try:
    import atheris
except ImportError:
    atheris = None

with atheris.instrument_imports() if atheris else contextlib.nullcontext():
    from ubdcow.errors import PartitionError, UnsupportedFilesystemError
    from ubdcow.fs.partitions import find_volume


def test_one_input(data: bytes) -> None:
    partition = (data[0] % 10) or None if data else None
    reads = [0]

    def pread(length: int, offset: int) -> bytes:
        assert 0 <= offset and offset + length <= len(data), (offset, length)
        reads[0] += 1
        return data[offset : offset + length]

    try:
        volume = find_volume(pread, len(data), partition=partition, name="fuzz.img")
    except (PartitionError, UnsupportedFilesystemError) as err:
        assert "\n" not in str(err) and str(err).startswith("fuzz.img: ")
        return
    finally:
        # bounded: 128 EBRs with 4 entries, or 8192 GPT entries; 16 partitions described
        assert reads[0] <= 8192 + 16 * 8 + 16, reads[0]
    assert 0 <= volume.offset and 0 < volume.size and volume.offset + volume.size <= len(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
