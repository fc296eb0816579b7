"""``ubdcow mount`` (issue 25): a disk's filesystem as a read-only FUSE folder, judged by ordinary tools.

The oracle is the kernel: every layout of the reader's tests, a real guest's overlay and a crashed guest's
are mounted twice — by ``ubdcow mount`` and by the kernel's read-only loop mount of the same (merged)
filesystem — and ``find``, ``stat``, ``sha256sum`` and ``getfattr`` must print the same about both. Then what
the mount must refuse (every change, EROFS; a non-root user reading a root file; a running guest, and a
guest started later), how it lives (detached from the caller's terminal and pipes; in the foreground, a
signal unmounts), and each failure in one line (no FUSE library, no binding, /dev/fuse not permitted or
missing, a mountpoint missing, not empty, or stale after a killed mount). Every FUSE mount made here is
taken away in a ``finally`` (``fusermount3 -u``, then ``-uz``), and its process must be gone.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import assert_one_line_error, require_root, require_tool, run_cli
from support.fuselab import (
    assert_same_tool_view,
    fuse_at,
    fuse_mounted,
    process_gone,
    require_fuse,
    small_image,
    take_down,
    take_down_under,
    tool_view,
)
from support.fstree import LAYOUTS, _acl, mounted

import ubdcow
from ubdcow.fuseops import Directories, Operations

ROOT = Path(__file__).parent.parent


@pytest.fixture(autouse=True)
def _nothing_left_mounted(tmp_path: Path) -> Iterator[None]:
    """Whatever a test mounted in its folder is taken away after it, also when it failed half-way; a test that
    passed must have taken its own mounts away."""
    yield
    left = take_down_under(tmp_path)
    assert not left, f"mounts left behind: {left}"


def fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def ubdcow_cmd(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "ubdcow", *map(str, args)]


# -- the tree, as tools see it: every layout of the reader's tests ----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_mounted_tree_is_the_kernels(fs_images, tmp_path, layout):
    require_fuse()
    image = fs_images.image(layout)
    before = fingerprint(image)
    with mounted(image) as point:
        kernel = tool_view(point)
    with fuse_mounted(image, tmp_path / "mnt"):
        ours = tool_view(tmp_path / "mnt")
    assert len(kernel) > 3000 and b"./big dir/entry-02999-" + b"x" * (2999 % 40) in kernel  # the whole tree
    assert kernel[b"./links/hard"]["find"].split()[1] == kernel[b"./files/hard-3"]["find"].split()[1]  # one inode
    if LAYOUTS[layout].xattrs:
        assert b"user.large" in kernel[b"./xattrs/file"]["xattrs"]
        assert b"system.posix_acl_access" in kernel[b"./xattrs/acl"]["xattrs"]
    assert_same_tool_view(kernel, ours)
    assert fingerprint(image) == before


# -- a real guest's overlay, and a crashed guest's ---------------------------------------------------------


@pytest.mark.uml
@pytest.mark.slow
def test_an_overlay_a_guest_changed_mounts_as_the_kernel_mounts_the_merged_disk(fs_images, tmp_path):
    require_fuse()
    from support.fslab import boot
    from test_fs_overlay import GUEST_TOOLS, guest_script

    for tool in GUEST_TOOLS:
        require_tool(tool, "coreutils util-linux attr mount")
    moo = require_tool("uml_moo")
    image = fs_images.image("ext4")
    cow = tmp_path / "overlay.cow"
    ubdcow.create(cow, image)
    point = tmp_path / "guest-mnt"
    point.mkdir()
    boot(guest_script(point, "ext4", True, None), f"ubdb={cow}", workdir=tmp_path)
    merged = tmp_path / "merged.img"
    proc = subprocess.run([moo, "-b", str(image), str(cow), str(merged)], capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    before = fingerprint(cow), fingerprint(image)
    with mounted(merged) as kernel_point:
        kernel = tool_view(kernel_point)
    with fuse_mounted(cow, tmp_path / "mnt"):
        ours = tool_view(tmp_path / "mnt")
    assert b"./guest/sub/many-599" in kernel and b"./files/size-100" not in kernel  # the guest's work is there
    assert_same_tool_view(kernel, ours)
    assert (fingerprint(cow), fingerprint(image)) == before


@pytest.mark.uml
@pytest.mark.slow
def test_a_crashed_guests_overlay_mounts_replayed_and_as_it_is(tmp_path):
    require_fuse()
    from support import jbd2lab as J
    from test_fs_crash import WORKLOAD

    for tool in ("setfattr", "tr", "head", "truncate"):
        require_tool(tool, "attr" if tool == "setfattr" else "coreutils")
    backing = tmp_path / "backing.img"
    J.mkfs(backing, "256M", "-b", "4096")
    cow = tmp_path / "overlay.cow"
    J.crash_guest(tmp_path, cow, backing, WORKLOAD)
    merged = tmp_path / "merged.img"
    J.merge_overlay(cow, backing, merged)
    assert "needs_recovery" in J.superblock_fields(merged)["Filesystem features"].split()
    before = fingerprint(cow), fingerprint(backing)

    with mounted(merged, noload=True) as point:
        on_disk = tool_view(point)
    with fuse_mounted(cow, tmp_path / "mnt", "--no-journal"):
        ours = tool_view(tmp_path / "mnt")
    assert_same_tool_view(on_disk, ours)

    fixed = tmp_path / "fixed.img"
    shutil.copyfile(merged, fixed)
    proc = subprocess.run(["e2fsck", "-fy", str(fixed)], capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    with mounted(fixed, noload=False) as point:
        replayed = tool_view(point)
    with fuse_mounted(cow, tmp_path / "mnt"):
        ours = tool_view(tmp_path / "mnt")
    assert_same_tool_view(replayed, ours)
    assert replayed != on_disk and b"./srv/new/deeper/f30" in replayed  # the journal mattered
    assert (fingerprint(cow), fingerprint(backing)) == before


# -- what the mount refuses ------------------------------------------------------------------------------------


def _overlay(tmp_path: Path) -> tuple[Path, Path]:
    files = {"etc/hostname": (b"pc1\n", 0o644), "home/user/notes": (b"notes\n" * 100, 0o644),
             "root/secret": (b"top secret\n", 0o600), "public": (b"for everyone\n", 0o644)}  # fmt: skip
    image = small_image(tmp_path, files)
    cow = tmp_path / "overlay.cow"
    ubdcow.create(cow, image)
    with ubdcow.open(cow, "r+") as disk:  # something in the COW file itself: a copy of block 0's page
        disk.pwrite(disk.pread(4096, 0), 0)
    return image, cow


def test_every_change_fails_with_erofs_and_the_overlay_is_unchanged(tmp_path):
    require_fuse()
    image, cow = _overlay(tmp_path)
    before = fingerprint(cow), fingerprint(image)
    mnt = tmp_path / "mnt"
    attempts = {
        "write": lambda: open(mnt / "public", "r+b").write(b"x"),
        "append": lambda: open(mnt / "public", "ab"),
        "create": lambda: open(mnt / "new-file", "wb"),
        "exclusive create": lambda: os.open(mnt / "new2", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644),
        "truncate": lambda: os.truncate(mnt / "public", 0),
        "rename": lambda: os.rename(mnt / "public", mnt / "renamed"),
        "chmod": lambda: os.chmod(mnt / "public", 0o777),
        "chown": lambda: os.chown(mnt / "public", 1, 1),
        "mkdir": lambda: os.mkdir(mnt / "dir"),
        "rmdir": lambda: os.rmdir(mnt / "etc"),
        "unlink": lambda: os.unlink(mnt / "public"),
        "symlink": lambda: os.symlink("public", mnt / "link"),
        "link": lambda: os.link(mnt / "public", mnt / "hard"),
        "mknod": lambda: os.mkfifo(mnt / "fifo"),
        "setxattr": lambda: os.setxattr(mnt / "public", "user.x", b"1"),
        "removexattr": lambda: os.removexattr(mnt / "public", "user.x"),
        "utime": lambda: os.utime(mnt / "public", (1, 1)),
    }
    with fuse_mounted(cow, mnt):
        for what, attempt in attempts.items():
            with pytest.raises(OSError) as excinfo:
                attempt()
            assert excinfo.value.errno == errno.EROFS, (what, excinfo.value)
        # the shell and coreutils say the same
        for command in ("echo x > public", "touch new", "mv public p2", "chmod 600 public", "truncate -s 0 public",
                        "rm public", "mkdir d", "setfattr -n user.a -v 1 public"):  # fmt: skip
            proc = subprocess.run(["sh", "-c", command], cwd=mnt, capture_output=True, text=True, timeout=60)
            assert proc.returncode != 0 and "Read-only file system" in proc.stderr, (command, proc.stderr)
        assert (mnt / "public").read_bytes() == b"for everyone\n"
        assert sorted(os.listdir(mnt)) == ["etc", "home", "lost+found", "public", "root"]
    assert (fingerprint(cow), fingerprint(image)) == before


@contextlib.contextmanager
def world_reachable() -> Iterator[Path]:
    """A folder other users can reach (pytest's and the run's temporary folders are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="ubdcow-mount-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def loop_mounted(image: Path, point: Path) -> Iterator[Path]:
    """The kernel's read-only loop mount of ``image`` at ``point`` (always unmounted)."""
    point.mkdir()
    proc = subprocess.run(["mount", "-t", "ext4", "-o", "loop,ro,noload", str(image), str(point)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True, timeout=120).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=120)


def test_the_kernel_checks_the_images_modes_and_acls_for_other_users(tmp_path):
    """With --allow-other (default_permissions is always on), a user gets what the image's modes and POSIX ACLs
    grant, exactly as on the kernel's own loop mount: no 0600 root file for user 65534."""
    require_fuse()
    setpriv = require_tool("setpriv", "util-linux")
    files = {"root-only": (b"secret\n", 0o600), "everyone": (b"public\n", 0o644), "by-acl": (b"acl\n", 0o640),
             "dir/inside": (b"inside\n", 0o644), "closed/inside": (b"hidden\n", 0o644)}  # fmt: skip
    tree = tmp_path / "tree"
    for name, (content, mode) in files.items():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(content)
        (tree / name).chmod(mode)
    (tree / "closed").chmod(0o700)
    # user 1000 may read by-acl (owner rw, group r, other none; mask r)
    os.setxattr(tree / "by-acl", "system.posix_acl_access",
                _acl([(1, 6, 0xFFFFFFFF), (2, 4, 1000), (4, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
                      (0x20, 0, 0xFFFFFFFF)]))  # fmt: skip
    image = tmp_path / "perm.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "16M"], check=True, timeout=120)

    def verdicts(root: Path) -> dict[tuple[int, str], bool]:
        out = {}
        for uid in (65534, 1000, 1001):
            for name in files:
                proc = subprocess.run([setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "cat",
                                       str(root / name)], capture_output=True, timeout=60)  # fmt: skip
                out[(uid, name)] = proc.returncode == 0 and proc.stdout == files[name][0]
        return out

    with world_reachable() as folder:
        with loop_mounted(image, folder / "loop") as point:
            kernel = verdicts(point)
        with fuse_mounted(image, folder / "fuse", "--allow-other"):
            ours = verdicts(folder / "fuse")
    assert not ours[(65534, "root-only")] and ours[(65534, "everyone")]
    assert ours[(1000, "by-acl")] and not ours[(1001, "by-acl")]  # the ACL is checked, not just the mode
    assert not ours[(65534, "closed/inside")] and ours[(65534, "dir/inside")]
    assert ours == kernel


def test_without_allow_other_other_users_are_kept_out(tmp_path):
    require_fuse()
    setpriv = require_tool("setpriv", "util-linux")
    image = small_image(tmp_path, {"everyone": (b"public\n", 0o644)})
    with world_reachable() as folder, fuse_mounted(image, folder / "mnt"):
        proc = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                               str(folder / "mnt" / "everyone")], capture_output=True, timeout=60)  # fmt: skip
        assert proc.returncode != 0 and b"Permission denied" in proc.stderr
        assert (folder / "mnt" / "everyone").read_bytes() == b"public\n"  # (root, who mounted it, reads it)


# -- a stale mountpoint ---------------------------------------------------------------------------------------


def test_a_killed_mount_leaves_a_stale_mountpoint_that_mount_explains(tmp_path):
    require_fuse()
    image, cow = _overlay(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = run_cli("mount", cow, mnt, "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    pid = json.loads(proc.stdout)["pid"]
    try:
        os.kill(pid, signal.SIGKILL)
        assert process_gone(pid)
        with pytest.raises(OSError) as excinfo:
            os.stat(mnt)
        # "Transport endpoint is not connected" (ENOTCONN), or on newer kernels "Software caused connection abort"
        assert excinfo.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        again = run_cli("mount", cow, mnt, timeout=120)
        line = assert_one_line_error(again, str(mnt), "stale", f"fusermount3 -u {shlex.quote(str(mnt))}")
        assert again.returncode == 1 and fuse_at(mnt), line
        # the command it names clears it, and the same mount command works again
        clear = line.rsplit("clear it with: ", 1)[1]
        assert subprocess.run(shlex.split(clear), capture_output=True, timeout=60).returncode == 0
        assert not fuse_at(mnt) and os.listdir(mnt) == []
        with fuse_mounted(cow, mnt):
            assert (mnt / "public").read_bytes() == b"for everyone\n"
        # ubdcow umount clears a stale mountpoint too
        proc = run_cli("mount", cow, mnt, "--json", timeout=120)
        pid = json.loads(proc.stdout)["pid"]
        os.kill(pid, signal.SIGKILL)
        assert process_gone(pid)
        done = run_cli("umount", mnt, timeout=120)
        assert done.returncode == 0 and not fuse_at(mnt), done.stderr
    finally:
        take_down(mnt, pid)


# -- the lock, both ways, with a real guest --------------------------------------------------------------------


@pytest.mark.uml
def test_a_running_guest_keeps_mount_out_and_a_mount_keeps_a_guest_out(tmp_path):
    require_fuse()
    from test_engine_uml import _kill_group, _wait_for
    from support.uml import kernel as uml_kernel
    from support.uml import run_guest, ubd_arg

    image, cow = _overlay(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    guest = run_guest("exec 3</dev/ubdb\necho UBDCOW-READY\nsleep 30\n", ubd_arg(cow), workdir=tmp_path,
                      background=True)  # fmt: skip
    assert isinstance(guest, subprocess.Popen)
    try:
        _wait_for(guest, b"UBDCOW-READY", timeout=60)
        proc = run_cli("mount", cow, mnt, timeout=120)
        comm = os.path.basename(uml_kernel())[:15]
        line = assert_one_line_error(proc, str(cow), "locked by process", comm)
        holder = int(line.split("locked by process ", 1)[1].split()[0])
        assert Path(f"/proc/{holder}/comm").read_text().strip() == comm and os.getpgid(holder) == guest.pid
        assert not fuse_at(mnt) and os.listdir(mnt) == []
    finally:
        _kill_group(guest)

    read = "dd if=/dev/ubdb of=/dev/null bs=4096 count=1 status=none"
    with fuse_mounted(cow, mnt):
        result = run_guest(f"{read} || echo UBDCOW-REFUSED\n", ubd_arg(cow), workdir=tmp_path)
        assert "Failed to lock" in result.console and "UBDCOW-REFUSED" in result.console, result.console[-3000:]
        assert (mnt / "etc" / "hostname").read_bytes() == b"pc1\n"  # the mount goes on
    result = run_guest(f"{read} && echo UBDCOW-ATTACHED\n", ubd_arg(cow), workdir=tmp_path)  # free again
    assert "UBDCOW-ATTACHED" in result.console, result.console[-3000:]


# -- how it lives ------------------------------------------------------------------------------------------------


def test_mount_returns_detached_from_the_callers_output_and_umount_waits_for_the_lock(tmp_path):
    require_fuse()
    image, cow = _overlay(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f"out=$({shlex.join(ubdcow_cmd('mount', '--json', cow, mnt))} 2>&1); printf '%s' \"$out\""
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", script], capture_output=True, timeout=60)  # EOF on both pipes
    assert proc.returncode == 0 and time.monotonic() - started < 30, proc
    pid = json.loads(proc.stdout)["pid"]
    try:
        assert fuse_at(mnt) and (mnt / "etc" / "hostname").read_bytes() == b"pc1\n"
        assert os.getsid(pid) == pid and os.getsid(pid) != os.getsid(0)  # its own session: no terminal
        for fd in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        # while it runs, it holds the overlay's read lock: a writer is refused, naming it
        with pytest.raises(ubdcow.ImageLockedError) as excinfo:
            ubdcow.open(cow, "r+")
        assert excinfo.value.pid == pid
        done = run_cli("umount", "--json", mnt, timeout=120)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"disk": str(cow), "mountpoint": str(mnt), "exit_code": 0}
        # umount returned once the lock was free: a writer gets in at once
        with ubdcow.open(cow, "r+"):
            pass
        assert process_gone(pid, 5) and not fuse_at(mnt)
    finally:
        take_down(mnt, pid)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_in_the_foreground_a_signal_unmounts_cleanly(tmp_path, sig, code):
    require_fuse()
    image, cow = _overlay(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(ubdcow_cmd("mount", "-f", cow, mnt), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().decode()
        assert ready.startswith("mounted ") and "Ctrl-C or SIGTERM" in ready, ready
        assert fuse_at(mnt) and (mnt / "public").read_bytes() == b"for everyone\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert err.decode().strip() == f"ubdcow: {'terminated' if code == 143 else 'interrupted'}"
        assert not fuse_at(mnt) and os.listdir(mnt) == []  # unmounted, not stale
        with ubdcow.open(cow, "r+"):  # and the lock is free
            pass
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        take_down(mnt)


def test_in_the_foreground_an_unmount_ends_it_with_0_and_a_busy_umount_says_lazy(tmp_path):
    require_fuse()
    image, cow = _overlay(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen(ubdcow_cmd("mount", "-f", "--json", cow, mnt), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready == {"disk": str(cow), "mountpoint": str(mnt), "pid": proc.pid}  # no exit_code: still running
        holder = subprocess.Popen(["sleep", "60"], cwd=mnt / "etc")  # a process whose current folder is there
        try:
            busy = run_cli("umount", mnt, timeout=120)
            line = assert_one_line_error(busy, "busy")
            hint = f"hint: close it, or detach the mount now with: ubdcow umount --lazy {shlex.quote(str(mnt))}"
            assert hint in busy.stderr.decode().splitlines(), busy.stderr
            assert fuse_at(mnt), line
            lazy = run_cli("umount", "--lazy", mnt, timeout=120)
            assert lazy.returncode == 0 and not fuse_at(mnt), lazy.stderr
        finally:
            holder.kill()
            holder.wait()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and err == b"", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        take_down(mnt)


def test_a_corrupt_file_fails_with_eio_once_logged_and_the_mount_goes_on(tmp_path):
    require_fuse()
    debugfs = require_tool("debugfs", "e2fsprogs")
    image = small_image(tmp_path, {"victim": (b"v" * 5000, 0o644), "fine": (b"fine\n", 0o644)}, fstype="ext2")
    # the victim's first block now points at the superblock's: data inside filesystem metadata
    proc = subprocess.run([debugfs, "-w", "-R", "sif /victim block[0] 1", str(image)], capture_output=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    daemon = subprocess.Popen(ubdcow_cmd("mount", "-f", image, mnt), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert daemon.stdout is not None and daemon.stdout.readline().startswith(b"mounted ")
        for _ in range(3):
            with pytest.raises(OSError) as excinfo:
                (mnt / "victim").read_bytes()
            assert excinfo.value.errno == errno.EIO
        assert (mnt / "fine").read_bytes() == b"fine\n" and os.stat(mnt / "victim").st_size == 5000
        assert daemon.poll() is None
        assert run_cli("umount", mnt, timeout=120).returncode == 0
        _, err = daemon.communicate(timeout=60)
        lines = err.decode().splitlines()
        assert len(lines) == 1 and "/victim" in lines[0] and "EIO" in lines[0], lines  # once, however often read
        assert daemon.returncode == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        take_down(mnt)


# -- failures, each one line -------------------------------------------------------------------------------------


def test_mountpoint_problems_are_one_line_and_mount_nothing(tmp_path):
    require_fuse()
    image = small_image(tmp_path, {"a": (b"a", 0o644)})
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    (tmp_path / "file").write_text("x")
    cases = {"missing": ("no such folder", 1), "full": ("not empty", 1), "file": ("not a folder", 1)}
    for name, (needle, code) in cases.items():
        proc = run_cli("mount", image, tmp_path / name, timeout=120)
        assert_one_line_error(proc, str(tmp_path / name), needle)
        assert proc.returncode == code and not fuse_at(tmp_path / name)
    with fuse_mounted(image, tmp_path / "mnt"):
        proc = run_cli("mount", image, tmp_path / "mnt", timeout=120)
        assert_one_line_error(proc, "already a ubdcow mount", str(image))
    # not a filesystem: the reader's one line, nothing mounted
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(1 << 20))
    proc = run_cli("mount", junk, tmp_path / "empty", timeout=120)
    assert_one_line_error(proc, str(junk))
    assert proc.returncode == 1 and not fuse_at(tmp_path / "empty")
    # umount of what ubdcow did not mount
    assert_one_line_error(run_cli("umount", tmp_path / "empty"), "not a mount point")
    proc = run_cli("umount", "/proc")
    assert_one_line_error(proc, "not a ubdcow mount", "proc")


def test_several_partitions_without_a_choice_is_a_usage_error(tmp_path):
    require_fuse()
    sfdisk = require_tool("sfdisk", "fdisk")
    part = small_image(tmp_path, {"a": (b"a", 0o644)}, size="8M")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(20 << 20)
    subprocess.run([sfdisk, "-q", str(disk)], input=b"2048,16384,83\n18432,16384,83\n", check=True, timeout=60)
    data = part.read_bytes()
    with open(disk, "r+b") as f:
        for start in (2048, 18432):
            f.seek(start * 512)
            f.write(data)
    (tmp_path / "mnt").mkdir()
    proc = run_cli("mount", disk, tmp_path / "mnt", timeout=120)
    assert proc.returncode == 2 and not fuse_at(tmp_path / "mnt"), proc.stderr
    assert "partition" in proc.stderr.decode()
    with fuse_mounted(disk, tmp_path / "mnt", "--partition", "2"):
        assert (tmp_path / "mnt" / "a").read_bytes() == b"a"


def _run_in(env: dict[str, str] | None, *args: str | os.PathLike[str], prefix: list[str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
    full = dict(os.environ, **(env or {}))
    full.pop("UBDCOW_DEBUG", None)
    return subprocess.run([*(prefix or []), *ubdcow_cmd(*args)], capture_output=True, env=full, timeout=120,
                          cwd=cwd or ROOT)  # fmt: skip


def test_no_fuse_library_names_the_package(tmp_path):
    require_fuse()
    image = small_image(tmp_path, {"a": (b"a", 0o644)})
    (tmp_path / "mnt").mkdir()
    # the binding's own library lookup failing
    proc = _run_in({"FUSE_LIBRARY_NAME": "ubdcow-no-such-fuse"}, "mount", image, tmp_path / "mnt")
    line = assert_one_line_error(proc, "FUSE library", "install the package fuse3")
    assert proc.returncode == 1, line
    # the libraries really absent: in a private mount namespace, /dev/null over each libfuse
    unshare = require_tool("unshare", "util-linux")
    from ctypes.util import find_library

    libraries = []
    for name in ("fuse3", "fuse"):
        found = find_library(name)
        if found:
            path = next((f"{d}/{found}" for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64",
                                                   "/usr/lib64", "/lib", "/usr/lib") if os.path.exists(f"{d}/{found}")),
                        None)  # fmt: skip
            if path:
                libraries.append(os.path.realpath(path))
    assert libraries, "no libfuse found to hide"
    binds = " && ".join(f"mount --bind /dev/null {shlex.quote(lib)}" for lib in libraries)
    command = shlex.join(ubdcow_cmd("mount", image, tmp_path / "mnt"))
    proc = subprocess.run([unshare, "-m", "sh", "-c", f"mount --make-rprivate / && {binds} && exec {command}"],
                          capture_output=True, timeout=120, cwd=ROOT)  # fmt: skip
    line = assert_one_line_error(proc, "FUSE library", "install the package fuse3")
    assert not fuse_at(tmp_path / "mnt")


def test_no_binding_says_how_to_install_it(tmp_path):
    image = small_image(tmp_path, {"a": (b"a", 0o644)})
    (tmp_path / "mnt").mkdir()
    code = ("import sys; sys.modules['mfusepy'] = None; sys.argv = ['ubdcow', 'mount', sys.argv[1], sys.argv[2]]\n"
            "from ubdcow.cli import run; run()")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, str(image), str(tmp_path / "mnt")], capture_output=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    assert_one_line_error(proc, "mfusepy", "pip install 'ubdcow[mount]'")
    assert proc.returncode == 1


def test_dev_fuse_not_permitted_or_missing_is_one_line(tmp_path):
    require_fuse()
    unshare = require_tool("unshare", "util-linux")
    setpriv = require_tool("setpriv", "util-linux")
    image = small_image(tmp_path, {"a": (b"a", 0o644)})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    node = tmp_path / "fuse-node"
    os.mknod(node, 0o600 | 0o020000, os.makedev(10, 229))  # a /dev/fuse only root may open
    os.chown(node, 0, 0)
    command = shlex.join([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                          *ubdcow_cmd("mount", image, mnt)])  # fmt: skip
    script = f"mount --make-rprivate / && mount --bind {shlex.quote(str(node))} /dev/fuse && exec {command}"
    proc = subprocess.run([unshare, "-m", "sh", "-c", script], capture_output=True, timeout=120, cwd="/")
    line = assert_one_line_error(proc, "/dev/fuse", "permission denied", "mode 0600")
    assert proc.returncode == 1 and not fuse_at(mnt), line
    # no /dev/fuse at all (a container started without it)
    command = shlex.join(ubdcow_cmd("mount", image, mnt))
    script = f"mount --make-rprivate / && mount -t tmpfs none /dev && exec {command}"
    proc = subprocess.run([unshare, "-m", "sh", "-c", script], capture_output=True, timeout=120, cwd="/")
    assert_one_line_error(proc, "/dev/fuse", "no FUSE device", "modprobe fuse")


# -- the operations without FUSE: directory offsets, and errno for reader errors ---------------------------------


def _listing(count: int) -> tuple[Directories, list[int]]:
    calls = []

    def listing(path: bytes) -> Iterator[tuple[bytes, dict[str, int]]]:
        calls.append(1)
        yield b".", {"st_ino": 2}
        yield b"..", {"st_ino": 2}
        for i in range(count):
            yield b"e%05d" % i, {"st_ino": 100 + i}

    return Directories(listing, lambda attrs: attrs["st_ino"]), calls


def _read_all(dirs: Directories, path: bytes, per_call: int) -> list[tuple[bytes, int, int]]:
    """What libfuse's readdir loop does: a buffer of ``per_call`` entries, the next call at the last offset."""
    got: list[tuple[bytes, int, int]] = []
    offset = 0
    while True:
        entries = dirs.entries(path, offset)
        batch = []
        for item in entries:
            if len(batch) == per_call:  # full: this one does not fit, it comes again next time
                break
            batch.append(item)
        entries.close()
        if not batch:
            return got
        got += batch
        offset = batch[-1][2]


def test_the_kernel_keeps_listings_so_a_second_pass_asks_for_none(tmp_path, monkeypatch):
    """libfuse's high-level API would have every listing asked for again on each pass; with keep_listings the
    kernel serves a second walk from its cache (the mount is served in this process to count the requests)."""
    import threading

    from ubdcow import mount

    require_fuse()
    files = {f"d{i}/sub/f{j}": (b"x" * j, 0o644) for i in range(6) for j in range(4)}
    image = small_image(tmp_path, files)
    asked: list[bytes] = []
    entries = Directories.entries

    def counted(self, path, offset):  # type: ignore[no-untyped-def]
        asked.append(path)
        return entries(self, path, offset)

    monkeypatch.setattr(Directories, "entries", counted)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    ready = threading.Event()
    with ubdcow.open_fs(image) as fs:
        server = threading.Thread(target=mount.serve, args=(fs, str(mnt)), daemon=True,
                                  kwargs={"ready": ready.set, "log": lambda line: None})  # fmt: skip
        server.start()
        try:
            assert ready.wait(60), "not mounted"

            def walk() -> list[tuple[str, list[str], list[str]]]:
                return sorted((top, sorted(dirs), sorted(names)) for top, dirs, names in os.walk(mnt))

            first = walk()
            once = len(asked)
            assert once >= 1 + 6 * 2 + 1, asked  # every folder (and lost+found) was listed once
            second = walk()
            assert second == first and len(first) == 1 + 6 * 2 + 1
            assert len(asked) == once, f"asked again for {asked[once:]}"
        finally:
            take_down(mnt)
            server.join(30)
        assert not server.is_alive()


def test_directories_resume_at_the_kernels_offsets_and_keep_complete_listings():
    dirs, calls = _listing(1000)
    first = _read_all(dirs, b"/d", 7)
    assert [name for name, _, _ in first] == [b".", b"..", *(b"e%05d" % i for i in range(1000))]
    assert [off for _, _, off in first] == list(range(1, 1003))
    assert calls == [1]  # resumed, never restarted
    assert _read_all(dirs, b"/d", 50) == first and calls == [1]  # kept: no second listing
    # any offset, out of order: restarted and skipped to
    dirs2, calls2 = _listing(100)
    assert list(dirs2.entries(b"/x", 50))[0] == (b"e00048", 148, 51)
    assert list(dirs2.entries(b"/x", 3))[0] == (b"e00001", 101, 4)
    assert list(dirs2.entries(b"/x", 102)) == [] and list(dirs2.entries(b"/x", 500)) == []


def test_directories_stream_interleaved_readers_and_do_not_keep_a_huge_one(monkeypatch):
    import ubdcow.fuseops as F

    monkeypatch.setattr(F, "LISTED_ENTRIES", 400)
    dirs, calls = _listing(1000)  # more than a quarter of the limit: streamed, never kept
    a, b = dirs.entries(b"/big", 0), dirs.entries(b"/big", 0)
    got_a = [next(a) for _ in range(10)]
    got_b = [next(b) for _ in range(5)]
    a.close()
    b.close()
    rest_a = list(dirs.entries(b"/big", got_a[-1][2]))
    rest_b = list(dirs.entries(b"/big", got_b[-1][2]))
    assert got_a + rest_a == got_b + rest_b and len(got_a + rest_a) == 1002
    assert len(calls) == 2  # each reader resumed its own listing
    assert len(_read_all(dirs, b"/big", 100)) == 1002 and len(calls) == 3  # not kept: listed again
    small, small_calls = _listing(50)
    monkeypatch.setattr(F, "LISTED_ENTRIES", 240)
    for path in (b"/1", b"/2", b"/3", b"/4", b"/5"):  # 52 entries each, 240 kept in all: the oldest goes
        _read_all(small, path, 1000)
    _read_all(small, b"/5", 1000)
    assert len(small_calls) == 5
    _read_all(small, b"/1", 1000)
    assert len(small_calls) == 6


def test_operations_turn_reader_errors_into_errno_and_log_each_once(tmp_path):
    require_tool("mkfs.ext4", "e2fsprogs")
    image = small_image(tmp_path, {"dir/file": (b"content", 0o644)})
    logged: list[str] = []
    with ubdcow.open_fs(image) as fs:
        ops = Operations(fs, ready=lambda: None, log=logged.append)
        assert ops.getattr("/dir/file")["st_size"] == 7
        for path, code in (("/nothing", errno.ENOENT), ("/dir/file/below", errno.ENOTDIR)):
            with pytest.raises(OSError) as excinfo:
                ops.getattr(path)
            assert excinfo.value.errno == code
        with pytest.raises(OSError) as excinfo:
            ops.getxattr("/dir/file", "user.none")
        assert excinfo.value.errno == errno.ENODATA
        for change in (ops.mkdir, ops.unlink, ops.write, ops.setxattr, ops.truncate, ops.rename):
            with pytest.raises(OSError) as excinfo:
                change("/dir/file")
            assert excinfo.value.errno == errno.EROFS
        with pytest.raises(OSError) as excinfo:
            ops.open("/dir/file", os.O_WRONLY)
        assert excinfo.value.errno == errno.EROFS
        fh = ops.open("/dir/file", os.O_RDONLY)  # (libfuse 2, or before init: real handles)
        assert ops.read("/dir/file", 100, 2, fh) == b"ntent" and ops.read(None, 3, 0, fh) == b"con"
        ops.release("/dir/file", fh)
        assert ops.read("/dir/file", 4, 0, 0) == b"cont"  # by path (open answered ENOSYS)
        names = [name for name, _, _ in ops.readdir_with_offset("/", 0, 0)]
        assert names[:2] == [".", ".."] and sorted(names[2:]) == ["dir", "lost+found"]
        assert not logged  # path problems are answers, not problems to log
        # an unexpected error: EIO, logged once however often it happens
        monkeypatch_target = fs.stat

        def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise ubdcow.CorruptFilesystemError(str(image), "/dir/file: a broken extent")

        fs.stat = broken  # type: ignore[method-assign]
        for _ in range(3):
            with pytest.raises(OSError) as excinfo:
                ops.getattr("/dir/file")
            assert excinfo.value.errno == errno.EIO
        fs.stat = monkeypatch_target  # type: ignore[method-assign]
        assert len(logged) == 1 and "a broken extent" in logged[0] and "EIO" in logged[0]
