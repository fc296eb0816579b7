"""The on-disk structures the filesystem reader knows, as construct definitions and numpy dtypes.

Everything here is a definition; the engines that use them live in the sibling modules.
construct's exceptions never leave this subpackage: they become ``ubdcow.errors`` types.
"""

from __future__ import annotations

# --- ext2/ext3/ext4: superblock, group descriptors, inode, extents, directory entries, xattrs ---


# --- jbd2 journal: superblock, block header, descriptor tags, revoke, commit ---


# --- partition tables: MBR and GPT ---
