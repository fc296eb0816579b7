"""jbd2 journal replay in memory (ubdcow.fs.journal) against e2fsck's replay.

Two kinds of journals:

- synthesized ones (tests/support/jbd2lab.py writes them from the format, with its own CRCs), installed
  into the journal inode of a real ext4 image with needs_recovery set, so that e2fsck
  (``-E journal_only``) replays each one too: the rules (later transactions win, revokes, torn
  transactions, wrap, escapes, the three tag forms, v1/v2/v3 checksums, async commit, stale
  blocks, sequence wrap) are pinned against e2fsprogs' recovery code, not against a model of it;
- real ones left by a UML guest SIGKILLed with the filesystem mounted (ext4 with 4 KiB and 1 KiB
  blocks, ext3, ext4 without 64bit and metadata_csum, v1 checksums, async commit, data=journal
  with escaped blocks and a wrapped log).

For every block of the filesystem, the replayed view (the disk's block, or ``replay.read(b)``
when the journal has one) must equal the block e2fsck left, except the fields e2fsck itself
writes after a replay (jbd2lab.EXT_SB_E2FSCK_FIELDS, JSB_E2FSCK_FIELDS and the needs_recovery
bit): the write time, kbytes written and checksum of the ext superblock, the journal
superblock's log start, sequence, errno and checksum. Corrupt journals raise JournalError
with a hint naming --no-journal.
"""

from __future__ import annotations

import importlib.util
import random
import shutil
import time
from pathlib import Path

from support import jbd2lab as J
import pytest
from conftest import require_tool, run_atheris
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubdcow.errors import JournalError, UbdCowError
from ubdcow.fs.journal import NO_JOURNAL_HINT, JournalReplay, replay

MAGIC = J.MAGIC.to_bytes(4, "big")
#: free blocks of the small test filesystems (8192 blocks; the metadata ends before 2000)
TARGET = 4000


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[int, tuple[Path, int]]:
    """A fresh ext4 per block size, with a 1024-block journal: ``{block_size: (image, blocks_count)}``."""
    require_tool("mkfs.ext4", "e2fsprogs")
    folder = tmp_path_factory.mktemp("jbase")
    out = {}
    for bs, size, journal in ((1024, "8M", "1"), (4096, "32M", "4")):
        image = folder / f"base{bs}.img"
        J.mkfs(image, size, "-b", str(bs), "-J", f"size={journal}")
        assert len(J.journal_blocks(image)) == 1024
        free = J.run("debugfs", "-R", f"testb {TARGET} 4000", image).stdout
        assert free.count("not in use") == 4000, free[:500]
        out[bs] = (image, int(J.superblock_fields(image)["Block count"]))
    return out


class Case:
    """One synthesized journal, replayed by ubdcow and by e2fsck."""

    def __init__(self, tmp_path: Path, images: dict[int, tuple[Path, int]], builder: J.JournalBuilder, **sb: int):
        self.builder = builder
        self.bs = builder.block_size
        base, self.fs_blocks = images[self.bs]
        self.journal = builder.image(**sb)
        self.image = tmp_path / "disk.img"
        shutil.copyfile(base, self.image)
        J.install_journal(self.image, self.journal, self.bs)
        self.tmp = tmp_path

    def replay(self, **kw: object) -> JournalReplay:
        return replay(J.reader(self.journal, self.bs), len(self.journal) // self.bs, block_size=self.bs,
                      name=str(self.image), fs_blocks=self.fs_blocks, **kw)  # type: ignore[arg-type]  # fmt: skip

    def e2fsck(self) -> str:
        proc = J.e2fsck_replay(self.image, self.tmp / "e2fsck.img")
        return proc.stdout + proc.stderr

    def compare(self, rep: JournalReplay) -> J.Comparison:
        self.e2fsck_output = self.e2fsck()
        physical = J.journal_blocks(self.image)
        return J.compare_replay(self.image, self.tmp / "e2fsck.img", self.bs, self.fs_blocks, rep, physical[0],
                                error_state=rep.failed_commit is not None)  # fmt: skip


def blocks(rng: random.Random, bs: int, n: int) -> list[bytes]:
    return [rng.randbytes(bs) for _ in range(n)]


FORMS = {
    # name: builder keywords
    "32bit": dict(is64=False, csum=0),
    "64bit": dict(is64=True, csum=0),
    "32bit-csum2": dict(is64=False, csum=2),
    "64bit-csum2": dict(is64=True, csum=2),
    "32bit-csum3": dict(is64=False, csum=3),
    "64bit-csum3": dict(is64=True, csum=3),
    "v1-checksum": dict(is64=False, csum=0, v1_checksum=True),
    "v1-checksum-async": dict(is64=True, csum=0, v1_checksum=True, async_commit=True),
    "csum3-async": dict(is64=True, csum=3, async_commit=True),
    "v1-superblock": dict(is64=False, csum=0, version=1),
}


@pytest.mark.parametrize("bs", [1024, 4096])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_transactions_revokes_wrap_escape_torn_match_e2fsck(tmp_path, images, form, bs):
    """Later transactions win, revokes hide earlier and same-transaction copies, a torn last
    transaction is dropped, escaped blocks get their magic back, and the log wraps."""
    rng = random.Random(f"{form}-{bs}")
    b = J.JournalBuilder(1024, bs, start=900, **FORMS[form])
    t1 = [(TARGET + i, d) for i, d in enumerate(blocks(rng, bs, 150))]  # several descriptor blocks
    b.transaction(t1)
    escaped = MAGIC + rng.randbytes(bs - 4)
    t2 = [(TARGET + i, d) for i, d in zip(range(0, 150, 3), blocks(rng, bs, 50), strict=True)]
    t2.append((TARGET + 300, escaped))
    b.transaction(t2, revokes=[TARGET + 1, TARGET + 3, TARGET + 4, TARGET + 500])
    t3 = [(TARGET + 1, rng.randbytes(bs))]
    b.transaction(t3)
    b.transaction([(TARGET + 2, rng.randbytes(bs)), (TARGET + 5, rng.randbytes(bs))], commit=False)  # torn
    case = Case(tmp_path, images, b)
    rep = case.replay()

    assert rep.transactions == 3 and rep.wrapped
    assert rep.read(TARGET + 1) == t3[0][1]  # revoked in 2, written again in 3
    assert rep.read(TARGET + 3) is None and rep.read(TARGET + 4) is None  # revoked: neither copy
    assert rep.read(TARGET + 6) == dict(t2)[TARGET + 6]  # the later copy
    assert rep.read(TARGET + 7) == dict(t1)[TARGET + 7]
    assert rep.read(TARGET + 2) == dict(t1)[TARGET + 2]  # the torn transaction's copy is not used
    assert rep.read(TARGET + 5) == dict(t1)[TARGET + 5]
    assert rep.read(TARGET + 300) == escaped and rep.escaped == 1
    assert rep.revoke_records == 4 and rep.revoke_hits == 4  # 1, 3 and 4 in transaction 1, 3 in 2
    assert rep.blocks == {TARGET + i for i in range(150)} - {TARGET + 3, TARGET + 4} | {TARGET + 300}

    result = case.compare(rep)
    assert result.differing == [], case.e2fsck_output
    assert result.replayed_and_changed == len(rep.blocks)  # e2fsck wrote the same blocks


@pytest.mark.parametrize("form", ["64bit", "32bit-csum2", "64bit-csum3"])
def test_tags_that_each_carry_a_uuid(tmp_path, images, form):
    rng = random.Random(form)
    b = J.JournalBuilder(1024, 1024, **FORMS[form])
    b.transaction([(TARGET + i, d) for i, d in enumerate(blocks(rng, 1024, 90))], same_uuid=False)
    case = Case(tmp_path, images, b)
    rep = case.replay()
    assert len(rep.blocks) == 90
    assert case.compare(rep).differing == []


def test_a_clean_log_replays_nothing(images, tmp_path):
    b = J.JournalBuilder(1024, 1024)
    b.transaction([(TARGET, bytes(1024))])
    rep = replay(J.reader(b.image(start=0), 1024), 1024, block_size=1024, name="disk.img")
    assert rep.transactions == 0 and rep.blocks == frozenset() and rep.read(TARGET) is None


@pytest.mark.parametrize("first", [1000, 0xFFFFFFFE])
def test_the_newest_revoke_of_a_block_counts(tmp_path, images, first):
    """Written in 1, revoked in 2, written in 3, revoked in 4: no copy is replayed (also across 2**32)."""
    rng = random.Random(first)
    b = J.JournalBuilder(1024, 1024, sequence=first, csum=3)
    b.transaction([(TARGET, rng.randbytes(1024)), (TARGET + 1, rng.randbytes(1024))])
    b.transaction([], revokes=[TARGET])
    b.transaction([(TARGET, rng.randbytes(1024))])
    b.transaction([(TARGET + 2, rng.randbytes(1024))], revokes=[TARGET])
    case = Case(tmp_path, images, b)
    rep = case.replay()
    assert rep.transactions == 4 and rep.blocks == {TARGET + 1, TARGET + 2} and rep.revoke_hits == 2
    assert case.compare(rep).differing == []


def test_a_journal_that_fills_the_whole_log_and_wraps_the_sequence(tmp_path, images):
    """Transactions around the whole journal, sequence numbers crossing 2**32: the scan stops
    where the log comes back to its start (an older sequence number)."""
    rng = random.Random(7)
    b = J.JournalBuilder(1024, 1024, sequence=0xFFFFFFF0, start=500, csum=3)
    seqs = []
    while True:
        writes = [(TARGET + rng.randrange(600), rng.randbytes(1024)) for _ in range(rng.randrange(1, 40))]
        if b.pos < 500 and b.pos + len(writes) + 3 >= 500:
            break
        seqs.append(b.transaction(writes, revokes=[TARGET + rng.randrange(600)] if rng.random() < 0.3 else []))
    while b.pos < 500:  # fill the journal up to the log's first block exactly
        gap = 500 - b.pos
        writes = [(TARGET + rng.randrange(600), rng.randbytes(1024)) for _ in range(gap - 2)] if gap >= 3 else []
        seqs.append(b.transaction(writes))
    assert b.pos == 500
    assert seqs[0] > seqs[-1]  # crossed 2**32
    case = Case(tmp_path, images, b)
    rep = case.replay()
    assert rep.transactions == len(seqs) and rep.wrapped and rep.revoke_hits > 0
    assert rep.end_transaction == (seqs[-1] + 1) & 0xFFFFFFFF
    assert case.compare(rep).differing == []


# -- checksums: which failures end the log, which make the journal corrupt ------------------------


def three(b: J.JournalBuilder, rng: random.Random, *, bad2: str | None = None, bad3: str | None = None,
          time2: int | None = None) -> list[dict[int, bytes]]:  # fmt: skip
    out = []
    for i, bad in enumerate((None, bad2, bad3)):
        writes = {TARGET + i * 20 + k: rng.randbytes(b.block_size) for k in range(12)}
        writes[TARGET + 100] = rng.randbytes(b.block_size)  # in all three
        b.transaction(writes.items(), bad=bad, commit_time=time2 if i == 1 and time2 else None)
        out.append(writes)
    return out


@pytest.mark.parametrize("form", ["64bit-csum3", "32bit-csum2", "v1-checksum"])
def test_a_wrong_commit_checksum_ends_the_log_before_its_transaction(tmp_path, images, form):
    rng = random.Random(form)
    b = J.JournalBuilder(1024, 1024, **FORMS[form])
    t = three(b, rng, bad2="v1" if form == "v1-checksum" else "commit")
    case = Case(tmp_path, images, b)
    rep = case.replay()
    assert rep.transactions == 1 and rep.failed_commit == b.first_sequence + 1
    assert rep.read(TARGET + 100) == t[0][TARGET + 100] and rep.read(TARGET + 20) is None
    assert case.compare(rep).differing == []
    assert f"Journal transaction {b.first_sequence + 1} was corrupt, replay was aborted" in case.e2fsck_output


@pytest.mark.parametrize("form", ["csum3-async", "v1-checksum-async"])
def test_async_commit_a_wrong_commit_checksum_ends_the_log_there_too(tmp_path, images, form):
    rng = random.Random(form)
    b = J.JournalBuilder(1024, 1024, **FORMS[form])
    t = three(b, rng, bad2="v1" if form.startswith("v1") else "commit")
    case = Case(tmp_path, images, b)
    rep = case.replay()
    assert rep.transactions == 1 and rep.read(TARGET + 100) == t[0][TARGET + 100]
    assert case.compare(rep).differing == []


def test_async_commit_v3_two_wrong_commits_replay_the_first_as_the_kernel_does(tmp_path, images):
    """The kernel's scan sets the end at the newest failing commit with async_commit and csum v3:
    transaction 2 of 3 is replayed although its own commit checksum is wrong. Pinned as e2fsck does it."""
    rng = random.Random(3)
    b = J.JournalBuilder(1024, 1024, **FORMS["csum3-async"])
    t = three(b, rng, bad2="commit", bad3="commit")
    case = Case(tmp_path, images, b)
    rep = case.replay()
    assert rep.transactions == 2 and rep.read(TARGET + 100) == t[1][TARGET + 100]
    assert case.compare(rep).differing == []


@pytest.mark.parametrize("bad", ["descriptor", "revoke"])
def test_a_wrong_block_checksum_with_an_older_commit_time_is_stale_and_ends_the_log(tmp_path, images, bad):
    rng = random.Random(bad)
    b = J.JournalBuilder(1024, 1024, csum=3)
    b.transaction([(TARGET, rng.randbytes(1024))], commit_time=2_000_000_000)
    b.transaction([(TARGET + 1, rng.randbytes(1024))], revokes=[TARGET + 9], bad=bad, commit_time=1_000_000_000)
    case = Case(tmp_path, images, b)
    rep = case.replay()
    assert rep.transactions == 1 and rep.blocks == {TARGET}
    assert case.compare(rep).differing == []


@pytest.mark.parametrize("bad", ["descriptor", "revoke", "tag"])
def test_a_wrong_block_checksum_in_a_committed_transaction_is_a_corrupt_journal(tmp_path, images, bad):
    rng = random.Random(bad)
    b = J.JournalBuilder(1024, 1024, csum=3)
    b.transaction([(TARGET, rng.randbytes(1024))])
    b.transaction([(TARGET + 1, rng.randbytes(1024))], revokes=[TARGET + 9], bad=bad)
    case = Case(tmp_path, images, b)
    with pytest.raises(JournalError) as info:
        case.replay()
    assert_journal_error(info.value, str(case.image), "checksum")
    assert "Journal checksum error" in case.e2fsck()  # e2fsck's recovery fails the same way


def test_a_wrong_data_checksum_of_a_revoked_block_is_not_looked_at(tmp_path, images):
    rng = random.Random(11)
    b = J.JournalBuilder(1024, 1024, csum=3)
    b.transaction([(TARGET, rng.randbytes(1024)), (TARGET + 1, rng.randbytes(1024))], bad="tag")
    b.transaction([], revokes=[TARGET])
    case = Case(tmp_path, images, b)
    rep = case.replay()
    assert rep.blocks == {TARGET + 1} and rep.revoke_hits == 1
    assert case.compare(rep).differing == []
    assert "checksum error" not in case.e2fsck_output


# -- corrupt and hostile journals ---------------------------------------------------------------


def assert_journal_error(err: UbdCowError, name: str, word: str) -> None:
    assert isinstance(err, JournalError)
    text = str(err)
    assert text.startswith(f"{name}: journal: ") and "\n" not in text and word in text, text
    assert err.hint == NO_JOURNAL_HINT and "--no-journal" in err.hint


def raises(journal: bytes, word: str, bs: int = 1024, nblocks: int | None = None, **kw: object) -> JournalError:
    with pytest.raises(JournalError) as info:
        replay(J.reader(journal, bs), nblocks if nblocks is not None else len(journal) // bs, block_size=bs,
               name="lab/disk.img", **kw)  # type: ignore[arg-type]  # fmt: skip
    assert_journal_error(info.value, "lab/disk.img", word)
    return info.value


def one_transaction(**kw: object) -> J.JournalBuilder:
    b = J.JournalBuilder(64, 1024, **kw)  # type: ignore[arg-type]
    b.transaction([(TARGET, bytes(1024))])
    return b


def patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


@pytest.mark.parametrize(
    "case,word",
    [
        ("magic", "magic"),
        ("log-block-type", "log block"),
        ("unknown-type", "type 7"),
        ("unknown-incompat", "0x100"),
        ("unknown-rocompat", "read-only"),
        ("csum2-and-csum3", "v2 and v3"),
        ("csum3-and-v1", "v1 and v2/v3"),
        ("superblock-checksum", "checksum is wrong"),
        ("checksum-type", "checksum type 1"),
        ("shared", "shared by 2"),
        ("maxlen", "says 65 blocks"),
        ("first-zero", "first block 0"),
        ("first-past", "first block 64"),
        ("block-size", "not the filesystem's 2048"),
        ("fast-commit", "fast commit"),
        ("start-past", "past the journal's end"),
        ("tiny", "has 1 blocks"),
    ],
)
def test_corrupt_or_unsupported_superblocks(case, word):
    b = one_transaction()
    j = b.image()
    bs = 1024
    kw: dict[str, object] = {}
    if case == "magic":
        j = patch(j, 0, b"\0\0\0\0")
    elif case == "log-block-type":
        j = patch(j, 0, b.superblock(blocktype=J.DESCRIPTOR))
    elif case == "unknown-type":
        j = patch(j, 0, b.superblock(blocktype=7))
    elif case == "unknown-incompat":
        j = one_transaction(extra_incompat=0x100).image()
    elif case == "unknown-rocompat":
        sb = bytearray(b.superblock())
        sb[0x2C:0x30] = (1).to_bytes(4, "big")
        sb[0xFC:0x100] = J.crc32c(bytes(sb[:0xFC]) + bytes(4) + bytes(sb[0x100:1024]), 0xFFFFFFFF).to_bytes(4, "big")
        j = patch(j, 0, bytes(sb))
    elif case == "csum2-and-csum3":
        j = one_transaction(extra_incompat=J.INCOMPAT_CSUM_V2).image()
    elif case == "csum3-and-v1":
        j = one_transaction(v1_checksum=True).image()
    elif case == "superblock-checksum":
        j = patch(j, 0x48, b"\x07")  # s_max_transaction, under the checksum
    elif case == "checksum-type":
        j = patch(j, 0, b.superblock(checksum_type=1))
    elif case == "shared":
        j = patch(j, 0, b.superblock(nr_users=2))
    elif case == "maxlen":
        j = patch(j, 0, b.superblock(maxlen=65))
    elif case == "first-zero":
        b2 = J.JournalBuilder(64, 1024, first=0, start=1)
        b2.transaction([(TARGET, bytes(1024))])
        j = b2.image()
    elif case == "first-past":
        j = patch(j, 0, J.JournalBuilder(64, 1024, first=64, start=1).superblock())
    elif case == "block-size":
        bs = 2048
        j = J.JournalBuilder(64, 1024).image() + bytes(64 * 1024)
    elif case == "fast-commit":
        j = one_transaction(extra_incompat=J.INCOMPAT_FAST_COMMIT).image()
    elif case == "start-past":
        j = patch(j, 0, b.superblock(start=64))
    elif case == "tiny":
        kw["nblocks"] = 1
    raises(j, word, bs=bs, **kw)  # type: ignore[arg-type]


def test_fast_commit_journals_with_a_clean_log_are_fine():
    b = J.JournalBuilder(64, 1024, extra_incompat=J.INCOMPAT_FAST_COMMIT)
    assert replay(J.reader(b.image(start=0), 1024), 64, block_size=1024, name="d").transactions == 0


def test_a_v1_superblock_ignores_the_v2_fields():
    """A v1 journal has 32-bit tags and no features, whatever the bytes where v2 keeps them say."""
    b = J.JournalBuilder(64, 1024, version=1, is64=False, csum=0)
    b.transaction([(TARGET, b"x" * 1024)])
    j = bytearray(b.image())
    j[0x24:0x30] = b"\xff" * 12  # features a v2 journal could not have
    rep = replay(J.reader(bytes(j), 1024), 64, block_size=1024, name="d")
    assert rep.blocks == {TARGET} and rep.read(TARGET) == b"x" * 1024


def test_a_tag_past_the_end_of_the_filesystem_is_corrupt_unless_revoked():
    b = J.JournalBuilder(64, 1024)
    b.transaction([(9000, bytes(1024)), (TARGET, bytes(1024))])
    err = raises(b.image(), "past the filesystem's end", fs_blocks=8192)
    assert "9000" in str(err)
    # without fs_blocks the tag is taken as it is
    assert replay(J.reader(b.image(), 1024), 64, block_size=1024, name="d").blocks == {9000, TARGET}
    b.transaction([], revokes=[9000])
    assert replay(J.reader(b.image(), 1024), 64, block_size=1024, name="d", fs_blocks=8192).blocks == {TARGET}
    # 64-bit block numbers far past any disk
    b = J.JournalBuilder(64, 1024, is64=True)
    b.transaction([(1 << 40, bytes(1024))])
    raises(b.image(), str(1 << 40), fs_blocks=8192)


def test_a_revoke_block_claiming_more_bytes_than_a_block_is_corrupt():
    b = J.JournalBuilder(64, 1024, csum=0)
    b.transaction([(TARGET, bytes(1024))], revokes=[TARGET + 1])
    j = b.image()
    raises(patch(j, 1024 + 12, (1025).to_bytes(4, "big")), "holds 1025 bytes")


def test_a_transaction_that_never_ends_around_the_journal_is_a_loop_not_a_hang():
    """Descriptor blocks of one transaction all around the journal and no commit: the kernel's scan
    would go round for ever; here the log may not be longer than the journal."""
    b = J.JournalBuilder(65, 1024, csum=0)
    for _ in range(32):  # one tag per descriptor, one transaction number: blocks 1 to 64, all of the log
        b.transaction([(TARGET, bytes(1024))], commit=False, per_descriptor=1, sequence=b.sequence)
    assert b.pos == 1
    calls = []
    read = J.reader(b.image(), 1024)

    def counting(n: int) -> bytes:
        calls.append(n)
        return read(n)

    t0 = time.monotonic()
    with pytest.raises(JournalError, match="loops"):
        replay(counting, 65, block_size=1024, name="d")
    assert time.monotonic() - t0 < 2 and len(calls) <= 2 * 65


def test_a_block_of_an_older_transaction_ends_the_log():
    """Sequence numbers must go up by one: the block after transaction N's commit is N+1's or the log ends."""
    b = J.JournalBuilder(64, 1024, csum=3)
    b.transaction([(TARGET, b"a" * 1024)])
    b.transaction([(TARGET, b"b" * 1024)], sequence=b.first_sequence)  # the same number again
    rep = replay(J.reader(b.image(), 1024), 64, block_size=1024, name="d")
    assert rep.transactions == 1 and rep.read(TARGET) == b"a" * 1024


def test_short_reads_and_wrong_block_sizes():
    j = one_transaction().image()
    with pytest.raises(JournalError, match="read 1000 bytes"):
        replay(lambda n: j[n * 1024 : n * 1024 + 1000], 64, block_size=1024, name="d")
    with pytest.raises(JournalError, match="power of two"):
        replay(J.reader(j, 1024), 64, block_size=1000, name="d")


def test_replay_reads_only_the_log_and_read_reads_one_block():
    """No checksums to verify: the data blocks are read only when asked for, one at a time."""
    b = J.JournalBuilder(512, 1024, csum=0)
    for k in range(3):
        b.transaction([(TARGET + i, bytes([k]) * 1024) for i in range(100)])
    j = b.image()
    calls: list[int] = []
    read = J.reader(j, 1024)

    def counting(n: int) -> bytes:
        calls.append(n)
        return read(n)

    rep = replay(counting, 512, block_size=1024, name="d")
    # the superblock, 3 x (2 descriptors + 1 commit) and the block after the log
    assert len(calls) == 1 + 3 * 3 + 1, calls
    calls.clear()
    assert rep.read(TARGET + 5) == bytes([2]) * 1024 and len(calls) == 1


# -- fuzz: mutated journals never raise anything but JournalError -------------------------------

FUZZ = Path(__file__).parent / "fuzz"


def load_harness(name: str):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), FUZZ / name)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seed_journals() -> list[bytes]:
    """48-block journals (1 KiB blocks, as the harness reads them) of every form, wrapped, with
    revokes, an escaped block and a torn last transaction."""
    rng = random.Random(1)
    out = []
    for form in ("32bit", "64bit-csum3", "32bit-csum2", "v1-checksum", "csum3-async"):
        b = J.JournalBuilder(48, 1024, start=30, **FORMS[form])
        for k in range(4):
            b.transaction([(TARGET + rng.randrange(50), rng.randbytes(1024)) for _ in range(rng.randrange(1, 6))],
                          revokes=[TARGET + rng.randrange(50)] if k % 2 else [])  # fmt: skip
        b.transaction([(TARGET, MAGIC + bytes(1020))], commit=False)
        out.append(b.image())
    return out


SEEDS = seed_journals()


@st.composite
def mutated_journals(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 10))):
        block = draw(st.integers(0, len(data) // 1024 - 1))
        offset = draw(st.one_of(st.integers(0, 40), st.integers(0, 1023), st.integers(0xF0, 0x100)))
        data[block * 1024 + offset] ^= draw(st.integers(1, 255))
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def test_mutated_journals_raise_only_journal_errors():
    """The atheris target, fed mutated seed journals by hypothesis (atheris or not)."""
    module = load_harness("fuzz_journal.py")
    for seed in SEEDS:
        module.test_one_input(seed)
        assert replay(J.reader(seed, 1024), 48, block_size=1024, name="s").transactions == 4

    @settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
    @given(mutated_journals())
    def check(data: bytes) -> None:
        module.test_one_input(data)

    check()


def test_atheris_journal_harness(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed-{i}").write_bytes(seed)
    run_atheris(FUZZ / "fuzz_journal.py", corpus, 20_000, "-seed=12345", "-max_len=100000", artifacts=tmp_path)


# -- real journals: a guest SIGKILLed with the filesystem mounted -----------------------------------

#: metadata work: many files in a folder that is then removed (its blocks are revoked), a
#: rename, a truncate, a symlink, a hard link, an xattr; ``sync`` in the middle (everything home,
#: the journal not yet clean), and an fsync at the end (committed, not yet home)
ORDERED = """
mkdir -p a/b/c keep
for i in $(seq 1 300); do echo "file $i" > a/f$i; done
dd if=/dev/urandom of=keep/big bs=4k count=200 status=none
ln -s a/f1 link1; ln keep/big keep/hard
setfattr -n user.x -v y keep/big
sync
rm -rf a
mkdir d3; for i in $(seq 1 100); do echo x$i > d3/g$i; done
mv d3 keep/moved
truncate -s 10000 keep/big
echo tail > keep/last
sync keep/last
"""

#: data=journal on a 1024-block journal: file data goes through the log, blocks that start with
#: the jbd2 magic are escaped; writes go on until the log (as debugfs reads it in the guest) wraps
DATA_JOURNAL = r"""
mkblk() {  # FILE COUNT SIZE: COUNT blocks of SIZE bytes, each starting with the jbd2 magic
  i=0; : > "$1"
  while [ $i -lt $2 ]; do printf '\300\073\071\230' >> "$1"; head -c $(($3 - 4)) /dev/urandom >> "$1"; i=$((i+1)); done
}
wrapped='/Found expected/ {b=$NF+0; if (seen && b < last) w=1; last=b; seen=1} END {exit !w}'
mkdir keep
dd if=/dev/urandom of=keep/first bs=1k count=100 status=none; sync keep/first
i=0
while [ $i -lt 60 ]; do
  dd if=/dev/urandom of=keep/w$i bs=1k count=64 status=none; sync keep/w$i
  if debugfs -R logdump /dev/ubdb 2>/dev/null | awk "$wrapped"; then break; fi
  i=$((i+1))
done
mkblk keep/magic 20 1024; sync keep/magic
mkdir gone; for i in $(seq 1 60); do echo g$i > gone/f$i; done; sync gone
rm -rf gone keep/first; sync keep
"""

GUESTS = {
    # name: (mkfs, size, mkfs options, mount options, workload, journal features expected)
    "ext4-4k": ("ext4", "256M", ["-b", "4096"], "rw", ORDERED, {"journal_64bit", "journal_checksum_v3"}),
    "ext4-1k": ("ext4", "64M", ["-b", "1024"], "rw", ORDERED, {"journal_64bit", "journal_checksum_v3"}),
    "ext4-32bit-nocsum": ("ext4", "128M", ["-b", "4096", "-O", "^64bit,^metadata_csum"], "rw", ORDERED, set()),
    "ext3": ("ext3", "128M", ["-b", "4096"], "rw", ORDERED, set()),
    "ext4-v1-checksum": ("ext4", "128M", ["-b", "4096", "-O", "^metadata_csum"], "journal_checksum", ORDERED,
                         {"journal_checksum", "journal_64bit"}),
    "ext4-async-commit": ("ext4", "128M", ["-b", "4096"], "journal_async_commit,data=writeback", ORDERED,
                          {"journal_checksum_v3", "journal_async_commit"}),
    "ext4-data-journal": ("ext4", "64M", ["-b", "1024", "-J", "size=1"], "data=journal", DATA_JOURNAL,
                          {"journal_64bit", "journal_checksum_v3"}),
}  # fmt: skip


@pytest.mark.uml
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GUESTS))
def test_a_killed_guest_journal_replays_as_e2fsck_replays_it(tmp_path, name):
    fstype, size, mkfs_args, mount_opts, body, journal_features = GUESTS[name]
    for tool in ("setfattr", "debugfs", "awk", "head", "truncate"):
        require_tool(tool, {"setfattr": "attr", "debugfs": "e2fsprogs"}.get(tool, "coreutils"))
    backing = tmp_path / "backing.img"
    J.mkfs(backing, size, *mkfs_args, fstype=fstype)
    cow = tmp_path / "overlay.cow"
    J.crash_guest(tmp_path, cow, backing, body, mount_opts=mount_opts, fstype=fstype)
    merged = tmp_path / "merged.img"
    J.merge_overlay(cow, backing, merged)
    ij = J.ImageJournal.read(merged, tmp_path)
    assert "needs_recovery" in ij.features.split()
    assert journal_features <= set(ij.journal_features.split()), ij.journal_features

    rep = replay(ij.read_block, ij.nblocks, block_size=ij.block_size, name=str(merged), fs_blocks=ij.blocks_count)
    assert rep.transactions >= 2
    logdump = J.run("debugfs", "-R", "logdump", merged).stdout
    assert logdump.count("(commit block)") == rep.transactions  # debugfs finds the same transactions
    if body is ORDERED:
        assert rep.revoke_hits > 0  # the removed folder's blocks
    else:
        assert rep.escaped > 0 and rep.wrapped

    out = tmp_path / "e2fsck.img"
    proc = J.e2fsck_replay(merged, out)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    result = J.compare_replay(merged, out, ij.block_size, ij.blocks_count, rep, ij.physical[0])
    assert result.differing == []
    assert result.replayed_and_changed >= 10  # the replay mattered: the disk was behind the journal
    assert result.changed_by_replay - result.replayed_and_changed <= 2  # the two superblocks at most
