"""The host side of ``get`` (:mod:`ubdcow.extract`): calls relative to folder descriptors that never follow a
link, ``renameat2(RENAME_NOREPLACE)``, and removing a tree ubdcow made (a temporary copy) without recursion,
opening up folders whose mode shuts their owner out."""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
import stat as S
from collections.abc import Callable

from ._atomic import TMP_SUFFIX

__all__ = ["pwrite_all", "exists", "unlink", "rename_noreplace", "replace", "remove_tree", "remove_stale",
           "more_files", "DIR_FLAGS"]  # fmt: skip

#: a folder of ours, opened to make entries in it (never through a link)
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_RENAME_NOREPLACE = 1


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def exists(parent: int, name: bytes) -> bool:
    try:
        os.lstat(name, dir_fd=parent)
    except FileNotFoundError:
        return False
    return True


def unlink(parent: int, name: bytes) -> None:
    try:
        os.unlink(name, dir_fd=parent)
    except FileNotFoundError:
        pass


_renameat2: Callable[..., int] | bool | None = False


def rename_noreplace(parent: int, old: bytes, new: bytes) -> None:
    """``renameat2(RENAME_NOREPLACE)``; where the host lacks it, a check then a rename (a short race)."""
    global _renameat2
    if _renameat2 is False:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = None
    if callable(_renameat2):
        if _renameat2(parent, old, parent, new, _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err))
    if exists(parent, new):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
    os.rename(old, new, src_dir_fd=parent, dst_dir_fd=parent)


def replace(parent: int, old: bytes, new: bytes) -> None:
    """Rename over ``new`` (a file, a link or an empty folder; of another kind, it is removed first)."""
    try:
        os.rename(old, new, src_dir_fd=parent, dst_dir_fd=parent)
    except (IsADirectoryError, NotADirectoryError):
        st = os.lstat(new, dir_fd=parent)
        if S.S_ISDIR(st.st_mode):
            os.rmdir(new, dir_fd=parent)
        else:
            os.unlink(new, dir_fd=parent)
        os.rename(old, new, src_dir_fd=parent, dst_dir_fd=parent)


def _open_for_removal(parent: int, name: bytes) -> int:
    try:
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    except PermissionError:  # a finished folder whose mode shuts its owner out
        os.chmod(name, 0o700, dir_fd=parent)
        fd = os.open(name, DIR_FLAGS, dir_fd=parent)
    try:
        os.fchmod(fd, 0o700)  # its entries can be removed
    except OSError:
        pass
    return fd


def remove_tree(parent: int, name: bytes) -> None:
    """Remove ``name`` in folder ``parent`` and all below it, without following any link and without
    recursion (a copy may be 2048 folders deep); folders whose mode shuts their owner out are opened up."""
    try:
        st = os.lstat(name, dir_fd=parent)
    except FileNotFoundError:
        return
    if not S.S_ISDIR(st.st_mode):
        unlink(parent, name)
        return
    stack: list[tuple[int, list[str], int, bytes]] = []
    try:
        fd = _open_for_removal(parent, name)
        stack.append((fd, os.listdir(fd), parent, name))
        while stack:
            fd, names, above, here = stack[-1]
            if not names:
                stack.pop()
                os.close(fd)
                os.rmdir(here, dir_fd=above)
                continue
            entry = os.fsencode(names.pop())
            if S.S_ISDIR(os.lstat(entry, dir_fd=fd).st_mode):
                child = _open_for_removal(fd, entry)
                stack.append((child, os.listdir(child), fd, entry))
            else:
                os.unlink(entry, dir_fd=fd)
    finally:
        for fd, *_ in stack:
            os.close(fd)


_STALE = re.compile(rb"\.(.*)\.(\d+)\.[0-9a-f]{8}" + re.escape(TMP_SUFFIX.encode()) + rb"$")


def remove_stale(parent: int, name: bytes) -> None:
    """Remove the temporary copies of ``name`` that a run which no longer lives left (kill -9)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for entry in map(os.fsencode, names):
        m = _STALE.match(entry)
        if m is None or m.group(1) != name[:100] or int(m.group(2)) == os.getpid():
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue  # its writer lives
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        try:
            remove_tree(parent, entry)
        except OSError:
            pass


def more_files() -> bool:
    """Raise the soft limit of open files to the hard one (a copy keeps a folder open per level); whether
    it grew."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return False
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        return False
    return True
