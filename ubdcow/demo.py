"""``ubdcow demo``: a guided tour on a small image in a temporary folder."""

from __future__ import annotations

import os
import tempfile
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cli import Output

DEMO_SIZE = 4 << 20  # 4 MiB, 8192 sectors
DEMO_MTIME = 1_700_000_000


def sector_pattern(index: int) -> bytes:
    """512 recognisable bytes naming sector ``index``."""
    text = f"ubdcow demo backing sector {index:08d}\n".encode()
    return (text * (512 // len(text) + 1))[:512]


def make_backing(path: str, size: int = DEMO_SIZE) -> None:
    """A backing image whose every sector names itself (the last 1 MiB left as a hole)."""
    with open(path, "wb") as f:
        data_end = max(512, size - (1 << 20))
        f.write(b"".join(sector_pattern(i) for i in range(data_end // 512)))
        f.truncate(size)
    os.utime(path, (DEMO_MTIME, DEMO_MTIME))


def run_demo(out: Output, keep: str | None = None) -> int:
    """Run the tour; returns 0, or 1 if a verification failed."""
    if keep:
        os.makedirs(keep, exist_ok=True)
        return _tour(out, os.path.abspath(keep))
    with tempfile.TemporaryDirectory(prefix="ubdcow-demo-") as folder:
        return _tour(out, folder)


def _tour(out: Output, folder: str) -> int:
    from .cli import print_info
    from .create import create
    from .inspect import info

    backing = os.path.join(folder, "backing.img")
    cow = os.path.join(folder, "overlay.cow")
    out.line(f"# working in {folder}")
    make_backing(backing)
    out.line(f"# a {DEMO_SIZE >> 20} MiB backing image whose sectors name themselves: {backing}")
    out.line()
    out.line(f"$ python -m ubdcow create {cow} {backing}")
    create(cow, backing, overwrite=True)
    out.line()
    out.line(f"$ python -m ubdcow info {cow}")
    facts = info(cow)
    if out.json:
        out.dump(facts)
    else:
        print_info(facts, out)
    ok = facts["cow_sectors"] == 0 and facts["backing"]["problem"] is None and facts["size"] == DEMO_SIZE
    out.line()
    out.line("demo: all checks passed" if ok else "demo: VERIFICATION FAILED")
    return 0 if ok else 1
