"""Whole-file fcntl locks that interoperate with a running UML guest, and the readers-writer lock of an
open image's threads.

The kernel's ubd driver holds a POSIX write lock on the COW file and a read
lock on the backing file. ubdcow uses open-file-description locks
(F_OFD_SETLK): they conflict with the kernel's POSIX locks, and closing
another descriptor of the same file does not drop them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading

from .errors import Fix, ImageLockedError, io_error

__all__ = ["lock", "holder", "held", "describe_holder", "SharedLock"]

_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", None)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
# struct flock on Linux LP64: short l_type, short l_whence, off_t l_start,
# off_t l_len, pid_t l_pid (+ padding to 32 bytes).
_FLOCK = struct.Struct("@hhqqi4x")


def _flock(kind: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)


def _lock_key(fd: int) -> str:
    st = os.fstat(fd)
    return f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"


def _proc_locks_pid(fd: int) -> int | None:
    """The pid /proc/locks gives for a POSIX lock on ``fd``'s inode."""
    key = _lock_key(fd)
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                if "->" in parts:  # a blocked waiter, not a holder
                    continue
                if len(parts) >= 6 and parts[5] == key and parts[4].isdigit():
                    pid = int(parts[4])
                    if pid > 0 and pid != os.getpid():
                        return pid
    except OSError:
        return None
    return None


def _fdinfo_pid(fd: int) -> int | None:
    """The pid of a process with a descriptor holding a lock on ``fd``'s inode.

    Recent kernels show OFD locks with pid -1 everywhere but in the holder's
    /proc/PID/fdinfo, so look there (only readable for our own or, as root,
    every process).
    """
    key = _lock_key(fd)
    me = os.getpid()
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if pid == me:
            continue
        try:
            names = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue
        for name in names:
            try:
                with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if "lock:" in text and any(line.startswith("lock:") and key in line.split() for line in text.splitlines()):
                return pid
    return None


def holder(fd: int, exclusive: bool = True) -> tuple[bool, int | None]:
    """Whether a lock of another open file would block ours, and the holder's pid if known."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    cmds = [c for c in (_F_OFD_GETLK, fcntl.F_GETLK) if c is not None]
    for cmd in cmds:
        try:
            res = fcntl.fcntl(fd, cmd, _flock(kind))
        except OSError:
            continue
        l_type, _, _, _, l_pid = _FLOCK.unpack(res)
        if l_type == fcntl.F_UNLCK:
            return False, None
        pid = l_pid if l_pid > 0 else (_proc_locks_pid(fd) or _fdinfo_pid(fd))
        return True, pid
    return False, None


def held(fd: int) -> tuple[str | None, int | None]:
    """The lock another open file holds on ``fd``'s file: ``("write", pid)``, ``("read", pid)`` or ``(None, None)``.

    A read lock (a read-only ``serve``, another ubdcow reading) does not block
    other readers but does block every writer (``compact``, ``rebase``), so both
    kinds count as "in use".
    """
    busy, pid = holder(fd, exclusive=False)  # only a write lock blocks a read lock
    if busy:
        return "write", pid
    busy, pid = holder(fd, exclusive=True)  # any lock blocks a write lock
    if busy:
        return "read", pid
    return None, None


def describe_holder(pid: int | None) -> str:
    """``process 123 (linux.uml)``, or a vague phrase when the pid is unknown."""
    if pid is None:
        return "another process"
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
            comm = f.read().strip()
    except OSError:
        return f"process {pid}"
    return f"process {pid} ({comm})"


def lock(fd: int, filename: str | os.PathLike[str], *, exclusive: bool, what: str = "COW file") -> None:
    """Take a non-blocking whole-file lock or raise :class:`ImageLockedError` naming the holder."""
    kind = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    cmd = _F_OFD_SETLK if _F_OFD_SETLK is not None else fcntl.F_SETLK
    try:
        fcntl.fcntl(fd, cmd, _flock(kind))
        return
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise io_error(filename, exc, f"cannot lock {what}") from None
    _, pid = holder(fd, exclusive)
    mode = "writing" if exclusive else "reading"
    raise ImageLockedError(
        filename,
        f"{what} is locked by {describe_holder(pid)}; cannot open it for {mode}",
        hint="a running UML guest (or another ubdcow) is using it: shut it down first",
        fixes=(Fix("or, if you are sure nothing writes it, skip the lock", (("no_lock", None),)),),
        pid=pid,
    )


class SharedLock:
    """A readers-writer lock: reads share it; writes, flush and close take it alone.

    Used as a context manager it is the exclusive side (what the write path
    takes); :meth:`acquire_shared`/:meth:`release_shared`
    are the readers' side. A writer closes the gate to new readers, then
    waits for the readers inside to leave, so writers are not starved. The
    readers inside are counted in a list (``append`` and ``pop`` are atomic),
    so a read costs one uncontended lock round trip.
    """

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._readers: list[None] = []
        self._drained = threading.Condition(threading.Lock())
        self._writer_waiting = False

    def acquire_shared(self) -> None:
        """Enter as a reader (waits while a writer holds the lock or waits for it)."""
        with self._gate:
            self._readers.append(None)

    def release_shared(self) -> None:
        """Leave as a reader."""
        self._readers.pop()
        if self._writer_waiting and not self._readers:
            with self._drained:
                self._drained.notify_all()

    def acquire(self) -> None:
        """Take the lock alone: no new reader gets in, then wait for the readers inside to leave."""
        self._gate.acquire()
        if not self._readers:
            return
        try:
            with self._drained:
                self._writer_waiting = True
                try:
                    while self._readers:
                        self._drained.wait()
                finally:
                    self._writer_waiting = False
        except BaseException:
            self._gate.release()
            raise

    def release(self) -> None:
        """Give up the exclusive side."""
        self._gate.release()

    def __enter__(self) -> SharedLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
