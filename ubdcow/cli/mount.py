"""``mount`` and ``umount``: the filesystem inside a disk as a read-only folder (FUSE), and taking it away."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from typing import Any

from ..errors import MountError, UbdCowError
from .base import Command, Output, report
from .fsargs import add_fs_options, fs_exit_code, open_filesystem


def _mount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("disk", metavar="DISK", help="a COW file (its backing file read where it records it) or a raw image")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing, empty folder")
    add_fs_options(p)
    p.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground until the folder is unmounted; Ctrl-C or SIGTERM unmounts it (default: return "
        "once the folder is ready, leaving a detached process that serves it until it is unmounted)",
    )
    p.add_argument(
        "--allow-other",
        action="store_true",
        help="let every user of this machine use the folder, not only you (FUSE's allow_other). The kernel still "
        "checks each access against the image's own modes, owners and groups: the uid and gid numbers stored in "
        "the image, which may belong to other people here, so a user whose uid matches a file's owner in the image "
        "reads it as its owner. Unless you are root, /etc/fuse.conf must say user_allow_other",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document once the folder is ready (disk, mountpoint, pid of the process serving it)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


def _umount_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="a folder that ubdcow mount mounted")
    p.add_argument(
        "--lazy",
        action="store_true",
        help="detach it now even if a process has a file open or its current folder there (fusermount3 -u -z): "
        "they keep what they have open, the folder is empty for everyone else at once",
    )
    p.add_argument("--json", action="store_true", help="print the result as JSON (disk, mountpoint)")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")


def cmd_mount(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow mount``: 0 once the folder is ready (with ``-f``: once it is unmounted), 1 on errors."""
    from .. import mount
    from .._daemon import detach, system_log

    mount.load_binding()
    mount.check_device()
    mount.check_mountpoint(args.mountpoint)
    try:
        fs = open_filesystem(args, args.disk)  # the overlay's read lock, for the mount's whole life
    except UbdCowError as exc:
        return report(exc, out, fs_exit_code(exc))
    source = os.path.abspath(args.disk)
    where = os.path.abspath(args.mountpoint)  # the detached process works from /
    facts: dict[str, Any] = {"disk": args.disk, "mountpoint": args.mountpoint}
    if args.foreground:
        return _foreground(args, out, fs, source, where, facts)

    def work(ready: Any) -> None:
        with fs:
            mount.serve(fs, where, source=source, allow_other=args.allow_other, ready=lambda: ready({}),
                        log=system_log("ubdcow-mount"))  # fmt: skip

    try:
        info = detach(work, ident="ubdcow-mount")
    finally:
        fs.close()  # this process's descriptors: the detached one keeps its own, and the lock with them
    if out.json:
        return out.document({**facts, "pid": info["pid"]}, 0)
    out.line(f"mounted {args.disk} at {args.mountpoint} (read-only); unmount with: ubdcow umount "
             f"{shlex.quote(args.mountpoint)}")  # fmt: skip
    return 0


def _foreground(args: argparse.Namespace, out: Output, fs: Any, source: str, where: str, facts: dict[str, Any]) -> int:
    from .. import mount

    def ready() -> None:
        if out.json:  # printed while mounted: the exit code is not known yet (as serve's)
            print(json.dumps({**facts, "pid": os.getpid()}), file=out.stdout, flush=True)
            out.documented = True
        elif not out.quiet:
            print(f"mounted {args.disk} at {args.mountpoint} (read-only), in the foreground: Ctrl-C or SIGTERM "
                  "unmounts it", file=out.stdout, flush=True)  # fmt: skip

    def log(line: str) -> None:
        print(f"ubdcow: {line}", file=sys.stderr, flush=True)

    with fs:
        mount.serve(fs, where, source=source, allow_other=args.allow_other, ready=ready, log=log)
    return 0


def cmd_umount(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow umount``: 0 once the folder is unmounted and the process that served it has let the disk go."""
    from .. import mount

    info = mount.find_mount(args.mountpoint)
    if info is None:
        raise MountError(args.mountpoint, "not a mount point")
    if info.fstype != f"fuse.{mount.SUBTYPE}":
        raise MountError(args.mountpoint, f"not a ubdcow mount (a {info.fstype} mount of {info.source}): ubdcow "
                         "umount unmounts only what ubdcow mount made")  # fmt: skip
    serving = mount.daemons(info.source)
    mount.unmount(args.mountpoint, lazy=args.lazy)
    mount.wait_released(info.source, serving)
    if out.json:
        return out.document({"disk": info.source, "mountpoint": args.mountpoint}, 0)
    out.line(f"unmounted {args.mountpoint} ({info.source})")
    return 0


MOUNT = Command(
    "mount",
    "the filesystem inside a disk as a read-only folder (FUSE, no root needed)",
    "Mount the ext2/ext3/ext4 filesystem inside DISK (a COW file over its backing file, or a raw image; a "
    "partition of either) at MOUNTPOINT, read-only, through FUSE, so that every tool works on a stopped guest's "
    "files: ls, grep -r, less, tar, rsync, a file manager. Returns once the folder is ready; a detached process "
    "serves it (its later errors go to the system log) until ubdcow umount MOUNTPOINT or fusermount3 -u "
    "MOUNTPOINT. Entries show the image's own types, modes, owners, sizes, link counts, times and inode numbers; "
    "every change fails with EROFS; the kernel checks the image's modes (default_permissions). The COW file's read "
    "lock is held while mounted: a running guest makes mount refuse, and a guest started meanwhile is refused. "
    "Needs the package fuse3 (libfuse) and the Python package mfusepy (pip install 'ubdcow[mount]'). Exit: 0 "
    "mounted, 1 errors, 2 usage errors (or several partitions and no --partition); with -f, 0 once unmounted, "
    "130 after Ctrl-C, 143 after SIGTERM. See docs/files.md.",
    _mount_arguments,
    cmd_mount,
)

UMOUNT = Command(
    "umount",
    "unmount a folder that ubdcow mount mounted",
    "Unmount MOUNTPOINT (fusermount3 -u), also a stale one whose mount process was killed, and wait until the "
    "process that served it has let the disk go (so that a guest can start on it at once). Refuses a folder that "
    "is not a ubdcow mount. Exit: 0 unmounted, 1 errors (not mounted, busy: see --lazy), 2 usage errors.",
    _umount_arguments,
    cmd_umount,
)
