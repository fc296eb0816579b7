"""What the filesystem API returns: the :class:`FileStat` record, and paths as bytes or str."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["FileStat", "PathLike", "to_bytes", "like", "show", "join"]

PathLike = str | bytes | os.PathLike[str] | os.PathLike[bytes]
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


@dataclass(frozen=True, slots=True)
class FileStat:
    """One entry of the filesystem, as ``os.lstat`` describes it, plus the symlink target.

    ``path`` has the type of the path asked for (bytes or str; str paths decode undecodable bytes with
    surrogateescape, as ``os.fsdecode`` does). ``type`` is one of 'file', 'dir', 'symlink', 'char',
    'block', 'fifo', 'socket'; ``mode`` holds the 12 permission bits (suid, sgid, sticky, rwx).
    Times are nanoseconds since the epoch (``crtime_ns`` is None where the inode has no creation time).
    ``rdev`` is (major, minor) for devices, else None; ``target`` is a symlink's target, else None.
    ``blocks`` counts 512-byte units, as ``st_blocks``; ``flags`` are the inode's flags (``lsattr``).
    """

    path: Any
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int | None
    inode: int
    rdev: tuple[int, int] | None
    target: Any
    blocks: int
    flags: int
    generation: int

    @property
    def name(self) -> Any:
        """The last component of ``path``."""
        sep = b"/" if isinstance(self.path, bytes) else "/"
        return self.path.rstrip(sep).rsplit(sep, 1)[-1] or sep

    @property
    def st_mode(self) -> int:
        """``mode`` with the file type bits, as ``os.stat_result.st_mode``."""
        return self.mode | _IFMT[self.type]

    def as_dict(self) -> dict[str, Any]:
        """The fields as a dict (bytes paths and targets decoded with surrogateescape, rdev as a list)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("path", "target"):
            if isinstance(out[key], bytes):
                out[key] = os.fsdecode(out[key])
        if out["rdev"] is not None:
            out["rdev"] = list(out["rdev"])
        return out


_IFMT = {"file": 0o100000, "dir": 0o040000, "symlink": 0o120000, "char": 0o020000, "block": 0o060000,
         "fifo": 0o010000, "socket": 0o140000}  # fmt: skip


def to_bytes(path: PathLike) -> tuple[bytes, bool]:
    """``path`` as bytes, and whether the caller gave a str (answers then come back as str)."""
    raw = os.fspath(path)
    if isinstance(raw, str):
        return os.fsencode(raw), True
    return raw, False


def like(value: bytes, as_str: bool) -> Any:
    """``value`` in the caller's type: str (surrogateescape) or bytes."""
    return os.fsdecode(value) if as_str else value


def show(path: bytes) -> str:
    """A path for a one-line message: undecodable bytes and control characters escaped."""
    text = path.decode("utf-8", "backslashreplace")
    return text.translate(_ESCAPES)


def join(directory: bytes, name: bytes) -> bytes:
    return (directory if directory.endswith(b"/") else directory + b"/") + name
