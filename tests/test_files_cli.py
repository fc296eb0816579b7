"""``ubdcow ls`` and ``ubdcow cat`` (issue 22) against the kernel's read-only loop mount of the same image.

The image is tests/support/fstree.py's awkward tree (every file type, set-id modes, owners past 16 bits, names
that are not UTF-8 or hold control characters, a folder of 3000 entries, holes, a file past 4 GiB). The
oracles: ``lstat``/``readlink`` of every entry under the mount point (``ls -R -l --json``), GNU ``ls -lnA``
itself (``ls -l``'s columns), the mounted files' bytes (``cat``). Then the edges: sorting, hidden names,
several PATHs, errors met on the way (the listing goes on, the JSON document still parses, also when a
signal cuts it short), partitions, hostile images, and cat's streams.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_one_line_error, require_root, require_tool, run_cli
from support.fstree import mounted

import ubdcow

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def image(fs_images) -> Path:
    require_root("building the tree (owners, devices) and the loop mount")
    return fs_images.image("ext4")


@pytest.fixture(scope="module")
def mnt(image: Path):
    with mounted(image) as point:
        yield point


def kind(mode: int) -> str:
    return {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
            stat.S_IFBLK: "block", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket"}[stat.S_IFMT(mode)]  # fmt: skip


def kernel_entries(mnt: Path, top: bytes = b"/", hidden: bool = True) -> dict[bytes, dict[str, object]]:
    """path inside -> the keys ``ls --json`` gives, from the mount (every entry below ``top``)."""
    base = os.fsencode(mnt)
    out: dict[bytes, dict[str, object]] = {}
    pending = [os.path.join(base, top.lstrip(b"/"))]
    while pending:
        folder = pending.pop()
        for name in os.listdir(folder):
            if not hidden and name.startswith(b"."):
                continue
            path = os.path.join(folder, name)
            st = os.lstat(path)
            record: dict[str, object] = {
                "path": os.fsdecode(path[len(base):]), "type": kind(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size, "nlink": st.st_nlink,
                "mtime_ns": st.st_mtime_ns, "inode": st.st_ino,
            }  # fmt: skip
            if stat.S_ISLNK(st.st_mode):
                record["target"] = os.fsdecode(os.readlink(path))
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                record["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
            if stat.S_ISDIR(st.st_mode):
                pending.append(path)
            out[path[len(base):]] = record
    return out


def by_components(path: str | bytes) -> list[bytes]:
    return os.fsencode(path).split(b"/")


def ls_json(*args: object, code: int = 0) -> dict[str, object]:
    proc = run_cli("ls", *args, "--json")
    assert proc.returncode == code, proc.stderr.decode()
    doc = json.loads(proc.stdout)
    assert doc["exit_code"] == code
    return doc


# -- ls against the kernel ---------------------------------------------------------------------------


def test_ls_R_l_json_is_the_kernels_lstat_of_every_entry(image, mnt):
    doc = ls_json(image, "-R", "-l", "-a")
    assert set(doc) == {"disk", "entries", "errors", "exit_code"} and doc["disk"] == str(image)
    assert doc["errors"] == []
    entries = doc["entries"]
    kernel = kernel_entries(mnt)
    assert len(entries) == len(kernel) > 3000
    assert [os.fsencode(e["path"]) for e in entries] == sorted(kernel, key=lambda p: p.split(b"/"))
    for entry in entries:
        assert entry == kernel[os.fsencode(entry["path"])], entry["path"]
    assert {e["type"] for e in entries} == {"file", "dir", "symlink", "char", "block", "fifo", "socket"}


@pytest.mark.parametrize("folder", ["/", "/modes", "/special", "/links", "/times", "/files", "/xattrs"])
def test_ls_l_has_the_columns_of_gnu_ls(image, mnt, folder):
    """Field by field as ``ls -lnA --time-style='+%Y-%m-%d %H:%M'`` prints them in UTC, in byte order."""
    ls = require_tool("ls", "coreutils")
    env = dict(os.environ, LC_ALL="C", TZ="UTC")
    theirs = subprocess.run([ls, "-lnA", "--quoting-style=literal", "--time-style=+%Y-%m-%d %H:%M",
                             str(mnt) + folder], capture_output=True, text=True, env=env, check=True).stdout  # fmt: skip
    proc = run_cli("ls", "-l", "-a", image, folder)
    assert proc.returncode == 0, proc.stderr
    ours = proc.stdout.decode().splitlines()
    expected = [line for line in theirs.splitlines() if not line.startswith("total ")]
    assert len(ours) == len(expected) > 3
    for mine, gnu in zip(ours, expected, strict=True):
        a, b = mine.split(None, 7), gnu.split(None, 7)
        if b[4].endswith(","):  # a device: "major, minor" takes two fields
            a, b = mine.split(None, 8), gnu.split(None, 8)
        assert a[0] == b[0].rstrip("+."), (mine, gnu)  # GNU ls marks ACLs with +
        assert a[1:] == b[1:], (mine, gnu)


def test_ls_without_a_hides_dotted_names_and_their_content(image, mnt):
    every = {os.fsencode(e["path"]) for e in ls_json(image, "-R", "-a")["entries"]}
    visible = ls_json(image, "-R")["entries"]
    assert {os.fsencode(e["path"]) for e in visible} == set(kernel_entries(mnt, hidden=False))
    assert b"/names/.hidden" in every and all(not e["path"].endswith("/.hidden") for e in visible)
    plain = run_cli("ls", image, "/names").stdout.decode().splitlines()
    assert ".hidden" not in plain and ".hidden" in run_cli("ls", "-a", image, "/names").stdout.decode().splitlines()


def test_ls_names_escaped_for_people_surrogates_in_json(image, mnt):
    text = run_cli("ls", "-a", image, "/names").stdout.decode()
    lines = text.splitlines()
    assert "new\\x0aline" in lines and "tab\\x09here" in lines and "latin1-\\xe9\\xff" in lines
    assert "ünïcödé 日本語" in lines and "x" * 255 in lines
    assert len(lines) == len(os.listdir(mnt / "names"))  # one line per entry, whatever the name holds
    doc = ls_json("-a", image, "/names")
    names = {os.fsencode(e["path"]) for e in doc["entries"]}
    assert names == {b"/names/" + n for n in os.listdir(os.fsencode(mnt / "names"))}
    assert b"/names/latin1-\xe9\xff" in names and b"/names/new\nline" in names


def test_ls_paths_files_folders_links_and_d(image, mnt):
    proc = run_cli("ls", image, "/modes", "/links/short", "/files/size-1", "/links/to-dir")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().split("\n")
    # like ls: the entries that are not folders first (a link is shown as itself), then each folder's section
    assert lines[:3] == ["/files/size-1", "/links/short", "/links/to-dir"]
    assert lines[3:5] == ["", "/modes:"] and lines[5:-1] == sorted(os.listdir(mnt / "modes"))
    assert run_cli("ls", image, "/links/to-dir/").stdout.decode().split() == sorted(os.listdir(mnt / "files"))
    assert run_cli("ls", "-d", image, "/modes", "/").stdout.decode().split() == ["/", "/modes"]
    doc = ls_json("-d", image, "/special")
    (entry,) = doc["entries"]
    assert entry["path"] == "/special" and entry["type"] == "dir"
    deep = ls_json("-R", image, "/deep/level00/level01")["entries"]
    assert [e["path"].count("/") for e in deep] == list(range(4, 42)) + [42]


def test_ls_goes_on_after_a_missing_path_and_says_so(image, mnt):
    proc = run_cli("ls", image, "/nope", "/special", "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["errors"] == ["/nope: no such file or directory"] and doc["exit_code"] == 1
    assert len(doc["entries"]) == len(os.listdir(mnt / "special"))
    assert proc.stderr.decode() == f"ubdcow: {image}: /nope: no such file or directory\n"
    human = run_cli("ls", image, "/nope", "/special")
    assert human.returncode == 1  # like GNU ls: two operands, so the folder gets its header
    assert human.stdout.decode().split() == ["/special:", *sorted(os.listdir(mnt / "special"))]
    assert_one_line_error(human, str(image), "/nope")


def test_ls_quiet_and_bad_disks(image, tmp_path):
    proc = run_cli("ls", "-q", image, "/files")
    assert proc.returncode == 0 and proc.stdout == b""
    missing = run_cli("ls", tmp_path / "missing.cow")
    assert missing.returncode == 1 and assert_one_line_error(missing, "missing.cow")
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 20))
    proc = run_cli("ls", zeros, "--json")
    assert_one_line_error(proc, str(zeros), "no ext2/ext3/ext4 filesystem")
    assert json.loads(proc.stdout) == {"error": proc.stderr.decode().split("ubdcow: ", 1)[1].strip(), "hint": None,
                                       "exit_code": 1}  # fmt: skip


def test_a_cow_overlay_lists_through_its_backing_file(image, tmp_path):
    cow = tmp_path / "pc1.cow"
    ubdcow.create(cow, image)
    assert ls_json("-R", cow, "/links") == {**ls_json("-R", image, "/links"), "disk": str(cow)}


def test_a_json_listing_cut_short_by_a_signal_still_parses(image):
    """SIGINT while ls -R --json is blocked writing (a full pipe): the document ends, with the error."""
    for sig, code, word in ((signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")):
        proc = subprocess.Popen([sys.executable, "-m", "ubdcow", "ls", "-R", "-a", "--json", str(image)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert proc.stdout is not None
        head = proc.stdout.read(4096)
        time.sleep(0.5)  # it fills the pipe and blocks in write
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        doc = json.loads(head + rest)
        assert doc["error"] == word and doc["exit_code"] == code and 0 < len(doc["entries"]) < 3500
        assert err.decode() == f"ubdcow: {word}\n"


# -- problems inside the filesystem -------------------------------------------------------------------------


def test_a_corrupt_folder_is_reported_and_the_listing_goes_on(tmp_path):
    from test_fs_hostile import zero_rec_len

    mkfs = require_tool("mkfs.ext4", "e2fsprogs")
    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "file").write_text("hi\n")
    (tree / "z").write_text("after\n")
    image = tmp_path / "bad.img"
    subprocess.run([mkfs, "-q", "-b", "4096", "-d", str(tree), str(image), "8M"], check=True, capture_output=True)
    zero_rec_len(image)
    proc = run_cli("ls", "-R", image, "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert [e["path"] for e in doc["entries"]] == ["/a", "/lost+found", "/z"]
    (error,) = doc["errors"]
    assert error.startswith("/a: ") and "rec_len 0" in error
    assert_one_line_error(proc, str(image), "/a", "rec_len 0")


def test_several_partitions_exit_2_with_hints_that_name_each(tmp_path):
    from test_fs_partitions import blank, mkfs_at, sfdisk

    disk = blank(tmp_path / "disk.img", 64 * (1 << 20))
    parts = sfdisk(disk, "label: dos\nsize=16MiB, type=83\nsize=24MiB, type=83\n")
    for p, size in zip(parts, (16 << 20, 24 << 20), strict=True):
        mkfs_at(disk, int(p["start"]) * 512, size)  # type: ignore[call-overload]
    proc = run_cli("ls", disk, "/")
    assert proc.returncode == 2
    assert_one_line_error(proc, str(disk), "2 partitions hold an ext2/ext3/ext4 filesystem")
    hint = proc.stderr.decode().splitlines()[1]
    assert hint == (f"hint: choose one; partition 1: ubdcow ls {disk} / --partition 1; "
                    f"partition 2: ubdcow ls {disk} / --partition 2")  # fmt: skip
    assert run_cli("ls", disk, "--partition", "2").stdout == b"lost+found\n"
    # PATHs after the options too (argparse alone would give the optional PATH list nothing)
    assert run_cli("ls", disk, "--partition", "2", "/", "-d").stdout == b"/\n"
    proc = run_cli("ls", disk, "--partition", "2", "/", "--bogus")
    assert proc.returncode == 2 and b"unrecognized arguments: " in proc.stderr and b"--bogus" in proc.stderr
    proc = run_cli("ls", disk, "--partition", "3", "--json")
    assert proc.returncode == 2 and "partition 3 is not in the table" in json.loads(proc.stdout)["error"]


# -- cat ---------------------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_cat_gives_the_kernels_bytes(image, mnt):
    paths = ["/files/holes", "/files/fragmented", "/files/random-3M", "/files/size-0", "/files/size-4097",
             "/links/absolute", "/xattrs/file"]  # fmt: skip
    # an absolute link is followed inside the filesystem (on the mount, the host would resolve it)
    kernel = {p: (mnt / ("files/size-100" if p == "/links/absolute" else p.lstrip("/"))).read_bytes() for p in paths}
    for inside in paths:
        proc = run_cli("cat", image, inside)
        assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
        assert sha(proc.stdout) == sha(kernel[inside]), inside
    proc = run_cli("cat", image, *paths)  # several: one after the other
    assert proc.stdout == b"".join(kernel[p] for p in paths)


def test_cat_of_a_folder_or_a_missing_path_is_one_line_and_the_others_still_come(image, mnt):
    proc = run_cli("cat", image, "/files/size-100", "/files", "/nope", "/special/fifo", "/links/loop-a",
                   "/files/size-59")  # fmt: skip
    assert proc.returncode == 1
    assert proc.stdout == (mnt / "files/size-100").read_bytes() + (mnt / "files/size-59").read_bytes()
    lines = proc.stderr.decode().splitlines()
    assert lines == [f"ubdcow: {image}: /files: is a directory", f"ubdcow: {image}: /nope: no such file or directory",
                     f"ubdcow: {image}: /special/fifo: not a regular file (a fifo)",
                     f"ubdcow: {image}: /links/loop-a: more than 40 symbolic links (a loop?)"]  # fmt: skip


def test_cat_json_goes_to_stderr(image, mnt):
    proc = run_cli("cat", "--json", image, "/files/size-4096", "/nope")
    assert proc.returncode == 1 and proc.stdout == (mnt / "files/size-4096").read_bytes()
    human, document = proc.stderr.decode().split("\n", 1)
    assert human == f"ubdcow: {image}: /nope: no such file or directory"
    assert json.loads(document) == {"disk": str(image), "paths": ["/files/size-4096", "/nope"], "bytes": 4096,
                                    "errors": ["/nope: no such file or directory"], "exit_code": 1}  # fmt: skip
    proc = run_cli("cat", "--json", image / "missing", "/x")
    assert json.loads(proc.stderr.decode().split("\n", 1)[1])["exit_code"] == 1 and proc.stdout == b""


def test_cat_into_a_closed_pipe_is_quiet(image):
    proc = subprocess.Popen([sys.executable, "-m", "ubdcow", "cat", str(image), "/files/random-3M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    assert proc.wait(timeout=60) == 1
    assert proc.stderr.read() == b""


def test_cat_streams_a_file_past_4_gib_in_little_memory(image, mnt):
    """The 4 GiB sparse file through a pipe to sha256: the child's peak RSS stays small."""
    code = (
        "import re, sys\n"
        "from ubdcow.cli.app import main\n"
        f"code = main(['cat', {str(image)!r}, '/files/past-4G'])\n"
        "print(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1], file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert child.stdout is not None and child.stderr is not None
    digest, size = hashlib.sha256(), 0
    while chunk := child.stdout.read(1 << 20):
        digest.update(chunk)
        size += len(chunk)
    assert child.wait(timeout=600) == 0
    peak_kib = int(child.stderr.read())
    with open(mnt / "files/past-4G", "rb") as f:
        kernel = hashlib.sha256()
        while chunk := f.read(1 << 24):
            kernel.update(chunk)
    assert size == os.stat(mnt / "files/past-4G").st_size > 4 << 30
    assert digest.hexdigest() == kernel.hexdigest()
    assert peak_kib < 150 << 10, peak_kib  # the interpreter, numpy and a 1 MiB buffer: not the file


def test_cat_keeps_its_input_untouched(image, tmp_path):
    cow = tmp_path / "pc1.cow"
    ubdcow.create(cow, image)
    before = (cow.read_bytes(), os.stat(image).st_mtime_ns)
    assert run_cli("cat", cow, "/files/size-100").returncode == 0
    assert (cow.read_bytes(), os.stat(image).st_mtime_ns) == before
