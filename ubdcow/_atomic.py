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
import tempfile
from types import TracebackType

from ._io import fsync_dir, same_file
from .errors import ImageIOError, OutputError

__all__ = ["AtomicFile", "check_output_path", "TMP_SUFFIX"]

TMP_SUFFIX = ".ubdcow-tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_path(
    path: str, *, overwrite: bool, inputs: dict[str, os.stat_result] | None = None, hint: str | None = None
) -> None:
    """Refuse an output that exists (without ``overwrite``) or that is one of the ``inputs`` (any path or link)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return  # absent, or a dangling link (replaced; nothing is lost)
    except OSError as exc:
        raise OutputError(path, f"cannot use as output: {exc.strerror}") from None
    for what, ist in (inputs or {}).items():
        if same_file(st, ist):
            raise OutputError(path, f"output is the {what} (same file); refusing to overwrite it")
    if not overwrite:
        raise OutputError(path, "output file already exists", hint=hint or "use --overwrite to replace it")


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
            os.fchmod(self.fd, 0o666 & ~_umask())
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
