"""Shared benchmark machinery: the size parameter, data files built once per session, timings and ratios.

Every target is a *ratio* between two timings taken in the same run (never an
absolute time): each side is timed for several rounds and its minimum is used
(the machine is shared and noisy; the minimum is the run least disturbed by
other work). Ratios are asserted only at full size with benchmarks enabled,
see :data:`ASSERT_TARGETS`; otherwise they are just recorded and printed in
the table at the end of the run (``pytest_terminal_summary``).

Environment:

* ``UBDCOW_BENCH_SIZE``   virtual disk size: ``64M`` (default), ``2G`` (full size), bytes, K/M/G/T suffixes.
* ``UBDCOW_BENCH_DIR``    where the session's temporary folder goes (default: the system temp dir, ``/tmp``).
* ``UBDCOW_BENCH_ROUNDS`` timed rounds per side (default 5; keep it >= 3).
* ``UBDCOW_BENCH_OPS``    4 KiB operations per round in the random I/O benchmarks.
* ``UBDCOW_BENCH_ASSERT`` ``auto`` (default: full size and --benchmark-enable), ``1`` always, ``0`` never.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ubdcow

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

BLOCK = 4096  # the I/O and dirty-block unit
SECTOR = 512
FULL_SIZE = 2 * GiB
DEFAULT_SIZE = "64M"
DIRTY_FRACTION = 0.10  # of 4 KiB blocks written in the COW file
SPARSE_DATA_FRACTION = 0.10  # of 1 MiB regions of the sparse backing that hold data
SPARSE_REGION = MiB
FEW_DIRTY = 64  # dirty 4 KiB blocks in the "few dirty blocks" COW files
SEED = 0x0BDC0


def parse_size(text: str) -> int:
    """``"64M"``, ``"2G"``, ``"2GiB"``, ``"1.5g"``, ``"2147483648"`` -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {text!r} (examples: 64M, 2G, 2147483648)")
    unit = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}[m.group(2).lower()]
    return int(float(m.group(1)) * unit)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


SIZE = parse_size(os.environ.get("UBDCOW_BENCH_SIZE", DEFAULT_SIZE))
if SIZE < 4 * MiB or SIZE % MiB:
    raise pytest.UsageError(f"UBDCOW_BENCH_SIZE must be a whole number of MiB, at least 4M (got {SIZE} bytes)")
FULL = SIZE >= FULL_SIZE
ROUNDS = max(1, _env_int("UBDCOW_BENCH_ROUNDS", 5))
OPS = _env_int("UBDCOW_BENCH_OPS", 100_000 if FULL else 10_000)
BENCH_DIR = os.environ.get("UBDCOW_BENCH_DIR") or None
_ASSERT = os.environ.get("UBDCOW_BENCH_ASSERT", "auto").strip().lower()


def human(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n:.0f} B"


# -- results ---------------------------------------------------------------


@dataclass
class Ratio:
    """One row of the ratio table."""

    label: str
    value: float
    detail: str
    op: str | None = None  # "<=" or ">=" (None: reported only)
    target: float | None = None
    always: bool = False  # asserted at every size (not a timing, e.g. allocated bytes)

    @property
    def ok(self) -> bool | None:
        if self.op is None or self.target is None:
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target


@dataclass
class Results:
    """Timings (seconds per round) and values of the session, and the ratios computed from them."""

    timings: dict[str, list[float]] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def record(self, key: str, seconds: list[float]) -> None:
        self.timings.setdefault(key, []).extend(seconds)

    def best(self, key: str) -> float | None:
        times = self.timings.get(key)
        return min(times) if times else None

    def _pair(self, num: str, den: str) -> tuple[float, float] | None:
        a, b = self.best(num), self.best(den)
        if a is None or b is None:
            missing = [k for k, v in ((num, a), (den, b)) if v is None]
            self.notes.append(f"ratio {num} / {den} not computed: no timing for {', '.join(missing)}")
            return None
        return a, b

    def time_ratio(self, label: str, num: str, den: str, op: str | None = None, target: float | None = None) -> Ratio:
        """min(time of ``num``) / min(time of ``den``): below 1 means ``num`` is faster."""
        pair = self._pair(num, den)
        if pair is None:
            pytest.skip(f"{label}: missing timings ({num}, {den})")
        a, b = pair
        return self._add(Ratio(label, a / b, f"{a:.4f} s / {b:.4f} s", op, target))

    def throughput_ratio(
        self, label: str, subject: str, reference: str, op: str | None = None, target: float | None = None
    ) -> Ratio:
        """Throughput of ``subject`` relative to ``reference`` for the same work: min(ref time) / min(subject time)."""
        pair = self._pair(subject, reference)
        if pair is None:
            pytest.skip(f"{label}: missing timings ({subject}, {reference})")
        a, b = pair
        return self._add(Ratio(label, b / a, f"{b:.4f} s / {a:.4f} s", op, target))

    def value_ratio(
        self, label: str, num: float, den: float, detail: str, op: str, target: float, always: bool = True
    ) -> Ratio:
        return self._add(Ratio(label, num / den, detail, op, target, always))

    def _add(self, ratio: Ratio) -> Ratio:
        self.ratios = [r for r in self.ratios if r.label != ratio.label] + [ratio]
        print(f"{ratio.label}: {ratio.value:.3f} ({ratio.detail})")
        return ratio


RESULTS = Results()


def assert_targets_enabled(config: pytest.Config) -> bool:
    """Timing targets are asserted at full size with benchmarks enabled (UBDCOW_BENCH_ASSERT overrides)."""
    if _ASSERT in ("1", "yes", "true", "always"):
        return True
    if _ASSERT in ("0", "no", "false", "never"):
        return False
    return FULL and not benchmarks_disabled(config)


def benchmarks_disabled(config: pytest.Config) -> bool:
    """pytest-benchmark's own rule: --benchmark-disable (from setup.cfg) unless --benchmark-enable; or skip."""
    disabled = config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False)
    return bool(disabled) or bool(config.getoption("benchmark_skip", False))


def check_ratios(config: pytest.Config, rows: list[Ratio]) -> None:
    """Fail on missed targets: timing targets when asserting is on, value targets always."""
    enforce = assert_targets_enabled(config)
    missed = [r for r in rows if r.ok is False and (enforce or r.always)]
    if missed:
        lines = [f"{r.label}: {r.value:.3f} (target {r.op} {r.target}; {r.detail})" for r in missed]
        pytest.fail("targets missed:\n  " + "\n  ".join(lines), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _compiled_package() -> None:
    """The package's bytecode written once, as pip writes it on install: the benchmarks that start
    ``ubdcow`` in a child process then measure it, not the compiler (even where PYTHONDONTWRITEBYTECODE
    is set, a child reads bytecode that exists)."""
    import compileall

    compileall.compile_dir(str(Path(ubdcow.__file__).parent), quiet=1)


@pytest.fixture(scope="session")
def results() -> Results:
    return RESULTS


@pytest.fixture(scope="session")
def assert_targets(pytestconfig: pytest.Config) -> bool:
    return assert_targets_enabled(pytestconfig)


Measure = Callable[..., list[float]]


@pytest.fixture
def measure(benchmark: Any, results: Results) -> Measure:
    """``measure(key, target, setup=None, rounds=ROUNDS)``: time ``target()`` per round, record under ``key``.

    Runs through pytest-benchmark's pedantic mode (so the runs also appear in
    its table and JSON), but keeps its own per-round wall times (perf_counter),
    which is what the ratios use. ``setup`` runs before each round, untimed.
    With --benchmark-disable, pytest-benchmark runs a single round.
    """

    def _measure(
        key: str, target: Callable[[], Any], *, setup: Callable[[], Any] | None = None, rounds: int = ROUNDS
    ) -> list[float]:
        times: list[float] = []

        def timed() -> None:
            t0 = time.perf_counter()
            target()
            times.append(time.perf_counter() - t0)

        def before() -> None:
            if setup is not None:
                setup()

        benchmark.extra_info["size"] = SIZE
        benchmark.pedantic(timed, setup=before, rounds=rounds, warmup_rounds=0, iterations=1)
        results.record(key, times)
        print(f"{key}: min {min(times):.4f} s over {len(times)} round(s)")
        return times

    return _measure


# -- data files ------------------------------------------------------------


@pytest.fixture(scope="session")
def bench_dir() -> Iterator[Path]:
    """One temporary folder for the session (UBDCOW_BENCH_DIR, else the system temp dir), removed at the end."""
    path = Path(tempfile.mkdtemp(prefix="ubdcow-bench-", dir=BENCH_DIR))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_random_file(path: Path, size: int, rng: np.random.Generator, chunk: int = 64 * MiB) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for pos in range(0, size, chunk):
            os.pwrite(fd, rng.bytes(min(chunk, size - pos)), pos)
    finally:
        os.close(fd)


def make_cow(cow: Path, backing: Path, blocks: np.ndarray, rng: np.random.Generator) -> ubdcow.CowHeader:
    """A v3 COW file on ``backing`` whose 4 KiB ``blocks`` hold random data, written directly.

    The data goes to ``data_offset + 512*i`` for each sector i of the blocks and
    the bits to ``bitmap_offset`` (sector i = bit i%8 of byte i//8), data first.
    """
    header = ubdcow.create(cow, backing)
    per = BLOCK // SECTOR
    blocks = np.unique(blocks.astype(np.int64))
    data = memoryview(rng.bytes(len(blocks) * BLOCK))
    fd = os.open(cow, os.O_WRONLY)
    try:
        for i, block in enumerate(blocks.tolist()):
            os.pwrite(fd, data[i * BLOCK : (i + 1) * BLOCK], header.data_offset + block * BLOCK)
        bits = np.zeros(header.bitmap_len * 8, dtype=bool)
        sectors = (blocks[:, None] * per + np.arange(per)).ravel()
        assert sectors.size == 0 or sectors[-1] < header.mapped_sectors
        bits[sectors] = True
        os.pwrite(fd, np.packbits(bits, bitorder="little").tobytes(), header.bitmap_offset)
    finally:
        os.close(fd)
    return header


def warm(*paths: Path) -> None:
    """Read files once so that the page cache holds them (the benchmarks compare cached I/O)."""
    buf = bytearray(8 * MiB)
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            pos = 0
            while n := os.preadv(fd, [buf], pos):
                pos += n
        finally:
            os.close(fd)


def settle(folder: Path | None = None) -> int:
    """Write dirty pages back now, so that background writeback does not land inside a timed round.

    With a ``folder``, also wait until its filesystem has finished freeing what was deleted (XFS and
    btrfs do it in the background: sync until the free space stops changing) and return its free bytes.
    """
    os.sync()
    free = -1
    while folder is not None:
        time.sleep(0.2)
        os.sync()
        st = os.statvfs(folder)
        if st.f_bfree * st.f_frsize == free:
            break
        free = st.f_bfree * st.f_frsize
    return free


@dataclass(frozen=True)
class DenseImage:
    """A random backing file of SIZE bytes and a COW file with DIRTY_FRACTION of its 4 KiB blocks written."""

    backing: Path
    cow: Path
    header: ubdcow.CowHeader
    dirty_blocks: np.ndarray  # sorted 4 KiB block indices

    @property
    def size(self) -> int:
        return self.header.size

    @property
    def dirty_bytes(self) -> int:
        return len(self.dirty_blocks) * BLOCK


@pytest.fixture(scope="session")
def dense(bench_dir: Path) -> DenseImage:
    return build_dense(bench_dir)


def build_dense(folder: Path) -> DenseImage:
    """The dense image (same seed, same bytes wherever it is built) in ``folder``, written back and cached."""
    rng = np.random.default_rng(SEED)
    backing = folder / "dense-backing.img"
    cow = folder / "dense.cow"
    write_random_file(backing, SIZE, rng)
    nblocks = SIZE // BLOCK
    blocks = np.sort(rng.choice(nblocks, size=round(nblocks * DIRTY_FRACTION), replace=False))
    header = make_cow(cow, backing, blocks, rng)
    with ubdcow.open(cow, backing=backing) as img:
        assert img.count_cow_sectors() == len(blocks) * (BLOCK // SECTOR)
    settle()
    warm(backing, cow)
    return DenseImage(backing, cow, header, blocks)


@dataclass(frozen=True)
class SparseImage:
    """A SIZE-byte backing file with data in SPARSE_DATA_FRACTION of its 1 MiB regions (the rest holes),
    a COW file on it with FEW_DIRTY dirty 4 KiB blocks, and the same dirty blocks on the dense backing."""

    backing: Path
    cow: Path
    data_bytes: int
    dirty_blocks: np.ndarray
    dense_twin: Path  # COW file on the dense backing with the same dirty blocks
    dense_backing: Path

    @property
    def dirty_bytes(self) -> int:
        return len(self.dirty_blocks) * BLOCK


@pytest.fixture(scope="session")
def sparse(bench_dir: Path, dense: DenseImage) -> SparseImage:
    rng = np.random.default_rng(SEED + 1)
    backing = bench_dir / "sparse-backing.img"
    nregions = SIZE // SPARSE_REGION
    regions = np.sort(rng.choice(nregions, size=max(1, round(nregions * SPARSE_DATA_FRACTION)), replace=False))
    fd = os.open(backing, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, SIZE)
        for region in regions.tolist():
            os.pwrite(fd, rng.bytes(SPARSE_REGION), region * SPARSE_REGION)
    finally:
        os.close(fd)
    blocks = np.sort(rng.choice(SIZE // BLOCK, size=FEW_DIRTY, replace=False))
    cow = bench_dir / "sparse.cow"
    make_cow(cow, backing, blocks, rng)
    twin = bench_dir / "dense-few.cow"
    make_cow(twin, dense.backing, blocks, np.random.default_rng(SEED + 2))
    settle()
    warm(backing, cow, twin, dense.backing)
    return SparseImage(backing, cow, len(regions) * SPARSE_REGION, blocks, twin, dense.backing)


def files_equal(a: Path, b: Path, chunk: int = 8 * MiB) -> bool:
    """Byte-for-byte comparison of two files (sizes included)."""
    if os.path.getsize(a) != os.path.getsize(b):
        return False
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def equals_virtual_disk(path: Path, cow: Path, backing: Path, chunk: int = 8 * MiB) -> bool:
    """Whether a raw file holds exactly the virtual disk of ``cow`` as read through the engine."""
    with ubdcow.open(cow, backing=backing) as img, open(path, "rb", buffering=0) as f:
        if os.fstat(f.fileno()).st_size != img.size:
            return False
        pos = 0
        while pos < img.size:
            want = img.pread(chunk, pos)
            if f.read(len(want)) != want:
                return False
            pos += len(want)
    return True


def remove(*paths: Path) -> None:
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def uml_moo_path() -> str | None:
    path = shutil.which("uml_moo")
    if path is None and os.access("/usr/bin/uml_moo", os.X_OK):
        path = "/usr/bin/uml_moo"
    return path


def fs_type(path: str | Path) -> str:
    """The type of the filesystem holding ``path`` (``ext4``, ``xfs``, ...; ``?`` when findmnt cannot tell)."""
    try:
        cmd = ["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        lines = out.stdout.split()
        return lines[0] if lines else "?"
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _system_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in ("/usr/sbin", "/sbin") if os.access(f"{d}/{name}", os.X_OK)), None
    )


@contextmanager
def loop_filesystem(kind: str, folder: Path, size: int) -> Iterator[Path]:
    """A ``kind`` filesystem (``xfs`` with reflink=1, or ``btrfs``) on a loop device over a sparse file of
    ``size`` bytes in ``folder``, mounted; yields the mount point. Skips with a reason where that cannot
    be done (not root, tools missing, no free loop device, no kernel support, too little room); always
    unmounted, detached and removed on exit."""
    if os.geteuid() != 0:
        pytest.skip(f"a loop-mounted {kind} filesystem needs root")
    tools = {name: _system_tool(name) for name in ("losetup", "mount", "umount", f"mkfs.{kind}")}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (util-linux, xfsprogs, btrfs-progs)")
    if shutil.disk_usage(folder).free < size:
        pytest.skip(f"{folder} has less than {human(size)} free for the {kind} loop image")
    image, point = folder / f"{kind}.img", folder / f"{kind}-mnt"
    point.mkdir()
    with open(image, "wb") as f:
        f.truncate(size)

    def run(*cmd: str | Path | None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300)

    proc = run(tools["losetup"], "--find", "--show", image)
    device = proc.stdout.strip()
    mounted = False
    try:
        if proc.returncode != 0:
            pytest.skip(f"no loop device for the {kind} image: {proc.stderr.strip()}")
        proc = run(tools[f"mkfs.{kind}"], "-q", *(["-m", "reflink=1"] if kind == "xfs" else []), device)
        assert proc.returncode == 0, proc.stderr
        proc = run(tools["mount"], device, point)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount {kind}: {proc.stderr.strip()}")
        mounted = True
        yield point
    finally:
        if mounted and run(tools["umount"], point).returncode != 0:
            run(tools["umount"], "-l", point)
        if device:
            run(tools["losetup"], "-d", device)
        image.unlink()
        point.rmdir()


# -- the table ---------------------------------------------------------------


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables
def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not RESULTS.timings and not RESULTS.ratios:
        return
    tr = terminalreporter
    where = BENCH_DIR or tempfile.gettempdir()
    enforce = assert_targets_enabled(config)
    mode = "disabled (single smoke round)" if benchmarks_disabled(config) else f"enabled, {ROUNDS} rounds"
    tr.write_sep("=", "ubdcow benchmark ratios")
    tr.write_line(
        f"size {human(SIZE)} ({'full' if FULL else 'reduced'}), dir {where} ({fs_type(where)}), "
        f"benchmarks {mode}, ops/round {OPS}, load {os.getloadavg()[0]:.2f}"
    )
    tr.write_line(
        "timing targets: "
        + ("ASSERTED" if enforce else "recorded only (asserted at full size with --benchmark-enable)")
    )
    tr.write_line("")
    tr.write_line(f"{'timing (seconds per round)':<46} {'rounds':>6} {'min':>10} {'median':>10}")
    for key, times in RESULTS.timings.items():
        tr.write_line(f"{key:<46} {len(times):>6} {min(times):>10.4f} {statistics.median(times):>10.4f}")
    if RESULTS.ratios:
        tr.write_line("")
        tr.write_line(f"{'ratio':<58} {'value':>8} {'target':>9} {'status':<12} detail")
        for r in RESULTS.ratios:
            target = f"{r.op} {r.target:g}" if r.op is not None and r.target is not None else "-"
            if r.ok is None:
                status = "report"
            elif r.ok:
                status = "PASS"
            else:
                status = "MISS" if (enforce or r.always) else "miss (n/a)"
            tr.write_line(f"{r.label:<58} {r.value:>8.3f} {target:>9} {status:<12} {r.detail}")
    for note in RESULTS.notes:
        tr.write_line(f"note: {note}")


# -- the model root filesystem (issue 22 and later) --------------------------------------------------------

REPO = Path(__file__).parent.parent
#: git-ignored: the Debian tree made once by debootstrap, and peers installed for comparison only
CACHE = REPO / ".cache"
DEBIAN_TREE = CACHE / "debian-minbase"
SYNTHETIC_TREE = CACHE / "synthetic-root"


@dataclass(frozen=True)
class ModelImage:
    """An ext4 image (4 KiB blocks, ``mkfs.ext4 -d``) of a root filesystem tree, and where the tree came from."""

    image: Path
    tree: Path
    kind: str  # "debootstrap" (Debian bookworm minbase) or "synthetic" (the same shape)
    entries: int  # every entry below the root, as find counts them


def _debootstrap() -> Path | None:
    """``debootstrap --variant=minbase bookworm`` into the cache (root and the network needed), or None."""
    tool = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if os.path.exists("/usr/sbin/debootstrap") else None)
    if os.geteuid() != 0 or tool is None:
        return None
    scratch = CACHE / "debootstrap-tmp"
    shutil.rmtree(scratch, ignore_errors=True)
    CACHE.mkdir(exist_ok=True)
    proc = subprocess.run([tool, "--variant=minbase", "bookworm", str(scratch)], capture_output=True, timeout=1800)
    if proc.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        return None
    scratch.rename(DEBIAN_TREE)
    return DEBIAN_TREE


def _synthesize(folder: Path, seed: int = 22) -> Path:
    """A tree shaped like a Debian minbase root: 785 folders up to 8 deep, 5,300 files of a few KiB (a few
    of MiBs), 650 relative symlinks; deterministic."""
    rng = np.random.default_rng(seed)
    scratch = folder.with_name(folder.name + "-tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    dirs = [scratch]
    scratch.mkdir(parents=True)
    for i in range(784):
        parent = dirs[int(rng.integers(0, len(dirs)))] if i > 20 else scratch
        if len(parent.relative_to(scratch).parts) >= 8:
            parent = scratch
        child = parent / f"dir{i:03d}"
        child.mkdir()
        dirs.append(child)
    files = []
    for i in range(5300):
        path = dirs[int(rng.integers(0, len(dirs)))] / f"file{i:04d}.so"
        size = int(min(rng.lognormal(7.5, 1.8), 4 << 20))
        path.write_bytes(rng.bytes(size))
        files.append(path)
    for i in range(650):
        path = dirs[int(rng.integers(0, len(dirs)))] / f"link{i:03d}"
        os.symlink(os.path.relpath(files[int(rng.integers(0, len(files)))], path.parent), path)
    scratch.rename(folder)
    return folder


def model_tree() -> tuple[Path, str]:
    """The cached Debian tree (made by debootstrap the first time), else a synthesized one of the same shape."""
    if (DEBIAN_TREE / "etc" / "debian_version").exists():
        return DEBIAN_TREE, "debootstrap"
    if os.environ.get("UBDCOW_BENCH_NO_DEBOOTSTRAP") != "1" and _debootstrap() is not None:
        return DEBIAN_TREE, "debootstrap"
    if not SYNTHETIC_TREE.exists():
        _synthesize(SYNTHETIC_TREE)
    return SYNTHETIC_TREE, "synthetic"


@pytest.fixture(scope="session")
def model_image(bench_dir: Path) -> ModelImage:
    """The model root filesystem as a 2 GiB ext4 image (sparse), made once per session."""
    mkfs = _system_tool("mkfs.ext4")
    if mkfs is None:
        pytest.skip("mkfs.ext4 is not installed (e2fsprogs)")
    tree, kind = model_tree()
    image = bench_dir / "model.img"
    proc = subprocess.run([mkfs, "-q", "-F", "-d", str(tree), str(image), "2G"], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    entries = sum(len(d) + len(f) for _, d, f in os.walk(tree))
    settle()
    warm(image)
    return ModelImage(image, tree, kind, entries)
