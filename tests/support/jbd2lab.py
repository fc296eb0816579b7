"""jbd2 journals for the replay tests: synthesized ones, and real ones left by SIGKILLed UML guests.

Everything here is written from the on-disk format (the kernel's include/linux/jbd2.h), not from
ubdcow: its own CRCs (plain byte loops), its own journal writer, and e2fsprogs and uml_moo as
the oracles:

- :class:`JournalBuilder` lays out transactions as the kernel's commit code does (descriptor
  blocks with tags in the three forms, escaped data blocks, revoke blocks, commit blocks, v1/v2/v3
  checksums) and can damage them on purpose.
- :func:`install_journal` writes such a journal over the journal inode's blocks of a real ext4
  image and sets needs_recovery, so that ``e2fsck -E journal_only`` replays it (:func:`e2fsck_replay`).
- :func:`crash_guest` runs a guest script on a mounted /dev/ubdb and SIGKILLs the UML kernel
  (the whole process group) as soon as the script says so, leaving an unreplayed journal.
- :func:`ImageJournal` reads a merged image's journal with ``debugfs -R 'dump <8>'`` and
  its geometry with ``dumpe2fs -h``; :func:`compare_replay` checks the replayed view block by block.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import require_tool

MAGIC = 0xC03B3998
DESCRIPTOR, COMMIT, SB_V1, SB_V2, REVOKE = 1, 2, 3, 4, 5
FLAG_ESCAPE, FLAG_SAME_UUID, FLAG_LAST_TAG = 1, 2, 8
INCOMPAT_REVOKE, INCOMPAT_64BIT, INCOMPAT_ASYNC, INCOMPAT_CSUM_V2, INCOMPAT_CSUM_V3 = 1, 2, 4, 8, 0x10
INCOMPAT_FAST_COMMIT = 0x20
COMPAT_CHECKSUM = 1
FAIL = "UBDCOW-FAIL"


# -- CRCs, the slow and obvious way ---------------------------------------------------------------


def _table(poly: int) -> list[int]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        out.append(c)
    return out


_CRC32C = _table(0x82F63B78)


def crc32c(data: bytes, crc: int) -> int:
    """CRC-32C register, no inversion (the kernel's crc32c / e2fsprogs' ext2fs_crc32c_le)."""
    for b in data:
        crc = (crc >> 8) ^ _CRC32C[(crc ^ b) & 0xFF]
    return crc


def crc32_be(data: bytes, crc: int) -> int:
    """The kernel's crc32_be: polynomial 0x04C11DB7, most significant bit first, no inversion."""
    for b in data:
        crc ^= b << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


# -- a journal writer -----------------------------------------------------------------------------


@dataclass
class JournalBuilder:
    """A jbd2 journal of ``nblocks`` blocks, written transaction by transaction as the kernel does."""

    nblocks: int
    block_size: int = 1024
    is64: bool = True
    csum: int = 3  # 0, 2 or 3
    v1_checksum: bool = False  # COMPAT_CHECKSUM
    async_commit: bool = False
    version: int = 2
    first: int = 1
    sequence: int = 1000
    start: int | None = None
    uuid: bytes = bytes(range(16))
    blocks: dict[int, bytes] = field(default_factory=dict)
    extra_incompat: int = 0

    def __post_init__(self) -> None:
        self.pos = self.start if self.start is not None else self.first
        self.log_start = self.pos
        self.first_sequence = self.sequence
        self.seed = crc32c(self.uuid, 0xFFFFFFFF)
        self.commit_time = 1_700_000_000

    # the tag size, as journal_tag_bytes() computes it
    @property
    def tag_bytes(self) -> int:
        if self.csum == 3:
            return 16
        size = 12 + (2 if self.csum == 2 else 0)
        return size if self.is64 else size - 4

    @property
    def incompat(self) -> int:
        value = INCOMPAT_REVOKE | self.extra_incompat
        value |= INCOMPAT_64BIT if self.is64 else 0
        value |= {0: 0, 2: INCOMPAT_CSUM_V2, 3: INCOMPAT_CSUM_V3}[self.csum]
        value |= INCOMPAT_ASYNC if self.async_commit else 0
        return value

    def _put(self, data: bytes) -> int:
        assert len(data) == self.block_size
        where = self.pos
        self.blocks[where] = data
        self.pos += 1
        if self.pos >= self.nblocks:
            self.pos = self.first
        return where

    def _header(self, kind: int, sequence: int) -> bytes:
        return struct.pack(">III", MAGIC, kind, sequence)

    def _tail(self, block: bytearray) -> None:
        if self.csum:
            block[-4:] = bytes(4)
            block[-4:] = struct.pack(">I", crc32c(bytes(block), self.seed))

    def _tag(self, number: int, flags: int, checksum: int) -> bytes:
        low, high = number & 0xFFFFFFFF, number >> 32
        if self.csum == 3:
            return struct.pack(">IIII", low, flags, high if self.is64 else 0, checksum)
        tag = struct.pack(">IHH", low, checksum & 0xFFFF, flags)
        if self.is64:
            tag += struct.pack(">I", high)
        return tag + (bytes(2) if self.csum == 2 else b"")

    def tags_per_descriptor(self, same_uuid: bool = True) -> int:
        room = self.block_size - 12 - (4 if self.csum else 0) - 16  # the first tag carries the UUID
        return 1 + (room - self.tag_bytes) // (self.tag_bytes + (0 if same_uuid else 16))

    def transaction(
        self,
        writes: Iterable[tuple[int, bytes]] = (),
        revokes: Iterable[int] = (),
        *,
        commit: bool = True,
        commit_time: int | None = None,
        per_descriptor: int | None = None,
        same_uuid: bool = True,
        bad: str | None = None,
        sequence: int | None = None,
    ) -> int:
        """Append one transaction; return its sequence number.

        ``bad``: ``"commit"`` (a wrong commit checksum), ``"descriptor"``, ``"revoke"`` (a wrong
        tail checksum), ``"tag"`` (a wrong data checksum in the first tag), ``"v1"`` (a wrong v1 CRC).
        """
        seq = self.sequence if sequence is None else sequence
        writes = list(writes)
        revokes = list(revokes)
        crc_sum = 0xFFFFFFFF
        if revokes:
            width = 8 if self.is64 else 4
            per_block = (self.block_size - 16 - (4 if self.csum else 0)) // width
            for i in range(0, len(revokes), per_block):
                chunk = revokes[i : i + per_block]
                block = bytearray(self.block_size)
                records = b"".join(n.to_bytes(width, "big") for n in chunk)
                block[:16] = self._header(REVOKE, seq) + struct.pack(">I", 16 + len(records))
                block[16 : 16 + len(records)] = records
                self._tail(block)
                if bad == "revoke":
                    block[-1] ^= 0xFF
                self._put(bytes(block))
        per = per_descriptor or self.tags_per_descriptor(same_uuid)
        for i in range(0, len(writes), per):
            chunk = writes[i : i + per]
            block = bytearray(self.block_size)
            block[:12] = self._header(DESCRIPTOR, seq)
            offset = 12
            stored = []
            for j, (number, data) in enumerate(chunk):
                assert len(data) == self.block_size
                flags = 0
                if data[:4] == MAGIC.to_bytes(4, "big"):
                    data = bytes(4) + data[4:]
                    flags |= FLAG_ESCAPE
                if j > 0 and same_uuid:
                    flags |= FLAG_SAME_UUID
                if j == len(chunk) - 1:
                    flags |= FLAG_LAST_TAG
                checksum = 0
                if self.csum:
                    checksum = crc32c(data, crc32c(seq.to_bytes(4, "big"), self.seed))
                    if bad == "tag" and i == 0 and j == 0:
                        checksum ^= 1
                tag = self._tag(number, flags, checksum)
                block[offset : offset + len(tag)] = tag
                offset += len(tag)
                if not flags & FLAG_SAME_UUID:
                    block[offset : offset + 16] = self.uuid
                    offset += 16
                stored.append(data)
            self._tail(block)
            if bad == "descriptor":
                block[-1] ^= 0xFF
            self._put(bytes(block))
            crc_sum = crc32_be(bytes(block), crc_sum)
            for data in stored:
                self._put(data)
                crc_sum = crc32_be(data, crc_sum)
        if commit:
            self.commit_time = commit_time if commit_time is not None else self.commit_time + 1
            block = bytearray(self.block_size)
            block[:12] = self._header(COMMIT, seq)
            if self.v1_checksum:
                block[12:14] = bytes([1, 4])
                block[16:20] = struct.pack(">I", crc_sum ^ (1 if bad == "v1" else 0))
            block[0x30:0x3C] = struct.pack(">QI", self.commit_time, 0)
            if self.csum:
                block[16:20] = struct.pack(">I", crc32c(bytes(block), self.seed))
                if bad == "commit":
                    block[16] ^= 0xFF
            self._put(bytes(block))
        if sequence is None:
            self.sequence = (self.sequence + 1) & 0xFFFFFFFF
        return seq

    def superblock(self, *, start: int | None = None, maxlen: int | None = None, nr_users: int = 1,
                   blocktype: int | None = None, checksum_type: int = 4) -> bytes:
        sb = bytearray(self.block_size)
        kind = blocktype if blocktype is not None else (SB_V2 if self.version == 2 else SB_V1)
        sb[:0x24] = struct.pack(
            ">IIIIIIIIi", MAGIC, kind, 0, self.block_size, maxlen if maxlen is not None else self.nblocks,
            self.first, self.first_sequence, self.log_start if start is None else start, 0)
        if self.version == 2:
            sb[0x24:0x30] = struct.pack(">III", COMPAT_CHECKSUM if self.v1_checksum else 0, self.incompat, 0)
            sb[0x30:0x40] = self.uuid
            sb[0x40:0x44] = struct.pack(">I", nr_users)
            if self.csum:
                sb[0x50] = checksum_type
                sb[0xFC:0x100] = struct.pack(">I", crc32c(bytes(sb[:1024]), 0xFFFFFFFF))
        return bytes(sb)

    def image(self, **superblock: int) -> bytes:
        """The whole journal: the superblock, the written blocks, zeros elsewhere."""
        out = bytearray(self.nblocks * self.block_size)
        for where, data in self.blocks.items():
            out[where * self.block_size : (where + 1) * self.block_size] = data
        out[: self.block_size] = self.superblock(**superblock)  # type: ignore[arg-type]
        return bytes(out)


def reader(journal: bytes, block_size: int) -> Callable[[int], bytes]:
    def read_block(n: int) -> bytes:
        assert 0 <= n < len(journal) // block_size, n
        return journal[n * block_size : (n + 1) * block_size]

    return read_block


# -- real images ----------------------------------------------------------------------------------


def run(*cmd: str | os.PathLike[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, check=check, timeout=timeout)


def mkfs(path: Path, size: str, *args: str, fstype: str = "ext4") -> None:
    require_tool(f"mkfs.{fstype}", "e2fsprogs")
    path.unlink(missing_ok=True)
    run(f"mkfs.{fstype}", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", *args, path, size,
        timeout=300)  # fmt: skip


def superblock_fields(image: Path) -> dict[str, str]:
    """``dumpe2fs -h``'s "Name: value" lines (the journal's too)."""
    require_tool("dumpe2fs", "e2fsprogs")
    out = run("dumpe2fs", "-h", image).stdout
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines()) if v}


def journal_blocks(image: Path) -> list[int]:
    """The physical blocks of the journal inode, in order (``debugfs -R 'blocks <8>'``)."""
    require_tool("debugfs", "e2fsprogs")
    return [int(x) for x in run("debugfs", "-R", "blocks <8>", image).stdout.split()]


@dataclass
class ImageJournal:
    """A filesystem image's geometry and its journal's content, read by e2fsprogs."""

    image: Path
    block_size: int
    blocks_count: int
    journal: bytes
    physical: list[int]
    features: str
    journal_features: str

    @classmethod
    def read(cls, image: Path, scratch: Path) -> ImageJournal:
        fields = superblock_fields(image)
        dump = scratch / "journal.bin"
        dump.unlink(missing_ok=True)
        run("debugfs", "-R", f"dump <8> {dump}", image)
        return cls(image, int(fields["Block size"]), int(fields["Block count"]), dump.read_bytes(),
                   journal_blocks(image), fields["Filesystem features"], fields.get("Journal features", ""))

    @property
    def nblocks(self) -> int:
        return len(self.journal) // self.block_size

    def read_block(self, n: int) -> bytes:
        return reader(self.journal, self.block_size)(n)


def install_journal(image: Path, journal: bytes, block_size: int) -> None:
    """Write ``journal`` over the journal inode's blocks of ``image`` and set needs_recovery."""
    physical = journal_blocks(image)
    assert len(physical) * block_size == len(journal), (len(physical), len(journal))
    with open(image, "r+b") as f:
        for i, where in enumerate(physical):
            f.seek(where * block_size)
            f.write(journal[i * block_size : (i + 1) * block_size])
    run("debugfs", "-w", "-R", "feature needs_recovery", image)


def e2fsck_replay(image: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """Copy ``image`` to ``out`` and let ``e2fsck -E journal_only -y`` replay the journal there.

    (No ``-f``: a forced check would run every pass and fix more than the journal.)
    """
    require_tool("e2fsck", "e2fsprogs")
    shutil.copyfile(image, out)
    return run("e2fsck", "-E", "journal_only", "-y", out, check=False)


def read_blocks(path: Path, block_size: int) -> Callable[[int], bytes]:
    data = path.read_bytes()

    def block(n: int) -> bytes:
        return data[n * block_size : (n + 1) * block_size]

    return block


# -- the fields e2fsck itself rewrites after a replay -------------------------------------------------

#: byte ranges of the ext superblock (offsets from its start, 1024 bytes into the disk) that
#: e2fsck rewrites after replaying: write time (s_wtime, s_wtime_hi), s_kbytes_written, the
#: checksum over them (s_checksum); and s_feature_incompat, where it clears needs_recovery (0x4)
EXT_SB_E2FSCK_FIELDS = {"s_wtime": (0x30, 4), "s_wtime_hi": (0x274, 1), "s_kbytes_written": (0x178, 8),
                        "s_checksum": (0x3FC, 4)}  # fmt: skip
EXT_SB_INCOMPAT = 0x60
EXT_SB_RECOVER = 0x4
#: s_state, where e2fsck sets EXT2_ERROR_FS (0x2) after it met a corrupt commit block (its verdict,
#: not the replay's); masked only when the replay reported a failed commit
EXT_SB_STATE = 0x3A
EXT_SB_ERROR_FS = 0x2
#: the journal superblock fields e2fsck resets: the log's start and sequence, the checksum, and
#: s_errno (set to -EINVAL when it met a corrupt commit)
JSB_E2FSCK_FIELDS = {"s_sequence": (0x18, 4), "s_start": (0x1C, 4), "s_errno": (0x20, 4), "s_checksum": (0xFC, 4)}


def _masked(data: bytes, fields: dict[str, tuple[int, int]], base: int) -> bytearray:
    out = bytearray(data)
    for offset, size in fields.values():
        out[base + offset : base + offset + size] = bytes(size)
    return out


@dataclass
class Comparison:
    """The replayed view against e2fsck's replay, block by block."""

    differing: list[int]  # blocks that differ beyond the fields e2fsck rewrites
    changed_by_replay: int  # blocks e2fsck's replay changed on disk
    replayed_and_changed: int  # of those, blocks the in-memory replay supplies


def compare_replay(before: Path, after: Path, block_size: int, blocks_count: int, replayed: object,
                   journal_sb_block: int, *, error_state: bool = False) -> Comparison:  # fmt: skip
    """Compare, for every filesystem block, the replayed view of ``before`` with ``after``.

    The ext superblock's block and the journal superblock's block are compared with the fields
    e2fsck rewrites masked (:data:`EXT_SB_E2FSCK_FIELDS`, :data:`JSB_E2FSCK_FIELDS`, the
    needs_recovery bit); every other block must be byte for byte equal.
    """
    a, b = before.read_bytes(), after.read_bytes()
    sb_block = 1024 // block_size  # block 1 with 1 KiB blocks, else block 0
    sb_base = 1024 % block_size
    differing = []
    changed = hit = 0
    for n in range(blocks_count):
        disk = a[n * block_size : (n + 1) * block_size]
        new = replayed.read(n)  # type: ignore[attr-defined]
        view = disk if new is None else new
        want = b[n * block_size : (n + 1) * block_size]
        if disk != want:
            changed += 1
            hit += new is not None
        if view == want:
            continue
        if n == sb_block:
            mv, mw = _masked(view, EXT_SB_E2FSCK_FIELDS, sb_base), _masked(want, EXT_SB_E2FSCK_FIELDS, sb_base)
            for m in (mv, mw):
                m[sb_base + EXT_SB_INCOMPAT] &= ~EXT_SB_RECOVER & 0xFF
                if error_state:
                    m[sb_base + EXT_SB_STATE] &= ~EXT_SB_ERROR_FS & 0xFF
            if mv == mw:
                continue
        if n == journal_sb_block and _masked(view, JSB_E2FSCK_FIELDS, 0) == _masked(want, JSB_E2FSCK_FIELDS, 0):
            continue
        differing.append(n)
    return Comparison(differing, changed, hit)


# -- guests killed with a mounted filesystem ------------------------------------------------------------

CRASH_MARK = "UBDCOW-CRASH-NOW"


def crash_guest(workdir: Path, cow: Path, backing: Path, body: str, *, mount_opts: str = "rw",
                fstype: str = "ext4", timeout: float = 240) -> str:  # fmt: skip
    """Boot a guest that mounts /dev/ubdb on a host folder, runs ``body`` there (shell, cwd = the
    mount), then prints :data:`CRASH_MARK`; SIGKILL the whole UML process group as soon as it does.

    Returns the console. Fails when the guest did not get there or a :func:`checked` command failed.
    """
    from .uml import run_guest, ubd_arg

    require_tool("linux.uml")
    mnt = workdir / "mnt"
    mnt.mkdir(exist_ok=True)
    script = (
        f"mount -t {fstype} -o {mount_opts} /dev/ubdb {shlex.quote(str(mnt))} || echo {FAIL}: mount\n"
        f"cd {shlex.quote(str(mnt))} || echo {FAIL}: cd\n" + body + f"\necho {CRASH_MARK}\nsleep 3600\n"
    )
    proc = run_guest(script, ubd_arg(cow, backing), workdir=workdir, background=True)
    assert isinstance(proc, subprocess.Popen) and proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while CRASH_MARK.encode() not in seen:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], min(max(left, 0), 0.5))[0]
            chunk = os.read(fd, 65536) if ready else None
            if left <= 0 or chunk == b"":
                tail = seen.decode(errors="replace")[-4000:]
                raise AssertionError(f"guest never got to the crash point; console:\n{tail}")
            seen += chunk or b""
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # with the filesystem still mounted
        proc.wait(timeout=60)
        proc.stdout.close()
    console = seen.decode(errors="replace")
    failures = [line for line in console.splitlines() if line.startswith(FAIL)]
    assert not failures, "guest commands failed:\n" + "\n".join(failures) + "\n" + console[-3000:]
    return console


def checked(cmd: str) -> str:
    return f"{cmd} || echo {FAIL}: {shlex.quote(cmd)}\n"


def merge_overlay(cow: Path, backing: Path, out: Path) -> None:
    """The merged disk, by uml_moo (the UML project's own tool, not ubdcow)."""
    moo = require_tool("uml_moo")
    out.unlink(missing_ok=True)
    run(moo, "-b", backing, cow, out, timeout=300)

