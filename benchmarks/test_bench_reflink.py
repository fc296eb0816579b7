"""Reflink merge (issue 14): sharing the backing's and the COW file's blocks on XFS and btrfs.

On a loop-mounted XFS (``mkfs.xfs -m reflink=1``) and a loop-mounted btrfs,
each a sparse file of 3 x SIZE + 1 GiB in the bench folder, the dense image
(conftest.dense: random backing, 10% of its 4 KiB blocks dirty, scattered)
is built on the mounted filesystem and merged in the same run:

* ``merge(cow, out)``: the default, sharing extents (FICLONERANGE);
* ``merge(cow, out, reflink=False)``: today's copy (``--no-reflink``).

Each round writes a fresh output; the untimed setup removes the previous one
and waits until the filesystem has freed its blocks (sync until the free
space stops changing). Targets: shared / copy <= 0.2 (time, at full size),
and the new space a shared merge takes (free-space difference, settled) <=
1.05 x the COW data + 1 MiB (asserted at every size). Skipped with a reason
where the filesystems cannot be made (not root, no loop device, no mkfs.xfs
or mkfs.btrfs, no kernel support).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import ubdcow
from ubdcow.merge import merge

from .conftest import (
    SIZE,
    DenseImage,
    GiB,
    Measure,
    MiB,
    Results,
    build_dense,
    check_ratios,
    equals_virtual_disk,
    files_equal,
    human,
    loop_filesystem,
    remove,
    settle,
)

REFLINK = pytest.mark.benchmark(group="merge: reflink (XFS, btrfs) vs --no-reflink, dense image")
TIME_TARGET = 0.2  # shared merge time / copying merge time


@dataclass(frozen=True)
class OnFs:
    kind: str
    mount: Path
    image: DenseImage
    cow_runs: int  # runs of set bits: a shared merge clones each

    @property
    def cow_data(self) -> int:
        return self.image.dirty_bytes


@pytest.fixture(scope="module", params=["xfs", "btrfs"])
def on_fs(request: pytest.FixtureRequest, bench_dir: Path) -> Iterator[OnFs]:
    with loop_filesystem(request.param, bench_dir, 3 * SIZE + GiB) as mount:
        image = build_dense(mount)
        with ubdcow.open(image.cow, backing=image.backing) as img:
            runs = sum(source == "cow" for _, _, source in img.extents())
        yield OnFs(request.param, mount, image, runs)


def _fresh(out: Path) -> Callable[[], None]:
    def setup() -> None:
        remove(out)
        settle(out.parent)

    return setup


@REFLINK
def test_reflink_merge_shared(measure: Measure, on_fs: OnFs, results: Results) -> None:
    out = on_fs.mount / "shared.img"
    image = on_fs.image
    measure(
        f"merge.reflink.{on_fs.kind}.shared", lambda: merge(image.cow, out, backing=image.backing), setup=_fresh(out)
    )
    remove(out)
    before = settle(on_fs.mount)
    result = merge(image.cow, out, backing=image.backing)
    used = before - settle(on_fs.mount)
    results.values[f"merge.reflink.{on_fs.kind}.new_space"] = used
    print(
        f"{on_fs.kind}: shared {human(result.shared_bytes)}, new space {human(used)}, COW data {human(on_fs.cow_data)}"
    )
    assert result.shared_bytes > 0
    assert equals_virtual_disk(out, image.cow, image.backing), "shared merge differs from the engine's reads"


@REFLINK
def test_reflink_merge_copy(measure: Measure, on_fs: OnFs) -> None:
    out = on_fs.mount / "copied.img"
    image = on_fs.image
    measure(
        f"merge.reflink.{on_fs.kind}.copy",
        lambda: merge(image.cow, out, backing=image.backing, reflink=False),
        setup=_fresh(out),
    )
    shared = on_fs.mount / "shared.img"
    assert files_equal(out, shared), "the --no-reflink merge differs from the shared one"
    remove(out, shared)


def test_reflink_ratios(results: Results, on_fs: OnFs, pytestconfig: pytest.Config) -> None:
    kind = on_fs.kind
    used = results.values.get(f"merge.reflink.{kind}.new_space")
    if used is None:
        pytest.skip("test_reflink_merge_shared did not run")
    allowed = 1.05 * on_fs.cow_data + MiB
    shared = results.best(f"merge.reflink.{kind}.shared")
    if shared is not None:
        results.notes.append(
            f"{kind}: shared merge {shared / on_fs.cow_runs * 1e6:.1f} us per COW run ({on_fs.cow_runs} runs)"
        )
    rows = [
        results.time_ratio(
            f"merge reflink {kind}: shared / --no-reflink (time)",
            f"merge.reflink.{kind}.shared",
            f"merge.reflink.{kind}.copy",
            "<=",
            TIME_TARGET,
        ),
        results.value_ratio(
            f"merge reflink {kind}: new space / (1.05 x COW data + 1 MiB)",
            used,
            allowed,
            f"{human(used)} / {human(allowed)}",
            "<=",
            1.0,
        ),
    ]
    check_ratios(pytestconfig, rows)
