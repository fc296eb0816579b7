"""``changes``: which files a VM changed, one line per path (``--json``: one document, entries sorted by path)."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
from typing import Any

from ..fs.records import show
from .base import Command, Output, add_common, add_no_lock, several
from .fsargs import add_fs_options

MARKERS = {"added": "+", "deleted": "-", "modified": "M", "metadata": "m", "renamed": "R"}
_TIMES = ("mtime", "ctime", "atime")


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("disks", metavar="DISK", nargs="+", help="a COW file (several may be given: one section each)")
    p.add_argument(
        "--against",
        metavar="OTHER",
        help="compare with this disk (a COW file or a raw image) instead of each DISK's backing file; a DISK may "
        "then be a raw image too",
    )
    p.add_argument(
        "-p",
        "--path",
        metavar="PATH",
        action="append",
        help="report only this subtree (a path inside the filesystem; may be repeated)",
    )
    p.add_argument(
        "-l", "--long", action="store_true", help="show old -> new for each changed field, and a size summary per disk"
    )
    p.add_argument(
        "--all", action="store_true", help="also report a directory's own times and link count, ctime and atime"
    )
    p.add_argument(
        "--renames",
        action="store_true",
        help="pair a deleted and an added path of the same file (same inode) as one rename",
    )
    p.add_argument(
        "--no-cache", action="store_true", help="neither read nor write the model index cache ($XDG_CACHE_HOME/ubdcow)"
    )
    add_fs_options(p)
    add_common(p)
    add_no_lock(p)


def _when(ns: int) -> str:
    seconds, rest = divmod(ns, 1_000_000_000)
    try:
        stamp = _dt.datetime.fromtimestamp(seconds, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return str(ns)
    return f"{stamp}.{rest:09d}"


def _field(name: str, old: Any, new: Any, out: Output) -> str:
    """``name: old -> new`` for one changed field."""
    if name == "content":
        return f"content: {out.size(old.size)} -> {out.size(new.size)}"
    if name == "xattrs":
        a, b = old.xattrs, new.xattrs
        parts = [f"+{k}" for k in sorted(b.keys() - a.keys())] + [f"-{k}" for k in sorted(a.keys() - b.keys())]
        parts += [f"~{k}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
        return "xattrs: " + " ".join(parts)
    values = {"type": (old.type, new.type), "target": (repr(old.target), repr(new.target)),
              "rdev": tuple(f"{v[0]}:{v[1]}" if v else "-" for v in (old.rdev, new.rdev)),
              "mode": (f"{old.mode:04o}", f"{new.mode:04o}"), "uid": (old.uid, new.uid), "gid": (old.gid, new.gid),
              "nlink": (old.nlink, new.nlink)}  # fmt: skip
    if name in _TIMES:
        a, b = _when(getattr(old, f"{name}_ns")), _when(getattr(new, f"{name}_ns"))
    else:
        a, b = values[name]
    return f"{name}: {a} -> {b}"


def _line(entry: Any, out: Output, long: bool) -> str:
    path = show(os.fsencode(entry.path))
    text = f"{MARKERS[entry.change]} {entry.type:<7} {path}"
    if entry.renamed_from is not None:
        text = f"{MARKERS[entry.change]} {entry.type:<7} {show(os.fsencode(entry.renamed_from))} -> {path}"
    if not long:
        return text
    details = [_field(name, entry.old, entry.new, out) for name in entry.fields]
    if entry.change in ("added", "deleted") and entry.type == "file":
        details.append(out.size((entry.new or entry.old).size))
    return text + (f"  ({'; '.join(details)})" if details else "")


def _summary(report: Any, out: Output) -> str:
    counts = {kind: 0 for kind in MARKERS}
    sizes = {"added": 0, "deleted": 0, "old": 0, "new": 0}
    for e in report.entries:
        counts[e.change] += 1
        if e.type == "file" and e.change in ("added", "deleted"):
            sizes[e.change] += (e.new or e.old).size
        elif "content" in e.fields:
            sizes["old"] += e.old.size
            sizes["new"] += e.new.size
    parts = [f"{counts['added']} added ({out.size(sizes['added'])})",
             f"{counts['deleted']} deleted ({out.size(sizes['deleted'])})",
             f"{counts['modified']} modified ({out.size(sizes['old'])} -> {out.size(sizes['new'])})",
             f"{counts['metadata']} metadata"]  # fmt: skip
    if counts["renamed"]:
        parts.append(f"{counts['renamed']} renamed")
    return f"{report.disk}: {len(report.entries)} changes against {report.against}: " + ", ".join(parts)


def cmd_changes(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow changes``: exit 0 no changes, 1 changes, 2 error (several disks: the worst)."""
    from ..changes import ChangesReport, ChangesSession

    titled = len(args.disks) > 1

    def note(report: ChangesReport) -> None:
        if report.reason is not None:
            print(f"note: {report.disk}: compared entry by entry (slow): {report.reason}", file=out.stderr)

    def compute(path: str) -> ChangesReport:
        report = session.report(path, args.against, args.path, all_fields=args.all, renames=args.renames,
                                details=args.long)  # fmt: skip
        note(report)
        return report

    def shown(report: ChangesReport) -> int:
        if titled:
            out.line(f"{report.disk}:")
        for entry in report.entries:
            out.line(_line(entry, out, args.long))
        if args.long:
            out.line(_summary(report, out))
        return 1 if report.entries else 0

    def as_json(report: ChangesReport) -> tuple[int, Any]:
        record = report.as_dict()
        del record["disk"]
        return (1 if report.entries else 0), record

    with ChangesSession(backing=args.backing, partition=args.partition, journal=not args.no_journal,
                        lock=not args.no_lock, cache=not args.no_cache) as session:  # fmt: skip
        return several(args.disks, out, compute, shown, as_json, error_code=2, order=(0, 1, 2))


CHANGES = Command(
    "changes",
    help="which files a VM changed: a COW file's filesystem against its backing file's (or another disk's)",
    description="List the paths that differ between the filesystem of each DISK (a COW file) and its backing "
    "file's, or another disk's (--against): added (+), deleted (-), modified (M: type, content, symlink target or "
    "device numbers), metadata only (m: mode, owner, group, mtime of a non-directory, xattrs). Content is compared "
    "as bytes. Only what the overlay holds is read (the model's tree is indexed once and cached under "
    "$XDG_CACHE_HOME/ubdcow); disks that share no backing file are compared entry by entry. Exit codes: 0 no "
    "changes, 1 changes, 2 error; with several disks, the worst.",
    arguments=_arguments,
    handler=cmd_changes,
    error_code=2,
    epilog="Paths given with --path are paths in the tree: symlinks on the way are not followed. See docs/cli.md.",
)
