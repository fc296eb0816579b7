"""The copy machinery of merge: a writer thread that writes buffers into the output while the next one is
read, leaving all-zero blocks as holes, copying in the kernel where the bytes came from a file."""

from __future__ import annotations

import errno
import os
import queue
import threading

import numpy as np

from ._io import copy_range, punch_hole, pwrite_all, read_at, start_writeback
from ._signals import deferred, register, release
from .errors import ImageIOError

__all__ = ["Copier", "nonzero_runs", "short_read", "CHUNK", "BLOCK"]

CHUNK = 1 << 20  # read/zero-check granularity (fits in cache, so the copy that follows is cheap)
BLOCK = 4096  # hole granularity in the output
WRITEBACK = 32 << 20  # start write-back of the output after this many bytes
BUFFERS = 3  # CHUNK buffers between the reading thread and the writing one


class Copier:
    """Writes data into the output, skipping all-zero blocks when sparse, on a thread of its own.

    The caller fills a buffer (:meth:`take`) and hands it over
    (:meth:`write_buffer`); the writer thread scans it for zero blocks and
    writes the rest (``pwritev``, or ``copy_file_range`` from where the bytes
    came from), so that reading the next buffer overlaps writing this one. A
    write error is raised by the next :meth:`take`, :meth:`drain` or
    :meth:`finish`. :meth:`close` (idempotent) must come before the output
    is closed.
    """

    def __init__(self, out_fd: int, sparse: bool, in_kernel: bool = True) -> None:
        self.out_fd = out_fd
        self.sparse = sparse
        self.written = 0  # counted by the writer
        # copy_file_range shares extents on XFS/btrfs: not when the caller asked for a copy
        self._cfr = in_kernel and hasattr(os, "copy_file_range")
        self._kicked = 0  # bytes written when write-back was last started
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(BUFFERS):
            self._free.put(bytearray(CHUNK))
        self._jobs: queue.Queue[tuple[bytearray, int, int, int, int] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stopping = False
        self._undo = 0

    def take(self) -> bytearray:
        """A free buffer of :data:`CHUNK` bytes, once the writer has given one back."""
        buf = self._free.get()
        self._raise_error()
        return buf

    def write_buffer(self, buf: bytearray, dst_off: int, n: int, src: int = -1, src_off: int = 0) -> None:
        """Have ``buf[:n]`` written at ``dst_off`` (all-zero blocks left as holes when sparse); ``buf`` goes
        back to the free buffers after. ``src``, ``src_off``: the file and offset the bytes were read from."""
        if self._thread is None:
            self._start()
        self._jobs.put((buf, n, dst_off, src, src_off))

    def _start(self) -> None:
        with deferred():  # started, recorded and its stop registered together: close() never meets a thread
            thread = threading.Thread(target=self._run, name="ubdcow-merge-writer", daemon=True)
            thread.start()
            self._thread = thread
            self._undo = register(self.close)

    def copy(self, src: int, src_off: int, dst_off: int, length: int, src_name: str) -> None:
        """Copy a data range of ``src`` a chunk at a time (all-zero blocks skipped when sparse)."""
        pos = 0
        while pos < length:
            n = min(CHUNK, length - pos)
            if n == CHUNK:  # end chunks on output block boundaries so zero blocks line up with holes
                n -= (dst_off + pos + n) % BLOCK
            buf = self.take()
            got = read_at(src, memoryview(buf)[:n], src_off + pos, src_name)
            if got < n:
                raise short_read(src_name, src_off + pos + got)
            self.write_buffer(buf, dst_off + pos, n, src, src_off + pos)
            pos += n

    def clear(self, dst_off: int, length: int) -> None:
        """Make a range of the output read zeros: a hole, or written zeros where holes cannot be punched."""
        self.drain()
        if punch_hole(self.out_fd, dst_off, length):
            return
        zeros = bytes(min(CHUNK, length))
        for pos in range(0, length, CHUNK):
            n = min(CHUNK, length - pos)
            pwrite_all(self.out_fd, [zeros[:n]], dst_off + pos)
            self._wrote(n)

    def drain(self) -> None:
        """Wait until everything handed over is written."""
        if self._thread is not None:
            self._jobs.join()
        self._raise_error()

    def finish(self) -> None:
        """Write what is left and stop the writer."""
        self.drain()
        self.close()

    def close(self) -> None:
        """Stop the writer, dropping what it has not begun, and wait for it."""
        with deferred():  # a signal does not cut this short: the writer is gone before the output is closed
            release(self._undo)
            if self._thread is not None:
                self._stopping = True
                self._jobs.put(None)
                self._thread.join()
                self._thread = None

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            buf, n, dst_off, src, src_off = job
            try:
                if self._error is None and not self._stopping:
                    self._write_buffer(buf, n, dst_off, src, src_off)
            except BaseException as exc:  # handed to the caller's thread
                self._error = exc
            finally:
                self._free.put(buf)
                self._jobs.task_done()
        self._jobs.task_done()

    def _write_buffer(self, buf: bytearray, n: int, dst_off: int, src: int, src_off: int) -> None:
        view = memoryview(buf)
        for a, b in nonzero_runs(buf, n, dst_off % BLOCK) if self.sparse else [(0, n)]:
            if src >= 0 and self._cfr:  # the kernel copies (and may share extents), else the bytes in hand
                self._cfr = copy_range(src, src_off + a, self.out_fd, dst_off + a, b - a, data=view[a:b])
            else:
                pwrite_all(self.out_fd, [view[a:b]], dst_off + a)
            self._wrote(b - a)

    def _wrote(self, n: int) -> None:
        """Count written bytes; every WRITEBACK bytes, start write-back so the final fsync is short."""
        self.written += n
        if self.written - self._kicked >= WRITEBACK:
            start_writeback(self.out_fd)
            self._kicked = self.written


def short_read(name: str, offset: int) -> ImageIOError:
    """A source file that ended early: it changed while being read."""
    return ImageIOError(
        name, f"file ended at offset {offset} during the merge: it changed while being read", errno=errno.EIO
    )


def nonzero_runs(buf: bytearray, n: int, phase: int) -> list[tuple[int, int]]:
    """Byte ranges of ``buf[:n]`` to write: everything but all-zero blocks.

    Blocks are :data:`BLOCK` bytes aligned to the output; ``phase`` is the
    output offset of ``buf[0]`` modulo BLOCK. Partial blocks at either end
    are written unless entirely zero; a piece of two blocks or less is
    written whole unless entirely zero.
    """
    if n <= 2 * BLOCK:
        return [] if buf.count(0, 0, n) == n else [(0, n)]
    head = min((BLOCK - phase) % BLOCK, n)
    k = (n - head) // BLOCK
    tail = head + k * BLOCK
    keep = np.empty(k + 2, dtype=bool)  # [head piece, k blocks, tail piece]
    keep[0] = head > 0 and buf.count(0, 0, head) != head
    keep[-1] = tail < n and buf.count(0, tail, n) != n - tail
    words = np.frombuffer(buf, dtype=np.uint64, count=k * (BLOCK // 8), offset=head).reshape(k, BLOCK // 8)
    nonzero = words[:, 0] != 0  # most data blocks show themselves in their first word
    maybe_zero = np.flatnonzero(~nonzero)
    if maybe_zero.size:
        nonzero[maybe_zero] = words[maybe_zero].any(axis=1)
    keep[1:-1] = nonzero
    if keep.all():
        return [(0, n)]
    bounds = np.concatenate(([0], head + BLOCK * np.arange(k + 1), [n]))  # piece i is [bounds[i], bounds[i+1])
    edges = np.flatnonzero(np.diff(np.concatenate(([0], keep.view(np.int8), [0]))))
    return [
        (int(bounds[a]), int(bounds[b])) for a, b in zip(edges[::2], edges[1::2], strict=True) if bounds[b] > bounds[a]
    ]
