"""Untrusted overlays: a COW file names the file it reads, so an output is no more readable than its inputs.

The measured attack: an unprivileged user crafts a COW header naming a secret (as /etc/shadow: mode
0640, group shadow) with its size and mtime, both visible to anyone through ``stat``; root runs
``ubdcow merge`` (or ``convert``, ``diff``, ``serve``) on it. The secret is read -- that is what the
file asks for -- but what comes out must be no more accessible than the secret: its group and others
keep only the permission bits every input gives them (a group's bits count only for that same group).
The secret here is a stand-in with /etc/shadow's mode and group, never the real file.

Also: the rule for ordinary outputs (mode = the inputs' intersection less the umask), ``--overwrite``
(the replaced file's mode only when not wider, its owner only when that owner may read the inputs), and
``info`` naming the file the recorded path resolves to.
"""

from __future__ import annotations

import grp
import json
import os
import stat
from pathlib import Path

import pytest
from conftest import assert_one_line_error, require_root, run_cli
from support.nbdlab import require_nbd, serve_run, shell_ok

import ubdcow
from ubdcow.format import make_header

NOBODY = 65534
SIZE = 3 * 4096 + 700  # a small secret: three whole pages and a partial one


def need_root() -> None:
    """The attack needs root (a privileged ubdcow) and files of other owners."""
    require_root("running ubdcow as root on another user's files")


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shadow_gid() -> int:
    try:
        return grp.getgrnam("shadow").gr_gid
    except KeyError:
        return 42


@pytest.fixture
def secret(tmp_path: Path) -> tuple[Path, bytes]:
    """A stand-in for /etc/shadow: root-owned, 0640, group shadow, in a folder anyone can enter."""
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "shadow"
    content = bytes((i * 7 + 1) % 251 + 1 for i in range(SIZE))  # no zero byte: never mistaken for a hole
    path.write_bytes(content)
    if os.geteuid() == 0:
        os.chown(path, 0, shadow_gid())
    os.chmod(path, 0o640)
    return path, content


def crafted_overlay(folder: Path, target: Path, *, mixed: bool = False) -> Path:
    """What the attacker writes: a v3 header naming ``target`` with its size and mtime (``stat`` shows
    both), an empty bitmap (or one set bit: page 0 mixed, for convert to fill it from ``target``),
    mode 0644, owned by nobody."""
    st = os.stat(target)
    header = make_header("v3", str(target), int(st.st_mtime), st.st_size)
    raw = bytearray(header.file_size)
    raw[: len(header.to_bytes())] = header.to_bytes()
    if mixed:
        raw[header.bitmap_offset] = 0x01
        raw[header.data_offset : header.data_offset + 512] = b"A" * 512
    folder.mkdir(exist_ok=True)
    os.chown(folder, NOBODY, NOBODY)
    os.chmod(folder, 0o755)
    cow = folder / "evil.cow"
    cow.write_bytes(bytes(raw))
    os.chown(cow, NOBODY, NOBODY)
    os.chmod(cow, 0o644)
    return cow


def assert_private(out: Path, what: str) -> None:
    st = os.stat(out)
    assert st.st_uid == 0, f"{what}: the output is owned by {st.st_uid}, not by the user who ran ubdcow"
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0, f"{what}: mode {stat.S_IMODE(st.st_mode):o} lets others read it"


# -- the attack ---------------------------------------------------------------------------------------


def test_convert_of_a_crafted_overlay_naming_a_secret_gives_a_private_file(tmp_path, secret):
    need_root()
    path, content = secret
    cow = crafted_overlay(tmp_path / "attacker", path, mixed=True)
    out = tmp_path / "attacker" / "out.cow"
    proc = run_cli("convert", cow, "-o", out)
    assert proc.returncode == 0, proc.stderr
    with ubdcow.open(out, backing=path) as img:  # the secret's bytes were copied in (the mixed page)
        assert img.pread(4096, 0)[512:] == content[512:4096]
    assert content[512:4096] in out.read_bytes()
    assert_private(out, "convert")


def test_diff_against_a_crafted_overlay_naming_a_secret_gives_a_private_file(tmp_path, secret):
    need_root()
    path, content = secret
    folder = tmp_path / "attacker"
    cow = crafted_overlay(folder, path)
    base = folder / "base.img"
    base.write_bytes(bytes(SIZE))
    os.chmod(base, 0o644)
    out = folder / "out.cow"
    proc = run_cli("diff", base, cow, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert content[:4096] in out.read_bytes()  # the secret's pages are stored in the output
    assert_private(out, "diff")


def test_merge_of_a_crafted_overlay_naming_a_secret_gives_a_private_file(tmp_path, secret):
    """Passes once merge.py hands its inputs to AtomicFile (the one-line change of issue 15)."""
    need_root()
    path, content = secret
    cow = crafted_overlay(tmp_path / "attacker", path)
    out = tmp_path / "attacker" / "out.img"
    proc = run_cli("merge", cow, "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == content
    assert_private(out, "merge")


def test_serve_socket_of_a_crafted_overlay_naming_a_secret_is_private(tmp_path, secret):
    need_root()
    require_nbd("nbdkit", "nbdinfo")
    path, _ = secret
    folder = tmp_path / "attacker"
    cow = crafted_overlay(folder, path)
    assert socket_mode_when_served(cow, folder / "nbd.sock") == 0o700
    # the same overlay on a backing file anyone may read: the socket is as open as the umask allows
    public = tmp_path / "public.img"
    public.write_bytes(bytes(SIZE))
    os.chmod(public, 0o644)
    ok = crafted_overlay(tmp_path / "public", public)
    assert socket_mode_when_served(ok, tmp_path / "public" / "nbd.sock") == 0o777 & ~umask()


def socket_mode_when_served(cow: Path, sock: Path) -> int:
    """The mode of ``serve --socket SOCK``'s socket, seen by a client of the running server (``--run``)."""
    script = f'while [ ! -S "{sock}" ]; do sleep 0.02; done; stat -c "MODE=%a" "{sock}"; nbdinfo --size "$uri"'
    text = shell_ok(serve_run(cow, script, "--socket", sock))
    assert f"{SIZE}" in text, text  # the server answered
    assert not sock.exists() and [p.name for p in sock.parent.iterdir() if p.name.startswith(".ubdcow")] == []
    return int(text.split("MODE=")[1].split()[0], 8)


def test_info_shows_where_the_recorded_path_resolves(tmp_path, secret):
    path, _ = secret
    folder = tmp_path / "attacker"
    folder.mkdir()
    link = folder / "harmless.img"
    link.symlink_to(path)
    st = os.stat(path)
    cow = folder / "evil.cow"
    header = make_header("v3", str(link), int(st.st_mtime), st.st_size)
    cow.write_bytes(header.to_bytes().ljust(header.file_size, b"\0"))
    facts = ubdcow.info(cow)
    assert facts["backing"]["path"] == str(link) and facts["backing"]["resolved"] == str(path)
    proc = run_cli("info", cow, "--json")
    assert json.loads(proc.stdout)["disks"][0]["backing"]["resolved"] == str(path)
    proc = run_cli("info", cow)
    lines = dict(line.split(":", 1) for line in proc.stdout.decode().splitlines() if ":" in line)
    assert lines["resolves to"].strip().startswith(f"{path} (through symbolic links")
    # a path without links: the JSON names the same file, the human form adds no line
    plain = tmp_path / "plain.cow"
    ubdcow.create(plain, path)
    assert ubdcow.info(plain)["backing"]["resolved"] == str(path)
    assert b"resolves to" not in run_cli("info", plain).stdout
    # a dangling link: where it leads, although nothing is there
    link.unlink()
    link.symlink_to(folder / "gone.img")
    assert ubdcow.info(cow)["backing"]["resolved"] == str(folder / "gone.img")


# -- the rule for ordinary outputs --------------------------------------------------------------------


def _files(tmp_path: Path, cow_mode: int, backing_mode: int, gid: int | None = None) -> tuple[Path, Path]:
    backing = tmp_path / "base.img"
    backing.write_bytes(bytes(range(256)) * 64)
    cow = tmp_path / "o.cow"
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"x" * 700, 100)  # a partial page: page 0 is COW, the rest reads the backing file
    os.chmod(cow, cow_mode)
    os.chmod(backing, backing_mode)
    if gid is not None:
        os.chown(cow, -1, gid)
        os.chown(backing, -1, gid)
    return cow, backing


def make_output(tool: str, cow: Path, backing: Path, out: Path, *extra: str) -> Path:
    """Run ``tool`` (convert, diff or merge) on the test's files into ``out``."""
    args = {"convert": ["convert", cow], "diff": ["diff", backing, cow], "merge": ["merge", cow]}[tool]
    proc = run_cli(*args, "-o", out, *extra)
    assert proc.returncode == 0, (tool, proc.stderr)
    return out


TOOLS = ["convert", "diff", "merge"]  # merge: passes once merge.py hands its inputs to AtomicFile (issue 15)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize(("cow_mode", "backing_mode", "expected"), [
    (0o644, 0o644, 0o644),
    (0o600, 0o644, 0o600),
    (0o644, 0o640, 0o640),  # same group as the output (root's)
    (0o664, 0o604, 0o604),  # others may read both; the group only what others may
    (0o644, 0o444, 0o644),  # a read-only backing file leaves the owner's write bit alone
])
def test_a_new_output_gets_the_inputs_intersection_less_the_umask(tmp_path, tool, cow_mode, backing_mode, expected):
    need_root()
    cow, backing = _files(tmp_path, cow_mode, backing_mode, gid=0)
    out = make_output(tool, cow, backing, tmp_path / "out")
    if tool == "convert":  # its output holds only the COW file's data here (no mixed page to fill)
        expected = 0o666 & ~umask() & (0o700 | cow_mode & 0o077)
    assert mode(out) == expected


@pytest.mark.parametrize("tool", TOOLS)
def test_a_group_that_is_not_the_outputs_counts_as_others(tmp_path, tool):
    need_root()
    cow, backing = _files(tmp_path, 0o644, 0o640, gid=shadow_gid())  # group-readable, but by another group
    out = make_output(tool, cow, backing, tmp_path / "out")
    assert os.stat(out).st_gid == 0
    assert mode(out) == (0o644 if tool == "convert" else 0o600)  # convert reads only the COW file here


@pytest.mark.parametrize("tool", TOOLS)
def test_a_restrictive_umask_still_applies(tmp_path, tool):
    cow, backing = _files(tmp_path, 0o644, 0o644)
    old = os.umask(0o077)
    try:
        out = make_output(tool, cow, backing, tmp_path / "out")
    finally:
        os.umask(old)
    assert mode(out) == 0o600


def replace_output(tool: str, cow: Path, backing: Path, out: Path, old_mode: int, owner: int = 0) -> os.stat_result:
    """``tool --overwrite`` onto an existing ``out`` of ``old_mode`` owned by ``owner``; the result's stat."""
    out.write_bytes(b"old")
    os.chown(out, owner, owner)
    os.chmod(out, old_mode)
    make_output(tool, cow, backing, out, "--overwrite")
    return os.stat(out)


@pytest.mark.parametrize("tool", TOOLS)
def test_overwrite_keeps_the_replaced_mode_only_when_it_is_not_wider(tmp_path, tool):
    need_root()
    cow, backing = _files(tmp_path, 0o600, 0o644, gid=0)
    out = tmp_path / "out"
    assert stat.S_IMODE(replace_output(tool, cow, backing, out, 0o644).st_mode) == 0o600  # wider: not kept
    assert stat.S_IMODE(replace_output(tool, cow, backing, out, 0o400).st_mode) == 0o400  # narrower: kept


@pytest.mark.parametrize("tool", TOOLS)
def test_overwrite_gives_the_output_to_the_replaced_files_owner_only_if_it_may_read_the_inputs(tmp_path, tool):
    need_root()
    cow, backing = _files(tmp_path, 0o600, 0o644, gid=0)
    out = tmp_path / "out"
    # user 1000 cannot read the COW file (root's, 0600); an owner could chmod the output: root keeps it
    st = replace_output(tool, cow, backing, out, 0o600, owner=1000)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 1000, 0o600)
    os.chmod(cow, 0o644)
    st = replace_output(tool, cow, backing, out, 0o600, owner=1000)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)


def test_serve_refuses_a_socket_folder_too_long_for_the_staged_socket(tmp_path):
    """The socket is first made in a folder beside PATH: where that path would not fit a Unix socket's
    108 bytes, one line names PATH and nothing is left behind."""
    require_nbd("nbdkit")
    backing = tmp_path / "b.img"
    backing.write_bytes(bytes(4096))
    cow = tmp_path / "o.cow"
    ubdcow.create(cow, backing)
    folder = tmp_path / ("d" * max(1, 100 - len(str(tmp_path))))
    folder.mkdir()
    sock = folder / "s"
    assert len(str(sock)) < 107  # a path nbdkit itself could bind
    proc = run_cli("serve", cow, "--socket", sock, "--run", "true")
    assert_one_line_error(proc, str(sock), "too long")
    assert list(folder.iterdir()) == []
