"""Low-level file helpers: safe opens, full positional I/O, holes, in-kernel copies."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Iterator

from .errors import ImageIOError, UbdCowError, io_error

__all__ = [
    "open_file",
    "file_size",
    "pread_into",
    "read_at",
    "pwrite_all",
    "punch_hole",
    "Segments",
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


def start_writeback(fd: int) -> None:
    """Start writing a file's dirty pages to disk without waiting (sync_file_range), where Linux can.

    A long copy that kicks write-back as it goes leaves little for the final
    fsync to wait for. Advisory: errors are ignored.
    """
    libc = _c()
    if hasattr(libc, "sync_file_range"):
        libc.sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE)


_copy_file_range_ok = hasattr(os, "copy_file_range")


def copy_range(src: int, src_off: int, dst: int, dst_off: int, length: int, buf: bytearray | None = None) -> None:
    """Copy ``length`` bytes between files: ``copy_file_range`` when the kernel can, else buffered.

    A source that ends early raises ``EIO`` naming the offset: the caller
    checked its size, so a short source means it changed under us.
    """
    global _copy_file_range_ok
    end = src_off + length
    while _copy_file_range_ok and src_off < end:
        try:
            n = os.copy_file_range(src, dst, min(end - src_off, COPY_CHUNK), src_off, dst_off)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM):
                _copy_file_range_ok = exc.errno not in (errno.ENOSYS,)
                break
            raise
        if n == 0:
            raise OSError(errno.EIO, f"unexpected end of file at offset {src_off}")
        src_off += n
        dst_off += n
    if src_off >= end:
        return
    view = memoryview(buf if buf is not None else bytearray(min(BUFFER, end - src_off)))
    while src_off < end:
        chunk = view[: min(len(view), end - src_off)]
        n = pread_into(src, chunk, src_off)
        if n < len(chunk):
            raise OSError(errno.EIO, f"unexpected end of file at offset {src_off + n}")
        pwrite_all(dst, [chunk], dst_off)
        src_off += n
        dst_off += n


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
