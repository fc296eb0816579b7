"""The cache of model indexes (``ubdcow.fs.index``) under ``$XDG_CACHE_HOME/ubdcow/``.

A model's index costs one walk of its whole tree; a lab asks the same model again and again, so the index
is kept in one file per model, in the user's cache folder (never beside the model). It is keyed by what
changes when the model does:

- the file's identity and stamps: device, inode, size, mtime and **ctime** (which every write and every
  ``touch`` moves, and which nobody can set back: a model changed in place with its mtime restored still
  gets a new ctime);
- the filesystem's: the volume's offset, whether the journal was replayed, the superblock's UUID, write
  and mount times, and a SHA-256 of the superblock and of the group descriptors (free counts move with
  every allocation).

A cache file is trusted only when it is whole: its header (the key, the arrays' places) and a SHA-256 of
its body are checked on every load, and the arrays themselves (sorted, inside their bounds); anything
else is rebuilt. Files are written to a temporary name and renamed (two processes may build at once:
the last rename wins, both files are whole), mode 0600 in a 0700 folder; older files of the same model
are removed when a new one is written. ``UBDCOW_NO_CACHE=1`` (or ``cache=False``) bypasses the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import stat
import struct
import tempfile
import time
from typing import Any

import numpy as np

from ._signals import deferred, register, release
from .fs import FileSystem
from .fs import layout as L
from .fs.index import ARRAYS, ModelIndex, build_index

__all__ = ["cache_folder", "model_key", "load_index", "save_index", "model_index", "NO_CACHE_ENV"]

NO_CACHE_ENV = "UBDCOW_NO_CACHE"
MAGIC = b"UBDCOWIX"
VERSION = 1
_ALIGN = 64
_HEAD = struct.Struct("<8sI")
_MAX_HEADER = 1 << 20


def cache_folder() -> str:
    """``$XDG_CACHE_HOME/ubdcow`` (an absolute ``XDG_CACHE_HOME`` only, as the XDG spec says), else
    ``~/.cache/ubdcow``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ubdcow")


def cache_enabled(cache: bool) -> bool:
    return cache and os.environ.get(NO_CACHE_ENV, "") in ("", "0")


def model_key(st: os.stat_result, fs: FileSystem, journal: bool) -> dict[str, Any]:
    """What the index of the model (``st``: its file; ``fs``: the filesystem read from it) depends on."""
    volume = fs.volume
    geo = volume.geo
    assert geo is not None
    raw = volume.read(L.SUPERBLOCK_SIZE, L.SUPERBLOCK_OFFSET)
    digest = hashlib.sha256(raw)
    for i in range(geo.desc_blocks):
        digest.update(volume.block(geo.desc_block(i), "group descriptors"))
    mount_time, write_time = struct.unpack_from("<II", raw, 0x2C)
    return {
        "version": VERSION,
        "device": st.st_dev,
        "inode": st.st_ino,
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "ctime_ns": st.st_ctime_ns,
        "offset": volume.offset,
        "journal": journal,
        "replayed": len(volume.replayed_blocks),
        "uuid": geo.uuid,
        "s_wtime": write_time,
        "s_mtime": mount_time,
        "stamp": digest.hexdigest(),
    }


def _prefix(key: dict[str, Any]) -> str:
    return f"{key['device']:x}-{key['inode']:x}-{key['offset']:x}-"


def _name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return f"{_prefix(key)}{digest}.idx"


def _usable_folder(folder: str, create: bool) -> bool:
    """The folder exists (or is made, 0700), is ours, is a real folder (not a link), and is 0700."""
    if create:
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError:
            return False
    try:
        st = os.lstat(folder)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return False
        if stat.S_IMODE(st.st_mode) != 0o700:
            os.chmod(folder, 0o700)
    except OSError:
        return False
    return True


def load_index(key: dict[str, Any], folder: str | None = None) -> ModelIndex | None:
    """The cached index for ``key``, or None (absent, damaged, stale, unreadable)."""
    folder = folder or cache_folder()
    if not _usable_folder(folder, create=False):
        return None
    try:
        fd = os.open(os.path.join(folder, _name(key)), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read(fd, key)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return None
    finally:
        os.close(fd)


def _read(fd: int, key: dict[str, Any]) -> ModelIndex | None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size < _HEAD.size:
        return None
    magic, length = _HEAD.unpack(os.pread(fd, _HEAD.size, 0))
    if magic != MAGIC or length > _MAX_HEADER or _HEAD.size + length > st.st_size:
        return None
    header = json.loads(os.pread(fd, length, _HEAD.size))
    body = _aligned(_HEAD.size + length)
    if header.get("version") != VERSION or header.get("key") != key or body > st.st_size:
        return None
    mm = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)  # kept open by the arrays that view it
    with memoryview(mm) as view:
        digest = hashlib.sha256(view[body:]).hexdigest()
    if digest != header.get("body_sha256"):
        return None
    arrays = {}
    for name, dtype in ARRAYS.items():
        offset, count = header["arrays"][name]
        if not (isinstance(offset, int) and isinstance(count, int)) or offset < body or offset % _ALIGN:
            return None
        if count < 0 or offset + count * dtype.itemsize > st.st_size:
            return None
        arrays[name] = np.frombuffer(mm, dtype=dtype, count=count, offset=offset)
    index = ModelIndex(arrays, entries=int(header["entries"]))
    return index if index.check() is None else None


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def save_index(key: dict[str, Any], index: ModelIndex, folder: str | None = None) -> bool:
    """Write the index for ``key`` (temporary file, then rename); False when the cache cannot be written."""
    folder = folder or cache_folder()
    if not _usable_folder(folder, create=True):
        return False
    target = os.path.join(folder, _name(key))
    layout: dict[str, list[int]] = {}
    header = {"version": VERSION, "key": key, "entries": index.entries, "arrays": layout, "body_sha256": ""}
    at = 0  # offsets are first counted from the body, then moved once the header's length is known
    for name in ARRAYS:
        layout[name] = [at, len(index.arrays[name])]
        at = _aligned(at + index.arrays[name].nbytes)
    digest = hashlib.sha256()
    for name in ARRAYS:
        data = index.arrays[name].tobytes()
        digest.update(data + bytes(_aligned(len(data)) - len(data)))
    header["body_sha256"] = digest.hexdigest()
    body, text = 0, b""
    while not text or _aligned(_HEAD.size + len(text)) != body:  # the offsets' digits move the body: settle it
        body = max(body, _aligned(_HEAD.size + len(text)))
        text = json.dumps({**header, "arrays": {k: [v[0] + body, v[1]] for k, v in layout.items()}}).encode()
    try:
        _write(folder, target, _HEAD.pack(MAGIC, len(text)) + text, body, index)
    except OSError:
        return False
    _remove_older(folder, key, os.path.basename(target))
    return True


def _write(folder: str, target: str, head: bytes, body: int, index: ModelIndex) -> None:
    with deferred():
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".idx", dir=folder)  # mode 0600
        undo = register(lambda: _unlink(tmp))
    try:
        with open(fd, "wb", closefd=True) as f:
            f.write(head + bytes(body - len(head)))
            for name in ARRAYS:
                data = index.arrays[name].tobytes()
                f.write(data + bytes(_aligned(len(data)) - len(data)))
        os.replace(tmp, target)
    finally:
        with deferred():
            release(undo)
            _unlink(tmp)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _remove_older(folder: str, key: dict[str, Any], keep: str) -> None:
    """Other indexes of the same model file (it changed since), and temporary files older than an hour (of a
    writer killed with SIGKILL)."""
    prefix = _prefix(key)
    with contextlib.suppress(OSError):
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if name.startswith(prefix) and name.endswith(".idx") and name != keep:
                _unlink(path)
            elif name.startswith(".tmp-") and name.endswith(".idx"):
                with contextlib.suppress(OSError):
                    if os.lstat(path).st_mtime < time.time() - 3600:
                        _unlink(path)


def model_index(fs: FileSystem, st: os.stat_result, *, journal: bool, cache: bool = True) -> ModelIndex:
    """The index of the model ``fs`` (read from the file ``st`` describes): from the cache when it holds a whole,
    current one, else built by a walk of the model (and cached). Raises the internal ``Corrupt`` for a corrupt
    model."""
    use = cache_enabled(cache)
    key = model_key(st, fs, journal) if use else None
    folder = cache_folder()
    if key is not None and os.path.realpath(folder) != os.path.realpath(os.path.dirname(fs.name) or "."):
        found = load_index(key, folder)
        if found is not None:
            return found
        index = build_index(fs.volume, fs.inodes)
        if index.check() is None and save_index(key, index, folder):
            reloaded = load_index(key, folder)  # mapped from the file: the built arrays can go
            if reloaded is not None:
                return reloaded
        return index
    return build_index(fs.volume, fs.inodes)
