"""``ubdcow demo``: a guided tour on a small image, each step a real command.

It builds a patterned backing image, creates a COW file (``ubdcow create``),
writes through the API (a partial sector and a discard included), runs
``ubdcow info``, ``map`` and ``check``, merges (``ubdcow merge``), and
verifies every byte of the result against a model. Each ``$ ubdcow ...`` line
it prints is run as printed, by the command line's own code, and what
follows it is that command's output.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shlex
import shutil
import tempfile

from .._signals import deferred, register, release
from .base import Command, Output, add_common

DEMO_SIZE = 4 << 20  # 4 MiB, 8192 sectors
DEMO_MTIME = 1_700_000_000


def sector_pattern(index: int) -> bytes:
    """512 recognisable bytes naming sector ``index``."""
    text = f"ubdcow demo backing sector {index:08d}\n".encode()
    return (text * (512 // len(text) + 1))[:512]


def make_backing(path: str, size: int = DEMO_SIZE) -> bytes:
    """A backing image whose every sector names itself, the last 1 MiB a hole; returns its bytes."""
    data_end = max(512, size - (1 << 20))
    data = b"".join(sector_pattern(i) for i in range(data_end // 512))
    with open(path, "wb") as f:
        f.write(data)
        f.truncate(size)
    os.utime(path, (DEMO_MTIME, DEMO_MTIME))
    return data + bytes(size - len(data))


def run_demo(out: Output, keep: str | None = None) -> int:
    """Run the tour; returns 0, or 1 if a verification failed."""
    if keep:
        os.makedirs(keep, exist_ok=True)
        return _tour(out, os.path.abspath(keep), kept=True)
    folder = ""

    def remove() -> None:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    with deferred():  # made and its removal registered together (see ubdcow._signals)
        undo = register(remove)
        folder = tempfile.mkdtemp(prefix="ubdcow-demo-")
    try:
        return _tour(out, folder, kept=False)
    finally:
        with deferred():
            release(undo)
            remove()


def _tour(out: Output, folder: str, kept: bool) -> int:
    tour = _Tour(out, folder, kept)
    as_json, out.quiet = out.json, out.quiet or out.json  # with --json, only the summary object is printed
    tour.prepare()
    tour.write()
    tour.inspect()
    tour.merge()
    return tour.finish(as_json)


class _Tour:
    """The tour's files, the expected virtual disk (``model``) and the verifications so far."""

    def __init__(self, out: Output, folder: str, kept: bool) -> None:
        self.out = out
        self.folder = folder
        self.kept = kept  # False: a temporary folder, gone when the tour ends
        self.backing = os.path.join(folder, "backing.img")
        self.cow = os.path.join(folder, "overlay.cow")
        self.merged = os.path.join(folder, "merged.img")
        self.model = bytearray()
        self.failures: list[str] = []
        self.checks: list[dict[str, object]] = []

    def step(self, title: str) -> None:
        self.out.line()
        self.out.line(f"== {title}")

    def run(self, *argv: str) -> int:
        """Print ``$ ubdcow ARGV`` and run it as the command line would: what follows is its real output."""
        from .app import build_parser

        self.out.line("$ " + shlex.join(("ubdcow", *argv)))
        args = build_parser().parse_args(argv)
        out = Output(args, self.out.stdout, self.out.stderr)
        out.quiet = out.quiet or self.out.quiet
        code: int = args.func(args, out)
        return code

    def verify(self, ok: bool, what: str) -> None:
        self.out.line(f"   {'ok' if ok else 'FAILED'}: {what}")
        if not ok:
            self.failures.append(what)
        self.checks.append({"check": what, "ok": ok})

    def prepare(self) -> None:
        """A fresh backing image and a COW file on it."""

        for stale in (self.cow, self.merged):
            if os.path.exists(stale):
                os.unlink(stale)
        self.out.line(f"# working in {self.folder}")
        self.step(f"a {DEMO_SIZE >> 20} MiB backing image whose sectors name themselves (its last MiB is a hole)")
        self.model = bytearray(make_backing(self.backing))
        self.out.line(f"   {self.backing}")
        self.step("create a COW file on it (like uml_mkcow)")
        self.run("create", self.cow, self.backing)

    def write(self) -> None:
        """Writes through the API, kept in the model too, then read back."""
        import ubdcow

        out, model = self.out, self.model
        self.step("write through the Python API (import ubdcow), as a guest would")
        with ubdcow.open(self.cow, "r+") as disk:
            hello = b"Hello from ubdcow! "
            disk.pwrite(hello, 100)  # a partial sector: the rest of sector 0 is kept from the backing
            model[100 : 100 + len(hello)] = hello
            out.line("   with ubdcow.open(cow, 'r+') as disk:")
            out.line(f"       disk.pwrite({hello!r}, 100)            # inside page 0: it becomes COW, whole")
            block = bytes(range(256)) * 64
            disk.pwrite(block, 1 << 20)
            model[1 << 20 : (1 << 20) + len(block)] = block
            out.line("       disk.pwrite(bytes(range(256)) * 64, 1 MiB)   # 16 KiB, 32 whole sectors")
            disk.discard(2 << 20, 64 << 10)
            model[2 << 20 : (2 << 20) + (64 << 10)] = bytes(64 << 10)
            out.line("       disk.discard(2 MiB, 64 KiB)                  # reads as zeros, a hole in the COW file")
            disk.pwrite(b"tail", DEMO_SIZE - 4)
            model[-4:] = b"tail"
            out.line("       disk.pwrite(b'tail', size - 4)               # inside the backing's hole")
        with ubdcow.open(self.cow) as disk:
            self.verify(disk.read() == bytes(model), "reading the virtual disk back gives the expected bytes")

    def inspect(self) -> None:
        """``info``, ``map`` and ``check`` on the COW file."""
        import ubdcow

        from ..check import check
        from ..inspect import iter_map

        cow = self.cow
        self.step("info: header, backing status, apparent vs allocated size")
        self.run("info", cow)
        facts = ubdcow.info(cow)
        # whole 4 KiB pages: sector 0's page, 32 sectors, 128 discarded, the last page
        self.verify(facts["cow_sectors"] == 8 + 32 + 128 + 8, "the bitmap records 176 written sectors (whole pages)")
        self.verify(facts["allocated_size"] < facts["apparent_size"], "the COW file is sparse")

        self.step("map: where each range of the disk comes from")
        self.run("map", cow)
        extents = list(iter_map(cow))
        self.verify(sum(e["length"] for e in extents) == DEMO_SIZE, "the extents cover the whole disk")
        self.verify(any(e["source"] == "zero" for e in extents), "the discard shows as a 'zero' extent")

        self.step("check: consistency of the COW file and its backing")
        code = self.run("check", cow)
        self.verify(code == 0 and check(cow).exit_code == 0, "check finds nothing wrong (exit 0)")

    def merge(self) -> None:
        """Merge, then verify the image's bytes, its sparseness and the untouched backing file."""
        self.step("merge into a new raw image (atomic, sparse; the backing is only read)")
        self.run("merge", self.cow, "-o", self.merged)
        with open(self.merged, "rb") as f:
            merged_bytes = f.read()
        self.verify(
            merged_bytes == bytes(self.model),
            f"the merged image equals the expected bytes (sha256 {hashlib.sha256(merged_bytes).hexdigest()[:16]}...)",
        )
        st = os.stat(self.merged)
        self.verify(
            st.st_blocks * 512 < DEMO_SIZE, f"the merged image is sparse ({st.st_blocks * 512} bytes allocated)"
        )
        with open(self.backing, "rb") as f:
            self.verify(
                f.read()[:1024] == b"".join(sector_pattern(i) for i in range(2)), "the backing file is unchanged"
            )

    def finish(self, as_json: bool) -> int:
        """The summary (a JSON object with ``--json``); 0, or 1 if a verification failed."""
        out = self.out
        out.line()
        if as_json:  # the folder only when it is kept (a temporary one is gone when this is read)
            folder = self.folder if self.kept else None
            out.document({"folder": folder, "ok": not self.failures, "checks": self.checks}, 1 if self.failures else 0)
        if self.failures:
            out.line(f"demo: VERIFICATION FAILED: {'; '.join(self.failures)}")
            return 1
        kept = f"; the files are in {self.folder}" if self.kept else ""
        out.line("demo: all checks passed" + kept)
        return 0


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep", metavar="DIR", help="leave the files in DIR instead of a temporary folder")
    add_common(p)


def cmd_demo(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow demo``."""
    return run_demo(out, keep=args.keep)


DEMO = Command(
    "demo",
    help="a guided tour in a temporary folder",
    description="Build a small backing image and a COW file in a temporary folder and show what ubdcow does with them.",
    arguments=_arguments,
    handler=cmd_demo,
)
