"""``ubdcow get`` (issue 22): the copy of a tree is the kernel's view of it, and nothing is written elsewhere.

Oracles: the kernel's read-only loop mount of the same image (lstat of every entry: type, mode, owner,
size, links, atime and mtime in ns, symlink targets, device numbers, extended attributes, sha256; holes
through SEEK_DATA/SEEK_HOLE), compared with the same record of the copy on the host. As root (owners,
devices and FIFOs made) and as ``nobody`` (``setpriv``: the skipped counts). Then the naming rules,
replacing, refusing the disk's own files, hostile images (names the reader refuses or leaves out, a name
held twice behind an absolute or ``../../..`` symbolic link, a folder loop) with the whole folder around
DEST compared before and after, a signal at any instant, and overlays of real guests: one shut down
cleanly, one killed (its journal replayed, or not with ``--no-journal``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_one_line_error, require_root, require_tool, run_cli
from support.fstree import assert_same_view, kernel_view, mounted
from test_fs_api import data_map

import ubdcow
from ubdcow.errors import CorruptFilesystemError

ROOT = Path(__file__).parent.parent
KEYS = ("type", "mode", "uid", "gid", "size", "nlink", "atime_ns", "mtime_ns", "target", "rdev", "xattrs", "sha256")
SPARSE = ("/files/holes", "/files/hole-at-end", "/files/fragmented", "/files/past-4G")


@pytest.fixture(scope="module")
def image(fs_images) -> Path:
    require_root("building the tree (owners, devices) and the loop mount")
    return fs_images.image("ext4")


@pytest.fixture(scope="module")
def mnt(image: Path):
    with mounted(image) as point:
        yield point


def view(folder: Path, *, drop: tuple[str, ...] = ()) -> dict[bytes, dict[str, Any]]:
    """The record of every entry under ``folder`` the copy promises (a folder's size is the host's own)."""
    out = {}
    for path, record in kernel_view(folder, hashes=False).items():  # every lstat before any read (atimes)
        kept = {k: record[k] for k in KEYS if k not in drop}
        if record["type"] == "dir":
            kept.pop("size", None)
        out[path] = kept
    base = os.fsencode(folder)
    for path, record in out.items():
        if record["type"] == "file" and "sha256" in record:
            digest = hashlib.sha256()
            with open(base + path if path != b"/" else base, "rb") as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
            record["sha256"] = digest.hexdigest()
    return out


def snapshot(folder: Path) -> dict[str, tuple[int, int, str | None]]:
    """Every entry below ``folder``: (mode, size, sha256 of a file or a link's target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            what = None
            if stat.S_ISREG(st.st_mode):
                what = hashlib.sha256(Path(path).read_bytes()).hexdigest() if st.st_size < 1 << 26 else "big"
            elif stat.S_ISLNK(st.st_mode):
                what = os.readlink(path)
            out[os.path.relpath(path, folder)] = (st.st_mode, st.st_size, what)
    return out


def get(*args: object, code: int = 0) -> dict[str, Any]:
    proc = run_cli("get", "--json", *args)
    assert proc.returncode == code, proc.stderr.decode()
    return json.loads(proc.stdout)


# -- the whole tree, as root ---------------------------------------------------------------------------------


def test_get_of_the_root_is_the_kernels_tree(image, mnt, tmp_path):
    doc = get(image, "/", "-o", tmp_path / "copy")
    kernel = view(mnt)
    sockets = {p for p, r in kernel.items() if r["type"] == "socket"}
    copy = view(tmp_path / "copy")
    assert_same_view({p: r for p, r in kernel.items() if p not in sockets}, copy)
    assert doc["skipped"] == {"owners": 0, "devices": 0, "fifos": 0, "sockets": len(sockets), "xattrs": 0,
                              "setid_bits": 0, "hard_links": 0}  # fmt: skip
    counts = {kind: sum(1 for r in copy.values() if r["type"] == kind) for kind in ("file", "dir", "symlink")}
    assert (doc["files"] + doc["hard_links"], doc["dirs"], doc["symlinks"]) == (counts["file"], counts["dir"],
                                                                                 counts["symlink"])  # fmt: skip
    assert doc["special"] == sum(1 for r in copy.values() if r["type"] in ("char", "block", "fifo"))
    # hard links are links, holes are holes
    names = [b"/links/hard", b"/links/hard-2", b"/files/hard-3"]
    assert len({os.lstat(os.fsencode(tmp_path / "copy") + n).st_ino for n in names}) == 1
    for inside in SPARSE:
        fds = [os.open(base / inside.lstrip("/"), os.O_RDONLY) for base in (mnt, tmp_path / "copy")]
        try:
            size = os.fstat(fds[0]).st_size
            maps = [data_map(lambda off, whence, fd=fd: os.lseek(fd, off, whence), size) for fd in fds]
            assert maps[0] == maps[1], inside
        finally:
            for fd in fds:
                os.close(fd)
    big = os.stat(tmp_path / "copy" / "files" / "past-4G")
    assert big.st_size > 4 << 30 and big.st_blocks * 512 < 1 << 20  # a 4 GiB file, sparse
    base = os.fsencode(tmp_path / "copy")
    inodes = {os.lstat(base + p).st_ino: base + p for p, r in copy.items() if r["type"] == "file"}
    assert doc["bytes"] == sum(e - s for path in inodes.values() for s, e in _data(path))  # holes not counted


def _data(path: bytes) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return data_map(lambda off, whence: os.lseek(fd, off, whence), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def test_the_summary_line(image, tmp_path):
    proc = run_cli("get", image, "/links", "/special", "-o", tmp_path / "two")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.decode()
    assert line.startswith(f"copied {image}:/links, /special -> {tmp_path / 'two'}: 2 files, 3 folders, 10 symbolic "
                           "links, 1 hard link, 4 device nodes and FIFOs, 23 B in ")  # fmt: skip
    assert line.endswith(" s; skipped: 1 socket\n")


def test_progress_only_on_a_terminal(image, tmp_path):
    from test_cli import run_on_tty

    code, terminal = run_on_tty(["get", image, "/files", "-o", tmp_path / "tty"])
    assert code == 0 and re.search(r"\rget: [0-9.]+ ?[KMG]?i?B \[", terminal), terminal
    assert (tmp_path / "tty" / "holes").exists()
    code, terminal = run_on_tty(["get", "--quiet", image, "/files", "-o", tmp_path / "quiet"])
    assert code == 0 and terminal == ""
    piped = run_cli("get", image, "/files", "-o", tmp_path / "piped")
    assert piped.returncode == 0 and piped.stderr == b"" and piped.stdout.startswith(b"copied ")


# -- as nobody ---------------------------------------------------------------------------------------


@pytest.fixture
def shared(image):
    """A folder nobody (65534) can read and a link to the image in it; removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="ubdcow-nobody-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        os.link(image, folder / "disk.img")
        out = folder / "out"
        out.mkdir()
        os.chown(out, 65534, 65534)
        yield folder
    finally:
        shutil.rmtree(folder)


def as_nobody(*args: object) -> subprocess.CompletedProcess[bytes]:
    setpriv = require_tool("setpriv", "util-linux")
    env = dict(os.environ)
    env.pop("UBDCOW_DEBUG", None)
    return subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                           "ubdcow", *map(str, args)], capture_output=True, env=env, cwd="/", timeout=600)  # fmt: skip


def test_get_as_nobody_skips_and_counts_what_needs_root(image, mnt, shared):
    proc = as_nobody("get", "--json", shared / "disk.img", "/", "-o", shared / "out" / "copy")
    assert proc.returncode == 0, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    kernel = view(mnt)
    copy = view(shared / "out" / "copy")
    special = {p for p, r in kernel.items() if r["type"] in ("char", "block", "fifo", "socket")}
    assert set(copy) == set(kernel) - special
    xattrs = sum(1 for r in kernel.values() for n in r["xattrs"] if n.split(".")[0] in ("trusted", "security"))
    assert doc["skipped"] == {
        "owners": sum(1 for p, r in kernel.items() if p not in special and (r["uid"], r["gid"]) != (65534, 65534))
        - 2,  # /links/hard-2 and /files/hard-3 are links to /links/hard: one owner
        "devices": sum(1 for r in kernel.values() if r["type"] in ("char", "block")),
        "fifos": sum(1 for r in kernel.values() if r["type"] == "fifo"),
        "sockets": sum(1 for r in kernel.values() if r["type"] == "socket"),
        "xattrs": xattrs,
        "setid_bits": sum(1 for p, r in kernel.items() if p not in special and r["type"] != "symlink"
                          and r["mode"] & 0o6000),  # fmt: skip
        "hard_links": 0,
    }
    for path, record in copy.items():
        want = dict(kernel[path], uid=65534, gid=65534)
        if want["type"] != "symlink":
            want["mode"] &= ~0o6000
        want["xattrs"] = {n: v for n, v in want["xattrs"].items() if n.split(".")[0] not in ("trusted", "security")}
        assert record == want, path


# -- naming, replacing, refusing --------------------------------------------------------------------------


def test_naming_is_cp_a(image, mnt, tmp_path):
    get(image, "/links", "-o", tmp_path / "L")  # one PATH, a new DEST: DEST is the copy
    kernel = view(mnt / "links", drop=("nlink",))
    assert_same_view(kernel, view(tmp_path / "L", drop=("nlink",)))
    assert os.lstat(tmp_path / "L" / "hard").st_ino == os.lstat(tmp_path / "L" / "hard-2").st_ino
    assert os.lstat(tmp_path / "L" / "hard").st_nlink == 2  # the third name is outside the copied set
    (tmp_path / "in").mkdir()
    get(image, "/links", "-o", tmp_path / "in")  # an existing folder receives it under its name
    assert_same_view(kernel, view(tmp_path / "in" / "links", drop=("nlink",)))
    get(image, "/files/holes", "/modes", "/links/absolute", "-o", tmp_path / "multi")  # several: a new folder
    assert sorted(os.listdir(tmp_path / "multi")) == ["absolute", "holes", "modes"]
    assert_same_view(view(mnt / "modes"), view(tmp_path / "multi" / "modes"))
    assert os.readlink(tmp_path / "multi" / "absolute") == "/files/size-100"  # a link, never followed
    assert (tmp_path / "multi" / "holes").read_bytes() == (mnt / "files" / "holes").read_bytes()
    assert stat.S_IMODE(os.stat(tmp_path / "multi").st_mode) == 0o777 & ~_umask()
    get(image, "/files/size-100", "/special/null", "-o", tmp_path / "in")  # several into an existing folder
    assert sorted(os.listdir(tmp_path / "in")) == ["links", "null", "size-100"]
    assert os.stat(tmp_path / "in" / "null").st_rdev == os.makedev(1, 3)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_what_get_refuses_leaves_the_folder_as_it_was(image, tmp_path):
    cow = tmp_path / "pc1.cow"
    ubdcow.create(cow, image)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("old\n")
    before = snapshot(tmp_path)
    cases = [
        (["/files/size-100", "-o", tmp_path / "file"], 1, ["already exists"]),
        (["/", "-o", tmp_path / "full"], 1, ["not empty", "remove it first"]),  # no hint: --overwrite would not
        (["/", "-o", tmp_path / "full", "--overwrite"], 1, ["not empty", "remove it first"]),
        (["/files/size-100", "-o", cow, "--overwrite"], 1, ["the disk's COW file"]),
        (["/files/size-100", "-o", image, "--overwrite"], 1, ["the disk's backing file"]),
        (["/files/size-100", "/links/to-dir/size-100", "-o", tmp_path / "x"], 1, ["both be copied as size-100"]),
        (["/", "/files", "-o", tmp_path / "x"], 1, ["the filesystem's root has no name"]),
        (["/files/size-100", "/modes", "-o", tmp_path / "file"], 1, ["not a folder"]),
        (["/nope", "-o", tmp_path / "x"], 1, ["/nope: no such file or directory"]),
        (["/files/size-100", "-o", tmp_path / "no" / "such" / "x"], 1, ["cannot write into this folder"]),
        (["/files", "-o", tmp_path / "empty", "--partition", "1"], 2, ["no partition table"]),
    ]
    for args, code, words in cases:
        proc = run_cli("get", cow, *args)
        assert proc.returncode == code, (args, proc.stderr)
        assert_one_line_error(proc, *words)
        assert snapshot(tmp_path) == before, args
    proc = run_cli("get", cow, "/files/size-100", "-o", tmp_path / "file")
    assert proc.stderr.decode().splitlines()[1] == (
        f"hint: to replace it: ubdcow get {cow} /files/size-100 --output {tmp_path / 'file'} --overwrite")
    # with --overwrite: a file, and an empty folder (the root has no name to go into it under), are replaced
    get(cow, "/files/size-100", "-o", tmp_path / "file", "--overwrite")
    get(cow, "/", "-o", tmp_path / "empty", "--overwrite")
    (tmp_path / "full" / "modes").mkdir()
    get(cow, "/modes", "/files/size-1", "-o", tmp_path / "full", "--overwrite")  # an empty full/modes: replaced
    with ubdcow.open_fs(image) as fs:
        assert (tmp_path / "file").read_bytes() == fs.read_bytes("/files/size-100")
        assert sorted(os.listdir(tmp_path / "empty")) == sorted(fs.listdir("/"))
        assert sorted(os.listdir(tmp_path / "full" / "modes")) == sorted(fs.listdir("/modes"))
    assert sorted(os.listdir(tmp_path / "full")) == ["modes", "size-1", "x"]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".ubdcow-tmp")]


# -- hostile images ------------------------------------------------------------------------------------


def debugfs(image: Path, *requests: str) -> str:
    tool = require_tool("debugfs", "e2fsprogs")
    out = ""
    for request in requests:
        proc = subprocess.run([tool, "-w", "-R", request, str(image)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out += proc.stdout
    return out


def rename_entry(image: Path, folder: str, old: bytes, new: bytes) -> None:
    """Give the entry ``old`` of ``folder`` the name ``new`` (no longer than ``old``), bytes as they are."""
    blocks = [int(b) for b in debugfs(image, f"blocks {folder}").split()]
    with open(image, "r+b") as f:
        for block in blocks:
            f.seek(block * 4096)
            data = bytearray(f.read(4096))
            pos = 0
            while pos < 4096:
                ino, rec_len, name_len, _ = struct.unpack_from("<IHBB", data, pos)
                if ino and data[pos + 8 : pos + 8 + name_len] == old:
                    data[pos + 6] = len(new)
                    data[pos + 8 : pos + 8 + len(new)] = new
                    f.seek(block * 4096)
                    f.write(data)
                    return
                pos += rec_len
    raise AssertionError(f"no entry {old!r} in {folder}")


@pytest.fixture
def small(tmp_path: Path) -> Path:
    """A small ext4 (4 KiB blocks): /a/b/c, /a/file, /a/more, /z."""
    tree = tmp_path / "tree"
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "a" / "file").write_text("hi\n")
    (tree / "a" / "more").write_text("more\n")
    (tree / "z").write_text("z\n")
    image = tmp_path / "small.img"
    subprocess.run([require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-b", "4096", "-d", str(tree), str(image), "16M"],
                   check=True, capture_output=True, timeout=60)  # fmt: skip
    shutil.rmtree(tree)
    return image


def _victim_setup(image: Path, tmp_path: Path, target: str) -> None:
    """/x: a symbolic link to ``target`` and a folder holding a file ``passwd``, under the same name."""
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "passwd").write_text("the host's\n")
    payload = tmp_path / "payload"
    payload.write_text("written through the link\n")
    debugfs(image, f"symlink /x {target}", "mkdir /y", f"write {payload} /y/passwd")
    payload.unlink()
    rename_entry(image, "/", b"y", b"x")


HOSTILE = {
    # name: (damage, exit code, words of the error line or None (no error), entries the copy has)
    "a name with /": (lambda img, tmp: rename_entry(img, "/a", b"file", b"../f"), 1, ["/a", "'/' or NUL"], None),
    "a name with NUL": (lambda img, tmp: rename_entry(img, "/a", b"file", b"f\0le"), 1, ["/a", "'/' or NUL"], None),
    "an entry named ..": (lambda img, tmp: rename_entry(img, "/a", b"file", b".."), 0, None, {"/a/more", "/z"}),
    "an entry named .": (lambda img, tmp: rename_entry(img, "/a", b"more", b"."), 0, None, {"/a/file", "/z"}),
    "a folder loop": (lambda img, tmp: debugfs(img, "link /a /a/b/c/up"), 1, ["/a/b/c/up", "reached twice"], None),
    "an absolute link, then a folder of the same name": (
        lambda img, tmp: _victim_setup(img, tmp, str(tmp / "victim")), 1, ["/x", "holds this name twice"], None),
    "a link to ../../.., then a folder of the same name": (
        lambda img, tmp: _victim_setup(img, tmp, "../../.."), 1, ["/x", "holds this name twice"], None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_image_writes_nothing_outside_dest(small, tmp_path, case):
    damage, code, words, entries = HOSTILE[case]
    damage(small, tmp_path)
    (tmp_path / "out").mkdir()
    before = snapshot(tmp_path)
    dest = tmp_path / "out" / "copy"
    proc = run_cli("get", small, "/", "-o", dest, timeout=60)
    assert proc.returncode == code, proc.stderr.decode()
    if words is None:
        assert proc.stderr == b""
        after = snapshot(tmp_path)
        made = {k for k in after if k.startswith(os.path.join("out", "copy"))}
        assert {k: v for k, v in after.items() if k not in made} == before
        copied = {"/" + os.path.relpath(os.path.join(d, n), dest) for d, ds, fs in os.walk(dest) for n in ds + fs}
        assert entries <= copied and not {p for p in copied if p.endswith(("/..", "/."))}
        return
    assert_one_line_error(proc, str(small), *words)
    assert snapshot(tmp_path) == before  # nothing written, nothing left
    # --keep-going: the rest is copied, still nothing outside DEST
    proc = run_cli("get", small, "/", "-o", dest, "--keep-going", timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr.decode()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith(os.path.join("out", "copy"))} == before
    assert (dest / "z").read_text() == "z\n"
    if (tmp_path / "victim").exists():
        assert (tmp_path / "victim" / "passwd").read_text() == "the host's\n"


def test_names_no_folder_may_hold_are_refused_by_get_too():
    """The reader refuses or leaves them out already; get's own check is the second guard."""
    from ubdcow._entrywriter import Problem, checked

    st = ubdcow.FileStat(b"/a/x", "file", 0o644, 0, 0, 0, 1, 0, 0, 0, None, 12, None, None, 0, 0, 0)

    class FS:
        name = "disk.img"

    for bad in (b"", b".", b"..", b"a/b", b"a\0b"):
        with pytest.raises(Problem) as info:
            checked(bad, st, FS())  # type: ignore[arg-type]
        assert isinstance(info.value.error, CorruptFilesystemError)
        assert str(info.value.error) == "disk.img: /a/x: a name no folder may hold"
    assert checked(b"x" * 255, st, FS()) == b"x" * 255  # type: ignore[arg-type]


# -- signals -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[bytes, dict[str, Any]]]:
    """An ext4 of 2,000 files in 40 folders and 24 MiB of data, and the kernel's view of it."""
    folder = tmp_path_factory.mktemp("signals")
    tree = folder / "tree"
    for d in range(40):
        (tree / f"d{d:02d}").mkdir(parents=True)
        for i in range(50):
            (tree / f"d{d:02d}" / f"f{i:02d}").write_bytes(os.urandom(i * 97))
    (tree / "big").write_bytes(os.urandom(24 << 20))
    os.symlink("d00/f01", tree / "link")
    image = folder / "medium.img"
    subprocess.run([require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-b", "4096", "-d", str(tree), str(image), "96M"],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    shutil.rmtree(tree)
    with mounted(image) as point:
        return image, view(point)


def test_a_signal_at_any_instant_leaves_the_copy_whole_or_nothing(medium, tmp_path):
    image, expected = medium
    t0 = time.monotonic()
    first = run_cli("get", image, "/", "-o", tmp_path / "calibrate")
    took = time.monotonic() - t0
    assert first.returncode == 0, first.stderr
    shutil.rmtree(tmp_path / "calibrate")
    trials = int(os.environ.get("UBDCOW_SIGNAL_TRIALS", "2"))
    delays = [took * (k + 0.5) / (3 * trials) for k in range(3 * trials)] + [0.0]
    seen = []
    for i, delay in enumerate(delays):
        sig, code = (signal.SIGTERM, 143) if i % 2 == 0 or not delay else (signal.SIGINT, 130)
        trial = tmp_path / f"trial{i}"
        trial.mkdir()
        proc = subprocess.Popen([sys.executable, "-m", "ubdcow", "get", str(image), "/", "-o", str(trial / "out")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        text = err.decode(errors="replace")
        left = os.listdir(trial)
        seen.append(proc.returncode)
        assert proc.returncode in (0, code, -sig), (delay, proc.returncode, text)
        assert "Traceback" not in text or proc.returncode == -sig, text
        assert left in ([], ["out"]), left  # no temporary copy left behind
        if left:
            assert_same_view(expected, view(trial / "out"))
        elif proc.returncode == 0:
            pytest.fail("exit 0 without the copy")
        shutil.rmtree(trial)
    assert any(c in (130, 143) for c in seen), seen  # some trials did land inside the work
    print(f"signal trials of get: {len(seen)}, exits {sorted(seen)}")


# -- real guests ---------------------------------------------------------------------------------------


@pytest.mark.uml
@pytest.mark.slow
def test_get_of_an_overlay_a_real_guest_changed(fs_images, tmp_path):
    from support.fslab import boot
    from test_fs_overlay import GUEST_TOOLS, features, guest_script

    require_root("building the tree and the loop mount")
    for tool in GUEST_TOOLS:
        require_tool(tool, "coreutils util-linux attr mount")
    moo = require_tool("uml_moo")
    image = fs_images.image("ext4")
    cow = tmp_path / "overlay.cow"
    ubdcow.create(cow, image)
    point = tmp_path / "guest-mnt"
    point.mkdir()
    boot(guest_script(point, "ext4", "extent" in features(image), None), f"ubdb={cow}", workdir=tmp_path)
    merged = tmp_path / "merged.img"
    subprocess.run([moo, "-b", str(image), str(cow), str(merged)], check=True, capture_output=True, timeout=600)
    doc = get(cow, "/guest", "/files", "/renamed", "-o", tmp_path / "copy")
    assert doc["files"] > 600 and doc["disk"] == str(cow)
    copy = view(tmp_path / "copy", drop=("nlink",))  # (one view: every lstat before a read changes an atime)
    with mounted(merged) as m:
        for name in (b"guest", b"files", b"renamed"):
            ours = {p[len(name) + 1 :] or b"/": r for p, r in copy.items() if p.split(b"/")[1] == name}
            assert_same_view(view(m / os.fsdecode(name), drop=("nlink",)), ours)
        assert (tmp_path / "copy" / "guest" / "sub" / "many-599").exists()


@pytest.mark.uml
@pytest.mark.slow
def test_get_of_a_killed_guests_overlay_with_and_without_the_journal(tmp_path):
    from support import jbd2lab as J
    from test_fs_crash import WORKLOAD

    require_root("the loop mounts")
    for tool in ("setfattr", "tr", "head", "truncate"):
        require_tool(tool, "attr" if tool == "setfattr" else "coreutils")
    backing = tmp_path / "backing.img"
    J.mkfs(backing, "256M", "-b", "4096")
    cow = tmp_path / "overlay.cow"
    J.crash_guest(tmp_path, cow, backing, WORKLOAD)
    merged = tmp_path / "merged.img"
    J.merge_overlay(cow, backing, merged)
    before = (hashlib.sha256(cow.read_bytes()).hexdigest(), os.stat(backing).st_mtime_ns)
    get(cow, "/", "-o", tmp_path / "as-is", "--no-journal")
    with mounted(merged, noload=True) as m:
        assert_same_view(view(m), view(tmp_path / "as-is"))
    fixed = tmp_path / "fixed.img"
    shutil.copyfile(merged, fixed)
    assert subprocess.run(["e2fsck", "-fy", str(fixed)], capture_output=True, timeout=300).returncode in (0, 1)
    get(cow, "/", "-o", tmp_path / "replayed")
    with mounted(fixed, noload=False) as m:
        assert_same_view(view(m), view(tmp_path / "replayed"))
    assert (tmp_path / "replayed" / "srv" / "new" / "deeper" / "f30").exists()
    assert not (tmp_path / "as-is" / "srv" / "new" / "deeper" / "f30").exists()
    assert before == (hashlib.sha256(cow.read_bytes()).hexdigest(), os.stat(backing).st_mtime_ns)
