"""An nbdkit Python plugin serving the virtual disk of a COW file over NBD.

Load it with nbdkit (``ubdcow serve`` does this for you)::

    nbdkit python /path/to/ubdcow/nbd.py cow=overlay.cow [backing=PATH] [writable=1] [force=1] [lock=0]
        [backing-holes=1]

nbdkit runs this file as a script in its embedded Python, so it imports the
package absolutely (``ubdcow`` must be importable: ``serve`` passes its own
``sys.path`` as ``PYTHONPATH``; the folder above this file is added too).
One :class:`Export` (one :class:`~ubdcow.image.CowImage`, its locks held)
serves every connection for the server's lifetime. The image's lock lets
reads from several connections run side by side, and writes, flushes and
closing run alone; each connection's requests are taken one at a time (see
:func:`thread_model`).
"""

from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

if __name__ != "ubdcow.nbd":  # loaded by nbdkit as a script: make the package importable
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from ubdcow.errors import (
    ImageIOError,
    ImageRangeError,
    UbdCowError,
    UnrecordableWriteError,
)
from ubdcow.format import PAGE_SIZE
from ubdcow.image import CowImage

try:
    import nbdkit  # type: ignore[import-not-found]  # only inside nbdkit
except ImportError:  # imported as ubdcow.nbd (tests, docs): no server around
    nbdkit = None

API_VERSION = 2

# nbdkit's constants (plugin API 2), fixed by its ABI; named here so the module imports without nbdkit
FLAG_FUA = 2
FLAG_REQ_ONE = 4
FLAG_FAST_ZERO = 8
EXTENT_HOLE = 1
EXTENT_ZERO = 2
ZERO = EXTENT_HOLE | EXTENT_ZERO
FUA_EMULATE = 1
THREAD_MODEL_SERIALIZE_REQUESTS = 2
PAGE = PAGE_SIZE
#: the most of the disk one extents request looks at (256 MiB: 64 KiB of bitmap)
EXTENTS_SCAN = 256 << 20

#: one extent: (offset, length, nbdkit extent type)
ExtentTuple = tuple[int, int, int]


class NotFastError(UbdCowError):
    """A fast zero was asked for a range that needs reading and writing (a partial 4 KiB page)."""


def errno_of(exc: BaseException) -> int:
    """The errno an NBD client should see for ``exc``."""
    if isinstance(exc, ImageRangeError):
        return errno.EINVAL
    if isinstance(exc, NotFastError):
        return errno.ENOTSUP
    if isinstance(exc, UnrecordableWriteError):
        return errno.ENOSPC
    if isinstance(exc, ImageIOError) and exc.errno:
        return exc.errno
    if isinstance(exc, io.UnsupportedOperation):
        return errno.EROFS
    return errno.EIO


def parse_bool(key: str, value: str) -> bool:
    """``1/0``, ``true/false``, ``yes/no``, ``on/off`` (as nbdkit's own boolean parameters)."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key}={value}: expected a boolean (1/0, true/false, yes/no, on/off)")


class Export:
    """The served disk: NBD requests mapped onto one open :class:`CowImage`."""

    def __init__(self, img: CowImage, *, backing_holes: bool = False) -> None:
        self.img = img
        #: report the backing file's data as holes (unallocated, not zero), for ``qemu-img convert -B``
        self.backing_kind = EXTENT_HOLE if backing_holes else 0
        # nbdkit extent type by source_runs' source: backing data, COW data, zeros
        self._kinds = np.array([self.backing_kind, 0, ZERO], dtype=np.int64)
        self.size = img.size
        self.writable = img.mode == "r+"

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill ``buf`` from ``offset`` (nbdkit has checked the range against the size)."""
        got = self.img.preadinto(buf, offset)
        if got != len(buf):
            raise ImageRangeError(self.img.name, f"read of {len(buf)} bytes at {offset} past the end ({self.size})")

    def pwrite(self, buf: memoryview | bytes, offset: int, fua: bool = False) -> None:
        """Write ``buf`` at ``offset`` (whole pages, data before bits); ``fua``: durable on return."""
        self.img.pwrite(buf, offset)
        if fua:
            self.img.flush()

    def flush(self) -> None:
        """fsync the COW file: data and bitmap."""
        self.img.flush()

    def zero(self, count: int, offset: int, fast: bool = False, fua: bool = False) -> None:
        """Make a range read as zeros; ``fast``: refuse (ENOTSUP) when partial pages need a read-modify-write."""
        if fast and not self._whole_pages(offset, count):
            raise NotFastError(self.img.name, f"zeroing {count} bytes at {offset} is not whole 4 KiB pages")
        self.img.write_zeroes(offset, count)
        if fua:
            self.img.flush()

    def trim(self, count: int, offset: int, fua: bool = False) -> None:
        """Discard a range: as with the ubd driver, it reads as zeros afterwards."""
        self.img.discard(offset, count)
        if fua:
            self.img.flush()

    def _whole_pages(self, offset: int, count: int) -> bool:
        end = offset + count
        return offset % PAGE == 0 and (end % PAGE == 0 or end == self.size)

    def extents(self, count: int, offset: int, req_one: bool = False) -> list[ExtentTuple]:
        """Extents of [offset, offset+count), as the ubd driver reads them.

        hole|zero where the disk reads as zeros without data (set bits over a
        hole in the data area, clear bits over a hole or past the end of the
        backing file); data everywhere else — except that with
        ``backing_holes`` the backing file's data is reported as a hole
        without zero (unallocated, as in a qcow2 overlay): ``qemu-img convert
        -B`` then leaves it to the backing file, but qemu's other tools
        (``compare``, ``map``) take such holes for zeros.
        """
        # The protocol lets a reply cover less than asked; a bounded scan keeps a client that walks the disk
        # one request at a time (qemu-img) linear instead of rescanning the rest of the bitmap each time.
        starts, ends, sources = self.img.source_runs(offset, min(count, EXTENTS_SCAN))
        if starts.size == 0:
            return []
        kinds = self._kinds[sources]
        change = np.flatnonzero(kinds[1:] != kinds[:-1]) + 1
        first = np.concatenate(([0], change))
        last = np.concatenate((change - 1, [starts.size - 1]))
        if req_one:  # one extent, as long as its kind lasts (COW and backing data merge)
            first, last = first[:1], last[:1]
        lo = starts[first]
        return list(zip(lo.tolist(), (ends[last] - lo).tolist(), kinds[first].tolist(), strict=True))

    def close(self) -> None:
        """Flush and close the image, releasing its locks."""
        self.img.close()


# -- the nbdkit plugin ------------------------------------------------------------------------------

KEYS = ("cow", "backing", "writable", "force", "lock", "backing-holes")
_config: dict[str, str] = {}
_export: Export | None = None
F = TypeVar("F", bound=Callable[..., Any])


def _reported(fn: F) -> F:
    """Report ubdcow's errors to the client as an errno (the server keeps serving)."""

    def wrapper(*args: Any) -> Any:
        try:
            return fn(*args)
        except (UbdCowError, OSError) as exc:  # io.UnsupportedOperation is an OSError
            if nbdkit is not None:
                code = exc.errno if isinstance(exc, OSError) and exc.errno else errno_of(exc)
                nbdkit.set_error(code)
            raise

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper  # type: ignore[return-value]


def _brief_request_errors() -> None:
    """Make nbdkit log a failed request in one line, not a traceback, when the failure is ours to report.

    nbdkit's Python plugin logs every exception a callback raises through
    :func:`traceback.format_exception`; for a request the disk refused (a
    range, an I/O error) the client already has its errno, and a traceback
    would read like a crash. Unexpected exceptions (bugs) keep theirs.
    """
    import traceback

    full = traceback.format_exception

    def brief(exc: Any, value: Any = None, tb: Any = None, *args: Any, **kwargs: Any) -> list[str]:
        error = value if isinstance(exc, type) else exc
        if isinstance(error, (UbdCowError, OSError)):
            return [f"ubdcow: {error}"]
        return full(exc, value, tb, *args, **kwargs)

    traceback.format_exception = brief  # type: ignore[assignment]


if nbdkit is not None:  # only in nbdkit's embedded interpreter, which serves nothing else
    _brief_request_errors()


def open_export(config: dict[str, str]) -> Export:
    """Open the export ``config`` (the plugin's key=value parameters) describes."""
    if "cow" not in config:
        raise ValueError("missing cow=PATH (the COW file to serve)")
    writable = parse_bool("writable", config.get("writable", "0"))
    force = parse_bool("force", config.get("force", "0"))
    lock = parse_bool("lock", config.get("lock", "1"))
    holes = parse_bool("backing-holes", config.get("backing-holes", "0"))
    img = CowImage(
        config["cow"], "r+" if writable else "r", backing=config.get("backing"), check_backing=not force, lock=lock
    )
    return Export(img, backing_holes=holes)


def config(key: str, value: str) -> None:
    """nbdkit: one ``key=value`` parameter."""
    try:
        if key not in KEYS:
            raise ValueError(f"unknown parameter {key}= (known: {', '.join(KEYS)})")
        if key not in ("cow", "backing"):
            parse_bool(key, value)
    except ValueError as exc:
        _fail(exc)
    _config[key] = value


def config_complete() -> None:
    """nbdkit: check the COW file can be served before the server starts (and fail with one line if not)."""
    try:
        open_export(_config).close()
    except (UbdCowError, ValueError) as exc:
        _fail(exc)


def _fail(exc: Exception) -> None:
    """One line (and the hint, if any) on stderr, then exit 1: the server has not started, nothing to clean up."""
    hint = getattr(exc, "hint", None)
    print(f"ubdcow: {exc}" + (f"\nhint: {hint}" if hint else ""), file=sys.stderr, flush=True)
    os._exit(1)  # no traceback: nbdkit would print one for an exception


config_help = (
    "cow=PATH       (required) the COW file to serve\n"
    "backing=PATH   use PATH as the backing file (only read)\n"
    "writable=1     allow writes (default: read-only)\n"
    "force=1        serve even if the backing file's size or mtime do not match\n"
    "lock=0         DANGEROUS: do not take the locks that keep a running guest out\n"
    "backing-holes=1  report the backing file's data as unallocated holes (for qemu-img convert -B)"
)


def thread_model() -> int:
    """nbdkit: one request at a time per connection; connections run in parallel (multi-conn).

    The image's lock lets reads run side by side and writes alone, so the
    parallel model would be safe too, but under Python's global interpreter
    lock nbdkit's 16 threads per connection spend more in lock hand-offs than
    they gain: serving from the page cache, ``nbdcopy`` took 0.72 s this way
    and 1.03 s with the parallel model (docs/performance.md). nbdkit still
    reads the next request and sends replies while a request runs.
    """
    return THREAD_MODEL_SERIALIZE_REQUESTS


def after_fork() -> None:
    """nbdkit: open the image for the server's lifetime (after any fork: fcntl locks do not survive one)."""
    global _export
    try:
        _export = open_export(_config)
    except (UbdCowError, ValueError) as exc:
        _fail(exc)


def cleanup() -> None:
    """nbdkit: the server stops: flush, close, release the locks."""
    global _export
    if _export is not None:
        _export.close()
        _export = None


def open(readonly: bool) -> Export:
    """nbdkit: a new connection; every connection shares the one export."""
    if _export is None:
        raise RuntimeError("the export is not open")
    return _export


def get_size(h: Export) -> int:
    return h.size


def block_size(h: Export) -> tuple[int, int, int]:
    """Minimum 512 (1 for a disk whose size is not whole sectors), preferred 4096 (whole pages)."""
    return (512 if h.size % 512 == 0 else 1, PAGE, 0xFFFFFFFF)


def can_write(h: Export) -> bool:
    return h.writable


def can_flush(h: Export) -> bool:
    return h.writable


def can_trim(h: Export) -> bool:
    return h.writable


def can_zero(h: Export) -> bool:
    return h.writable


def can_fast_zero(h: Export) -> bool:
    return h.writable


def can_fua(h: Export) -> int:
    return FUA_EMULATE if h.writable else 0


def can_extents(h: Export) -> bool:
    return True


def can_multi_conn(h: Export) -> bool:
    """One image in one process behind every connection: a flush on one covers all."""
    return True


@_reported
def pread(h: Export, buf: bytearray, offset: int, flags: int) -> None:
    h.pread(buf, offset)


@_reported
def pwrite(h: Export, buf: bytes, offset: int, flags: int) -> None:
    h.pwrite(buf, offset, bool(flags & FLAG_FUA))


@_reported
def flush(h: Export, flags: int) -> None:
    h.flush()


@_reported
def trim(h: Export, count: int, offset: int, flags: int) -> None:
    h.trim(count, offset, bool(flags & FLAG_FUA))


@_reported
def zero(h: Export, count: int, offset: int, flags: int) -> None:
    h.zero(count, offset, bool(flags & FLAG_FAST_ZERO), bool(flags & FLAG_FUA))


@_reported
def extents(h: Export, count: int, offset: int, flags: int) -> list[ExtentTuple]:
    return h.extents(count, offset, bool(flags & FLAG_REQ_ONE))
