"""What the file-level commands (ls, cat, get, changes, mount) share: the options that name the filesystem
on a disk, and opening it."""

from __future__ import annotations

import argparse

from ..errors import PartitionError, UbdCowError
from ..fs import FileSystem, open_fs
from .base import EXIT_ERROR, EXIT_USAGE

__all__ = ["add_fs_options", "open_filesystem", "fs_exit_code"]


def _partition_number(text: str) -> int:
    try:
        number = int(text, 10)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"not a partition number (1, 2, ...): {text!r}")
    return number


def add_fs_options(p: argparse.ArgumentParser) -> None:
    """``--backing``, ``--partition N`` and ``--no-journal``."""
    p.add_argument("--backing", metavar="PATH", help="the backing file, if not at the path the COW file records")
    p.add_argument(
        "--partition",
        metavar="N",
        type=_partition_number,
        help="the MBR/GPT partition that holds the filesystem (numbered as Linux does); without it, a whole-disk "
        "filesystem or the only partition holding one",
    )
    p.add_argument(
        "--no-journal",
        action="store_true",
        help="read the disk as it is; by default the journal of a filesystem that was not unmounted cleanly (a "
        "crashed or killed guest) is replayed in memory, as the next mount would",
    )


def open_filesystem(args: argparse.Namespace, disk: str) -> FileSystem:
    """The filesystem on ``disk`` (a COW file or a raw image), as the options in ``args`` choose it."""
    return open_fs(disk, backing=args.backing, partition=args.partition, journal=not args.no_journal)


def fs_exit_code(exc: UbdCowError, default: int = EXIT_ERROR) -> int:
    """Several partitions and no ``--partition`` is a usage error (2): the message lists the choices."""
    return EXIT_USAGE if isinstance(exc, PartitionError) else default
