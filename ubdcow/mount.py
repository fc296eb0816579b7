"""``mount``: the filesystem inside a disk as a read-only folder, through FUSE (no root needed).

The FUSE binding is mfusepy (ctypes over libfuse 3, or 2 where only that is installed), an optional
extra (``pip install 'ubdcow[mount]'``): it is imported only here, when a mount is made. This module
holds what a mount needs, in the order :func:`mount` uses it:

- :func:`load_binding`, :func:`check_device`, :func:`check_mountpoint`: the checks that make each
  common failure one line (the library or the binding missing, ``/dev/fuse`` absent or not
  permitted, a mountpoint missing, not a folder, not empty, already mounted, or stale);
- :class:`Operations`: the FUSE operations over a :class:`~ubdcow.fs.FileSystem`, path by path
  (libfuse's high-level API): lstat's fields with the image's inode numbers, readdir streamed by
  offset, reads through one :class:`~ubdcow.fs.FsFile` per open handle, symlinks, xattrs, statfs;
  every change is refused with EROFS; a corrupt structure makes its request fail with EIO, logged
  once, and the mount goes on;
- :func:`serve`: libfuse's loop in a thread (several worker threads: the filesystem is thread-safe),
  the main thread waiting for the mount to be ready, then for its end; SIGTERM or Ctrl-C there
  unmounts before the exception goes on (the CLI's 143 or 130);
- :func:`unmount` and :func:`find_mount`: ``fusermount3 -u`` and ``/proc/self/mountinfo``.

The kernel does the rest: ``ro`` refuses every change, ``default_permissions`` checks the image's own
modes and owners, and since the image cannot change under the mount (the overlay's read lock keeps a
guest out for the mount's whole life), entries, attributes and file pages are cached for long
(``entry_timeout``, ``attr_timeout``, ``negative_timeout``, ``kernel_cache``).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import shlex
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from ctypes.util import find_library
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from . import _signals
from .errors import MountError
from .fs import FileSystem
from .fuseglue import fuse_class, packer
from .fuseops import Operations

__all__ = [
    "BINDING",
    "LIBRARY_PACKAGE",
    "MountInfo",
    "load_binding",
    "check_device",
    "check_mountpoint",
    "fuse_options",
    "serve",
    "unmount",
    "find_mount",
    "mounts",
    "daemons",
    "wait_released",
    "clear_command",
]

#: the Python package of the FUSE binding (the ``mount`` extra)
BINDING = "mfusepy"
#: the distribution package that installs libfuse (Debian, Ubuntu, Fedora, Arch: ``fuse3``)
LIBRARY_PACKAGE = "fuse3"
#: seconds the kernel may keep entries, attributes and negative lookups (the image does not change)
CACHE_SECONDS = 7 * 86400.0
#: the type ``mount`` and ``/proc/self/mountinfo`` show: ``fuse.ubdcow``
SUBTYPE = "ubdcow"
#: seconds a signal's unmount waits for libfuse's loop to end before the process goes on without it
STOP_WAIT = 5.0
_DEVICE = "/dev/fuse"
#: what a FUSE mountpoint whose process died answers: "Transport endpoint is not connected" (ECONNABORTED on
#: kernels that report the aborted connection as such)
_STALE = (errno.ENOTCONN, errno.ECONNABORTED)
_binding: ModuleType | None = None


# -- the binding, the device, the mountpoint --------------------------------------------------------


def load_binding() -> ModuleType:
    """The mfusepy module over libfuse 3 (or 2); :class:`~ubdcow.errors.MountError` naming what to install."""
    global _binding
    if _binding is not None:
        return _binding
    chosen = None
    if not (os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME")):
        chosen = find_library("fuse3")  # mfusepy's own order tries libfuse 2 first: prefer 3 where both are
    try:
        if chosen:
            os.environ["FUSE_LIBRARY_PATH"] = chosen
        import mfusepy
    except ImportError:
        raise MountError(
            None,
            f"cannot mount: the FUSE binding ({BINDING}) is not installed: pip install 'ubdcow[mount]'",
        ) from None
    except OSError as exc:  # mfusepy loads libfuse when imported
        raise MountError(
            None,
            f"cannot mount: the FUSE library (libfuse3.so.3 or libfuse.so.2) cannot be loaded ({exc}): "
            f"install the package {LIBRARY_PACKAGE}",
        ) from None
    finally:
        if chosen:
            os.environ.pop("FUSE_LIBRARY_PATH", None)
    logging.getLogger("fuse").setLevel(logging.CRITICAL)  # its per-request debug lines; we log our own
    module: ModuleType = mfusepy
    _binding = module
    return module


def check_device(device: str = _DEVICE) -> None:
    """``/dev/fuse`` exists and this user may open it (libfuse gives up when it cannot, even as root)."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO):
            raise MountError(device, "no FUSE device: load the kernel's fuse module (modprobe fuse), or give "
                             "this container the device /dev/fuse") from None  # fmt: skip
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise MountError(device, f"permission denied: mounting needs read and write access to it "
                             f"({_describe_node(device)}); most systems make it mode 0666") from None  # fmt: skip
        raise MountError(device, f"cannot open: {exc.strerror}") from None
    os.close(fd)


def _describe_node(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError:
        return "it cannot be examined"
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, group gid {st.st_gid}"


def clear_command(mountpoint: str) -> str:
    """The command that clears a stale mountpoint (as the user typed its path)."""
    return f"fusermount3 -u {shlex.quote(mountpoint)}"


def check_mountpoint(mountpoint: str) -> None:
    """An existing, empty folder that is not mounted already, or a :class:`MountError` saying which it is not."""
    try:
        st = os.stat(mountpoint)
    except OSError as exc:
        if exc.errno in _STALE:
            stale = f"a stale mount, left by a mount process that was killed ({exc.strerror})"
            raise MountError(mountpoint, f"{stale}; clear it with: {clear_command(mountpoint)}") from None
        if exc.errno == errno.ENOENT:
            raise MountError(mountpoint, "no such folder: make it first (mkdir)") from None
        raise MountError(mountpoint, f"cannot use as a mountpoint: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(mountpoint, "not a folder: a mountpoint must be an empty folder")
    mounted = find_mount(mountpoint)
    if mounted is not None and mounted.fstype == f"fuse.{SUBTYPE}":
        raise MountError(mountpoint, f"already a ubdcow mount (of {mounted.source}): unmount it first "
                         "(ubdcow umount), or choose another folder")  # fmt: skip
    try:
        with os.scandir(mountpoint) as entries:
            count = sum(1 for _ in itertools.islice(entries, 1000))
    except OSError as exc:
        raise MountError(mountpoint, f"cannot list: {exc.strerror}") from None
    if count:
        what = "1 entry" if count == 1 else f"{count}{'+' if count == 1000 else ''} entries"
        raise MountError(mountpoint, f"not empty ({what}, which the mount would hide): choose an empty folder")


# -- /proc/self/mountinfo --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MountInfo:
    """One line of /proc/self/mountinfo: where, what type (``fuse.ubdcow``), and its source (the disk)."""

    mountpoint: str
    fstype: str
    source: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \040, \011, \012, \134
    raw = os.fsencode(field)
    out, i = bytearray(), 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) + 0 and raw[i + 1 : i + 4].isdigit():
            out.append(int(raw[i + 1 : i + 4], 8) & 0xFF)
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mounts() -> list[MountInfo]:
    """Every mount this process sees, in mount order."""
    found = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, rest = left.split(), right.split()
                if len(fields) >= 6 and len(rest) >= 2:
                    found.append(MountInfo(_unescape(fields[4]), rest[0], _unescape(rest[1]), fields[5]))
    except OSError:
        pass
    return found


def _absolute(path: str) -> str:
    # realpath without strictness: a stale mountpoint cannot be stat'ed, its parents can
    parent, name = os.path.split(os.path.abspath(path))
    return os.path.join(os.path.realpath(parent), name) if name else os.path.realpath(parent)


def find_mount(mountpoint: str) -> MountInfo | None:
    """The topmost mount at ``mountpoint``, or None."""
    where = _absolute(mountpoint)
    found = None
    for info in mounts():
        if info.mountpoint == where:
            found = info
    return found


# -- mounting ---------------------------------------------------------------------------------------------


def _option_value(text: str) -> str:
    # libfuse splits -o at commas; a backslash escapes the next character
    return text.replace("\\", "\\\\").replace(",", "\\,")


def fuse_options(source: str, *, allow_other: bool = False) -> dict[str, Any]:
    """The options libfuse gets (``-o``), as mfusepy takes them; ``source`` (the disk's absolute path) is what
    ``mount`` and ``df`` show as the mounted device."""
    options: dict[str, Any] = {
        "ro": True,
        "default_permissions": True,
        "fsname": _option_value(source),
        "subtype": SUBTYPE,
        "use_ino": True,
        "kernel_cache": True,
        "entry_timeout": CACHE_SECONDS,
        "attr_timeout": CACHE_SECONDS,
        "negative_timeout": CACHE_SECONDS,
    }
    if allow_other:
        options["allow_other"] = True
    return options


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """Descriptor 2 into a pipe while libfuse (and fusermount3) mount: their complaints become our one line."""
    lines: list[str] = []
    read_end, write_end = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(write_end, 2)
        os.close(write_end)
        write_end = -1
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        if write_end >= 0:
            os.close(write_end)
        os.set_blocking(read_end, False)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := os.read(read_end, 65536):
                chunks.append(chunk)
        os.close(read_end)
        lines += [line.strip() for line in b"".join(chunks).decode(errors="replace").splitlines() if line.strip()]


def serve(
    fs: FileSystem,
    mountpoint: str,
    *,
    source: str | None = None,
    allow_other: bool = False,
    ready: Callable[[], None],
    log: Callable[[str], None],
    threads: bool = True,
) -> None:
    """Mount ``fs`` at ``mountpoint`` and serve it until it is unmounted (``source``: the disk's absolute path,
    by default ``fs.name`` made absolute).

    ``ready()`` runs once the folder is mounted; a mount that fails raises :class:`MountError` with
    libfuse's reason. SIGTERM or Ctrl-C (as ``Terminated`` or KeyboardInterrupt in this, the main
    thread) unmounts the folder, then goes on as the exception.
    """
    binding = load_binding()
    mounted = threading.Event()  # FUSE_INIT came: the folder is up
    changed = threading.Event()  # mounted, or the loop ended
    failure: list[BaseException] = []

    def hello() -> None:
        mounted.set()
        changed.set()

    ops = Operations(fs, ready=hello, log=log, pack=packer(binding))
    options = fuse_options(source or os.path.abspath(fs.name), allow_other=allow_other)

    def loop() -> None:
        try:
            fuse_class(binding)(ops, mountpoint, foreground=True, nothreads=not threads, **options)
        except BaseException as exc:  # handed to the main thread
            failure.append(exc)
        finally:
            changed.set()

    thread = threading.Thread(target=loop, name="ubdcow-fuse", daemon=True)
    with _stderr_captured() as complaints:
        try:
            thread.start()
            changed.wait()
        except BaseException:  # a signal while mounting: let the mount finish, then undo it
            if thread.ident is not None:
                changed.wait(STOP_WAIT)
            if mounted.is_set():
                with _signals.deferred():
                    _stop(mountpoint, thread, log)
            raise
    if not mounted.is_set():
        thread.join()
        reason = "; ".join(complaints[-2:]) or (str(failure[0]) if failure else "libfuse gave no reason")
        raise MountError(mountpoint, f"cannot mount: {reason}")
    # (what libfuse says on a mount that works is chatter, e.g. 3.14's "Ignoring invalid max threads value")
    try:
        ready()
        while thread.is_alive():
            thread.join(3600)
    except BaseException:  # Terminated, KeyboardInterrupt: unmount, then go on as the signal
        with _signals.deferred():
            _stop(mountpoint, thread, log)
        raise


def _stop(mountpoint: str, thread: threading.Thread, log: Callable[[str], None]) -> None:
    """Unmount (lazily if something there is busy) and give libfuse's loop a moment to end."""
    try:
        unmount(mountpoint)
    except MountError:
        try:
            unmount(mountpoint, lazy=True)
        except MountError as exc:
            log(str(exc))
    thread.join(STOP_WAIT)


def _unmounter() -> list[str]:
    for name in ("fusermount3", "fusermount"):
        path = shutil.which(name) or next(
            (f"{d}/{name}" for d in ("/usr/bin", "/bin") if os.access(f"{d}/{name}", os.X_OK)), None
        )
        if path:
            return [path, "-u"]
    if os.geteuid() == 0 and shutil.which("umount"):
        return ["umount"]
    raise MountError(None, f"cannot unmount: fusermount3 is not installed: install the package {LIBRARY_PACKAGE}")


def unmount(mountpoint: str, *, lazy: bool = False) -> None:
    """``fusermount3 -u [-z] MOUNTPOINT`` (``umount`` as root without it); :class:`MountError` with its reason."""
    command = [*_unmounter(), *(["-z"] if lazy else []), "--", mountpoint]
    if command[0] == "umount" and lazy:
        command = ["umount", "-l", "--", mountpoint]
    try:
        proc = subprocess.run(command, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MountError(mountpoint, f"cannot unmount: {exc}") from None
    if proc.returncode != 0:
        text = proc.stderr.decode(errors="replace").strip().splitlines()
        reason = text[-1] if text else f"{os.path.basename(command[0])} exited with {proc.returncode}"
        if "busy" in reason.lower():
            raise MountError(mountpoint, "busy: a process has a file open or its current folder there",
                             hint=f"close it, or detach the mount now with: ubdcow umount --lazy "
                             f"{shlex.quote(mountpoint)}")  # fmt: skip
        raise MountError(mountpoint, f"cannot unmount: {reason}")


def daemons(source: str) -> set[int]:
    """The processes serving a FUSE mount of the disk ``source``: ``/dev/fuse`` and the disk open (the ones
    this user may look at: their own, or every one as root)."""
    try:
        disk = os.stat(source)
        fuse = os.stat(_DEVICE)
    except OSError:
        return set()
    wanted = {(disk.st_dev, disk.st_ino), (fuse.st_dev, fuse.st_ino)}
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        seen = set()
        try:
            for fd in os.listdir(f"/proc/{name}/fd"):
                with contextlib.suppress(OSError):
                    st = os.stat(f"/proc/{name}/fd/{fd}")
                    seen.add((st.st_dev, st.st_ino))
        except OSError:
            continue
        if wanted <= seen:
            found.add(int(name))
    return found


def wait_released(source: str, before: set[int], timeout: float = STOP_WAIT * 2) -> None:
    """After an unmount: wait (at most ``timeout`` seconds) until the processes of ``before`` that served it have
    let the disk go (so that its lock is free), as many as there are fewer ubdcow mounts of it now."""
    left = sum(1 for info in mounts() if info.fstype == f"fuse.{SUBTYPE}" and info.source == source)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(before & daemons(source)) > left:
        time.sleep(0.02)
