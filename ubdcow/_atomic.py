"""Atomic output files: write a temporary file beside the target, fsync, rename.

A crash or kill -9 never leaves a partial file under the final name; the
temporary file is named after its target and its writer's pid
(``.NAME.PID.XXXX.ubdcow-tmp``) so a later run can remove leftovers whose
writer is dead.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Iterable, Mapping
from types import TracebackType

from . import lock as _lock
from ._io import fsync_dir, same_file
from .errors import ImageIOError, ImageLockedError, OutputError

__all__ = ["AtomicFile", "check_output_path", "TMP_SUFFIX"]

TMP_SUFFIX = ".ubdcow-tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(
    path: str,
    *,
    overwrite: bool,
    inputs: Mapping[str, os.stat_result] | Iterable[tuple[str, os.stat_result]] = (),
    hint: str | None = None,
) -> None:
    """Refuse an output path that would lose something if replaced.

    Refused: one of the ``inputs`` (through any path or link), an existing
    file or link without ``overwrite``, anything but a regular file (a device
    node or FIFO would be replaced by a file, not written), and a file that a
    running guest or another process holds locked.
    """
    if not os.path.lexists(path):
        return
    try:
        st: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        st = None  # a dangling link
    except OSError as exc:
        raise OutputError(path, f"cannot use as output: {exc.strerror}") from None
    for what, ist in inputs.items() if isinstance(inputs, Mapping) else inputs:
        if st is not None and same_file(st, ist):
            raise OutputError(path, f"output is the {what} (same file); refusing to overwrite it")
    if not overwrite:
        raise OutputError(path, "output file already exists", hint=hint or "use --overwrite to replace it")
    if st is None:
        return  # the dangling link is replaced by the output; nothing is lost
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(path, "output exists and is not a regular file; ubdcow only replaces image files")
    _refuse_if_locked(path)


def _refuse_if_locked(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return
    try:
        busy, pid = _lock.holder(fd, exclusive=True)
    finally:
        os.close(fd)
    if busy:
        raise ImageLockedError(
            path, f"output file is in use by {_lock.describe_holder(pid)}; refusing to replace it", pid=pid
        )


def _cleanup_stale(directory: str, base: str) -> None:
    """Remove temporary files of this target left by writers that are no longer alive."""
    pattern = re.compile(re.escape(f".{base}.") + r"(\d+)\.[^.]+" + re.escape(TMP_SUFFIX) + "$")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        m = pattern.match(name)
        if not m:
            continue
        pid = int(m.group(1))
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


class AtomicFile:
    """A temporary file that becomes ``path`` on :meth:`commit`, or vanishes.

    Use as a context manager: leaving the block without commit (an error,
    Ctrl-C) removes the temporary file.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        path = os.fspath(path)
        if os.path.islink(path) and os.path.exists(path):
            path = os.path.realpath(path)  # replace the file the link points at, not the link
        self.path = path
        self.overwrite = overwrite
        directory = os.path.dirname(os.path.abspath(path))
        base = os.path.basename(path)
        self.directory = directory
        _cleanup_stale(directory, base)
        try:
            self.fd, self.tmp_path = tempfile.mkstemp(
                prefix=f".{base}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=directory
            )
        except OSError as exc:
            raise ImageIOError(path, f"cannot create a file in {directory}: {exc.strerror}", errno=exc.errno) from None
        self.committed = False
        self._removed = False

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()

    def commit(self) -> None:
        """fsync, give the file normal permissions, move it into place and fsync the folder."""
        try:
            self._set_owner_and_mode()
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            if self.overwrite:
                os.replace(self.tmp_path, self.path)
            else:
                self._link_no_replace()
            fsync_dir(self.directory)
        except OSError as exc:
            raise ImageIOError(self.path, f"cannot finish writing: {exc.strerror}", errno=exc.errno) from None
        self.committed = True

    def _set_owner_and_mode(self) -> None:
        """A new file gets the usual 0666 & ~umask; a replaced one keeps its mode and (if allowed) owner."""
        try:
            old = os.stat(self.path) if self.overwrite else None
        except OSError:
            old = None
        if old is None:
            os.fchmod(self.fd, 0o666 & ~_umask())
            return
        try:
            os.fchown(self.fd, old.st_uid, old.st_gid)
        except OSError:
            pass  # not ours to give away: keep the writer's
        os.fchmod(self.fd, stat.S_IMODE(old.st_mode))

    def _link_no_replace(self) -> None:
        try:
            os.link(self.tmp_path, self.path)
        except FileExistsError:
            raise OutputError(self.path, "output file already exists (it appeared while writing)") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            if os.path.lexists(self.path):
                raise OutputError(self.path, "output file already exists (it appeared while writing)") from None
            os.rename(self.tmp_path, self.path)
            return
        os.unlink(self.tmp_path)

    def abort(self) -> None:
        """Close and remove the temporary file unless committed (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed and not self._removed:
            self._removed = True
            try:
                os.unlink(self.tmp_path)
            except FileNotFoundError:
                pass
