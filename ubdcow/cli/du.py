"""``du``: what overlays and their backing files take, grouped by backing file; which will not boot."""

from __future__ import annotations

import argparse
import shlex
from typing import TYPE_CHECKING

from .base import EXIT_ERROR, EXIT_OK, Command, Output, add_common, command_line, plural

if TYPE_CHECKING:
    from ..du import DuReport, Group

_HEAD = f"{'ALLOCATED':>11} {'APPARENT':>11} {'OVERLAYS':>8} {'OVL ALLOC':>11} {'FLAT':>11} {'SAVED':>11}  BACKING"


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", metavar="PATH", nargs="*", default=["."], help="COW files or folders (default: .)")
    p.add_argument("-a", "--all", action="store_true", help="also a row per overlay")
    p.add_argument("--written", action="store_true", help="also count the written sectors (reads each bitmap; slower)")
    add_common(p)


def _row(out: Output, g: Group) -> str:
    backing = g.backing or "(none recorded)"
    tag = "" if g.boots else f"  [will not boot: {g.reason}]"
    sizes = [g.allocated_size, g.apparent_size] if g.device is not None else [None, None]
    a, b = (out.size(n) for n in sizes)
    return (
        f"{a:>11} {b:>11} {g.overlays:>8} {out.size(g.overlays_allocated):>11} {out.size(g.flat_size):>11} "
        f"{out.size(g.saved) if g.boots else '-':>11}  {backing}{tag}"
    )


def _hint(g: Group, out: Output) -> str | None:
    """What to do about a group that will not boot; a rebase only where it is safe to suggest."""
    n = plural(g.overlays, "overlay")
    if g.reason == "mtime mismatch":
        if g.overlays == 1:
            return g.files[0].hint
        listing = command_line("du", out.args, set={"all": True})
        return (
            f"{g.backing} was modified, copied or touched after its {n} were made; if its content is unchanged, "
            f"record its new mtime in each (to list them: {listing}): "
            f"ubdcow rebase --unsafe COW --backing {shlex.quote(g.backing or '')}"
        )
    if g.reason == "size mismatch":
        return f"{g.backing} is not the file its {n} were made on (its size differs): do not rebase them onto it"
    if g.reason == "backing file missing":
        return (
            f"{g.backing} does not exist: if it moved, check a candidate before recording it: "
            "ubdcow info COW --backing PATH"
        )
    return None


def print_du(report: DuReport, out: Output, show_all: bool) -> None:
    """The human form of :func:`ubdcow.du.du`'s report."""
    out.line(_HEAD)
    for g in report.groups:
        out.line(_row(out, g))
        if show_all:
            for o in g.files:
                why = f"  [{o.problem}]" if o.problem else ""
                written = f" {out.size(o.written_bytes)} written" if o.written_bytes is not None else ""
                size = out.size(o.allocated_size)
                out.line(f"{'':>11} {'':>11} {'':>8} {size:>11} {'':>11} {'':>11}    {o.path}{written}{why}")
    out.line(
        f"{out.size(report.allocated):>11} {'':>11} {report.overlays:>8} {out.size(report.overlays_allocated):>11} "
        f"{out.size(report.flat_size):>11} {out.size(report.saved):>11}  total "
        f"({plural(report.backing_files, 'backing file')}{', each counted once' if report.backing_files > 1 else ''})"
    )
    counted = [g.written_bytes for g in report.groups if g.written_bytes is not None]
    if counted:
        out.line(f"written: {out.size(sum(counted))} of the overlays' disks read from the COW files")
    refused = sum(report.will_not_boot.values())
    if refused:
        reasons = list(report.will_not_boot.items())
        why = reasons[0][0] if len(reasons) == 1 else ", ".join(f"{r} ({n})" for r, n in reasons)
        out.line(f"{plural(refused, 'overlay')} will not boot: {why}")
        for g in report.groups:
            hint = None if g.boots else _hint(g, out)
            if hint:
                out.line(f"hint: {hint}")
    if report.unreadable:
        out.line(f"{plural(len(report.unreadable), 'file')} could not be read (listed on stderr)")


def cmd_du(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow du``: exit 0, or 1 if a file or folder could not be read."""
    from ..du import du

    report = du(args.paths, written=args.written)
    for bad in report.unreadable:
        print(f"ubdcow: {bad.error}", file=out.stderr)
    code = EXIT_ERROR if report.unreadable else EXIT_OK
    if out.json:
        doc = report.as_dict()
        for group in doc["groups"]:  # an overlay is a disk: named "disk", as everywhere (docs/cli.md)
            group["files"] = [{"disk": o.pop("path"), **o} for o in group["files"]]
        return out.document(doc, code)
    print_du(report, out, args.all)
    return code


DU = Command(
    "du",
    help="what overlays take on disk, grouped by backing file, and which will not boot",
    description="Find the COW files under each PATH (by their magic, whatever their name; folders recursively, "
    "symbolic links inside them not followed) and show, per backing file (the same file however it is named): "
    "its size, the number of overlays on it, what they take, what flat copies of them would take and what the "
    "overlays save. Overlays whose backing file is missing or would be refused by the kernel (size or mtime "
    "mismatch) are grouped apart with the reason. Only headers are read (and files stat-ed) unless --written.",
    arguments=_arguments,
    handler=cmd_du,
    epilog="Exit codes: 0, or 1 if a file or folder could not be read (each is one line on stderr). Overlays that "
    "will not boot do not change the exit code.",
)
