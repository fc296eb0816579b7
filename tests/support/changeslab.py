"""What ``ubdcow changes`` is judged against: a model tree, a workload that makes every kind of change the
issue lists, and the kernel's view as the oracle.

- :func:`make_tree` / :func:`make_model`: a root-like tree (files of many sizes, a 3000-entry directory,
  devices, a FIFO, fast and slow symlinks, hard links, xattrs in the inode and in a block) and an
  ext2/ext3/ext4 image of it (``mkfs -d``);
- :data:`WORKLOAD` / :func:`workload_script`: shell commands run with the filesystem's root as the
  current folder, by the host on a read-write loop mount or by a UML guest on /dev/ubdb: create,
  delete, rename, move a directory, chmod, chown, ``touch -d``, setfattr (add, change, remove; in the
  inode and in a block), hard links, symlinks (new, retargeted), truncate (down and up), an in-place write
  whose mtime is restored with ``touch -r``, a rewrite of identical bytes with its mtime restored (no
  change), a file replaced by a symlink and by a directory, a directory replaced by a file, ``rm -rf`` of a
  tree, devices (new, new numbers), a FIFO, files removed and re-created (inode numbers reused), entries
  added to and removed from a large hashed directory, a directory's mode and mtime;
- :func:`kernel_tree` and :func:`expected`: the kernel's view (``mount -o loop,ro``, lstat, readlink,
  listxattr/getxattr, sha256 of every file) of the old and the new disk, and the report the issue's
  rules give, computed here independently of ubdcow (a plain comparison of two full walks);
- :func:`identities`: (inode, generation, creation time) per path from ``debugfs``, for ``--renames``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

from . import fstree
from conftest import require_root, require_tool, run_cli

FAIL = "UBDCOW-FAIL"
#: the fields of the issue, in its order (the last three only with --all)
FIELDS = ("type", "content", "target", "rdev", "mode", "uid", "gid", "mtime", "xattrs", "ctime", "atime", "nlink")
CONTENT_FIELDS = {"type", "content", "target", "rdev"}
LARGE_XATTR = 1500


def make_tree(root: Path, seed: int = 23) -> None:
    """The model's tree (as root: devices and owners)."""
    rng = random.Random(seed)
    for folder in ("etc", "opt/moveme/sub", "usr/share/doomed", "var", "reuse", "reuse2", "bigdir", "dev",
                   "links", "srv", "etc/dir-to-file"):  # fmt: skip
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = ("hostname", "passwd", "delete-me", "rename-me", "chmod-me", "chown-me", "touch-me", "xattr-add",
             "xattr-change", "xattr-remove", "hard-src", "hard-a", "to-symlink", "to-dir")  # fmt: skip
    for name in names:
        (root / "etc" / name).write_bytes(f"{name}\n".encode() * rng.randrange(1, 40))
    os.link(root / "etc" / "hard-a", root / "etc" / "hard-b")
    (root / "etc" / "dir-to-file" / "inner").write_text("inner\n")
    os.setxattr(root / "etc" / "xattr-change", "user.k", b"old")
    os.setxattr(root / "etc" / "xattr-remove", "user.k", b"v")
    os.symlink("target1", root / "etc" / "relink")
    for i in range(6):
        (root / "opt" / "moveme" / f"m{i}").write_bytes(rng.randbytes(rng.randrange(0, 9000)))
    (root / "opt" / "moveme" / "sub" / "deep").write_text("deep\n")
    for d in range(4):
        (root / "usr" / "share" / "doomed" / f"d{d}").mkdir()
        for i in range(10):
            (root / "usr" / "share" / "doomed" / f"d{d}" / f"f{i}").write_bytes(rng.randbytes(rng.randrange(1, 20000)))
    sizes = {"big-truncate": 300_000, "grow": 10_000, "inplace": 20_000, "same": 50_000, "big": 6 << 20,
             "append": 5_000, "xattr-block": 100}  # fmt: skip
    for name, size in sizes.items():
        (root / "var" / name).write_bytes(rng.randbytes(size))
    os.setxattr(root / "var" / "xattr-block", "user.large", b"a" * LARGE_XATTR)
    for i in range(30):
        (root / "reuse" / f"f{i:02d}").write_text(f"old {i}\n")
        (root / "reuse2" / f"x{i:02d}").write_text(f"first {i}\n")
    for i in range(3000):
        (root / "bigdir" / f"entry-{i:05d}").write_bytes(b"%d" % i if i % 7 == 0 else b"")
    os.mknod(root / "dev" / "chr-old", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(root / "dev" / "chr-keep", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
    os.mkfifo(root / "dev" / "fifo")
    os.symlink("t" * 30, root / "links" / "fast")
    os.symlink("/" + "s" * 200, root / "links" / "slow")
    os.utime(root / "etc" / "touch-me", (1_600_000_000, 1_600_000_000))


#: the workload: (shell command, comment); run with the filesystem's root as the current folder
WORKLOAD = [
    "echo new > etc/newfile",
    "mkdir -p srv/www && echo hi > srv/www/index.html",
    "rm etc/delete-me",
    "mv etc/rename-me etc/renamed",
    "mv opt/moveme srv/moved",
    "chmod 600 etc/chmod-me",
    "chown 1000:2000 etc/chown-me",
    "touch -d '2001-02-03 04:05:06' etc/touch-me",
    "setfattr -n user.new -v value etc/xattr-add",
    "setfattr -n user.k -v changed etc/xattr-change",
    "setfattr -x user.k etc/xattr-remove",
    f"setfattr -n user.large -v {'b' * LARGE_XATTR} var/xattr-block",
    "ln etc/hard-src etc/hard-new",
    "rm etc/hard-b",
    "ln -s target etc/newlink",
    "ln -sfn target2 etc/relink",
    "truncate -s 100 var/big-truncate",
    "truncate -s 2000000 var/grow",
    "touch -r var/inplace ref.tmp && dd if=/dev/urandom of=var/inplace bs=1 count=10 seek=5000 conv=notrunc "
    "status=none && touch -r ref.tmp var/inplace && rm ref.tmp",
    "touch -r var/same ref2.tmp && dd if=var/same of=var/same bs=4096 conv=notrunc status=none && "
    "touch -r ref2.tmp var/same && rm ref2.tmp",
    "rm etc/to-symlink && ln -s somewhere etc/to-symlink",
    "rm etc/to-dir && mkdir etc/to-dir && echo inside > etc/to-dir/inside",
    "rm -rf etc/dir-to-file && echo now-a-file > etc/dir-to-file",
    "rm -rf usr/share/doomed",
    "mknod dev/chr-new c 1 7",
    "rm dev/chr-old && mknod -m 600 dev/chr-old c 1 8",
    "mkfifo dev/fifo-new",
    "rm reuse/f*",
    "for i in $(seq 0 29); do echo \"replacement $i\" > reuse/g$i; done",
    "rm reuse2/x*",
    "for i in $(seq -w 0 29); do echo \"second $i\" > reuse2/x$i; done",
    "for i in $(seq -w 0 99); do rm bigdir/entry-000$i; echo $i > bigdir/added-$i; done",
    "dd if=/dev/urandom of=var/big bs=4096 count=2 seek=100 conv=notrunc status=none",
    "echo more >> var/append",
    "chmod 700 srv",
    "touch -d 2002-01-01 opt",
]
#: the programs the workload runs (the guest runs the host's, through hostfs), and their packages
TOOLS = {"setfattr": "attr", "mknod": "coreutils", "mkfifo": "coreutils", "truncate": "coreutils", "dd": "coreutils",
         "touch": "coreutils", "chown": "coreutils", "seq": "coreutils"}  # fmt: skip


def workload_script(commands: list[str] | None = None, *, guest: bool = False) -> str:
    """The workload as a shell script: each command checked (a guest prints a failure marker; the host stops)."""
    for name, package in TOOLS.items():
        require_tool(name, package)
    lines = []
    for cmd in WORKLOAD if commands is None else commands:
        lines.append(f"{{ {cmd}; }} || echo {FAIL}: {json.dumps(cmd)}" if guest else f"{cmd} || exit 1")
    return "\n".join(lines) + "\n"


def run(*cmd: str | os.PathLike[str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc


def make_model(tree: Path, image: Path, fstype: str, size: str = "200M", *extra: str) -> Path:
    """``mkfs.<fstype> -d tree image size`` (4 KiB blocks; ext3 and ext4 get hashed directories)."""
    mkfs = require_tool(f"mkfs.{fstype}", "e2fsprogs")
    run(mkfs, "-q", "-F", "-b", "4096", *extra, "-d", tree, image, size)
    if fstype != "ext2":  # mkfs -d makes linear directories; e2fsck -D hashes them
        proc = subprocess.run([require_tool("e2fsck", "e2fsprogs"), "-fyD", str(image)], capture_output=True,
                              text=True, timeout=600)  # fmt: skip
        assert proc.returncode in (0, 1), proc.stdout[-2000:]
    return image


def modify(model: Path, out: Path, script: str) -> Path:
    """A copy of ``model`` changed by the kernel: mounted read-write, ``script`` run at its root, unmounted."""
    require_root("a read-write loop mount")
    shutil.copyfile(model, out)
    point = out.with_suffix(".mnt")
    point.mkdir(exist_ok=True)
    run(require_tool("mount", "mount"), "-o", "loop", out, point)
    try:
        proc = subprocess.run(["sh", "-c", script], cwd=point, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
        point.rmdir()
    return out


def kernel_tree(image: Path, *, offset: int = 0, noload: bool = True) -> dict[bytes, dict[str, Any]]:
    """The kernel's view of every entry of ``image`` (a read-only loop mount)."""
    with fstree.mounted(image, offset=offset, noload=noload) as point:
        return fstree.kernel_view(point)


def _fields(a: dict[str, Any], b: dict[str, Any], all_fields: bool) -> list[str]:
    """The issue's rules, written out for the test."""
    out = []
    if a["type"] != b["type"]:
        out.append("type")
    elif a["type"] == "file" and a["sha256"] != b["sha256"]:
        out.append("content")
    elif a["type"] == "symlink" and a["target"] != b["target"]:
        out.append("target")
    elif a["type"] in ("char", "block") and a["rdev"] != b["rdev"]:
        out.append("rdev")
    out += [k for k in ("mode", "uid", "gid") if a[k] != b[k]]
    both_dirs = a["type"] == b["type"] == "dir"
    if a["mtime_ns"] != b["mtime_ns"] and (all_fields or not both_dirs):
        out.append("mtime")
    if a["xattrs"] != b["xattrs"]:
        out.append("xattrs")
    if all_fields:
        out += [k for k, key in (("ctime", "ctime_ns"), ("atime", "atime_ns"), ("nlink", "nlink")) if a[key] != b[key]]
    return out


def expected(old: dict[bytes, dict[str, Any]], new: dict[bytes, dict[str, Any]], *, all_fields: bool = False,
             under: list[bytes] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The report by the issue's rules, sorted by path (``under``: only those subtrees)."""
    out = []
    for path in sorted(old.keys() | new.keys()):
        if under is not None and not any(path == u or path.startswith(u.rstrip(b"/") + b"/") for u in under):
            continue
        name = os.fsdecode(path)
        if path not in new:
            out.append({"path": name, "change": "deleted", "type": old[path]["type"], "fields": []})
        elif path not in old:
            out.append({"path": name, "change": "added", "type": new[path]["type"], "fields": []})
        else:
            fields = _fields(old[path], new[path], all_fields)
            if fields:
                kind = "modified" if CONTENT_FIELDS & set(fields) else "metadata"
                out.append({"path": name, "change": kind, "type": new[path]["type"], "fields": fields})
    return out


def changes_json(*args: str | os.PathLike[str], code: int | None = None, env: dict[str, str] | None = None
                 ) -> tuple[dict[str, Any], str]:  # fmt: skip
    """``ubdcow changes ARGS --json``: the document and stderr."""
    proc = run_cli("changes", *map(str, args), "--json", env=env)
    assert "Traceback" not in proc.stderr.decode(errors="replace"), proc.stderr
    doc = json.loads(proc.stdout)
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr.decode(errors="replace"), doc)
    assert doc["exit_code"] == proc.returncode
    return doc, proc.stderr.decode(errors="replace")


def entries(doc: dict[str, Any], index: int = 0) -> list[dict[str, Any]]:
    return list(doc["disks"][index]["entries"])


def assert_same_report(ours: list[dict[str, Any]], oracle: list[dict[str, Any]]) -> None:
    """Entry by entry; the message lists the first differences."""
    a = {e["path"]: e for e in ours}
    b = {e["path"]: e for e in oracle}
    problems = [f"only ubdcow reports {p!r}: {a[p]}" for p in sorted(a.keys() - b.keys())]
    problems += [f"only the kernel's view shows {p!r}: {b[p]}" for p in sorted(b.keys() - a.keys())]
    problems += [f"{p!r}: ubdcow {a[p]} kernel {b[p]}" for p in sorted(a.keys() & b.keys()) if a[p] != b[p]]
    assert not problems, f"{len(problems)} differences:\n" + "\n".join(problems[:40])
    assert [e["path"] for e in ours] == sorted((e["path"] for e in ours), key=os.fsencode), "not sorted by path"


def identities(image: Path, inodes: set[int]) -> dict[int, tuple[int, int, str]]:
    """(inode, generation, crtime) of each inode, from ``debugfs -R 'stat <N>'`` (not from ubdcow)."""
    debugfs = require_tool("debugfs", "e2fsprogs")
    out = {}
    for ino in sorted(inodes):
        text = run(debugfs, "-R", f"stat <{ino}>", image).stdout
        generation = re.search(r"Generation:\s*(\d+)", text)
        crtime = re.search(r"crtime:\s*(\S+)", text)
        out[ino] = (ino, int(generation[1]) if generation else -1, crtime[1] if crtime else "")
    return out


def expected_renames(report: list[dict[str, Any]], old_view: dict[bytes, dict[str, Any]],
                     new_view: dict[bytes, dict[str, Any]], old_image: Path, new_image: Path
                     ) -> list[dict[str, Any]]:  # fmt: skip
    """The report with deleted and added entries of the same file (inode, generation, creation time) paired."""
    deleted = [e for e in report if e["change"] == "deleted"]
    added = [e for e in report if e["change"] == "added"]
    old_ids = identities(old_image, {old_view[os.fsencode(e["path"])]["inode"] for e in deleted})
    new_ids = identities(new_image, {new_view[os.fsencode(e["path"])]["inode"] for e in added})
    pool: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for e in deleted:
        pool.setdefault(old_ids[old_view[os.fsencode(e["path"])]["inode"]], []).append(e)
    gone, out = set(), []
    for e in report:
        if e["change"] == "added":
            key = new_ids[new_view[os.fsencode(e["path"])]["inode"]]
            if pool.get(key):
                source = pool[key].pop(0)
                gone.add(source["path"])
                a, b = old_view[os.fsencode(source["path"])], new_view[os.fsencode(e["path"])]
                out.append({"path": e["path"], "change": "renamed", "type": e["type"], "fields": _fields(a, b, False),
                            "from": source["path"]})  # fmt: skip
                continue
        out.append(e)
    return [e for e in out if not (e["change"] == "deleted" and e["path"] in gone)]
