"""Replay an ext3/ext4 jbd2 journal in memory, by the kernel's recovery rules; nothing is written.

A guest that was killed or crashed leaves its newest metadata in the journal only
(``needs_recovery``). :func:`replay` reads the journal (the content of the journal inode,
block by block, through ``read_block``) and returns a :class:`JournalReplay`: for each filesystem
block the log rewrites, where its newest copy sits in the journal. The content is read lazily,
one block at a time, when the reader asks for it.

The passes follow the kernel's ``fs/jbd2/recovery.c`` (which e2fsck shares):

1. scan: from ``s_start``/``s_sequence``, wrapping at the journal's end, each block must carry
   the jbd2 magic and the expected sequence number; a commit block ends a transaction. The log
   ends at the first block that does not. Checksums are verified here: the superblock's, the
   descriptor and revoke blocks' tails and the commit blocks' (v2/v3), the v1 transaction CRC
   (``COMPAT_CHECKSUM``). A commit block whose checksum is wrong ends the log before its
   transaction (with ``async_commit`` the scan goes on, as the kernel's does); a wrong descriptor or
   revoke block ends it quietly when a commit time older than the last one shows stale
   blocks, else the journal is corrupt.
2. revoke: every revoke record of a complete transaction revokes its block for that
   transaction and all earlier ones.
3. replay: every tag of a complete transaction that is not revoked maps its filesystem block
   to that journal block (a later transaction wins); with csum v2/v3 its data block's
   checksum must match, and an escaped block gets its magic number back when read.

A corrupt journal raises :class:`~ubdcow.errors.JournalError`, whose hint names ``--no-journal``.
The journal's superblock, its block reads and their checksums are :mod:`ubdcow.fs.journal_blocks`'s.
All work is bounded by the journal's size: the log cannot be longer than the journal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field

import construct as cs
import numpy as np

from . import journal_layout as L
from .crc import crc32_be
from .journal_blocks import MASK32, NO_JOURNAL_FIX, NO_JOURNAL_HINT, JournalBlocks, journal_error, read_exact

__all__ = ["NO_JOURNAL_FIX", "NO_JOURNAL_HINT", "JournalReplay", "journal_error", "replay"]


def _tid_gt(x: int, y: int) -> bool:
    """``x`` comes after ``y`` in transaction order (the kernel's tid_gt: modulo 2**32)."""
    return 0 < ((x - y) & MASK32) < 0x80000000


def _tid_geq(x: int, y: int) -> bool:
    return ((x - y) & MASK32) < 0x80000000


@dataclass(repr=False, eq=False)
class JournalReplay:
    """The replayed view: the newest committed copy of each block the journal rewrites."""

    _read_block: Callable[[int], bytes]
    _block_size: int
    _name: str
    _mapping: dict[int, int]  # fs block -> journal block * 2 + escape flag
    _: KW_ONLY
    #: complete transactions replayed
    transactions: int = 0
    #: the first transaction of the log, and the one after the last replayed
    first_transaction: int = 0
    end_transaction: int = 0
    #: a transaction whose commit block failed its checksum (the kernel logs it as corrupt)
    failed_commit: int | None = None
    #: revoke records read, and tags they kept from being replayed
    revoke_records: int = 0
    revoke_hits: int = 0
    #: replayed blocks whose first four bytes were escaped (JBD2_FLAG_ESCAPE)
    escaped: int = 0
    #: the replayed log runs past the journal's last block and on from its first
    wrapped: bool = False
    #: the filesystem blocks the replay replaces
    blocks: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        self.blocks = frozenset(self._mapping)

    def read(self, fs_block: int) -> bytes | None:
        """The replayed content of filesystem block ``fs_block``, or None when the journal has none."""
        where = self._mapping.get(fs_block)
        if where is None:
            return None
        jblock, escape = divmod(where, 2)
        data = read_exact(self._read_block, jblock, self._block_size, self._name)
        if escape:
            data = L.JBD2_MAGIC.to_bytes(4, "big") + data[4:]
        return data

    def __repr__(self) -> str:
        return f"<JournalReplay {self.transactions} transactions, {len(self.blocks)} blocks>"


@dataclass
class _Descriptor:
    block: int  # where it sits in the journal
    first_data: int  # the journal block of its first tag's data
    tags: list[tuple[int, int, int]]  # (fs block, flags, checksum)
    tail_ok: bool


@dataclass
class _Transaction:
    sequence: int
    descriptors: list[_Descriptor] = field(default_factory=list)
    revokes: list[int] = field(default_factory=list)  # journal blocks of its revoke blocks
    wrapped: bool = False  # its commit block comes after the log wrapped


@dataclass
class _Scan:
    transactions: list[_Transaction]
    end: int  # the first transaction not replayed
    failed_commit: int | None


@dataclass
class _Cursor:
    """Where pass 1 is, and what its checks carry from block to block."""

    at: int  # the next journal block
    next_id: int  # the sequence number the next block must carry
    consumed: int = 0  # blocks read or stepped over: at most the journal's
    wrapped: bool = False
    end: int | None = None  # the first transaction whose commit block failed
    failed: int | None = None
    need_check_commit_time: bool = False  # a descriptor or revoke block of this transaction was bad
    last_commit_time: int = 0
    crc_sum: int = MASK32  # v1 transaction checksum (crc32_be)


class _Journal(JournalBlocks):
    """The three recovery passes over the journal's blocks."""

    # -- pass 1: scan --------------------------------------------------------------------------

    def scan(self) -> _Scan:
        """Find the end of the log: the transactions whose commit block is there and valid."""
        capacity = self.maxlen - self.first
        c = _Cursor(self.start, self.sequence)
        transactions: dict[int, _Transaction] = {}
        while True:
            here, block = c.at, self.read(c.at)
            self.advance(c, 1)
            header = np.frombuffer(block, L.JOURNAL_HEADER, count=1)[0]
            if int(header["h_magic"]) != L.JBD2_MAGIC or int(header["h_sequence"]) != c.next_id:
                break
            if c.consumed > capacity:  # the kernel would go round for ever
                self.fail(f"the log is longer than the journal: transaction {c.next_id} loops at block {here}")
            blocktype = int(header["h_blocktype"])
            transaction = transactions.setdefault(c.next_id, _Transaction(c.next_id))
            if blocktype == L.JBD2_DESCRIPTOR_BLOCK:
                self.scan_descriptor(c, here, block, transaction)
            elif blocktype == L.JBD2_COMMIT_BLOCK:
                if not self.scan_commit(c, block, transaction):
                    break
            elif blocktype == L.JBD2_REVOKE_BLOCK:
                c.need_check_commit_time = c.need_check_commit_time or not self.tail_ok(block)
                transaction.revokes.append(here)
            else:
                break
        end = c.next_id if c.end is None else c.end
        replayed = [t for t in transactions.values() if not _tid_geq(t.sequence, end)]
        return _Scan(replayed, end, c.failed)

    def advance(self, c: _Cursor, n: int) -> None:
        """Step over ``n`` blocks, wrapping at the journal's end."""
        c.consumed += n
        c.wrapped = c.wrapped or c.at + n >= self.maxlen
        c.at = self.wrap(c.at + n)

    def scan_descriptor(self, c: _Cursor, here: int, block: bytes, transaction: _Transaction) -> None:
        """Record a descriptor block and step over its data blocks (summing them for the v1 CRC)."""
        tail_ok = self.tail_ok(block)
        c.need_check_commit_time = c.need_check_commit_time or not tail_ok
        tags = self.tags(block)
        transaction.descriptors.append(_Descriptor(here, c.at, tags, tail_ok))
        if self.checksum_v1 and not c.need_check_commit_time and c.end is None:
            c.crc_sum = crc32_be(block, c.crc_sum)
            for _ in tags:
                c.crc_sum = crc32_be(self.read(c.at), c.crc_sum)
                self.advance(c, 1)
        else:
            self.advance(c, len(tags))

    def scan_commit(self, c: _Cursor, block: bytes, transaction: _Transaction) -> bool:
        """Check a commit block and close its transaction; False when the log ends before it."""
        commit = L.JOURNAL_COMMIT_HEADER.parse(block)
        if c.need_check_commit_time:  # a descriptor or revoke block of this transaction was bad
            if commit.h_commit_sec >= c.last_commit_time:
                self.fail(f"transaction {c.next_id} has a descriptor or revoke block with a wrong checksum")
            return False  # older than the last commit: stale blocks, the log ends here
        bad = False
        if self.checksum_v1:
            if c.end is not None:
                c.failed = c.end
                return True
            found = commit.h_chksum[0]
            if (c.crc_sum == found and commit.h_chksum_type == L.JBD2_CRC32_CHKSUM
                    and commit.h_chksum_size == L.JBD2_CRC32_CHKSUM_SIZE) or (
                    commit.h_chksum_type == 0 and commit.h_chksum_size == 0 and found == 0):  # fmt: skip
                c.crc_sum = MASK32
            else:
                bad = True
        if bad or not self.commit_ok(block):
            if commit.h_commit_sec < c.last_commit_time:
                return False  # stale
            c.end = c.next_id
            if not self.async_commit:
                c.failed = c.next_id
                return True  # the kernel's scan goes on with the same sequence number
        c.last_commit_time = commit.h_commit_sec
        transaction.wrapped = c.wrapped
        c.next_id = (c.next_id + 1) & MASK32
        return True

    # -- pass 2: revoke ------------------------------------------------------------------------

    def revoked(self, scan: _Scan) -> tuple[dict[int, int], int]:
        """Each revoked filesystem block and the newest transaction that revokes it; the records read."""
        revoked: dict[int, int] = {}
        records = 0
        width = 8 if self.is64 else 4
        for transaction in scan.transactions:
            for where in transaction.revokes:
                block = self.read(where)
                count = L.JOURNAL_REVOKE_HEADER.parse(block).r_count
                if count > self.block_size - self.tail:
                    self.fail(f"revoke block {where} of transaction {transaction.sequence} says it holds {count} bytes")
                n = max(0, (count - L.JOURNAL_REVOKE_HEADER_SIZE) // width)
                numbers = np.frombuffer(block, f">u{width}", count=n, offset=L.JOURNAL_REVOKE_HEADER_SIZE)
                records += n
                for number in numbers.tolist():
                    previous = revoked.get(number)
                    if previous is None or _tid_gt(transaction.sequence, previous):
                        revoked[number] = transaction.sequence
        return revoked, records

    # -- pass 3: replay ------------------------------------------------------------------------

    def replay(self, scan: _Scan, revoked: dict[int, int], fs_blocks: int | None) -> tuple[dict[int, int], int, int]:
        """Map each filesystem block to its newest unrevoked copy; return the map, revoke hits, escapes."""
        mapping: dict[int, int] = {}
        hits = 0
        for transaction in scan.transactions:
            sequence = transaction.sequence
            for descriptor in transaction.descriptors:
                if not descriptor.tail_ok:
                    self.fail(f"descriptor block {descriptor.block} of transaction {sequence} has a wrong checksum")
                at = descriptor.first_data
                for number, flags, checksum in descriptor.tags:
                    here, at = at, self.wrap(at + 1)
                    revoker = revoked.get(number)
                    if revoker is not None and not _tid_gt(sequence, revoker):
                        hits += 1
                        continue
                    if self.csum and not self.tag_ok(checksum, self.read(here), sequence):
                        self.fail(
                            f"the copy of block {number} in transaction {sequence} (journal block {here}) "
                            "has a wrong checksum"
                        )
                    if fs_blocks is not None and number >= fs_blocks:
                        self.fail(
                            f"transaction {sequence} writes block {number}, past the filesystem's end "
                            f"({fs_blocks} blocks)"
                        )
                    mapping[number] = here * 2 + (1 if flags & L.JBD2_FLAG_ESCAPE else 0)
        escaped = sum(where & 1 for where in mapping.values())
        return mapping, hits, escaped


def replay(
    read_block: Callable[[int], bytes],
    nblocks: int,
    *,
    block_size: int,
    name: str,
    fs_blocks: int | None = None,
) -> JournalReplay:
    """Replay the jbd2 journal whose block ``n`` ``read_block(n)`` returns (``0 <= n < nblocks``).

    ``name`` (the disk's path) starts every error message. ``fs_blocks``, when given, is the
    filesystem's size in blocks: a transaction that writes past it makes the journal corrupt.
    Returns an empty replay when the log is clean. Raises :class:`~ubdcow.errors.JournalError`
    on a corrupt or unsupported journal.
    """
    try:
        journal = _Journal(read_block, nblocks, block_size, name)
        if journal.start == 0:
            return JournalReplay(read_block, block_size, name, {}, first_transaction=journal.sequence,
                                 end_transaction=journal.sequence)  # fmt: skip
        scan = journal.scan()
        revoked, records = journal.revoked(scan)
        mapping, hits, escaped = journal.replay(scan, revoked, fs_blocks)
    except cs.ConstructError as exc:  # only a short block gets here: every field's value is accepted
        raise journal_error(name, f"journal: unreadable structure ({exc})") from None
    return JournalReplay(
        read_block,
        block_size,
        name,
        mapping,
        transactions=len(scan.transactions),
        first_transaction=journal.sequence,
        end_transaction=scan.end,
        failed_commit=scan.failed_commit,
        revoke_records=records,
        revoke_hits=hits,
        escaped=escaped,
        wrapped=any(t.wrapped for t in scan.transactions),
    )
