"""Memory target: commands stay bounded whatever the image size (merge: peak RSS <= 100 MiB at 1 TiB).

A 1 TiB virtual disk (a 256 MiB bitmap) on a sparse backing file, with
written sectors scattered over the whole disk, is merged, checked, mapped and
counted by ``info`` in child processes whose peak RSS is read back from
``/proc/self/status`` (VmHWM). The reference is the RSS of a child that only imports
ubdcow, measured in the same run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import ubdcow
from ubdcow.format import read_header

TIB = 1 << 40
LIMIT = 100 << 20


def peak_rss(code: str) -> int:
    """Peak RSS in bytes of a fresh interpreter running ``code``."""
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over execve, so a child of a big
    # pytest process would report the parent's size
    script = (
        f"{code}\nimport json, re\n"
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())\n"
        "print(json.dumps(int(hwm.group(1)) * 1024))"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.fixture(scope="module")
def huge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("huge")
    backing = folder / "b.img"
    with open(backing, "wb") as f:
        f.write(os.urandom(1 << 20))  # some data at the start, the rest a hole
        f.truncate(TIB)
    cow = folder / "o.cow"
    ubdcow.create(cow, backing)
    rng = random.Random(3)
    with ubdcow.open(cow, "r+") as img:
        for _ in range(2000):
            img.pwrite(os.urandom(4096), rng.randrange(TIB // 4096) * 4096)
        img.pwrite(os.urandom(4096), TIB - 4096)
    return cow


def test_memory_stays_bounded_on_a_1_tib_image(huge: Path) -> None:
    assert read_header(huge).bitmap_len == 256 << 20
    baseline = peak_rss("import ubdcow")
    out = huge.parent / "merged.img"
    results = {
        "merge": peak_rss(f"import ubdcow; ubdcow.merge({str(huge)!r}, {str(out)!r}, overwrite=True)"),
        "info": peak_rss(f"import ubdcow; assert 8 <= ubdcow.info({str(huge)!r})['cow_sectors'] <= 8 * 2001"),
        "check": peak_rss(f"import ubdcow; assert ubdcow.check({str(huge)!r}).exit_code == 0"),
        "map": peak_rss(f"import ubdcow; n = sum(1 for _ in ubdcow.iter_map({str(huge)!r}))"),
    }
    assert out.stat().st_size == TIB
    assert out.stat().st_blocks * 512 < 64 << 20  # sparse: the data, not the disk
    print()
    print(f"peak RSS, 1 TiB virtual disk (256 MiB bitmap); import-only baseline {baseline / 2**20:.1f} MiB")
    for name, rss in results.items():
        print(f"  {name:<6} {rss / 2**20:7.1f} MiB   (+{(rss - baseline) / 2**20:.1f} MiB over the baseline)")
    for name, rss in results.items():
        assert rss <= LIMIT, f"{name}: peak RSS {rss / 2**20:.1f} MiB > {LIMIT / 2**20:.0f} MiB"
