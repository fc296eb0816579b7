"""The on-disk structures the filesystem reader knows, as construct definitions and numpy dtypes:
ext2/ext3/ext4's and the partition tables' (the jbd2 journal's are in :mod:`.journal_layout`).

Everything here is a definition; the engines that use them live in the sibling modules.
construct's exceptions never leave this subpackage: they become ``ubdcow.errors`` types.
"""

from __future__ import annotations

import struct
from typing import Any

import construct as cs
import numpy as np

# --- ext2/ext3/ext4: superblock, group descriptors, inode, extents, directory entries, xattrs ---

SUPERBLOCK_OFFSET = 1024  # bytes from the start of the volume, whatever the block size
SUPERBLOCK_SIZE = 1024
EXT_MAGIC = 0xEF53
GOOD_OLD_REV = 0  # fixed 128-byte inodes, first inode 11, no feature fields
DYNAMIC_REV = 1
GOOD_OLD_INODE_SIZE = 128
GOOD_OLD_FIRST_INO = 11
ROOT_INO = 2
JOURNAL_INO = 8
N_BLOCKS = 15  # i_block: 12 direct, indirect, double, triple (or 60 bytes of extent root / inline data)
NAME_MAX = 255
MAX_EXTENT_DEPTH = 5

SUPERBLOCK = cs.Struct(
    "s_inodes_count" / cs.Int32ul,
    "s_blocks_count_lo" / cs.Int32ul,
    "s_r_blocks_count_lo" / cs.Int32ul,
    "s_free_blocks_count_lo" / cs.Int32ul,
    "s_free_inodes_count" / cs.Int32ul,
    "s_first_data_block" / cs.Int32ul,
    "s_log_block_size" / cs.Int32ul,
    "s_log_cluster_size" / cs.Int32ul,
    "s_blocks_per_group" / cs.Int32ul,
    "s_clusters_per_group" / cs.Int32ul,
    "s_inodes_per_group" / cs.Int32ul,
    "s_mtime" / cs.Int32ul,
    "s_wtime" / cs.Int32ul,
    "s_mnt_count" / cs.Int16ul,
    "s_max_mnt_count" / cs.Int16sl,
    "s_magic" / cs.Int16ul,  # 0x38
    "s_state" / cs.Int16ul,
    "s_errors" / cs.Int16ul,
    "s_minor_rev_level" / cs.Int16ul,
    "s_lastcheck" / cs.Int32ul,
    "s_checkinterval" / cs.Int32ul,
    "s_creator_os" / cs.Int32ul,
    "s_rev_level" / cs.Int32ul,  # 0x4C
    "s_def_resuid" / cs.Int16ul,
    "s_def_resgid" / cs.Int16ul,
    # from here on, meaningful in revision 1 (dynamic) only
    "s_first_ino" / cs.Int32ul,  # 0x54
    "s_inode_size" / cs.Int16ul,
    "s_block_group_nr" / cs.Int16ul,
    "s_feature_compat" / cs.Int32ul,  # 0x5C
    "s_feature_incompat" / cs.Int32ul,
    "s_feature_ro_compat" / cs.Int32ul,
    "s_uuid" / cs.Bytes(16),  # 0x68
    "s_volume_name" / cs.Bytes(16),
    "s_last_mounted" / cs.Bytes(64),
    "s_algorithm_usage_bitmap" / cs.Int32ul,  # 0xC8
    "s_prealloc_blocks" / cs.Int8ul,
    "s_prealloc_dir_blocks" / cs.Int8ul,
    "s_reserved_gdt_blocks" / cs.Int16ul,
    "s_journal_uuid" / cs.Bytes(16),  # 0xD0
    "s_journal_inum" / cs.Int32ul,  # 0xE0
    "s_journal_dev" / cs.Int32ul,
    "s_last_orphan" / cs.Int32ul,
    "s_hash_seed" / cs.Array(4, cs.Int32ul),
    "s_def_hash_version" / cs.Int8ul,  # 0xFC
    "s_jnl_backup_type" / cs.Int8ul,
    "s_desc_size" / cs.Int16ul,  # 0xFE
    "s_default_mount_opts" / cs.Int32ul,
    "s_first_meta_bg" / cs.Int32ul,  # 0x104
    "s_mkfs_time" / cs.Int32ul,
    "s_jnl_blocks" / cs.Array(17, cs.Int32ul),  # 0x10C
    "s_blocks_count_hi" / cs.Int32ul,  # 0x150
    "s_r_blocks_count_hi" / cs.Int32ul,
    "s_free_blocks_count_hi" / cs.Int32ul,
    "s_min_extra_isize" / cs.Int16ul,  # 0x15C
    "s_want_extra_isize" / cs.Int16ul,
    "s_flags" / cs.Int32ul,  # 0x160
    "s_raid_stride" / cs.Int16ul,
    "s_mmp_interval" / cs.Int16ul,
    "s_mmp_block" / cs.Int64ul,  # 0x168
    "s_raid_stripe_width" / cs.Int32ul,
    "s_log_groups_per_flex" / cs.Int8ul,  # 0x174
    "s_checksum_type" / cs.Int8ul,
    cs.Padding(2),
    "s_kbytes_written" / cs.Int64ul,  # 0x178
    cs.Padding(0x24C - 0x180),  # snapshots, error records, mount options, quota inodes, overhead
    "s_backup_bgs" / cs.Array(2, cs.Int32ul),  # 0x24C: sparse_super2's two backup groups
    "s_encrypt_algos" / cs.Bytes(4),
    "s_encrypt_pw_salt" / cs.Bytes(16),
    "s_lpf_ino" / cs.Int32ul,  # 0x268
    "s_prj_quota_inum" / cs.Int32ul,
    "s_checksum_seed" / cs.Int32ul,  # 0x270
    "s_time_hi" / cs.Bytes(8),  # the high bytes of wtime, mtime, mkfs_time, lastcheck, error times, error codes
    "s_encoding" / cs.Int16ul,  # 0x27C
    "s_encoding_flags" / cs.Int16ul,
    "s_orphan_file_inum" / cs.Int32ul,  # 0x280
    cs.Padding(0x3FC - 0x284),
    "s_checksum" / cs.Int32ul,  # 0x3FC
)

# s_feature_compat: nothing here changes how a read-only reader reads
COMPAT = {
    0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal", 0x8: "ext_attr", 0x10: "resize_inode",
    0x20: "dir_index", 0x40: "lazy_bg", 0x80: "exclude_inode", 0x100: "exclude_bitmap", 0x200: "sparse_super2",
    0x400: "fast_commit", 0x800: "stable_inodes", 0x1000: "orphan_file",
}  # fmt: skip
INCOMPAT = {
    0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery", 0x8: "journal_dev", 0x10: "meta_bg",
    0x40: "extent", 0x80: "64bit", 0x100: "mmp", 0x200: "flex_bg", 0x400: "ea_inode", 0x1000: "dirdata",
    0x2000: "metadata_csum_seed", 0x4000: "large_dir", 0x8000: "inline_data", 0x10000: "encrypt",
    0x20000: "casefold",
}  # fmt: skip
RO_COMPAT = {
    0x1: "sparse_super", 0x2: "large_file", 0x4: "btree_dir", 0x8: "huge_file", 0x10: "uninit_bg",
    0x20: "dir_nlink", 0x40: "extra_isize", 0x80: "snapshot", 0x100: "quota", 0x200: "bigalloc",
    0x400: "metadata_csum", 0x800: "replica", 0x1000: "read-only", 0x2000: "project", 0x4000: "shared_blocks",
    0x8000: "verity", 0x10000: "orphan_present",
}  # fmt: skip
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_EA_INODE = 0x400
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
COMPAT_HAS_JOURNAL = 0x4
COMPAT_SPARSE_SUPER2 = 0x200

GROUP_DESC = cs.Struct(  # 32 bytes; 64 (s_desc_size) with the 64bit feature, the _hi halves after
    "bg_block_bitmap_lo" / cs.Int32ul,
    "bg_inode_bitmap_lo" / cs.Int32ul,
    "bg_inode_table_lo" / cs.Int32ul,
    "bg_free_blocks_count_lo" / cs.Int16ul,
    "bg_free_inodes_count_lo" / cs.Int16ul,
    "bg_used_dirs_count_lo" / cs.Int16ul,
    "bg_flags" / cs.Int16ul,
    "bg_exclude_bitmap_lo" / cs.Int32ul,
    "bg_block_bitmap_csum_lo" / cs.Int16ul,
    "bg_inode_bitmap_csum_lo" / cs.Int16ul,
    "bg_itable_unused_lo" / cs.Int16ul,
    "bg_checksum" / cs.Int16ul,
    "hi"
    / cs.If(
        cs.this._.desc_size >= 64,
        cs.Struct(
            "bg_block_bitmap_hi" / cs.Int32ul,
            "bg_inode_bitmap_hi" / cs.Int32ul,
            "bg_inode_table_hi" / cs.Int32ul,
            "bg_free_blocks_count_hi" / cs.Int16ul,
            "bg_free_inodes_count_hi" / cs.Int16ul,
            "bg_used_dirs_count_hi" / cs.Int16ul,
            "bg_itable_unused_hi" / cs.Int16ul,
            "bg_exclude_bitmap_hi" / cs.Int32ul,
            "bg_block_bitmap_csum_hi" / cs.Int16ul,
            "bg_inode_bitmap_csum_hi" / cs.Int16ul,
            cs.Padding(4),
        ),
    ),
)
MIN_DESC_SIZE = 32
MIN_DESC_SIZE_64BIT = 64


def group_desc_dtype(desc_size: int) -> np.dtype[Any]:
    """The numpy record of one group descriptor of ``desc_size`` bytes (the fields a reader uses)."""
    names = ["block_bitmap_lo", "inode_bitmap_lo", "inode_table_lo", "flags"]
    formats = ["<u4", "<u4", "<u4", "<u2"]
    offsets = [0, 4, 8, 18]
    if desc_size >= MIN_DESC_SIZE_64BIT:
        names += ["block_bitmap_hi", "inode_bitmap_hi", "inode_table_hi"]
        formats += ["<u4", "<u4", "<u4"]
        offsets += [32, 36, 40]
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": desc_size})


INODE = cs.Struct(  # 128 bytes in revision 0; s_inode_size (256 by default) in revision 1
    "i_mode" / cs.Int16ul,
    "i_uid" / cs.Int16ul,
    "i_size_lo" / cs.Int32ul,
    "i_atime" / cs.Int32sl,
    "i_ctime" / cs.Int32sl,
    "i_mtime" / cs.Int32sl,
    "i_dtime" / cs.Int32ul,
    "i_gid" / cs.Int16ul,
    "i_links_count" / cs.Int16ul,
    "i_blocks_lo" / cs.Int32ul,
    "i_flags" / cs.Int32ul,  # 0x20
    "l_i_version" / cs.Int32ul,
    "i_block" / cs.Bytes(4 * N_BLOCKS),  # 0x28: block pointers, extent root, inline data or symlink target
    "i_generation" / cs.Int32ul,  # 0x64
    "i_file_acl_lo" / cs.Int32ul,
    "i_size_high" / cs.Int32ul,  # 0x6C
    "i_obso_faddr" / cs.Int32ul,
    "l_i_blocks_high" / cs.Int16ul,  # 0x74
    "l_i_file_acl_high" / cs.Int16ul,
    "l_i_uid_high" / cs.Int16ul,
    "l_i_gid_high" / cs.Int16ul,
    "l_i_checksum_lo" / cs.Int16ul,
    "l_i_reserved" / cs.Int16ul,
    # large inodes: the fields that i_extra_isize covers, from 0x80
    "i_extra_isize" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int16ul),
    "i_checksum_hi" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int16ul),
    "i_ctime_extra" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int32ul),  # nsec << 2 | epoch
    "i_mtime_extra" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int32ul),
    "i_atime_extra" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int32ul),
    "i_crtime" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int32sl),
    "i_crtime_extra" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int32ul),
    "i_version_hi" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int32ul),
    "i_projid" / cs.If(cs.this._.inode_size > GOOD_OLD_INODE_SIZE, cs.Int32ul),
)
#: where each extra field ends, from the start of the inode: present when 128 + i_extra_isize reaches it
EXTRA_END = {"ctime": 0x88, "mtime": 0x8C, "atime": 0x90, "crtime": 0x98}
#: where the in-inode extended attributes start: 128 + i_extra_isize


def inode_dtype(inode_size: int) -> np.dtype[Any]:
    """The numpy record of one on-disk inode of ``inode_size`` bytes (many parsed at once: a table block)."""
    fields: list[tuple[str, str, int]] = [
        ("mode", "<u2", 0x0), ("uid", "<u2", 0x2), ("size_lo", "<u4", 0x4), ("atime", "<i4", 0x8),
        ("ctime", "<i4", 0xC), ("mtime", "<i4", 0x10), ("dtime", "<u4", 0x14), ("gid", "<u2", 0x18),
        ("links", "<u2", 0x1A), ("blocks_lo", "<u4", 0x1C), ("flags", "<u4", 0x20), ("block0", "<u4", 0x28),
        ("block1", "<u4", 0x2C), ("generation", "<u4", 0x64), ("file_acl_lo", "<u4", 0x68),
        ("size_high", "<u4", 0x6C), ("blocks_high", "<u2", 0x74), ("file_acl_high", "<u2", 0x76),
        ("uid_high", "<u2", 0x78), ("gid_high", "<u2", 0x7A),
    ]  # fmt: skip
    if inode_size > GOOD_OLD_INODE_SIZE:
        fields += [
            ("extra_isize", "<u2", 0x80), ("ctime_extra", "<u4", 0x84), ("mtime_extra", "<u4", 0x88),
            ("atime_extra", "<u4", 0x8C), ("crtime", "<i4", 0x90), ("crtime_extra", "<u4", 0x94),
        ]  # fmt: skip
    return np.dtype(
        {
            "names": [f[0] for f in fields],
            "formats": [f[1] for f in fields],
            "offsets": [f[2] for f in fields],
            "itemsize": inode_size,
        }
    )


I_BLOCK_OFFSET = 0x28
I_BLOCK_SIZE = 4 * N_BLOCKS

# i_mode's file type (the top four bits) and the names the reader gives them
S_IFMT = 0o170000
FILE_TYPES = {
    0o140000: "socket", 0o120000: "symlink", 0o100000: "file", 0o060000: "block", 0o040000: "dir",
    0o020000: "char", 0o010000: "fifo",
}  # fmt: skip
#: a directory entry's file_type byte (with the filetype feature)
DIRENT_TYPES = {1: "file", 2: "dir", 3: "char", 4: "block", 5: "fifo", 6: "socket", 7: "symlink"}

# i_flags
FL_COMPR = 0x4
FL_INDEX = 0x1000
FL_HUGE_FILE = 0x40000
FL_EXTENTS = 0x80000
FL_EA_INODE = 0x200000
FL_INLINE_DATA = 0x10000000
FL_ENCRYPT = 0x800
FL_CASEFOLD = 0x40000000
FL_VERITY = 0x100000

EXTENT_MAGIC = 0xF30A
EXTENT_HEADER = cs.Struct(
    "eh_magic" / cs.Int16ul,
    "eh_entries" / cs.Int16ul,
    "eh_max" / cs.Int16ul,
    "eh_depth" / cs.Int16ul,  # 0: the entries are leaves
    "eh_generation" / cs.Int32ul,
)
EXTENT_INDEX = cs.Struct(
    "ei_block" / cs.Int32ul,  # first logical block the child covers
    "ei_leaf_lo" / cs.Int32ul,
    "ei_leaf_hi" / cs.Int16ul,
    "ei_unused" / cs.Int16ul,
)
EXTENT_LEAF = cs.Struct(
    "ee_block" / cs.Int32ul,
    "ee_len" / cs.Int16ul,  # > 32768: uninitialized (reads as zeros), ee_len - 32768 blocks
    "ee_start_hi" / cs.Int16ul,
    "ee_start_lo" / cs.Int32ul,
)
EXTENT_ENTRY_SIZE = 12
EXTENT_INIT_MAX_LEN = 32768
#: the same, for the parser: a node's header, and its index or leaf entries read one after another
EXTENT_HEADER_HEAD = struct.Struct("<HHHH")  # magic, entries, max, depth
EXTENT_INDEX_ENTRY = struct.Struct("<IIH2x")  # ei_block, ei_leaf_lo, ei_leaf_hi
EXTENT_LEAF_ENTRY = struct.Struct("<IHHI")  # ee_block, ee_len, ee_start_hi, ee_start_lo

DIR_ENTRY = cs.Struct(  # ext2_dir_entry_2; without the filetype feature name_len is 16 bits and no type byte
    "inode" / cs.Int32ul,
    "rec_len" / cs.Int16ul,  # to the next entry; 0 or 65535 mean 65536 in 64 KiB blocks
    "name_len" / cs.Int8ul,
    "file_type" / cs.Int8ul,
    "name" / cs.Bytes(cs.this.name_len),
)
#: the fixed head of a directory entry, read one entry after another along the rec_len chain
DIR_ENTRY_HEAD = struct.Struct("<IHBB")
DIR_ENTRY_HEAD_SIZE = 8
#: an inline directory starts with its parent's inode number, then entries
INLINE_DIR_PARENT = struct.Struct("<I")

XATTR_MAGIC = 0xEA020000
XATTR_BLOCK_HEADER = cs.Struct(  # an external xattr block (i_file_acl) starts with this, entries after it
    "h_magic" / cs.Int32ul,
    "h_refcount" / cs.Int32ul,
    "h_blocks" / cs.Int32ul,  # always 1
    "h_hash" / cs.Int32ul,
    "h_checksum" / cs.Int32ul,
    cs.Padding(12),
)
XATTR_BLOCK_HEADER_SIZE = 32
XATTR_BLOCK_HEAD = struct.Struct("<III")  # h_magic, h_refcount, h_blocks
XATTR_IBODY_HEADER = cs.Struct("h_magic" / cs.Int32ul)  # in-inode attributes: entries right after it
XATTR_ENTRY = cs.Struct(
    "e_name_len" / cs.Int8ul,
    "e_name_index" / cs.Int8ul,  # the prefix: XATTR_PREFIXES
    "e_value_offs" / cs.Int16ul,  # from the first entry (in-inode) or from the block's start
    "e_value_inum" / cs.Int32ul,  # ea_inode: the value is this inode's content
    "e_value_size" / cs.Int32ul,
    "e_hash" / cs.Int32ul,
    "e_name" / cs.Bytes(cs.this.e_name_len),
)
XATTR_ENTRY_HEAD = struct.Struct("<BBHIII")
XATTR_ENTRY_HEAD_SIZE = 16
#: the name prefixes the kernel lists (index 7 holds system.data, the rest of inline data: not listed)
XATTR_PREFIXES = {
    1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.", 6: "security.",
    10: "gnu.",
}  # fmt: skip
XATTR_INDEX_SYSTEM = 7
XATTR_INLINE_DATA_NAME = b"data"

# POSIX ACLs are stored in ext4's short form; getxattr gives them in the VFS's xattr form
EXT4_ACL_VERSION = 1
POSIX_ACL_XATTR_VERSION = 2
ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20
ACL_UNDEFINED_ID = 0xFFFFFFFF
ACL_HEADER = cs.Struct("a_version" / cs.Int32ul)
ACL_ENTRY = cs.Struct(  # user and group entries; the *_OBJ, MASK and OTHER entries stop after e_perm
    "e_tag" / cs.Int16ul,
    "e_perm" / cs.Int16ul,
    "e_id" / cs.If(lambda this: this.e_tag in (ACL_USER, ACL_GROUP), cs.Int32ul),
)


# --- partition tables: MBR and GPT ---

#: the unit of both tables: ubd disks and image files have 512-byte sectors
PT_SECTOR = 512

#: one MBR or EBR partition entry (16 bytes, little-endian)
MBR_ENTRY = cs.Struct(
    "status" / cs.Int8ul,  # 0x80 bootable, 0x00 not; anything else: not a partition table
    "chs_first" / cs.Bytes(3),
    "type" / cs.Int8ul,
    "chs_last" / cs.Bytes(3),
    "lba_start" / cs.Int32ul,  # MBR: from the disk's start; EBR: see partitions.py
    "sectors" / cs.Int32ul,
)
#: sector 0 of a disk (and every EBR of an extended partition's chain)
MBR = cs.Struct(
    "bootcode" / cs.Bytes(440),
    "disk_signature" / cs.Int32ul,
    "reserved" / cs.Int16ul,
    "entries" / cs.Array(4, MBR_ENTRY),
    "signature" / cs.Int16ul,  # 0xAA55 (bytes 55 AA)
)
MBR_SIGNATURE = 0xAA55
MBR_TYPE_EMPTY = 0x00
MBR_TYPE_LINUX = 0x83
MBR_TYPE_LINUX_SWAP = 0x82
MBR_TYPES_EXTENDED = frozenset({0x05, 0x0F, 0x85})
MBR_TYPE_GPT_PROTECTIVE = 0xEE

#: the GPT header (LBA 1, and a backup in the disk's last sector), little-endian
GPT_HEADER = cs.Struct(
    "signature" / cs.Bytes(8),  # b"EFI PART"
    "revision" / cs.Int32ul,
    "header_size" / cs.Int32ul,
    "header_crc32" / cs.Int32ul,  # zlib crc32 of header_size bytes with this field 0
    "reserved" / cs.Int32ul,
    "my_lba" / cs.Int64ul,
    "alternate_lba" / cs.Int64ul,
    "first_usable_lba" / cs.Int64ul,
    "last_usable_lba" / cs.Int64ul,
    "disk_guid" / cs.Bytes(16),
    "partition_entry_lba" / cs.Int64ul,
    "num_partition_entries" / cs.Int32ul,
    "sizeof_partition_entry" / cs.Int32ul,
    "partition_entry_array_crc32" / cs.Int32ul,
)
GPT_HEADER_SIZE = 92
GPT_HEADER_CRC_OFFSET = 16
GPT_SIGNATURE = b"EFI PART"
#: one GPT partition entry; the array is read at once
GPT_ENTRY = np.dtype(
    [
        ("type_guid", "V16"),  # mixed-endian GUID: uuid.UUID(bytes_le=...)
        ("unique_guid", "V16"),
        ("first_lba", "<u8"),
        ("last_lba", "<u8"),  # inclusive
        ("attributes", "<u8"),
        ("name", "V72"),  # UTF-16LE
    ]
)
GPT_ENTRY_SIZE = 128
