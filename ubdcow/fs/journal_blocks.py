"""The journal's blocks, for the replay (:mod:`ubdcow.fs.journal`): the jbd2 superblock read and checked
(magic, v1/v2, known features, the checksum type and the superblock's own CRC-32C, ``s_maxlen``,
``s_first``, the block size), blocks read inside the journal, the descriptor, revoke, commit and data
checksums (v2/v3), a descriptor's tags; and the one error every journal problem raises, which offers
``--no-journal``. It reads through ``read_block`` and writes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

import construct as cs
import numpy as np

from ..errors import Fix, JournalError
from . import journal_layout as L
from .crc import crc32c

__all__ = ["NO_JOURNAL_FIX", "NO_JOURNAL_HINT", "MASK32", "JournalBlocks", "journal_error", "read_exact"]


#: the fix every journal error offers (the command line's --no-journal, the API's journal=False)
NO_JOURNAL_FIX = Fix("to read the disk as it is (without the changes still in the journal)", (("no_journal", None),))
#: the library's text of that hint
NO_JOURNAL_HINT = NO_JOURNAL_FIX.text()


def journal_error(name: str, message: str) -> JournalError:
    """A journal that cannot be replayed: every such error offers :data:`NO_JOURNAL_FIX`."""
    return JournalError(name, message, fixes=(NO_JOURNAL_FIX,))


#: transaction ids and CRCs are 32-bit
MASK32 = 0xFFFFFFFF


def read_exact(read_block: Callable[[int], bytes], n: int, block_size: int, name: str) -> bytes:
    """Journal block ``n``, which must be a whole block."""
    data = read_block(n)
    if len(data) != block_size:
        raise journal_error(name, f"journal block {n}: read {len(data)} bytes, not {block_size}")
    return bytes(data)


class JournalBlocks:
    """The journal's superblock, its features, and its blocks: read in bounds, checksums checked."""

    def __init__(self, read_block: Callable[[int], bytes], nblocks: int, block_size: int, name: str) -> None:
        self.read_block = read_block
        self.block_size = block_size
        self.name = name
        if block_size < 1024 or block_size > 65536 or block_size & (block_size - 1):
            self.fail(f"block size {block_size} is not a power of two from 1024 to 65536")
        if nblocks < 2:
            self.fail(f"the journal has {nblocks} blocks")
        raw = self.read(0, limit=nblocks)
        sb = L.JOURNAL_SUPERBLOCK.parse(raw[: L.JOURNAL_SUPERBLOCK_SIZE])
        if sb.h_magic != L.JBD2_MAGIC:
            self.fail("the journal superblock has no jbd2 magic number")
        if sb.h_blocktype == L.JBD2_SUPERBLOCK_V1:
            self.version = 1
        elif sb.h_blocktype == L.JBD2_SUPERBLOCK_V2:
            self.version = 2
        elif sb.h_blocktype in (L.JBD2_DESCRIPTOR_BLOCK, L.JBD2_COMMIT_BLOCK, L.JBD2_REVOKE_BLOCK):
            self.fail(f"the journal superblock is a log block (type {sb.h_blocktype})")
        else:
            self.fail(f"unknown journal superblock type {sb.h_blocktype}")
        self.features(sb, raw[: L.JOURNAL_SUPERBLOCK_SIZE])
        if sb.s_blocksize != block_size:
            self.fail(f"the journal's block size {sb.s_blocksize} is not the filesystem's {block_size}")
        if sb.s_maxlen > nblocks:
            self.fail(f"the journal superblock says {sb.s_maxlen} blocks, the journal has {nblocks}")
        self.maxlen = sb.s_maxlen
        self.first = sb.s_first
        if self.first == 0 or self.first >= self.maxlen:
            self.fail(f"the log's first block {self.first} is outside the journal ({self.maxlen} blocks)")
        self.start = sb.s_start
        self.sequence = sb.s_sequence
        if self.start and self.incompat & L.JBD2_FEATURE_INCOMPAT_FAST_COMMIT:
            self.fail("the journal has fast commits (fast_commit), which ubdcow does not replay")
        if self.csum3:
            self.tag_dtype, self.tag_bytes = L.JOURNAL_BLOCK_TAG3, L.JOURNAL_BLOCK_TAG3.itemsize
        else:
            self.tag_dtype = L.JOURNAL_BLOCK_TAG64 if self.is64 else L.JOURNAL_BLOCK_TAG32
            self.tag_bytes = self.tag_dtype.itemsize + (2 if self.csum2 else 0)
        self.tail = L.JOURNAL_BLOCK_TAIL_SIZE if self.csum else 0

    def features(self, sb: cs.Container, raw: bytes) -> None:
        """The superblock's features: which checksums (and the superblock's own), 64-bit block numbers."""
        # a v1 superblock has no features (the kernel ignores those fields)
        self.compat = sb.s_feature_compat if self.version == 2 else 0
        self.incompat = sb.s_feature_incompat if self.version == 2 else 0
        rocompat = sb.s_feature_ro_compat if self.version == 2 else 0
        if self.version == 2 and sb.s_nr_users > 1:
            self.fail(f"the journal is shared by {sb.s_nr_users} filesystems (an external journal)")
        if self.incompat & ~L.JBD2_KNOWN_INCOMPAT:
            self.fail(f"unknown incompatible journal features 0x{self.incompat & ~L.JBD2_KNOWN_INCOMPAT:x}")
        if rocompat & ~L.JBD2_KNOWN_ROCOMPAT:
            self.fail(f"unknown read-only journal features 0x{rocompat:x}")
        self.csum2 = bool(self.incompat & L.JBD2_FEATURE_INCOMPAT_CSUM_V2)
        self.csum3 = bool(self.incompat & L.JBD2_FEATURE_INCOMPAT_CSUM_V3)
        self.csum = self.csum2 or self.csum3
        self.checksum_v1 = bool(self.compat & L.JBD2_FEATURE_COMPAT_CHECKSUM)
        self.is64 = bool(self.incompat & L.JBD2_FEATURE_INCOMPAT_64BIT)
        self.async_commit = bool(self.incompat & L.JBD2_FEATURE_INCOMPAT_ASYNC_COMMIT)
        if self.csum2 and self.csum3:
            self.fail("the journal claims checksums v2 and v3 at once")
        if self.csum and self.checksum_v1:
            self.fail("the journal claims checksums v1 and v2/v3 at once")
        if self.csum:
            if sb.s_checksum_type != L.JBD2_CRC32C_CHKSUM:
                self.fail(f"unknown journal checksum type {sb.s_checksum_type}")
            image = bytearray(raw)
            image[L.JOURNAL_SUPERBLOCK_CHECKSUM_OFFSET : L.JOURNAL_SUPERBLOCK_CHECKSUM_OFFSET + 4] = bytes(4)
            if crc32c(image, MASK32) != sb.s_checksum:
                self.fail("the journal superblock's checksum is wrong")
            self.seed = crc32c(sb.s_uuid, MASK32)

    # -- helpers -------------------------------------------------------------------------------

    def fail(self, problem: str) -> NoReturn:
        raise journal_error(self.name, f"journal: {problem}")

    def read(self, n: int, limit: int | None = None) -> bytes:
        if n >= (self.maxlen if limit is None else limit):
            self.fail(f"the log runs to block {n}, past the journal's end ({self.maxlen} blocks)")
        return read_exact(self.read_block, n, self.block_size, self.name)

    def wrap(self, n: int) -> int:
        return n - (self.maxlen - self.first) if n >= self.maxlen else n

    def tail_ok(self, block: bytes) -> bool:
        """A descriptor or revoke block's tail checksum matches (always, without csum v2/v3)."""
        if not self.csum:
            return True
        end = self.block_size - L.JOURNAL_BLOCK_TAIL_SIZE
        provided = L.JOURNAL_BLOCK_TAIL.parse(block[end:]).t_checksum
        return bool(crc32c(block[:end] + bytes(4), self.seed) == provided)

    def commit_ok(self, block: bytes) -> bool:
        if not self.csum:
            return True
        at = L.JOURNAL_COMMIT_CHECKSUM_OFFSET
        provided = int.from_bytes(block[at : at + 4], "big")
        return bool(crc32c(block[:at] + bytes(4) + block[at + 4 :], self.seed) == provided)

    def tag_ok(self, checksum: int, data: bytes, sequence: int) -> bool:
        if not self.csum:
            return True
        value = crc32c(data, crc32c(sequence.to_bytes(4, "big"), self.seed))
        return checksum == (value if self.csum3 else value & 0xFFFF)

    def tags(self, block: bytes) -> list[tuple[int, int, int]]:
        """The tags of a descriptor block: (filesystem block, flags, checksum), as count_tags walks them."""
        out = []
        size = self.block_size - self.tail
        offset = L.JOURNAL_HEADER.itemsize
        while offset + self.tag_bytes <= size:
            tag = np.frombuffer(block, self.tag_dtype, count=1, offset=offset)[0]
            flags = int(tag["t_flags"]) & 0xFFFF
            number = int(tag["t_blocknr"])
            if self.is64:
                number |= int(tag["t_blocknr_high"]) << 32
            out.append((number, flags, int(tag["t_checksum"])))
            offset += self.tag_bytes
            if not flags & L.JBD2_FLAG_SAME_UUID:
                offset += L.JOURNAL_TAG_UUID_SIZE
            if flags & L.JBD2_FLAG_LAST_TAG:
                break
        return out
