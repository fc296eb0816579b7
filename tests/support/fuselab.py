"""Helpers of the ``mount`` tests: the FUSE gate, a mount that is always taken away, and what ordinary tools
(``find``, ``stat``, ``sha256sum``, ``getfattr``) say about a mounted tree — the same for ubdcow's FUSE mount
and for the kernel's read-only loop mount of the same filesystem, which is the oracle.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import find_tool, require, require_root, require_tool, run_cli


def require_fuse() -> None:
    """FUSE mounts here: fusermount3, /dev/fuse, mfusepy, and root (the oracle is the kernel's loop mount)."""
    require_root("FUSE mounts compared with the kernel's loop mount")
    require_tool("fusermount3", "fuse3")
    require(os.path.exists("/dev/fuse"), "no /dev/fuse (modprobe fuse)")
    require(importlib.util.find_spec("mfusepy") is not None, "mfusepy is not installed (pip install 'ubdcow[mount]')")


def mount_entry(point: str | os.PathLike[str]) -> str | None:
    """The fstype of the topmost mount at ``point`` (from /proc/self/mountinfo), or None."""
    where = os.path.realpath(point)
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) > 4 and fields[4].replace("\\040", " ") == where:
                found = right.split()[0]
    return found


def process_gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether ``pid`` has exited (or is a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def fuse_at(point: str | os.PathLike[str]) -> bool:
    """Whether a FUSE mount (live or stale) is at ``point``."""
    kind = mount_entry(point)
    return kind is not None and kind.startswith("fuse")


def take_down(point: str | os.PathLike[str], pid: int | None = None) -> None:
    """Unmount ``point`` (``fusermount3 -u``, then ``-uz``) and make sure the mount process ``pid`` is gone."""
    fusermount = find_tool("fusermount3") or "fusermount3"
    for _ in range(3):
        if not fuse_at(point):
            break
        subprocess.run([fusermount, "-u", str(point)], capture_output=True, timeout=60)
        if fuse_at(point):
            subprocess.run([fusermount, "-uz", str(point)], capture_output=True, timeout=60)
    if pid is not None and not process_gone(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        process_gone(pid)
        subprocess.run([fusermount, "-uz", str(point)], capture_output=True, timeout=60)
    if fuse_at(point) and os.geteuid() == 0:  # the last resort: the kernel's lazy unmount
        subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=60)


@contextlib.contextmanager
def fuse_mounted(disk: str | os.PathLike[str], point: Path, *options: str,
                 env: dict[str, str] | None = None) -> Iterator[int]:  # fmt: skip
    """``ubdcow mount DISK POINT --json OPTIONS``: yields the pid of the process serving it; always taken away,
    and that process must be gone afterwards."""
    point.mkdir(exist_ok=True)
    proc = run_cli("mount", disk, point, "--json", *options, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    pid = int(json.loads(proc.stdout)["pid"])
    try:
        yield pid
    finally:
        take_down(point, pid)
    assert not fuse_at(point), "still mounted"
    assert process_gone(pid, 1), f"the mount process {pid} is still running"


# -- what ordinary tools see ------------------------------------------------------------------------

#: find's view of an entry: type, inode, mode, owners, size, links, the three times (ns precision), 512-byte blocks
FIND_FIELDS = "%y %i %m %U %G %s %n %T@ %A@ %C@ %b"


def _run(cmd: list[str], cwd: Path | None = None) -> bytes:
    proc = subprocess.run(cmd, capture_output=True, cwd=cwd, timeout=1800)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr.decode(errors='replace')[-2000:]}"
    return proc.stdout


def tool_view(root: Path, *, hashes: bool = True) -> dict[bytes, dict[str, Any]]:
    """path inside (``.`` for the root) -> what find, stat, sha256sum and getfattr print about it."""
    find = require_tool("find", "findutils")
    out = _run([find, ".", "-printf", f"%p\\0{FIND_FIELDS}\\0%l\\0"], cwd=root).split(b"\0")
    view: dict[bytes, dict[str, Any]] = {}
    for i in range(0, len(out) - 1, 3):
        path, fields, target = out[i : i + 3]
        view[path] = {"find": fields, "target": target, "rdev": None, "sha256": None, "xattrs": {}}
    stat = require_tool("stat", "coreutils")
    devices = _run([find, ".", "(", "-type", "c", "-o", "-type", "b", ")", "-exec", stat, "--printf",
                    "%n\\0%t:%T\\0", "{}", "+"], cwd=root).split(b"\0")  # fmt: skip
    for i in range(0, len(devices) - 1, 2):
        view[devices[i]]["rdev"] = devices[i + 1]
    if hashes:
        sums = _run([find, ".", "-type", "f", "-exec", require_tool("sha256sum", "coreutils"), "-z", "{}", "+"],
                    cwd=root).split(b"\0")  # fmt: skip
        for line in sums:
            if line:
                digest, path = line.split(b"  ", 1)
                view[path]["sha256"] = digest
    getfattr = require_tool("getfattr", "attr")
    dump = _run([getfattr, "-R", "-P", "-h", "-d", "-m", "-", "-e", "hex", "."], cwd=root)
    for block in re.split(rb"\n\n+", dump):
        lines = block.strip(b"\n").split(b"\n")
        if not lines or not lines[0].startswith(b"# file: "):
            continue
        name = _unescape_getfattr(lines[0][len(b"# file: ") :])
        if name != b"." and not name.startswith(b"./"):  # (getfattr drops the leading ./)
            name = b"./" + name
        view[name]["xattrs"] = dict(line.split(b"=", 1) if b"=" in line else (line, b"") for line in lines[1:])
    return view


def _unescape_getfattr(name: bytes) -> bytes:
    """getfattr writes special bytes of a name as backslash and three octal digits."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), name)


def assert_same_tool_view(kernel: dict[bytes, dict[str, Any]], fuse: dict[bytes, dict[str, Any]]) -> None:
    """Entry by entry, field by field; the message lists the first differences."""
    problems = [f"only the kernel has {p!r}" for p in sorted(kernel.keys() - fuse.keys())]
    problems += [f"only the FUSE mount has {p!r}" for p in sorted(fuse.keys() - kernel.keys())]
    for path in sorted(kernel.keys() & fuse.keys()):
        for key, value in kernel[path].items():
            if fuse[path].get(key) != value:
                problems.append(f"{path!r} {key}: kernel {value!r:.300} FUSE {fuse[path].get(key)!r:.300}")
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:30])


def small_image(folder: Path, files: dict[str, tuple[bytes, int]], *, size: str = "16M", fstype: str = "ext4",
                options: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """``mkfs -d`` of a tree of ``{path: (content, mode)}`` (owned by root when made by root)."""
    tree = folder / "tree"
    for name, (content, mode) in files.items():
        path = tree / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        path.chmod(mode)
    image = folder / f"{fstype}.img"
    mkfs = require_tool(f"mkfs.{fstype}", "e2fsprogs")
    _run([mkfs, "-q", "-F", *options, "-d", str(tree), str(image), size])
    return image


def take_down_under(folder: str | os.PathLike[str]) -> list[str]:
    """Unmount every mount below ``folder`` (FUSE ones with :func:`take_down`, the kernel's loop mounts with
    ``umount``, then ``umount -l``), deepest first; the mountpoints that were there."""
    root = os.path.realpath(folder) + "/"
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), left.split()[4])
            if point.startswith(root):
                found.append((point, right.split()[0]))
    for point, fstype in reversed(found):
        if fstype.startswith("fuse"):
            take_down(point)
        else:
            for cmd in (["umount"], ["umount", "-l"]):
                if mount_entry(point) is not None:
                    subprocess.run([*cmd, point], capture_output=True, timeout=120)
    return [point for point, _ in found]

