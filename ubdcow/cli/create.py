"""``create``: an empty COW file on a backing file, as ``uml_mkcow`` makes."""

from __future__ import annotations

import argparse

from .base import EXIT_OK, Command, Output, add_common, add_cow, disk_record


def _arguments(p: argparse.ArgumentParser) -> None:
    add_cow(p, "the COW file to create")
    p.add_argument("backing", metavar="BACKING", help="the backing file (recorded by absolute path)")
    p.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="replace an existing COW file with a new, empty one (its old content is lost)",
    )
    add_common(p)


def cmd_create(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow create``."""
    from ..create import create

    header = create(args.cow, args.backing, overwrite=args.force)
    if out.json:
        from ..inspect import info

        return out.document(disk_record(args.cow, info(args.cow).to_dict()), EXIT_OK)
    out.line(f"created {args.cow}: {header.layout} COW file on {header.backing_file} ({out.size(header.size)} virtual)")
    return EXIT_OK


CREATE = Command(
    "create",
    help="create an empty COW file on a backing file (like uml_mkcow)",
    description="Create a v3 COW file on BACKING, as uml_mkcow does. The backing file is only read.",
    arguments=_arguments,
    handler=cmd_create,
    option_for=lambda key, file, args: "force" if key == "overwrite" else key,
)
