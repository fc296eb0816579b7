"""The ext2/3/4 superblock: parsed, checked for sanity, and its features held against what the reader supports."""

from __future__ import annotations

from dataclasses import dataclass

import construct as cs

from ..errors import CorruptFilesystemError, UnsupportedFilesystemError
from . import layout as L

__all__ = ["Geometry", "parse_superblock", "check_features", "SUPPORTED_INCOMPAT", "REFUSED_RO_COMPAT"]

#: incompat features the reader handles (needs_recovery is handled by the journal replay or --no-journal;
#: mmp only guards writers; metadata_csum_seed only changes checksums, which are not verified)
SUPPORTED_INCOMPAT = (
    L.INCOMPAT_FILETYPE
    | L.INCOMPAT_RECOVER
    | L.INCOMPAT_META_BG
    | L.INCOMPAT_EXTENTS
    | L.INCOMPAT_64BIT
    | 0x100  # mmp
    | 0x200  # flex_bg
    | L.INCOMPAT_EA_INODE
    | 0x2000  # metadata_csum_seed
    | L.INCOMPAT_LARGEDIR
    | L.INCOMPAT_INLINE_DATA
)
#: ro_compat features that change how blocks are addressed: refused. Every other ro_compat bit, known or
#: not, leaves the on-disk format readable by definition (that is what ro_compat means).
REFUSED_RO_COMPAT = L.RO_COMPAT_BIGALLOC
MAX_LOG_BLOCK_SIZE = 6  # 64 KiB


@dataclass(frozen=True)
class Geometry:
    """What the reader needs from the superblock, checked: sizes, counts and features."""

    block_size: int
    blocks_count: int
    first_data_block: int
    blocks_per_group: int
    inodes_per_group: int
    inodes_count: int
    inode_size: int
    first_ino: int
    rev_level: int
    groups: int
    desc_size: int
    compat: int
    incompat: int
    ro_compat: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    journal_inum: int
    journal_dev: int
    label: str
    uuid: str
    state: int

    @property
    def desc_per_block(self) -> int:
        return self.block_size // self.desc_size

    @property
    def desc_blocks(self) -> int:
        return -(-self.groups // self.desc_per_block)

    @property
    def inodes_per_block(self) -> int:
        return self.block_size // self.inode_size

    @property
    def itable_blocks(self) -> int:
        """Blocks of one group's inode table."""
        return -(-self.inodes_per_group * self.inode_size // self.block_size)

    def has_incompat(self, bit: int) -> bool:
        return bool(self.incompat & bit)

    def has_ro_compat(self, bit: int) -> bool:
        return bool(self.ro_compat & bit)

    @property
    def features(self) -> list[str]:
        """The feature names, as dumpe2fs prints them (unknown bits as ``<kind>_0x<bit>``)."""
        names = []
        for value, table, kind in ((self.compat, L.COMPAT, "compat"), (self.incompat, L.INCOMPAT, "incompat"),
                                   (self.ro_compat, L.RO_COMPAT, "ro_compat")):  # fmt: skip
            names += [table.get(1 << i, f"{kind}_{1 << i:#x}") for i in range(32) if value >> i & 1]
        return names

    def group_first_block(self, group: int) -> int:
        return self.first_data_block + group * self.blocks_per_group

    def group_has_super(self, group: int) -> bool:
        """Whether ``group`` starts with a copy of the superblock (sparse_super, sparse_super2)."""
        if group == 0:
            return True
        if self.compat & L.COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if group <= 1 or not self.ro_compat & L.RO_COMPAT_SPARSE_SUPER:
            return True
        if group % 2 == 0:
            return False
        return any(_is_power(group, base) for base in (3, 5, 7))

    def desc_block(self, index: int) -> int:
        """The block holding group descriptor block ``index`` (meta_bg keeps them in their meta group)."""
        if not self.incompat & L.INCOMPAT_META_BG or index < self.first_meta_bg:
            return self.first_data_block + 1 + index
        group = index * self.desc_per_block
        return self.group_first_block(group) + int(self.group_has_super(group))

    def max_file_blocks(self, extents: bool) -> int:
        """How many logical blocks a file can address: 2^32 with extents, 12 + p + p^2 + p^3 with block maps."""
        if extents:
            return 1 << 32
        p = self.block_size // 4
        return min(12 + p + p * p + p * p * p, 1 << 32)


def _is_power(n: int, base: int) -> bool:
    while n > 1 and n % base == 0:
        n //= base
    return n == 1


def parse_superblock(raw: bytes, *, name: str, volume_size: int) -> Geometry:
    """Parse and check the 1024 bytes of a superblock; raise a one-line error for anything impossible."""
    if len(raw) < L.SUPERBLOCK_SIZE:
        raise UnsupportedFilesystemError(name, "too small to hold an ext2/ext3/ext4 filesystem")
    try:
        sb = L.SUPERBLOCK.parse(raw)
    except cs.ConstructError as exc:  # cannot happen with 1024 bytes, but construct stays inside
        raise CorruptFilesystemError(name, f"superblock: {exc}") from None
    if sb.s_magic != L.EXT_MAGIC:
        raise UnsupportedFilesystemError(name, "no ext2/ext3/ext4 filesystem (bad superblock magic)")
    if sb.s_rev_level >= L.DYNAMIC_REV:  # a valid filesystem this reader refuses: say so before its geometry
        _refuse(sb.s_feature_incompat, sb.s_feature_ro_compat, name)
    bad = _geometry_problem(sb, volume_size)
    if bad:
        raise CorruptFilesystemError(name, f"superblock: {bad}")
    rev = sb.s_rev_level
    incompat = sb.s_feature_incompat if rev else 0
    is64 = bool(incompat & L.INCOMPAT_64BIT)
    bs = 1024 << sb.s_log_block_size
    blocks = sb.s_blocks_count_lo | (sb.s_blocks_count_hi << 32 if is64 else 0)
    groups = -(-(blocks - sb.s_first_data_block) // sb.s_blocks_per_group)
    return Geometry(
        block_size=bs,
        blocks_count=blocks,
        first_data_block=sb.s_first_data_block,
        blocks_per_group=sb.s_blocks_per_group,
        inodes_per_group=sb.s_inodes_per_group,
        inodes_count=sb.s_inodes_count,
        inode_size=sb.s_inode_size if rev else L.GOOD_OLD_INODE_SIZE,
        first_ino=sb.s_first_ino if rev else L.GOOD_OLD_FIRST_INO,
        rev_level=rev,
        groups=groups,
        desc_size=sb.s_desc_size if is64 else L.MIN_DESC_SIZE,
        compat=sb.s_feature_compat if rev else 0,
        incompat=incompat,
        ro_compat=sb.s_feature_ro_compat if rev else 0,
        first_meta_bg=sb.s_first_meta_bg,
        backup_bgs=(sb.s_backup_bgs[0], sb.s_backup_bgs[1]),
        journal_inum=sb.s_journal_inum if rev else 0,
        journal_dev=sb.s_journal_dev if rev else 0,
        label=sb.s_volume_name.split(b"\0", 1)[0].decode("utf-8", "replace"),
        uuid=sb.s_uuid.hex(),
        state=sb.s_state,
    )


def _geometry_problem(sb: cs.Container, volume_size: int) -> str | None:
    """What makes this superblock unusable, or None."""
    rev = sb.s_rev_level
    if rev > L.DYNAMIC_REV:
        return f"revision {rev} is unknown (0 and 1 exist)"
    if sb.s_log_block_size > MAX_LOG_BLOCK_SIZE:
        return f"block size 2^{sb.s_log_block_size + 10} is impossible"
    bs = 1024 << sb.s_log_block_size
    is64 = rev and sb.s_feature_incompat & L.INCOMPAT_64BIT
    blocks = sb.s_blocks_count_lo | (sb.s_blocks_count_hi << 32 if is64 else 0)
    isize = sb.s_inode_size if rev else L.GOOD_OLD_INODE_SIZE
    if isize < L.GOOD_OLD_INODE_SIZE or isize > bs or isize & (isize - 1):
        return f"inode size {isize} is impossible"
    if sb.s_first_data_block != (1 if bs == 1024 else 0):
        return f"first data block {sb.s_first_data_block} is wrong for {bs}-byte blocks"
    if not 0 < sb.s_blocks_per_group <= 8 * bs:
        return f"{sb.s_blocks_per_group} blocks per group is impossible"
    if not 0 < sb.s_inodes_per_group <= 8 * bs:
        return f"{sb.s_inodes_per_group} inodes per group is impossible"
    if blocks <= sb.s_first_data_block:
        return f"block count {blocks} is impossible"
    if blocks * bs > volume_size:
        return f"the filesystem needs {blocks * bs} bytes but its volume holds {volume_size} (a truncated image?)"
    groups = -(-(blocks - sb.s_first_data_block) // sb.s_blocks_per_group)
    if not 0 < sb.s_inodes_count <= groups * sb.s_inodes_per_group:
        return f"inode count {sb.s_inodes_count} does not fit {groups} groups of {sb.s_inodes_per_group}"
    if rev and not L.GOOD_OLD_FIRST_INO <= sb.s_first_ino < sb.s_inodes_count:
        return f"first inode {sb.s_first_ino} is impossible"
    if is64 and (
        sb.s_desc_size < L.MIN_DESC_SIZE_64BIT or sb.s_desc_size > bs or sb.s_desc_size & (sb.s_desc_size - 1)
    ):
        return f"group descriptor size {sb.s_desc_size} is impossible"
    return None


def check_features(geo: Geometry, name: str) -> None:
    """Refuse, naming the feature, what the reader does not understand (reading it could give wrong answers)."""
    _refuse(geo.incompat, geo.ro_compat, name)


def _refuse(incompat: int, ro_compat: int, name: str) -> None:
    refused = [(1 << i, L.INCOMPAT, "incompat") for i in range(32) if (incompat & ~SUPPORTED_INCOMPAT) >> i & 1]
    refused += [(1 << i, L.RO_COMPAT, "ro_compat") for i in range(32) if (ro_compat & REFUSED_RO_COMPAT) >> i & 1]
    if refused:
        names = [table.get(bit, f"unknown {kind} feature {bit:#x}") for bit, table, kind in refused]
        raise UnsupportedFilesystemError(
            name, f"the filesystem uses {', '.join(names)}, which this reader does not support"
        )
