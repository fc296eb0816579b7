"""The jbd2 journal's on-disk structures (superblock, block header, descriptor tags, revoke, commit),
as construct definitions and numpy dtypes, for :mod:`ubdcow.fs.journal`.

Every jbd2 structure is big-endian. Facts from the kernel's include/linux/jbd2.h.
"""

from __future__ import annotations

import construct as cs
import numpy as np

JBD2_MAGIC = 0xC03B3998
JBD2_DESCRIPTOR_BLOCK = 1
JBD2_COMMIT_BLOCK = 2
JBD2_SUPERBLOCK_V1 = 3
JBD2_SUPERBLOCK_V2 = 4
JBD2_REVOKE_BLOCK = 5
JBD2_FC_BLOCK = 6

JBD2_FEATURE_COMPAT_CHECKSUM = 0x1
JBD2_FEATURE_INCOMPAT_REVOKE = 0x1
JBD2_FEATURE_INCOMPAT_64BIT = 0x2
JBD2_FEATURE_INCOMPAT_ASYNC_COMMIT = 0x4
JBD2_FEATURE_INCOMPAT_CSUM_V2 = 0x8
JBD2_FEATURE_INCOMPAT_CSUM_V3 = 0x10
JBD2_FEATURE_INCOMPAT_FAST_COMMIT = 0x20
JBD2_KNOWN_INCOMPAT = 0x3F
JBD2_KNOWN_ROCOMPAT = 0
#: s_checksum_type / h_chksum_type values
JBD2_CRC32_CHKSUM = 1
JBD2_CRC32C_CHKSUM = 4
JBD2_CRC32_CHKSUM_SIZE = 4

#: descriptor tag flags (the low 16 bits of t_flags)
JBD2_FLAG_ESCAPE = 1
JBD2_FLAG_SAME_UUID = 2
JBD2_FLAG_DELETED = 4
JBD2_FLAG_LAST_TAG = 8

#: the 12 bytes that start every journal block but data blocks
JOURNAL_HEADER = np.dtype([("h_magic", ">u4"), ("h_blocktype", ">u4"), ("h_sequence", ">u4")])

#: block 0 of the journal: a v1 superblock uses the fields up to s_errno, the rest is v2
JOURNAL_SUPERBLOCK = cs.Struct(
    "h_magic" / cs.Int32ub,
    "h_blocktype" / cs.Int32ub,
    "h_sequence" / cs.Int32ub,
    "s_blocksize" / cs.Int32ub,
    "s_maxlen" / cs.Int32ub,  # blocks in the journal
    "s_first" / cs.Int32ub,  # first block of the log
    "s_sequence" / cs.Int32ub,  # first transaction expected in the log
    "s_start" / cs.Int32ub,  # block where the log starts; 0: the log is clean
    "s_errno" / cs.Int32sb,
    "s_feature_compat" / cs.Int32ub,
    "s_feature_incompat" / cs.Int32ub,
    "s_feature_ro_compat" / cs.Int32ub,
    "s_uuid" / cs.Bytes(16),
    "s_nr_users" / cs.Int32ub,
    "s_dynsuper" / cs.Int32ub,
    "s_max_transaction" / cs.Int32ub,
    "s_max_trans_data" / cs.Int32ub,
    "s_checksum_type" / cs.Int8ub,
    cs.Padding(3),
    "s_num_fc_blks" / cs.Int32ub,
    cs.Padding(41 * 4),
    "s_checksum" / cs.Int32ub,  # crc32c of these 1024 bytes with this field 0
    "s_users" / cs.Bytes(16 * 48),
)
JOURNAL_SUPERBLOCK_SIZE = 1024
JOURNAL_SUPERBLOCK_CHECKSUM_OFFSET = 0xFC

#: a descriptor block's tags, in one of three forms chosen by the journal's features
#: (``journal_tag_bytes``): 32-bit block numbers, 64bit (``t_blocknr_high``), csum v3 (tag3).
#: csum v2 adds two unused bytes to the first two forms. The flags are at byte 6 in all three.
JOURNAL_BLOCK_TAG32 = np.dtype([("t_blocknr", ">u4"), ("t_checksum", ">u2"), ("t_flags", ">u2")])
JOURNAL_BLOCK_TAG64 = np.dtype(
    [("t_blocknr", ">u4"), ("t_checksum", ">u2"), ("t_flags", ">u2"), ("t_blocknr_high", ">u4")]
)
JOURNAL_BLOCK_TAG3 = np.dtype(  # t_flags is 32 bits here; the flags are its low 16
    [("t_blocknr", ">u4"), ("t_flags", ">u4"), ("t_blocknr_high", ">u4"), ("t_checksum", ">u4")]
)
#: the 16-byte UUID that follows a tag without JBD2_FLAG_SAME_UUID
JOURNAL_TAG_UUID_SIZE = 16
#: the last 4 bytes of a descriptor or revoke block with csum v2/v3: crc32c of the block with this field 0
JOURNAL_BLOCK_TAIL = cs.Struct("t_checksum" / cs.Int32ub)
JOURNAL_BLOCK_TAIL_SIZE = 4

#: a revoke block: the header, then r_count bytes (header included) of 4- or 8-byte (64bit) block numbers
JOURNAL_REVOKE_HEADER = cs.Struct(
    "h_magic" / cs.Int32ub,
    "h_blocktype" / cs.Int32ub,
    "h_sequence" / cs.Int32ub,
    "r_count" / cs.Int32ub,
)
JOURNAL_REVOKE_HEADER_SIZE = 16

#: a commit block
JOURNAL_COMMIT_HEADER = cs.Struct(
    "h_magic" / cs.Int32ub,
    "h_blocktype" / cs.Int32ub,
    "h_sequence" / cs.Int32ub,
    "h_chksum_type" / cs.Int8ub,
    "h_chksum_size" / cs.Int8ub,
    cs.Padding(2),
    "h_chksum" / cs.Array(8, cs.Int32ub),  # [0]: crc32_be (COMPAT_CHECKSUM) or crc32c (csum v2/v3)
    "h_commit_sec" / cs.Int64ub,
    "h_commit_nsec" / cs.Int32ub,
)
JOURNAL_COMMIT_CHECKSUM_OFFSET = 0x10
