"""open_fs and the journal: a filesystem that needs recovery reads as e2fsck's replay of it, or as it is.

The journals here are real metadata changes: a copy of a small ext4 is changed by debugfs (a rename,
a new folder, a chmod, a removed file), and the blocks that changed (superblock, group descriptors,
inode table, directory blocks) are written as one transaction (tests/support/jbd2lab.py's builder) into the
journal of the unchanged image, with needs_recovery set. Oracles: the kernel's read-only loop mount
of a copy that ``e2fsck -E journal_only`` replayed (``journal=True``), and the kernel's ``ro,noload``
mount of the image itself (``journal=False``). The crash of a real guest is tests/test_fs_crash.py's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from support import jbd2lab as J
import pytest
from conftest import require_root, require_tool
from support.fstree import assert_same_view, kernel_view, mounted, reader_view

import ubdcow
from ubdcow.errors import JournalError

BS = 4096


def changed_blocks(before: Path, after: Path, skip: set[int]) -> list[tuple[int, bytes]]:
    a, b = before.read_bytes(), after.read_bytes()
    return [(n, b[n * BS : (n + 1) * BS]) for n in range(len(a) // BS)
            if n not in skip and a[n * BS : (n + 1) * BS] != b[n * BS : (n + 1) * BS]]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("recovery")
    tree = folder / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("pc1\n")
    (tree / "etc" / "old-name").write_text("renamed by the journal\n")
    (tree / "gone").write_text("removed by the journal\n")
    for i in range(50):
        (tree / f"f{i}").write_bytes(b"%d" % i * 100)
    image = folder / "base.img"
    J.mkfs(image, "32M", "-b", str(BS), "-J", "size=4", "-d", str(tree))
    return image


def journaled(base: Path, tmp_path: Path, transaction: bool = True) -> Path:
    """A copy of ``base`` whose journal holds debugfs's changes as one committed transaction."""
    changed = tmp_path / "changed.img"
    shutil.copyfile(base, changed)
    for request in ("mkdir /etc/new", "ln /etc/old-name /etc/new/name", "unlink /etc/old-name", "rm /gone",
                    "sif /f7 mode 0100600", "sif /etc/hostname uid 4242", "ssv volume_name journaled"):  # fmt: skip
        J.run("debugfs", "-w", "-R", request, changed)
    journal_area = set(J.journal_blocks(base))
    writes = changed_blocks(base, changed, journal_area)
    assert {0, 1} <= {n for n, _ in writes}  # the superblock and the group descriptors are in the log
    builder = J.JournalBuilder(len(journal_area), BS, csum=3)
    builder.transaction(writes, commit=transaction)
    image = tmp_path / "disk.img"
    shutil.copyfile(base, image)
    J.install_journal(image, builder.image(), BS)
    return image


def test_needs_recovery_reads_as_e2fsck_replays_it(base, tmp_path):
    require_root("the loop mounts")
    image = journaled(base, tmp_path)
    before = image.read_bytes()
    replayed = tmp_path / "replayed.img"
    assert J.e2fsck_replay(image, replayed).returncode in (0, 1)
    with mounted(replayed) as point:
        kernel = kernel_view(point)
    with ubdcow.open_fs(image) as fs:
        ours = reader_view(fs)
        assert fs.journal_transactions == 1 and not fs.needs_recovery
        assert fs.label == J.superblock_fields(replayed)["Filesystem volume name"] == "journaled"
    assert b"/etc/new/name" in kernel and b"/gone" not in kernel
    assert_same_view(kernel, ours)
    with mounted(image, noload=True) as point:  # the disk as it is: the journal not replayed
        as_is = kernel_view(point)
    with ubdcow.open_fs(image, journal=False) as fs:
        assert fs.needs_recovery and fs.journal_transactions == 0 and fs.label == ""
        assert_same_view(as_is, reader_view(fs))
    assert b"/gone" in as_is and as_is != kernel
    assert image.read_bytes() == before  # nothing written


def test_a_torn_transaction_is_not_replayed(base, tmp_path):
    require_root("the loop mount")
    image = journaled(base, tmp_path, transaction=False)
    with mounted(image, noload=True) as point:
        as_is = kernel_view(point)
    with ubdcow.open_fs(image) as fs:
        assert fs.journal_transactions == 0
        assert_same_view(as_is, reader_view(fs))


def test_an_overlay_needing_recovery(base, tmp_path):
    image = journaled(base, tmp_path)
    cow = tmp_path / "overlay.cow"
    ubdcow.create(cow, image)
    with ubdcow.open_fs(cow) as over, ubdcow.open_fs(image) as raw:
        assert list(over.walk("/")) == list(raw.walk("/"))
        assert over.stat("/etc/hostname").uid == 4242


def test_an_external_journal_is_refused_naming_no_journal(base, tmp_path):
    image = tmp_path / "external.img"
    shutil.copyfile(base, image)
    J.run("debugfs", "-w", "-R", "ssv journal_inum 0", image)
    J.run("debugfs", "-w", "-R", "ssv journal_dev 0x0801", image)
    J.run("debugfs", "-w", "-R", "feature needs_recovery", image)
    with pytest.raises(JournalError, match="another device") as err:
        ubdcow.open_fs(image)
    assert "--no-journal" in (err.value.hint or "")
    with ubdcow.open_fs(image, journal=False) as fs:
        assert fs.needs_recovery and "f7" in fs.listdir("/")


def test_a_journal_writing_past_the_end_is_corrupt(base, tmp_path):
    image = tmp_path / "past.img"
    shutil.copyfile(base, image)
    blocks = int(J.superblock_fields(base)["Block count"])
    builder = J.JournalBuilder(len(J.journal_blocks(base)), BS, csum=3)
    builder.transaction([(blocks + 5, bytes(BS))])
    J.install_journal(image, builder.image(), BS)
    with pytest.raises(JournalError) as err:
        ubdcow.open_fs(image)
    assert str(blocks + 5) in str(err.value) and "--no-journal" in (err.value.hint or "")
    with ubdcow.open_fs(image, journal=False) as fs:
        assert fs.needs_recovery


def test_a_corrupt_journal_or_journal_inode(base, tmp_path):
    require_tool("debugfs", "e2fsprogs")
    image = tmp_path / "bad.img"
    shutil.copyfile(base, image)
    J.run("debugfs", "-w", "-R", "feature needs_recovery", image)
    first = J.journal_blocks(image)[0]
    with open(image, "r+b") as f:  # the journal's superblock loses its magic
        f.seek(first * BS)
        f.write(bytes(16))
    with pytest.raises(JournalError) as err:
        ubdcow.open_fs(image)
    assert str(err.value).startswith(f"{image}: ") and "--no-journal" in (err.value.hint or "")
    J.run("debugfs", "-w", "-R", "sif <8> block[5] 0x7FFFFFF0", image)  # its extent points past the end
    with pytest.raises(JournalError, match="journal inode 8 is unreadable"):
        ubdcow.open_fs(image)
    with ubdcow.open_fs(image, journal=False) as fs:
        assert len(fs.listdir("/")) == 53  # lost+found, etc, gone, f0..f49
