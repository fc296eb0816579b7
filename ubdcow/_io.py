"""Low-level file helpers: safe opens, full positional I/O, holes (SEEK_DATA, FIEMAP), in-kernel copies."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

import numpy as np

from .errors import ImageIOError, UbdCowError, io_error

__all__ = [
    "open_file",
    "file_size",
    "pread_into",
    "read_at",
    "pwrite_all",
    "punch_hole",
    "Segments",
    "written_extents",
    "split_data",
    "copy_range",
    "clone_range",
    "clone_block",
    "fsync_dir",
    "same_file",
    "mtime_seconds",
]

COPY_CHUNK = 1 << 30  # copy_file_range length per call
BUFFER = 8 << 20  # buffered fallback chunk


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_file(
    path: str | os.PathLike[str],
    flags: int,
    *,
    what: str = "file",
    error: type[UbdCowError] = ImageIOError,
    report_as: str | os.PathLike[str] | None = None,
) -> tuple[int, os.stat_result]:
    """Open a regular file or block device; refuse directories, FIFOs and devices.

    Opens with O_NONBLOCK first so that a FIFO cannot hang the open. Errors
    name ``report_as`` (default: ``path``).
    """
    name = path if report_as is None else report_as
    try:
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(name, f"cannot open {what}: too many levels of symbolic links") from None
        err = error(name, f"cannot open {what}: {exc.strerror}")
        if isinstance(err, ImageIOError):
            err.errno = exc.errno
        raise err from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise error(name, f"{what} is {_kind(st.st_mode)}, not a regular file or block device")
        if flags & os.O_NONBLOCK == 0:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def file_size(fd: int, st: os.stat_result | None = None) -> int:
    """Size of a regular file, or of a block device (by seeking to its end)."""
    st = st or os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size


def pread_into(fd: int, buf: memoryview, offset: int) -> int:
    """Fill ``buf`` from ``offset`` with as few ``preadv`` calls as possible.

    Returns the number of bytes read, smaller than ``len(buf)`` only at EOF.
    """
    want = len(buf)
    done = 0
    while done < want:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def read_at(fd: int, buf: memoryview, offset: int, name: str | os.PathLike[str]) -> int:
    """:func:`pread_into`, with a read error reported as :class:`ImageIOError` naming the file and offset."""
    try:
        return pread_into(fd, buf, offset)
    except OSError as exc:
        raise io_error(name, exc, f"read error at offset {offset}") from None


def pwrite_all(fd: int, buffers: list[memoryview | bytes], offset: int) -> int:
    """Write all ``buffers`` contiguously at ``offset`` (``pwritev``, retrying short writes)."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    done = 0
    while views:
        n = os.pwritev(fd, views, offset + done)
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]
    return total


_libc: ctypes.CDLL | None = None
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SYNC_FILE_RANGE_WRITE = 2


def _c() -> ctypes.CDLL:
    """libc, with the prototypes of the calls os does not offer (fallocate modes, sync_file_range)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        if hasattr(_libc, "sync_file_range"):
            _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return _libc


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate a byte range (reads as zeros afterwards); False if unsupported here."""
    if length <= 0:
        return True
    rc = _c().fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class Segments:
    """Split ranges of a file into data and holes (SEEK_DATA/SEEK_HOLE), remembering the last answer.

    Queries usually move forward through the file; one lseek pair per
    segment *of the file* answers all the queries that fall inside it. (On
    ext4 a SEEK_HOLE over dirty, not yet written-back pages scans the page
    cache to the next hole: once per segment is fine, once per query is
    quadratic.) Ranges past EOF are holes; where the filesystem cannot tell,
    everything is data.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lo = self.hi = 0  # the known segment [lo, hi)
        self.is_data = False

    def __call__(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """Yield ``(start, end, is_data)`` pieces covering [start, end)."""
        pos = start
        while pos < end:
            if not self.lo <= pos < self.hi:
                self._learn(pos)
            stop = min(end, self.hi)
            yield pos, stop, self.is_data
            pos = stop

    def _learn(self, pos: int) -> None:
        try:
            data = os.lseek(self.fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                self.lo, self.hi, self.is_data = pos, 2**63, False
                return
            if exc.errno == errno.EINVAL:  # SEEK_DATA unsupported
                self.lo, self.hi, self.is_data = pos, 2**63, True
                return
            raise
        if data > pos:
            self.lo, self.hi, self.is_data = pos, data, False
        else:
            self.lo, self.hi, self.is_data = pos, os.lseek(self.fd, pos, os.SEEK_HOLE), True


# FIEMAP (linux/fiemap.h): struct fiemap is 32 bytes, then fm_extent_count struct fiemap_extent
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEAD = struct.Struct("=QQIIII")  # fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, reserved
_FIEMAP_EXTENT = np.dtype(
    [
        ("logical", "<u8"),
        ("physical", "<u8"),
        ("length", "<u8"),
        ("reserved", "<u8", 2),
        ("flags", "<u4"),
        ("reserved32", "<u4", 3),
    ]
)
_FIEMAP_EXTENT_LAST = 0x1
_FIEMAP_EXTENT_UNWRITTEN = 0x800  # allocated, reads as zeros unless the page cache holds data: not trusted
_FIEMAP_BATCH = 4096
_EMPTY = np.empty(0, dtype=np.int64)


def written_extents(fd: int, start: int, end: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Byte ranges ``[starts, ends)`` of the file, sorted and coalesced, that FIEMAP reports as written
    extents (allocated or delayed allocation) overlapping [start, end); None where FIEMAP does not work.

    Only the positive answer is trusted: a range inside these extents (and inside the file) is data for
    SEEK_DATA too. Anything else — unwritten extents, apparent holes — must be asked with SEEK_DATA/SEEK_HOLE.
    """
    starts: list[np.ndarray] = []
    ends: list[np.ndarray] = []
    pos = start
    buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.itemsize * _FIEMAP_BATCH)
    while pos < end:
        _FIEMAP_HEAD.pack_into(buf, 0, pos, end - pos, 0, 0, _FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf, True)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL, errno.ENOSYS):
                return None
            raise
        mapped = _FIEMAP_HEAD.unpack_from(buf)[3]
        if mapped == 0:
            break
        ext = np.frombuffer(buf, dtype=_FIEMAP_EXTENT, count=mapped, offset=_FIEMAP_HEAD.size)
        written = ext[(ext["flags"] & _FIEMAP_EXTENT_UNWRITTEN) == 0]
        starts.append(written["logical"].astype(np.int64))
        ends.append((written["logical"] + written["length"]).astype(np.int64))
        last = ext[-1]
        if last["flags"] & _FIEMAP_EXTENT_LAST or mapped < _FIEMAP_BATCH:
            break
        pos = max(pos + 1, int(last["logical"]) + int(last["length"]))
    if not starts:
        return _EMPTY, _EMPTY
    s, e = np.concatenate(starts), np.concatenate(ends)
    if s.size > 1:  # coalesce touching extents
        joined = np.flatnonzero(s[1:] > np.maximum.accumulate(e)[:-1]) + 1
        first = np.concatenate(([0], joined))
        last_end = np.maximum.accumulate(e)[np.concatenate((joined - 1, [s.size - 1]))]
        s, e = s[first], last_end
    return s, e


def split_data(
    fd: int, starts: np.ndarray, ends: np.ndarray, shift: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split the ranges ``[starts, ends)`` (sorted, disjoint) of a file at ``+ shift`` into data and holes.

    Returns ``(starts, ends, is_data)`` of the pieces, in the input's coordinates and order. The answer is
    SEEK_DATA/SEEK_HOLE's (holes past the end of the file, everything data where the filesystem cannot
    tell); ranges that FIEMAP shows inside written extents are answered without asking it per range.
    """
    if starts.size == 0:
        return _EMPTY, _EMPTY, np.empty(0, dtype=bool)
    size = file_size(fd)
    a, b = starts + shift, ends + shift
    covered = np.zeros(starts.size, dtype=bool)
    written = written_extents(fd, int(a[0]), min(int(b[-1]), size))
    if written is not None and written[0].size:
        ws, we = written[0], np.minimum(written[1], size)
        i = np.minimum(np.searchsorted(we, a, side="right"), ws.size - 1)  # the first extent ending after a
        covered = (ws[i] <= a) & (we[i] >= b)
    if covered.all():
        return starts, ends, np.ones(starts.size, dtype=bool)
    segments = Segments(fd)
    piece_starts: list[int] = []
    piece_ends: list[int] = []
    piece_data: list[bool] = []
    for k in np.flatnonzero(~covered).tolist():
        for x, y, is_data in segments(int(a[k]), int(b[k])):
            piece_starts.append(x - shift)
            piece_ends.append(y - shift)
            piece_data.append(is_data)
    out_s = np.concatenate((starts[covered], np.array(piece_starts, dtype=np.int64)))
    out_e = np.concatenate((ends[covered], np.array(piece_ends, dtype=np.int64)))
    out_d = np.concatenate((np.ones(int(covered.sum()), dtype=bool), np.array(piece_data, dtype=bool)))
    order = np.argsort(out_s, kind="stable")
    return out_s[order], out_e[order], out_d[order]


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk without waiting (sync_file_range), where Linux can.

    A long copy that kicks write-back as it goes leaves little for the final
    fsync to wait for. Advisory: errors are ignored.
    """
    libc = _c()
    if hasattr(libc, "sync_file_range"):
        libc.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


_copy_file_range_ok = hasattr(os, "copy_file_range")


#: errors by which copy_file_range says it cannot copy between these files (the copy then goes through memory)
NO_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM})


def copy_range(
    src: int,
    src_off: int,
    dst: int,
    dst_off: int,
    length: int,
    buf: bytearray | None = None,
    *,
    data: memoryview | None = None,
) -> bool:
    """Copy ``length`` bytes between files: ``copy_file_range`` when the kernel can, else through memory.

    ``data``: the bytes, when the caller has read them already (merge's writer): where the kernel cannot
    copy, or the source ends early, they are written instead. Without it, a source that ends early raises
    ``EIO`` naming the offset: the caller checked its size, so a short source means it changed under us.
    Returns False when ``copy_file_range`` cannot copy between these files (the caller may stop asking).
    """
    global _copy_file_range_ok
    end = src_off + length
    in_kernel = _copy_file_range_ok
    while in_kernel and src_off < end:
        try:
            n = os.copy_file_range(src, dst, min(end - src_off, COPY_CHUNK), src_off, dst_off)
        except OSError as exc:
            if exc.errno not in NO_COPY:
                raise
            _copy_file_range_ok = exc.errno != errno.ENOSYS
            in_kernel = False
            break
        if n == 0:
            if data is None:
                raise OSError(errno.EIO, f"unexpected end of file at offset {src_off}")
            break
        src_off += n
        dst_off += n
    if src_off >= end:
        return in_kernel
    if data is not None:
        pwrite_all(dst, [data[len(data) - (end - src_off) :]], dst_off)
        return in_kernel
    view = memoryview(buf if buf is not None else bytearray(min(BUFFER, end - src_off)))
    while src_off < end:
        chunk = view[: min(len(view), end - src_off)]
        got = pread_into(src, chunk, src_off)
        if got < len(chunk):
            raise OSError(errno.EIO, f"unexpected end of file at offset {src_off + got}")
        pwrite_all(dst, [chunk], dst_off)
        src_off += got
        dst_off += got
    return in_kernel


def _iow(kind: int, number: int, size: int) -> int:
    """An ioctl request number ``_IOW(kind, number, size)`` for this machine's encoding."""
    if os.uname().machine.startswith(("ppc", "powerpc", "mips", "sparc", "alpha")):
        return (4 << 29) | (size << 16) | (kind << 8) | number  # _IOC_WRITE is 4 there, 13 size bits
    return (1 << 30) | (size << 16) | (kind << 8) | number


_CLONE_ARGS = struct.Struct("=qQQQ")  # struct file_clone_range: src_fd, src_offset, src_length, dest_offset
FICLONERANGE = _iow(0x94, 13, _CLONE_ARGS.size)
#: errors by which FICLONERANGE says these files, this filesystem or this range cannot share extents
#: (EINVAL: unaligned, past the source's end, or unsupported; EBADF/EPERM/ETXTBSY: a destination it
#: will not remap into); anything else (ENOSPC, EIO, ...) is a real error
NO_CLONE = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EBADF, errno.EPERM, errno.ETXTBSY}
)


def clone_range(src: int, src_off: int, dst: int, dst_off: int, length: int) -> bool:
    """Make ``dst[dst_off:dst_off+length]`` share ``src``'s extents (FICLONERANGE); False when it cannot.

    Nothing is copied: on XFS (reflink=1), btrfs and the like the two files
    then hold the same blocks until either is written. Offsets and length
    must be multiples of the filesystem block (see :func:`clone_block`), or
    the call fails (False). ``src`` needs only be open for reading. A hole in
    the source becomes a hole in the destination. A failure leaves the
    destination as it was; errors other than :data:`NO_CLONE` raise OSError.
    """
    if length <= 0:
        return True
    try:
        fcntl.ioctl(dst, FICLONERANGE, _CLONE_ARGS.pack(src, src_off, length, dst_off))
    except OSError as exc:
        if exc.errno in NO_CLONE:
            return False
        raise
    return True


def clone_block(fd: int) -> int:
    """The alignment :func:`clone_range` needs on the filesystem of ``fd`` (its block size)."""
    st = os.fstatvfs(fd)
    return max(st.f_frsize or st.f_bsize, 512)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename in it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mtime_seconds(st: os.stat_result) -> int:
    """Whole-second mtime as the kernel compares it (truncated: the float st_mtime can round up)."""
    return st.st_mtime_ns // 1_000_000_000


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """True when two stat results name the same inode."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
