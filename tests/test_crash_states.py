"""Crash states beyond kill -9: what a power loss can leave of a workload's writes to a COW file.

In the spirit of ALICE (Pillai et al., "All File Systems Are Not Created Equal", OSDI 2014): while a
workload runs, every call that changes the COW file is recorded (``pwrite``/``pwritev``, hole punches
through ``fallocate``, ``ftruncate``, ``fsync``/``fdatasync``; any other way of writing it fails the
test), and replaying the record onto the file as it was before the workload must give the file as it is
after it. The record then yields the file states a crash could leave, under three models:

* **ordered**: the calls reach the disk in the order they were made. A crash keeps every call before
  the one in flight and, of that one, any first part of its 4 KiB file pages (a torn call). Every such
  state is built (every prefix of the sequence of page pieces).
* **call subsets**: everything up to the last completed fsync, then any subset of the calls made after
  it (applied in their order, each whole): the brief's "the page cache may write back in any order".
* **page versions**: everything up to the last completed fsync, then each 4 KiB page of the file (and
  its size) independently holds any content it had since: at the fsync or after any later call. This is
  what write-back really does (whole pages, each at some moment, in any order); it includes torn calls.

The subset models are enumerated whole when small and sampled (seeded) when not; every crash moment
(after each call) is covered.

On every state: ``ubdcow.check`` reports no error and no mixed page the file did not have before the
workload; ubdcow reads the same disk as an independent reader (bitmap and data area decoded from the
spec, plain bytes); and each unit (a 4 KiB page of the disk where the data area is page-aligned, v3;
else a sector) reads one of the contents the workload gave it between the last fsync and the crash --
so a unit untouched since the last ``flush()`` reads exactly what it held then. The write path keeps
that rule in the ordered model; in the subset models it cannot, because no fsync separates a write's
data from its bits (the kernel's driver has none either): there the test asserts the exact exposure
docs/reliability.md documents -- a unit whose bits were clear at the last fsync may read what the data
area held there at that fsync (zeros, or data whose bits never reached the disk) -- and that nothing
else ever appears. ``check --repair`` and ``compact`` fsync between data and bits and must keep the
strict rule in every model.
"""

from __future__ import annotations

import importlib
import itertools
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_compact import build as build_compact_lab
from test_oracle_model import decode

import ubdcow
import ubdcow._io as uio
from ubdcow.check import EXIT_CLEAN
from ubdcow.format import CowHeader, read_header

SECTOR = 512
PAGE = 4096
#: per workload and subset model: states built at most (sampled, seeded, spread over the crash moments)
SAMPLES = int(os.environ.get("UBDCOW_CRASH_STATES", "1000"))
_compact = importlib.import_module("ubdcow.compact")
_pagewrite = importlib.import_module("ubdcow._pagewrite")


# -- recording ------------------------------------------------------------------------------------


@dataclass
class Call:
    """One recorded change to the COW file: ``kind`` is write, punch, truncate or fsync."""

    kind: str
    offset: int = 0
    length: int = 0
    data: bytes = b""
    op: int = 0  # the workload operation it belongs to


class Recorder:
    """Wraps the system calls that can change a file; records those that change one file."""

    def __init__(self, path: Path) -> None:
        st = os.stat(path)
        self.key = (st.st_dev, st.st_ino)
        self.path = str(path)
        self.calls: list[Call] = []
        self.op = 0

    def mine(self, fd: int) -> bool:
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.key

    def add(self, kind: str, **kw: object) -> None:
        self.calls.append(Call(kind, op=self.op, **kw))  # type: ignore[arg-type]

    @contextmanager
    def recording(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
        real = {name: getattr(os, name) for name in
                ("pwrite", "pwritev", "ftruncate", "truncate", "fsync", "fdatasync", "write", "writev",
                 "posix_fallocate", "copy_file_range", "sendfile")}
        rec = self

        def pwrite(fd, data, offset):
            n = real["pwrite"](fd, data, offset)
            if rec.mine(fd):
                rec.add("write", offset=offset, data=bytes(memoryview(data).cast("B")[:n]))
            return n

        def pwritev(fd, buffers, offset, *flags):
            n = real["pwritev"](fd, buffers, offset, *flags)
            if rec.mine(fd):
                joined = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
                rec.add("write", offset=offset, data=joined[:n])
            return n

        def ftruncate(fd, length):
            real["ftruncate"](fd, length)
            if rec.mine(fd):
                rec.add("truncate", length=length)

        def fsync(fd):
            real["fsync"](fd)
            if rec.mine(fd):
                rec.add("fsync")

        def fdatasync(fd):
            real["fdatasync"](fd)
            if rec.mine(fd):
                rec.add("fsync")

        def refuse(name):
            def call(fd, *args, **kw):
                if isinstance(fd, int) and rec.mine(fd):
                    raise AssertionError(f"the workload changed the COW file with os.{name}: not modelled")
                if name == "truncate" and os.path.exists(fd) and rec.mine_path(fd):
                    raise AssertionError("the workload truncated the COW file by name: not modelled")
                return real[name](fd, *args, **kw)
            return call

        def copy_file_range(src, dst, *args, **kw):
            if rec.mine(dst):
                raise AssertionError("the workload copied into the COW file: not modelled")
            return real["copy_file_range"](src, dst, *args, **kw)

        libc = uio._c()

        class Libc:
            def fallocate(self, fd, mode, offset, length):
                rc = libc.fallocate(fd, mode, offset, length)
                if rc == 0 and rec.mine(fd):
                    if mode != uio.FALLOC_FL_PUNCH_HOLE | uio.FALLOC_FL_KEEP_SIZE:
                        raise AssertionError(f"fallocate mode {mode:#x} on the COW file: not modelled")
                    rec.add("punch", offset=offset, length=length)
                return rc

            def __getattr__(self, name):
                return getattr(libc, name)

        wrapped = Libc()
        with monkeypatch.context() as m:
            for name, fn in (("pwrite", pwrite), ("pwritev", pwritev), ("ftruncate", ftruncate),
                             ("fsync", fsync), ("fdatasync", fdatasync), ("copy_file_range", copy_file_range)):
                m.setattr(os, name, fn)
            for name in ("write", "writev", "posix_fallocate", "sendfile", "truncate"):
                m.setattr(os, name, refuse(name))
            m.setattr(uio, "_c", lambda: wrapped)
            yield self

    def mine_path(self, path: object) -> bool:
        try:
            st = os.stat(path)  # type: ignore[arg-type]
        except (OSError, TypeError, ValueError):
            return False
        return (st.st_dev, st.st_ino) == self.key


def apply(buf: bytearray, call: Call) -> tuple[int, int]:
    """Apply a call to a file's bytes; the file pages [first, last) it touched."""
    if call.kind == "write":
        end = call.offset + len(call.data)
        if end > len(buf):
            buf.extend(bytes(end - len(buf)))
        buf[call.offset:end] = call.data
        return call.offset // PAGE, -(-end // PAGE)
    if call.kind == "punch":  # KEEP_SIZE: only inside the file
        a, b = call.offset, min(call.offset + call.length, len(buf))
        if a < b:
            buf[a:b] = bytes(b - a)
        return a // PAGE, -(-b // PAGE) if a < b else a // PAGE
    if call.kind == "truncate":
        old = len(buf)
        if call.length < old:
            del buf[call.length:]
        else:
            buf.extend(bytes(call.length - old))
        lo, hi = sorted((old, call.length))
        return lo // PAGE, -(-hi // PAGE)
    return 0, 0  # fsync


# -- the file's history and its crash states ------------------------------------------------------


@dataclass
class History:
    """The COW file before the workload and after each recorded call, page by page."""

    pre: bytes
    calls: list[Call]
    versions: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)  # page -> [(t, content)]
    sizes: list[int] = field(default_factory=list)  # size after t calls
    final: bytes = b""

    def __post_init__(self) -> None:
        buf = bytearray(self.pre)
        self.sizes = [len(buf)]
        for t, call in enumerate(self.calls, 1):
            first, last = apply(buf, call)
            for p in range(first, last):
                self.versions.setdefault(p, []).append((t, bytes(buf[p * PAGE:(p + 1) * PAGE])))
            self.sizes.append(len(buf))
        self.final = bytes(buf)

    def page(self, p: int, t: int) -> bytes:
        """Page ``p`` after ``t`` calls."""
        content = self.pre[p * PAGE:(p + 1) * PAGE]
        for when, data in self.versions.get(p, []):
            if when > t:
                break
            content = data
        return content

    def page_choices(self, p: int, since: int, until: int) -> list[bytes]:
        """The contents page ``p`` had from ``since`` calls to ``until`` calls (the one at ``since`` first)."""
        choices = [self.page(p, since)]
        choices += [data for when, data in self.versions.get(p, []) if since < when <= until]
        return choices

    def fsyncs(self) -> list[int]:
        """Numbers of calls done when each fsync completed (0: the file as it was, durable)."""
        return [0] + [t for t, c in enumerate(self.calls, 1) if c.kind == "fsync"]

    def assemble(self, size: int, pages: dict[int, bytes], base_t: int) -> bytes:
        """A file of ``size`` bytes: ``pages`` where given, else each page as after ``base_t`` calls."""
        npages = -(-size // PAGE)
        parts = []
        for p in range(npages):
            data = pages.get(p)
            parts.append(self.page(p, base_t) if data is None else data)
        out = b"".join(part.ljust(PAGE, b"\0") for part in parts)
        return out[:size].ljust(size, b"\0")


@dataclass
class State:
    """A crash state: the file's bytes, and the moment of the crash (calls issued; the last fsync)."""

    data: bytes
    crash: int  # calls issued before the crash
    durable: int  # calls done at the last completed fsync (everything up to it is on disk)


def ordered_states(h: History) -> Iterator[State]:
    """Every prefix of the calls, the call in flight torn after any of its pages (in order)."""
    buf = bytearray(h.pre)
    durable = 0
    yield State(bytes(buf), 0, 0)
    for t, call in enumerate(h.calls, 1):
        before = bytes(buf)
        first, last = apply(buf, call)
        if call.kind == "write" and last - first > 1:
            for k in range(1, last - first):  # the first k pages of the call landed
                torn = bytearray(before.ljust(len(buf), b"\0"))
                a, b = first * PAGE, (first + k) * PAGE
                torn[a:b] = buf[a:b]
                yield State(bytes(torn[:len(buf)]), t, durable)
        if call.kind == "fsync":
            durable = t
        yield State(bytes(buf), t, durable)


def _epochs(h: History) -> Iterator[tuple[int, int]]:
    """``(durable, crash)``: every crash moment, after ``crash`` calls, with the last fsync done then."""
    fsyncs = h.fsyncs()
    for i, start in enumerate(fsyncs):
        end = fsyncs[i + 1] - 1 if i + 1 < len(fsyncs) else len(h.calls)  # the next fsync had not returned
        for crash in range(start, end + 1):
            yield start, crash


def subset_states(h: History, rng: random.Random, budget: int) -> Iterator[State]:
    """Everything up to the last fsync, then any subset of the later calls (in order, each whole)."""
    moments = list(_epochs(h))
    per = max(2, budget // max(1, len(moments)))
    for durable, crash in moments:
        later = [c for c in h.calls[durable:crash] if c.kind != "fsync"]
        if 2 ** len(later) <= per:
            masks = list(itertools.product((False, True), repeat=len(later)))
        else:
            masks = [tuple([False] * len(later)), tuple([True] * len(later))]
            masks += [tuple(rng.random() < 0.5 for _ in later) for _ in range(per - 2)]
        base = bytearray(h.pre)
        for call in h.calls[:durable]:
            apply(base, call)
        for mask in masks:
            buf = bytearray(base)
            for call, keep in zip(later, mask, strict=True):
                if keep:
                    apply(buf, call)
            yield State(bytes(buf), crash, durable)


def page_states(h: History, rng: random.Random, budget: int) -> Iterator[State]:
    """Everything up to the last fsync, then each page (and the size) any content it had since."""
    moments = list(_epochs(h))
    per = max(2, budget // max(1, len(moments)))
    for durable, crash in moments:
        touched = sorted({p for p, vs in h.versions.items() for when, _ in vs if durable < when <= crash})
        choices = {p: h.page_choices(p, durable, crash) for p in touched}
        sizes = sorted(set(h.sizes[durable:crash + 1]))
        combos = len(sizes)
        for p in touched:
            combos *= len(choices[p])
        if combos <= per:
            picks = itertools.product(sizes, *(range(len(choices[p])) for p in touched))
        else:
            corners = [(h.sizes[durable], *[0] * len(touched)),
                       (h.sizes[crash], *[len(choices[p]) - 1 for p in touched])]
            randoms = [(rng.choice(sizes), *[rng.randrange(len(choices[p])) for p in touched])
                       for _ in range(per - 2)]
            picks = iter(corners + randoms)
        for size, *which in picks:
            pages = {p: choices[p][i] for p, i in zip(touched, which, strict=True)}
            yield State(h.assemble(size, pages, durable), crash, durable)


# -- what a state must read -----------------------------------------------------------------------


@dataclass
class Workload:
    """A COW file, its backing file, what the disk reads after each operation (an independent model),
    and the record of the calls the operations made."""

    name: str
    cow: Path
    backing: Path
    header: CowHeader
    backing_bytes: bytes
    pre: bytes
    logical: list[bytes]  # logical[m + 1]: the disk after operation m (logical[0]: before the workload)
    history: History
    unit: int  # PAGE where the data area is page-aligned (a disk page is one file page), else SECTOR
    pre_mixed: set[int] = field(default_factory=set)
    pre_codes: set[str] = field(default_factory=set)


@dataclass
class Tally:
    states: int = 0
    exposed_states: int = 0  # states where some unit read its data area's old content (the exposure)
    exposed_units: int = 0
    seen: set[int] = field(default_factory=set)
    files: set[int] = field(default_factory=set)  # distinct file contents among the states


def check_state(w: Workload, state: State, scratch: Path, tally: Tally, *, strict: bool) -> None:
    """The checks of the module's docstring on one crash state (duplicates are checked once)."""
    key = hash(state.data) ^ hash((state.crash, state.durable))
    if key in tally.seen:
        return
    tally.seen.add(key)
    tally.files.add(hash(state.data))
    tally.states += 1
    hd, calls = w.header, w.history.calls
    where = f"{w.name}: crash after {state.crash} calls (last fsync after {state.durable})"
    scratch.write_bytes(state.data)
    disk, bits, mixed = decode(state.data, w.backing_bytes)
    report = ubdcow.check(scratch, backing=w.backing)
    errors = [f for f in report.findings if f.severity == "error" or f.code not in w.pre_codes | {"mixed-pages"}]
    assert report.exit_code == EXIT_CLEAN and not errors, (where, report.as_dict())
    assert mixed <= w.pre_mixed, (where, "new mixed pages", sorted(mixed - w.pre_mixed))
    with ubdcow.open(scratch, backing=w.backing) as img:
        assert img.read() == disk, (where, "ubdcow reads another disk than the bytes define")
    # the operations whose results may show: from the one the last fsync was in, to the one in flight
    first_op = calls[state.durable - 1].op if state.durable else 0
    last_op = calls[state.crash - 1].op if state.crash else 0
    allowed = w.logical[first_op:last_op + 2]  # logical[m] is the disk before operation m
    synced = w.history.assemble(w.history.sizes[state.durable], {}, state.durable)
    exposed = 0
    for a in range(0, hd.size, w.unit):
        b = min(a + w.unit, hd.size)
        got = disk[a:b]
        if any(got == content[a:b] for content in allowed):
            continue
        # not one of the workload's contents: only the documented exposure may explain it
        sectors = range(a // SECTOR, -(-b // SECTOR))
        at_fsync = synced[hd.data_offset + a:hd.data_offset + b].ljust(b - a, b"\0")
        synced_bits = [synced[hd.bitmap_offset + s // 8] >> (s % 8) & 1 for s in sectors]
        detail = (where, f"bytes {a}-{b - 1} read neither a content the workload gave them nor the exposure")
        assert not strict, (*detail, "(strict model)")
        assert got == at_fsync and not any(synced_bits) and all(bits[s] for s in sectors), detail
        exposed += 1
    if exposed:
        tally.exposed_states += 1
        tally.exposed_units += exposed


# -- workloads ------------------------------------------------------------------------------------


def _lab(tmp: Path, layout: str, size: int, seed: int) -> tuple[Path, Path, bytes]:
    rng = random.Random(seed)
    backing = tmp / "backing.img"
    data = bytes(b | 1 for b in rng.randbytes(size))  # no zero byte: a zeroed sector is never backing data
    backing.write_bytes(data)
    cow = tmp / "overlay.cow"
    ubdcow.create(cow, backing, layout=layout)
    return cow, backing, data


def _prepare(cow: Path, rng: random.Random, size: int, unrecorded: int = 3) -> None:
    """Before the workload: some pages written (COW), and data under clear bits in a few others (a write
    whose bits never landed, e.g. after an earlier crash): what the exposure can show."""
    with ubdcow.open(cow, "r+") as img:
        for _ in range(6):
            off = rng.randrange(size - 2 * PAGE)
            img.pwrite(rng.randbytes(rng.randint(1, 2 * PAGE)), off)
    hd = read_header(cow)
    raw = cow.read_bytes()
    clear = [p for p in range(size // PAGE) if raw[hd.bitmap_offset + p] == 0]
    with open(cow, "r+b") as f:
        for p in rng.sample(clear, unrecorded):
            f.seek(hd.data_offset + p * PAGE)
            f.write(bytes(b | 0x80 for b in rng.randbytes(PAGE)))
        os.fsync(f.fileno())


Op = tuple  # ("pwrite", offset, data) | ("zero", offset, length) | ("discard", ...) | ("flush",) | ...


def run_workload(name: str, cow: Path, backing: Path, backing_bytes: bytes, ops: list[Op],
                 monkeypatch: pytest.MonkeyPatch) -> Workload:
    """Run ``ops`` (through the public API) while recording; model what the disk reads after each."""
    hd = read_header(cow)
    pre = cow.read_bytes()
    disk, _, pre_mixed = decode(pre, backing_bytes)
    logical = [disk]
    model = bytearray(disk)
    pre_codes = {f.code for f in ubdcow.check(cow, backing=backing).findings}
    rec = Recorder(cow)
    image_ops = {"pwrite", "zero", "discard", "flush"}
    with rec.recording(monkeypatch):
        img = ubdcow.open(cow, "r+") if any(op[0] in image_ops for op in ops) else None
        for m, op in enumerate(ops):
            rec.op = m
            kind = op[0]
            if kind == "pwrite":
                img.pwrite(op[2], op[1])
                model[op[1]:op[1] + len(op[2])] = op[2]
            elif kind in ("zero", "discard"):
                (img.write_zeroes if kind == "zero" else img.discard)(op[1], op[2])
                model[op[1]:op[1] + op[2]] = bytes(op[2])
            elif kind == "flush":
                img.flush()
            elif kind == "close":
                img.close()
            elif kind == "repair":
                report = ubdcow.check(cow, backing=backing, repair=True)
                assert report.repaired_pages == len(pre_mixed) and report.mixed_pages == 0, report.as_dict()
            elif kind == "compact":
                ubdcow.compact(cow, backing=backing)
            logical.append(bytes(model))
        assert img is None or img.closed, "a workload on an image ends with close"
    history = History(pre, rec.calls)
    after = cow.read_bytes()
    assert history.final == after, f"{name}: replaying the record does not give the file: a call was missed"
    with ubdcow.open(cow, backing=backing) as img:
        assert img.read() == bytes(model), f"{name}: the workload did not leave the disk the model expects"
    unit = PAGE if hd.data_offset % PAGE == 0 else SECTOR
    return Workload(name, cow, backing, hd, backing_bytes, pre, logical, history, unit, pre_mixed, pre_codes)


def _writes(rng: random.Random, size: int, partial: bool) -> list[Op]:
    """A schedule of writes with a flush now and then, ending in close."""
    ops: list[Op] = []
    for i in range(14):
        if partial:
            length = rng.choice([1, 100, SECTOR - 3, SECTOR + 7, PAGE - 1, PAGE + 700, 3 * PAGE + 5])
            off = rng.randrange(size - length + 1) if i != 5 else size - length  # once: to the end
        else:
            length = rng.choice([SECTOR, 2 * SECTOR, PAGE, 2 * PAGE, 3 * PAGE])
            off = rng.randrange((size - length) // SECTOR + 1) * SECTOR
            if i % 2:
                off = off // PAGE * PAGE
        ops.append(("pwrite", off, bytes(b | 1 for b in rng.randbytes(length))))
        if i % 4 == 3:
            ops.append(("flush",))
    return [*ops, ("close",)]


def _zeroing(rng: random.Random, size: int, kind: str) -> list[Op]:
    ops: list[Op] = []
    for i in range(10):
        length = rng.choice([SECTOR, PAGE, PAGE + 3 * SECTOR, 3 * PAGE, 5 * PAGE - 2 * SECTOR, 9 * PAGE])
        off = rng.randrange((size - length) // SECTOR + 1) * SECTOR
        if i == 4:
            off, length = size - length, length  # to the end of the disk (its partial last page)
        ops.append((kind, off, min(length, size - off)))
        if i % 3 == 2:
            ops.append(("flush",))
    return [*ops, ("close",)]


def workload(name: str, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Workload:
    seed = sum(map(ord, name))
    rng = random.Random(seed)
    if name == "check --repair":
        return _repair_workload(tmp, rng, monkeypatch)
    if name == "compact":
        return _compact_workload(tmp, monkeypatch)
    kind, layout = name.split("/")
    size = (64 << 12) + 1000 if layout == "v3" else 65 << 12  # v3: a partial last page and sector
    cow, backing, data = _lab(tmp, layout, size, seed)
    assert read_header(cow).mapped_sectors == read_header(cow).sectors
    _prepare(cow, rng, size)
    if kind in ("pwrite-aligned", "pwrite-partial"):
        ops = _writes(rng, size, partial=kind == "pwrite-partial")
    else:
        ops = _zeroing(rng, size, "zero" if kind == "write_zeroes" else "discard")
    return run_workload(name, cow, backing, data, ops, monkeypatch)


def _repair_workload(tmp: Path, rng: random.Random, monkeypatch: pytest.MonkeyPatch) -> Workload:
    """Mixed pages made by hand (data, then a few bits of a page), made whole by ``check --repair``,
    two pages per batch (several fsyncs)."""
    size = 64 << 12
    cow, backing, data = _lab(tmp, "v3", size, 99)
    _prepare(cow, rng, size)
    hd = read_header(cow)
    raw = bytearray(cow.read_bytes())
    clear = [p for p in range(size // PAGE) if raw[hd.bitmap_offset + p] == 0]
    for p in rng.sample(clear, 7):
        bits = rng.randrange(1, 255)
        for s in range(8):
            if bits >> s & 1:
                at = hd.data_offset + (8 * p + s) * SECTOR
                raw[at:at + SECTOR] = bytes(b | 2 for b in rng.randbytes(SECTOR))
        raw[hd.bitmap_offset + p] = bits
    cow.write_bytes(raw)
    monkeypatch.setattr(_pagewrite, "_FILL_BATCH", 2)
    w = run_workload("check --repair", cow, backing, data, [("repair",)], monkeypatch)
    assert len(w.pre_mixed) >= 5
    return w


def _compact_workload(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Workload:
    """Every kind of page compact handles (tests/test_compact.py's lab), a few pages per commit."""
    lab = build_compact_lab(tmp / "lab", size=(48 << 12) + 3 * SECTOR, seed=5, per_kind=2)
    monkeypatch.setattr(_compact, "_BATCH", 2)
    data = lab.backing.read_bytes()
    return run_workload("compact", lab.cow, lab.backing, data, [("compact",)], monkeypatch)


# -- the tests ------------------------------------------------------------------------------------

WORKLOADS = ["pwrite-aligned/v3", "pwrite-partial/v3", "pwrite-partial/v2", "discard/v3", "write_zeroes/v3",
             "write_zeroes/v2", "check --repair", "compact"]
#: workloads that fsync between data and bits: the strict rule holds in every model
FSYNCED = {"check --repair", "compact"}
MODELS: dict[str, Callable[..., Iterator[State]]] = {
    "ordered": lambda h, rng, budget: ordered_states(h),
    "call subsets": subset_states,
    "page versions": page_states,
}


@pytest.mark.parametrize("name", WORKLOADS)
def test_crash_states(name, tmp_path, monkeypatch):
    w = workload(name, tmp_path, monkeypatch)
    scratch = tmp_path / "state.cow"
    calls = w.history.calls
    counts = {}
    for model, states in MODELS.items():
        tally = Tally()
        rng = random.Random(f"{name}/{model}")
        strict = model == "ordered" or name in FSYNCED
        for state in states(w.history, rng, SAMPLES):
            check_state(w, state, scratch, tally, strict=strict)
        counts[model] = tally
    summary = ", ".join(f"{m}: {t.states} states, {len(t.files)} distinct files, {t.exposed_states} exposing "
                        f"{t.exposed_units} units" for m, t in counts.items())
    kinds = {k: sum(c.kind == k for c in calls) for k in ("write", "punch", "truncate", "fsync")}
    print(f"OBSERVED {name}: {len(calls)} calls {kinds}; {summary}")
    assert kinds["fsync"] >= 2 and counts["ordered"].states > len(calls) // 2, (kinds, summary)
    if name not in FSYNCED and name.startswith("pwrite"):
        # the exposure is real (the test can see it): bits reached the disk without their data
        assert counts["page versions"].exposed_states > 0, summary
