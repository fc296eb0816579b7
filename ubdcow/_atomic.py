"""Atomic output files: write a temporary file beside the target, fsync, rename.

A crash or kill -9 never leaves a partial file under the final name; the
temporary file is named after its target and its writer's pid
(``.NAME.PID.XXXX.ubdcow-tmp``) so a later run can remove leftovers whose
writer is dead.

An output made from other files (``inputs``) is no more readable than they
are: its group and others keep only the permission bits every input gives
them (see :func:`allowed_bits`). A COW file names the file it reads, so an
untrusted one can make a privileged ubdcow read a secret; the secret then
lands in a file only its owner can read.
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
from ._signals import deferred, register, release
from .errors import Fix, ImageLockedError, OutputError, io_error

__all__ = ["AtomicFile", "allowed_bits", "check_output_path", "TMP_SUFFIX"]

TMP_SUFFIX = ".ubdcow-tmp"


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def allowed_bits(inputs: Iterable[os.stat_result], gid: int) -> int:
    """The permission bits (of 0o777) an output of group ``gid`` made from ``inputs`` may have.

    Its group and others keep only what every input gives them; an input's
    group bits count for the output's group only when the input has that same
    group (to anyone else the input's "other" bits apply). The owner's bits
    are not limited: the output's owner is the user who read the inputs.
    """
    bits = 0o777
    for st in inputs:
        other = st.st_mode & 0o007
        group = st.st_mode & 0o070 if st.st_gid == gid else other << 3
        bits &= 0o700 | group | other
    return bits


def _may_own(uid: int, inputs: Iterable[os.stat_result]) -> bool:
    """Whether ``uid`` may own an output made from ``inputs``: it can read each of them as their owner
    or as anyone (group membership is not looked at: when in doubt, no)."""
    if uid in (0, os.geteuid()):
        return True
    return all((st.st_uid == uid and st.st_mode & 0o400) or st.st_mode & 0o004 for st in inputs)


def check_output_path(
    path: str,
    *,
    overwrite: bool,
    inputs: Mapping[str, os.stat_result] | Iterable[tuple[str, os.stat_result]] = (),
    replace: str = "to replace it",
) -> None:
    """Refuse an output path that would lose something if replaced (``replace``: the hint's words for
    ``overwrite``).

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
        raise OutputError(path, "output file already exists", fixes=(Fix(replace, (("overwrite", None),)),))
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
    Ctrl-C) removes the temporary file. ``inputs``: the stat results of the
    files whose content the output holds (a mapping like
    :func:`check_output_path`'s, or a list); the output is then no more
    readable than they are (:func:`allowed_bits`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        overwrite: bool = False,
        inputs: Mapping[str, os.stat_result] | Iterable[os.stat_result] | None = None,
    ) -> None:
        path = os.fspath(path)
        self.inputs = None if inputs is None else list(inputs.values() if isinstance(inputs, Mapping) else inputs)
        if os.path.islink(path) and os.path.exists(path):
            path = os.path.realpath(path)  # replace the file the link points at, not the link
        self.path = path
        self.overwrite = overwrite
        self.directory = os.path.dirname(os.path.abspath(path))
        self.fd = -1
        self.tmp_path = ""
        self.committed = False
        self._removed = False
        self._undo = 0

    def __enter__(self) -> AtomicFile:
        """Make the temporary file (here, not in ``__init__``: once it exists, the ``with`` block removes it)."""
        base = os.path.basename(self.path)
        _cleanup_stale(self.directory, base)
        try:
            with deferred():  # made and its removal registered together (see _signals)
                try:
                    self.fd, self.tmp_path = tempfile.mkstemp(
                        prefix=f".{base}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=self.directory
                    )
                except OSError as exc:
                    raise io_error(self.path, exc, f"cannot create a file in {self.directory}") from None
                self._undo = register(self.abort)
            return self
        except BaseException:  # a signal raised as the section ends: __exit__ will not run, so remove it here
            self.abort()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.abort()

    def commit(self) -> None:
        """fsync, give the file normal permissions, move it into place and fsync the folder."""
        try:
            self._set_owner_and_mode()
            os.fsync(self.fd)
            self._close()
            if self.overwrite:
                os.replace(self.tmp_path, self.path)
            else:
                self._link_no_replace()
            fsync_dir(self.directory)
        except OSError as exc:
            raise io_error(self.path, exc, "cannot finish writing") from None
        self.committed = True

    def _set_owner_and_mode(self) -> None:
        """A new file gets 0666 & ~umask, limited by the inputs' bits (:func:`allowed_bits`); a replaced one
        keeps its group, its owner (if that owner may read the inputs) and its mode (if not wider)."""
        try:
            old = os.stat(self.path) if self.overwrite else None
        except OSError:
            old = None
        if old is not None:
            uid = old.st_uid if self.inputs is None or _may_own(old.st_uid, self.inputs) else -1
            try:
                os.fchown(self.fd, uid, old.st_gid)
            except OSError:
                pass  # not ours to give away: keep the writer's
        allowed = 0o7777 if self.inputs is None else allowed_bits(self.inputs, os.fstat(self.fd).st_gid)
        mode = 0o666 & ~current_umask() & allowed
        if old is not None and stat.S_IMODE(old.st_mode) & ~allowed == 0:
            mode = stat.S_IMODE(old.st_mode)
        os.fchmod(self.fd, mode)

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

    def _close(self) -> None:
        with deferred():  # closed and forgotten together: never closed twice
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                os.close(fd)

    def abort(self) -> None:
        """Close and remove the temporary file unless committed (idempotent; a signal does not cut it short).

        What was registered after it (merge's writer thread, which writes into it) is stopped first.
        """
        with deferred():
            release(self._undo)
            self._close()
            if not self.committed and not self._removed and self.tmp_path:
                try:
                    os.unlink(self.tmp_path)  # after a commit cut short by a signal, it may be gone already
                except FileNotFoundError:
                    pass
                self._removed = True
