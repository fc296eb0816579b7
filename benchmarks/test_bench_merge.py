"""Merge (flatten) wall time against uml_moo and against the floor: copying the backing file and fsyncing it.

Dense case: a random backing file of SIZE bytes and a COW file with 10% of its
4 KiB blocks written (conftest.dense). Timed in the same run, each round
writing a fresh output (the previous one is removed, and dirty pages written
back, in the untimed setup):

* ``uml_moo -b backing cow out`` (skipped with a message when not installed);
* ``ubdcow.merge.merge(cow, out)`` (sparse, atomic: includes its fsync);
* the floor, the same work without the overlay: an ``os.copy_file_range``
  loop copying the backing file alone into a fresh file, then ``fsync``
  (merge's output is durable too: fsync before its rename). The bare copy,
  without fsync, is reported beside it.

Targets at full size: ubdcow <= 0.35x uml_moo, and <= 1.1x the floor where
the bench folder is on ext4 (on XFS or btrfs copy_file_range shares extents
instead of copying, and merge does too: see test_bench_reflink.py; there the
ratio is only reported).

Sparse case: a SIZE-byte backing that is 90% holes (data in 10% of its 1 MiB
regions) with a COW file with a few dirty blocks (conftest.sparse). The
output must be allocated only where there is data (<= 1.2x data + dirty
bytes, asserted at every size) and the merge time must follow the data, not
the size: it is compared with merging a fully dense image of the same size
with the same dirty blocks, in the same run (asserted at full size).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ubdcow.merge import merge

from .conftest import (
    DenseImage,
    Measure,
    Results,
    SparseImage,
    check_ratios,
    equals_virtual_disk,
    files_equal,
    fs_type,
    human,
    remove,
    settle,
    uml_moo_path,
)

DENSE = pytest.mark.benchmark(group="merge: dense backing, 10% of 4K blocks dirty")
SPARSE = pytest.mark.benchmark(group="merge: 90%-hole backing vs dense, few dirty blocks")

#: sparse merge time / dense merge time (same size, same dirty blocks); the data is 10% of the size.
SPARSE_TIME_TARGET = 0.3
#: merge time / (copy_file_range of the backing + fsync), where the bench folder is ext4
FLOOR_TARGET = 1.1
FLOOR_FS = "ext4"


@pytest.fixture(scope="module")
def merge_dir(bench_dir: Path) -> Iterator[Path]:
    path = bench_dir / "merge"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _fresh(out: Path) -> Callable[[], None]:
    def setup() -> None:
        remove(out)
        settle()

    return setup


def copy_floor(src: Path, dst: Path, *, fsync: bool = False) -> None:
    """copy_file_range of a whole file into a new one, in as few calls as the kernel allows (then fsync)."""
    fi = os.open(src, os.O_RDONLY)
    try:
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            left = os.fstat(fi).st_size
            while left:
                n = os.copy_file_range(fi, fo, left)
                if n == 0:
                    raise OSError(f"copy_file_range: unexpected end of {src}")
                left -= n
            if fsync:
                os.fsync(fo)
        finally:
            os.close(fo)
    finally:
        os.close(fi)


# -- dense ---------------------------------------------------------------------


@DENSE
def test_merge_dense_uml_moo(measure: Measure, dense: DenseImage, merge_dir: Path) -> None:
    moo = uml_moo_path()
    if moo is None:
        pytest.skip("uml_moo is not installed (apt-get install uml-utilities): no uml_moo reference in this run")
    out = merge_dir / "uml_moo.img"  # kept for the byte comparison in test_merge_dense_ubdcow
    cmd = [moo, "-b", str(dense.backing), str(dense.cow), str(out)]

    def run() -> None:
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    measure("merge.dense.uml_moo", run, setup=_fresh(out))
    assert os.path.getsize(out) == dense.size // 512 * 512


@DENSE
def test_merge_dense_ubdcow(measure: Measure, dense: DenseImage, merge_dir: Path) -> None:
    out = merge_dir / "ubdcow.img"
    measure("merge.dense.ubdcow", lambda: merge(dense.cow, out, backing=dense.backing), setup=_fresh(out))
    reference = merge_dir / "uml_moo.img"
    if reference.exists():
        assert files_equal(out, reference), "ubdcow's merged image differs from uml_moo's"
    else:
        assert equals_virtual_disk(out, dense.cow, dense.backing), "merged image differs from the engine's reads"
    remove(out, reference)


@DENSE
def test_merge_dense_floor(measure: Measure, dense: DenseImage, merge_dir: Path) -> None:
    """The floor: the backing file copied and made durable, as merge's atomic output is (fsync before rename)."""
    out = merge_dir / "floor-fsync.img"
    measure(
        "merge.dense.floor_copy_file_range+fsync",
        lambda: copy_floor(dense.backing, out, fsync=True),
        setup=_fresh(out),
    )
    assert files_equal(out, dense.backing)
    remove(out)


@DENSE
def test_merge_dense_bare_copy(measure: Measure, dense: DenseImage, merge_dir: Path) -> None:
    """Informational: the copy alone, not durable (its write-back is left to the kernel, after the clock stops)."""
    out = merge_dir / "floor.img"
    measure("merge.dense.bare_copy_file_range", lambda: copy_floor(dense.backing, out), setup=_fresh(out))
    assert os.path.getsize(out) == dense.size
    remove(out)


def test_merge_dense_ratios(results: Results, merge_dir: Path, pytestconfig: pytest.Config) -> None:
    """ubdcow merge time / reference time (min of N rounds each)."""
    rows = []
    if results.best("merge.dense.uml_moo") is not None:
        rows.append(
            results.time_ratio(
                "merge dense: ubdcow / uml_moo (time)", "merge.dense.ubdcow", "merge.dense.uml_moo", "<=", 0.35
            )
        )
    else:
        results.notes.append("uml_moo not installed: ubdcow / uml_moo not measured")
    kind = fs_type(merge_dir)
    target = FLOOR_TARGET if kind == FLOOR_FS else None
    if target is None:
        results.notes.append(f"bench folder on {kind}, not {FLOOR_FS}: merge / floor is reported, not asserted")
    rows.append(
        results.time_ratio(
            f"merge dense: ubdcow / floor copy+fsync on {kind} (time)",
            "merge.dense.ubdcow",
            "merge.dense.floor_copy_file_range+fsync",
            "<=" if target else None,
            target,
        )
    )
    if results.best("merge.dense.bare_copy_file_range") is not None:
        rows.append(
            results.time_ratio(
                "merge dense: ubdcow / bare copy, no fsync (time)",
                "merge.dense.ubdcow",
                "merge.dense.bare_copy_file_range",
            )
        )
    check_ratios(pytestconfig, rows)


# -- sparse --------------------------------------------------------------------


@SPARSE
def test_merge_sparse_ubdcow(measure: Measure, sparse: SparseImage, merge_dir: Path, results: Results) -> None:
    out = merge_dir / "sparse.img"
    measure("merge.sparse.ubdcow", lambda: merge(sparse.cow, out, backing=sparse.backing), setup=_fresh(out))
    allocated = os.stat(out).st_blocks * 512
    results.values["merge.sparse.allocated_bytes"] = allocated
    print(
        f"sparse merge: allocated {human(allocated)}, data {human(sparse.data_bytes)}, "
        f"dirty {human(sparse.dirty_bytes)}"
    )
    assert equals_virtual_disk(out, sparse.cow, sparse.backing), "merged image differs from the engine's reads"
    remove(out)


@SPARSE
def test_merge_sparse_dense_twin(measure: Measure, sparse: SparseImage, merge_dir: Path) -> None:
    """The reference: the same size and dirty blocks over a fully dense (random) backing."""
    out = merge_dir / "dense-few.img"
    measure(
        "merge.dense_few.ubdcow",
        lambda: merge(sparse.dense_twin, out, backing=sparse.dense_backing),
        setup=_fresh(out),
    )
    remove(out)


def test_merge_sparse_ratios(results: Results, sparse: SparseImage, pytestconfig: pytest.Config) -> None:
    allocated = results.values.get("merge.sparse.allocated_bytes")
    if allocated is None:
        pytest.skip("test_merge_sparse_ubdcow did not run")
    wanted = sparse.data_bytes + sparse.dirty_bytes
    rows = [
        results.value_ratio(
            "merge sparse: allocated / (data + dirty bytes)",
            allocated,
            wanted,
            f"{human(allocated)} / {human(wanted)}",
            "<=",
            1.2,
        ),
        results.time_ratio(
            "merge sparse: time 90%-hole / time dense (same size)",
            "merge.sparse.ubdcow",
            "merge.dense_few.ubdcow",
            "<=",
            SPARSE_TIME_TARGET,
        ),
    ]
    check_ratios(pytestconfig, rows)
