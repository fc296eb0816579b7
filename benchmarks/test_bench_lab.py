"""Labs of overlays: ``du`` over 1,000 overlays and ``compact`` of the dense image (issue 13).

* ``du`` over 1,000 overlays of a 10 GiB (sparse) backing file, without
  ``--written``: wall time against a 2 s budget (a value row, asserted with
  the timing targets) and peak RSS of a child running it (<= 100 MiB,
  asserted at every size).
* ``compact`` of the dense image (10% of its 4 KiB blocks written, random
  data, so nothing is given back and the file is unchanged) against the
  floor: reading just its set pages from the COW file and the same pages
  from the backing file, each run of dirty blocks in one ``pread`` per file.
  Target at full size: <= 1.5x.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ubdcow
from ubdcow.compact import compact
from ubdcow.du import du

from .conftest import BLOCK, DenseImage, Measure, Results, check_ratios
from .test_bench_memory import peak_rss

OVERLAYS = 1000
DU_SECONDS = 2.0
RSS_LIMIT = 100 << 20
COMPACT_TARGET = 1.5
LAB = pytest.mark.benchmark(group="lab: du and compact")


@pytest.fixture(scope="module")
def lab(bench_dir: Path) -> Path:
    folder = bench_dir / "lab"
    (folder / "vms").mkdir(parents=True)
    model = folder / "model.img"
    with open(model, "wb") as f:
        f.truncate(10 << 30)
    for i in range(OVERLAYS):
        ubdcow.create(folder / "vms" / f"vm{i:04d}", model)
    os.sync()
    return folder


@LAB
def test_du_1000_overlays(lab: Path, results: Results) -> None:
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        report = du([lab / "vms"])
        times.append(time.perf_counter() - t0)
    assert report.overlays == OVERLAYS and len(report.groups) == 1
    best = min(times)
    results.value_ratio(f"du {OVERLAYS} overlays / {DU_SECONDS} s", best, DU_SECONDS, f"{best:.3f} s", "<=", 1.0,
                        always=False)
    rss = peak_rss(f"import sys; sys.path.insert(0, {str(Path(ubdcow.__file__).parent.parent)!r})\n"
                   f"from ubdcow.du import du\nassert du([{str(lab / 'vms')!r}]).overlays == {OVERLAYS}")
    results.value_ratio(f"du {OVERLAYS} overlays peak RSS / 100 MiB", rss, RSS_LIMIT, f"{rss >> 20} MiB", "<=", 1.0)
    print(f"du: {best:.3f} s, {rss >> 20} MiB peak RSS ({sys.executable})")


def _runs(blocks: np.ndarray) -> list[tuple[int, int]]:
    """Runs ``[first, last)`` of consecutive block numbers."""
    if blocks.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(blocks) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [blocks.size]))
    return [(int(blocks[a]), int(blocks[b - 1]) + 1) for a, b in zip(starts, ends, strict=True)]


@LAB
def test_compact_dense(measure: Measure, dense: DenseImage) -> None:
    before = os.stat(dense.cow).st_mtime_ns, os.stat(dense.cow).st_blocks
    result = compact(dense.cow, backing=dense.backing)
    assert (result.pages_returned, result.pages_punched, result.dead_pages) == (0, 0, 0)
    measure("compact.dense.ubdcow", lambda: compact(dense.cow, backing=dense.backing))
    assert (os.stat(dense.cow).st_mtime_ns, os.stat(dense.cow).st_blocks) == before  # nothing changed


@LAB
def test_compact_dense_floor(measure: Measure, dense: DenseImage) -> None:
    runs = _runs(dense.dirty_blocks)
    base = dense.header.data_offset

    def read_set_pages() -> None:
        cfd, bfd = os.open(dense.cow, os.O_RDONLY), os.open(dense.backing, os.O_RDONLY)
        try:
            for a, b in runs:
                os.pread(cfd, (b - a) * BLOCK, base + a * BLOCK)
                os.pread(bfd, (b - a) * BLOCK, a * BLOCK)
        finally:
            os.close(cfd)
            os.close(bfd)

    measure("compact.dense.floor_read_set_pages", read_set_pages)


@LAB
def test_lab_ratios(results: Results, pytestconfig: pytest.Config) -> None:
    rows = [results.time_ratio("compact dense / reading its set pages (COW + backing)", "compact.dense.ubdcow",
                               "compact.dense.floor_read_set_pages", "<=", COMPACT_TARGET)]
    rows += [r for r in results.ratios if r.label.startswith("du ")]
    check_ratios(pytestconfig, rows)
