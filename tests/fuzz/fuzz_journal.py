"""atheris harness: jbd2 replay of a fuzzed journal raises only JournalError, with bounded reads.

    python tests/fuzz/fuzz_journal.py -runs=20000 [CORPUS_DIR]

The input is the journal (1 KiB blocks; a short last block is padded with zeros). Every block the
replay says it replaces is read back. tests/test_fs_journal.py also runs test_one_input through
hypothesis, with or without atheris.
"""

import contextlib
import sys

try:
    import atheris
except ImportError:
    atheris = None

with atheris.instrument_imports() if atheris else contextlib.nullcontext():
    from ubdcow.errors import JournalError
    from ubdcow.fs.journal import NO_JOURNAL_HINT, replay

BLOCK = 1024


def test_one_input(data: bytes) -> None:
    journal = data + bytes(-len(data) % BLOCK)
    nblocks = len(journal) // BLOCK
    calls = [0]

    def read_block(n: int) -> bytes:
        assert 0 <= n < nblocks, n
        calls[0] += 1
        return journal[n * BLOCK : (n + 1) * BLOCK]

    try:
        rep = replay(read_block, nblocks, block_size=BLOCK, name="fuzz.img", fs_blocks=1 << 20)
    except JournalError as err:
        assert "\n" not in str(err) and str(err).startswith("fuzz.img: journal: ") and err.hint == NO_JOURNAL_HINT
        return
    assert calls[0] <= 3 * nblocks + 2, (calls[0], nblocks)  # the log is read about once, never looped
    for n in rep.blocks:
        block = rep.read(n)
        assert block is not None and len(block) == BLOCK


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
