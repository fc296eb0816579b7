"""The glue between :mod:`ubdcow.fuseops` and libfuse through mfusepy: ``struct stat`` packing, mfusepy's
``FUSE`` with its readdir, read and init callbacks done here, and the kernel keeping folder listings."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from .fuseops import FILL_DIR_PLUS, READDIR_PLUS, Attributes

__all__ = ["fuse_class", "keep_listings", "packer"]


def packer(binding: ModuleType) -> Callable[[Attributes], bytes]:
    """Attributes as the bytes of the binding's ``struct stat`` (what libfuse's filler takes)."""
    st = binding.c_stat()
    size = ctypes.sizeof(st)
    lock = threading.Lock()

    def pack(attrs: Attributes) -> bytes:
        with lock:
            ctypes.memset(ctypes.addressof(st), 0, size)
            binding.set_st_attrs(st, attrs, use_ns=True)
            return ctypes.string_at(ctypes.addressof(st), size)

    return pack


#: libfuse 3's ``struct fuse_lowlevel_ops`` (public, fuse_lowlevel.h): 44 function pointers; ``opendir`` is the 21st
_LOWLEVEL_OPS = 44
_OPENDIR = 20
#: the ones libfuse's high-level API always leaves NULL in the table it hands the session (write: it uses
#: write_buf; retrieve_reply), and the ones it always sets (init, destroy, lookup, forget, getattr, open, read,
#: release, opendir, readdir, releasedir, statfs, readdirplus); the rest depend on the filesystem's operations
_UNSET = (16, 37)
_SET = (0, 1, 2, 3, 4, 14, 15, 18, 20, 21, 22, 24, 42)
#: how far into ``struct fuse_session`` the table is looked for (it is among the first fields)
_SCAN = 256


def _text_ranges(address: int) -> list[tuple[int, int]]:
    """The executable mappings of the file mapped at ``address`` (a function of a library) in this process."""
    maps = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                maps.append((start, end, fields[1], fields[5]))
    path = next((p for start, end, _, p in maps if start <= address < end), None)
    return [(start, end) for start, end, perms, p in maps if p == path and "x" in perms] if path else []


def keep_listings(binding: ModuleType) -> Any:
    """Let the kernel keep each folder's listing (FOPEN_CACHE_DIR and FOPEN_KEEP_CACHE in the OPENDIR reply).

    libfuse's high-level API never sets those flags (its opendir drops what a filesystem sets), so a second
    pass over a tree would ask for every listing again. This wraps the session's low-level ``opendir`` so that
    the reply says them (the wrapper sets ``keep_cache`` and ``cache_readdir`` in the request's
    ``fuse_file_info``, then calls libfuse's own). ``struct fuse_session`` is private, so the table is found
    inside it only where it is unmistakable: one place among its first :data:`_SCAN` bytes where 44 words
    are pointers into libfuse's code, NULL where the high-level API always leaves them and set where it
    always sets them; anything else (another layout, libfuse 2) changes nothing. Called in libfuse's
    ``init``, before any other request; returns what must stay alive (the wrapper), or None.
    """
    try:
        lib = binding._libfuse
        if binding.fuse_version_major != 3 or not hasattr(binding.fuse_file_info, "cache_readdir"):
            return None
        lib.fuse_get_session.restype = ctypes.c_void_p
        lib.fuse_get_session.argtypes = [ctypes.c_void_p]
        session = lib.fuse_get_session(ctypes.c_void_p(lib.fuse_get_context().contents.fuse))
        ranges = _text_ranges(ctypes.cast(lib.fuse_get_session, ctypes.c_void_p).value or 0)
        if not session or not ranges:
            return None
        words = (ctypes.c_void_p * (_SCAN // 8 + _LOWLEVEL_OPS)).from_address(session)

        def code(pointer: int | None) -> bool:
            return pointer is not None and any(start <= pointer < end for start, end in ranges)

        def table(k: int) -> bool:
            return all(
                words[k + i] is None
                if i in _UNSET
                else code(words[k + i])
                if i in _SET
                else words[k + i] is None or code(words[k + i])
                for i in range(_LOWLEVEL_OPS)
            )

        found = [k for k in range(_SCAN // 8) if table(k)]
        if len(found) != 1:
            return None
        slot = found[0] + _OPENDIR
        prototype = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.POINTER(binding.fuse_file_info))
        original = prototype(words[slot] or 0)  # (set: _OPENDIR is in _SET)

        def opendir(req: Any, ino: int, fi: Any) -> None:
            try:
                fi.contents.keep_cache = 1
                fi.contents.cache_readdir = 1
            finally:
                original(req, ino, fi)

        wrapper = prototype(opendir)
        words[slot] = ctypes.cast(wrapper, ctypes.c_void_p).value
        return (wrapper, original)
    except Exception:  # (an unexpected library: no kept listings, nothing else changes)
        return None


def fuse_class(binding: ModuleType) -> Any:
    """mfusepy's ``FUSE`` with three of its libfuse callbacks done here (mfusepy 3.x's method names):

    - ``init`` (libfuse 3) makes the kernel keep folder listings (:func:`keep_listings`);
    - ``readdir`` fills from :attr:`Operations.directories` (packed attributes copied into one ``struct stat``),
      answering READDIRPLUS (libfuse 3) with each entry's attributes (FUSE_FILL_DIR_PLUS);
    - ``read`` reads straight into libfuse's buffer.
    """

    class Fuse(binding.FUSE):  # type: ignore[misc,name-defined]
        def init_fuse_3(self, conn: Any, config: Any) -> None:
            self.listings_kept = keep_listings(binding)  # (before the folder is reported ready)
            super().init_fuse_3(conn, config)

        def readdir_fuse_3(self, path: bytes, buf: Any, filler: Any, offset: int, fip: Any, flags: int) -> int:
            return self._fill(path, buf, filler, offset, bool(flags & READDIR_PLUS))

        def readdir_fuse_2(self, path: bytes, buf: Any, filler: Any, offset: int, fip: Any) -> int:
            return self._fill(path, buf, filler, offset, None)

        def _fill(self, path: bytes, buf: Any, filler: Any, offset: int, plus: bool | None) -> int:
            st = binding.c_stat()
            size = ctypes.sizeof(st)
            where = ctypes.addressof(st)
            entries = self.operations.directories.entries(path, offset)
            try:
                for name, packed, following in entries:
                    ctypes.memmove(where, packed, size)
                    if plus is None:
                        full = filler(buf, name, st, following)
                    else:
                        flags = FILL_DIR_PLUS if plus and following > 2 else 0  # (not for . and ..)
                        full = filler(buf, name, st, following, flags)
                    if full:
                        break
            finally:
                entries.close()
            return 0

        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            view = memoryview((ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))).cast("B")
            name = None if path is None else path.decode("utf-8", "surrogateescape")
            return int(self.operations.readinto(name, fip.contents.fh, view, offset))

    return Fuse
