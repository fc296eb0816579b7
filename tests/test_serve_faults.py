"""``ubdcow serve`` when things go wrong: refusals before it starts, bad requests, faults while it serves,
the locks against a real guest, and SIGKILL of the server or the client during multi-connection writes.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tool
from support.fslab import checked
from support.nbdlab import (
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_FLAG_READ_ONLY,
    RawClient,
    Server,
    file_locks,
    random_overlay,
    require_nbd,
    ubdcow_cmd,
)
from test_engine_uml import _kill_group, _posix_locks, _wait_for
from support.uml import Guest, run_guest, ubd_arg
from support.uml import kernel as uml_kernel

import ubdcow

PAGE = 4096
SECTOR = 512
NBD_CMD_FLAG_FUA = 1
NBD_CMD_FLAG_FAST_ZERO = 1 << 4


def _image(tmp_path: Path, size: int = 4 << 20, seed: int = 1) -> tuple[Path, Path, bytearray]:
    """An overlay on random bytes with its first page written; and the disk's bytes."""
    cow, backing = random_overlay(tmp_path, size, random.Random(seed))
    with ubdcow.open(cow, "r+") as disk:
        disk.pwrite(b"\xc0" * PAGE, 0)
    model = bytearray(backing.read_bytes())
    model[:PAGE] = b"\xc0" * PAGE
    return cow, backing, model


def _serve(*args: str | os.PathLike[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, **(env or {}))
    full.pop("UBDCOW_DEBUG", None)
    return subprocess.run(ubdcow_cmd("serve", *args), capture_output=True, text=True, timeout=120, env=full)


def _refused(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """Exit 1, one error line naming the problem (plus an optional hint line), no traceback, no stdout."""
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert proc.stdout == "", proc.stdout
    assert "Traceback" not in proc.stderr
    assert 1 <= len(lines) <= 2 and lines[0].startswith("ubdcow: "), lines
    assert len(lines) == 1 or lines[1].startswith("hint: "), lines
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    return proc.stderr


# -- refusals, one line each, exit 1, nothing left behind ---------------------------------------------------


def _fake_nbdkit(folder: Path, dump: str, status: int = 0) -> dict[str, str]:
    """A PATH whose ``nbdkit`` prints ``dump`` for ``nbdkit python --dump-plugin`` and exits ``status``."""
    folder.mkdir()
    script = folder / "nbdkit"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{dump}'\nexit {status}\n")
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_refusals_before_the_server_starts(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    cow, backing, _ = _image(tmp_path)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    base = {"TMPDIR": str(tmp)}
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"

    empty = tmp_path / "empty-path"
    empty.mkdir()
    _refused(_serve(cow, env={**base, "PATH": str(empty)}), "nbdkit is not installed", "nbdkit-plugin-python")
    env = _fake_nbdkit(tmp_path / "noplugin", "nbdkit: error: cannot open plugin", status=1)
    _refused(_serve(cow, env={**base, **env}), "Python plugin is not installed", "apt-get install nbdkit-plugin-python")
    env = _fake_nbdkit(tmp_path / "old", "python_version=3.9.2")
    err = _refused(_serve(cow, env={**base, **env}), "Python 3.9", f"Python {ours}")
    assert "python3.9" in err and "Python 3.9 interpreter" in err  # what to do: an interpreter of the plugin's version

    not_cow = tmp_path / "notes.txt"
    not_cow.write_text("not a disk\n")
    _refused(_serve(not_cow, env=base), str(not_cow), "not a UML COW file")
    info = subprocess.run(ubdcow_cmd("info", tmp_path / "missing.cow"), capture_output=True, text=True)
    _refused(_serve(tmp_path / "missing.cow", env=base), info.stderr.splitlines()[0])  # info's own message
    os.utime(backing, (1, 1))
    merge = subprocess.run(ubdcow_cmd("merge", cow, "-o", tmp_path / "m.img"), capture_output=True, text=True)
    assert merge.returncode == 1 and "mtime" in merge.stderr
    _refused(_serve(cow, env=base), merge.stderr.splitlines()[0])  # the same refusal as merge's
    proc = _serve(cow, "--force", "--run", "true", env=base)  # and --force serves anyway
    assert proc.returncode == 0, proc.stderr

    taken = tmp_path / "taken.sock"
    taken.write_text("")
    _refused(_serve(cow, "--force", "--socket", taken, env=base), str(taken), "exists")
    assert taken.read_text() == ""  # not removed: it is not ours
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _refused(_serve(cow, "--force", "--port", str(port), env=base), f"port {port}", "not free")
    for bind in ("0.0.0.0", "127.0.0.1"):  # a usage error (exit 2), whatever the address: never ignored
        usage = _serve(cow, "--bind", bind, env=base)
        assert usage.returncode == 2 and usage.stdout == "", usage
        assert usage.stderr.startswith("usage: ubdcow serve ") and usage.stderr.splitlines()[-1] == (
            "ubdcow serve: error: --bind needs --port (without --port the disk is served on a Unix socket)")
    usage = _serve(cow, "--socket", taken, "--port", "10809", env=base)
    assert usage.returncode == 2 and "not allowed with" in usage.stderr
    assert list(tmp.iterdir()) == [], "serve left files in TMPDIR"


def test_warning_for_tcp_without_tls_and_uri(tmp_path: Path) -> None:
    require_nbd("nbdkit", "nbdinfo")
    cow, _, _ = _image(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = _serve(cow, "--port", str(port), "--bind", "0.0.0.0", "--run", f"nbdinfo --size nbd://127.0.0.1:{port}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(4 << 20)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "without TLS" in warnings[0] and "0.0.0.0" in warnings[0], proc.stderr
    assert f"at nbd://{socket.gethostname()}:{port}" in proc.stderr  # a wildcard address: this host's name
    proc = _serve(cow, "--port", str(port), "--run", "true")  # loopback: no warning
    assert proc.returncode == 0 and "warning:" not in proc.stderr, proc.stderr
    assert f"at nbd://127.0.0.1:{port}" in proc.stderr  # with --run the URI goes to stderr


def test_run_exit_status_is_the_commands(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    cow, _, _ = _image(tmp_path)
    assert _serve(cow, "--run", "exit 7").returncode == 7
    assert _serve(cow, "--run", 'test -S "${uri#*socket=}"').returncode == 0  # $uri names our socket
    proc = _serve(cow, "--run", "kill -9 $$")
    assert proc.returncode == 128 + signal.SIGKILL, proc.stderr


def test_sigterm_and_ctrl_c_stop_cleanly(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    cow, _, _ = _image(tmp_path)
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        with Server(cow, tmp_path, "--writable") as server:
            assert file_locks(cow) == [("OFDLCK", "WRITE")]
            with RawClient(server.socket) as client:
                assert client.request(NBD_CMD_WRITE, 8192, PAGE, b"\x5a" * PAGE)[0] == 0
            if sig == signal.SIGINT:  # Ctrl-C reaches the whole foreground group
                assert server.proc is not None
                os.killpg(server.proc.pid, sig)
            assert server.stop(sig) == code, server.output
        assert "Traceback" not in server.output
        assert not server.socket.exists(), "the socket was left behind"
        assert file_locks(cow) == [], "the locks were not released"
        with ubdcow.open(cow) as disk:
            assert disk.pread(PAGE, 8192) == b"\x5a" * PAGE
        assert ubdcow.check(cow).exit_code == 0


# -- bad requests: errors to the client, the server keeps serving --------------------------------------------


def test_bad_requests_get_errors_and_the_server_keeps_serving(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    size = 4 << 20
    cow, backing, expected = _image(tmp_path, size)
    with Server(cow, tmp_path) as server, RawClient(server.socket) as client:
        assert client.size == size and client.flags & NBD_FLAG_READ_ONLY
        assert client.read(size - SECTOR, 2 * SECTOR)[0] == errno.EINVAL  # past the end
        assert client.read(size + (1 << 30), SECTOR)[0] == errno.EINVAL
        assert client.request(NBD_CMD_WRITE, 0, SECTOR, bytes(SECTOR))[0] == errno.EPERM  # a read-only export
        assert client.request(NBD_CMD_TRIM, 0, PAGE)[0] == errno.EPERM
        assert client.request(NBD_CMD_WRITE_ZEROES, 0, PAGE)[0] == errno.EPERM
        assert client.read(0, 2 * PAGE) == (0, bytes(expected[: 2 * PAGE]))  # still serving, nothing changed

        os.truncate(backing, 1 << 20)  # the backing file shrinks under the server: EIO, then still serving
        assert client.read(2 << 20, 64 << 10)[0] == errno.EIO
        assert client.read(0, 1 << 20) == (0, bytes(expected[: 1 << 20]))
    assert "Traceback" not in server.output, server.output
    assert server.stop() in (0, 143)


def test_odd_writes_fast_zero_and_fua_on_a_writable_export(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    size = 4 << 20
    cow, backing, model = _image(tmp_path, size)
    with Server(cow, tmp_path, "--writable") as server, RawClient(server.socket) as client:
        assert not client.flags & NBD_FLAG_READ_ONLY
        # NBD lets a client ignore the advertised block size: a 3-byte write still works, pages stay whole
        assert client.request(NBD_CMD_WRITE, 10001, 3, b"abc")[0] == 0
        model[10001:10004] = b"abc"
        assert client.request(NBD_CMD_WRITE, size - 100, 200, bytes(200))[0] in (errno.EINVAL, errno.ENOSPC)
        # fast zero: refused for a partial page (it needs a read and a write), done for whole pages
        assert client.request(NBD_CMD_WRITE_ZEROES, 20000, 1000, flags=NBD_CMD_FLAG_FAST_ZERO)[0] == errno.ENOTSUP
        assert client.request(NBD_CMD_WRITE_ZEROES, 5 * PAGE, 3 * PAGE, flags=NBD_CMD_FLAG_FAST_ZERO)[0] == 0
        model[5 * PAGE : 8 * PAGE] = bytes(3 * PAGE)
        data = b"\x77" * 3000
        assert client.request(NBD_CMD_WRITE, 1 << 20, len(data), data, flags=NBD_CMD_FLAG_FUA)[0] == 0
        model[1 << 20 : (1 << 20) + len(data)] = data
        assert client.request(NBD_CMD_TRIM, 2 << 20, 10 * PAGE + 700)[0] == 0
        model[2 << 20 : (2 << 20) + 10 * PAGE + 700] = bytes(10 * PAGE + 700)
        assert client.read(0, size) == (0, bytes(model))
    assert server.stop() in (0, 143)
    with ubdcow.open(cow) as disk:
        assert disk.read() == bytes(model)
    report = ubdcow.check(cow)
    assert (report.exit_code, report.mixed_pages) == (0, 0), report.as_dict()


# -- the locks, both ways, with a real guest ----------------------------------------------------------------


def test_a_running_guest_makes_serve_refuse(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    uml_kernel()
    cow, _, _ = _image(tmp_path, 1 << 20)
    proc = run_guest("exec 3</dev/ubdb\necho UBDCOW-READY\nsleep 30\n", ubd_arg(cow), workdir=tmp_path,
                     background=True)
    assert isinstance(proc, subprocess.Popen)
    try:
        _wait_for(proc, b"UBDCOW-READY", 60)
        guest_pid = _posix_locks(cow)[0][1]
        for args in ((), ("--writable",)):
            _refused(_serve(cow, *args), str(cow), str(guest_pid))
    finally:
        _kill_group(proc)


@pytest.mark.parametrize("mode", ["read-only", "writable"])
def test_serve_keeps_a_guest_out(tmp_path: Path, mode: str) -> None:
    require_nbd("nbdkit")
    uml_kernel()
    cow, backing, _ = _image(tmp_path, 1 << 20)
    script = checked("dd if=/dev/ubdb of=/dev/null bs=4096 count=1 status=none")
    args = ("--writable",) if mode == "writable" else ()
    with Server(cow, tmp_path, *args) as server:
        assert file_locks(cow) == [("OFDLCK", "WRITE" if args else "READ")]
        # with --writable the backing file's read lock, as the kernel takes it; read-only, none: qemu takes a
        # whole-file lock for "every permission denied", and qemu-img convert -B could not open the backing file
        assert file_locks(backing) == ([("OFDLCK", "READ")] if args else [])
        result = run_guest(script, ubd_arg(cow), workdir=tmp_path)
        assert isinstance(result, Guest)
        assert "Failed to lock" in result.console, result.console[-3000:]
        assert "UBDCOW-FAIL: dd if=/dev/ubdb" in result.console, result.console[-3000:]
        with RawClient(server.socket) as client:  # and the server was not disturbed
            assert client.read(0, PAGE) == (0, b"\xc0" * PAGE)
    result = run_guest(script, ubd_arg(cow), workdir=tmp_path)  # once it stops, the guest attaches
    assert isinstance(result, Guest) and "UBDCOW-FAIL" not in result.console, result.console[-3000:]


# -- SIGKILL of the server or the client during a multi-connection write ------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(p) for p in text]
    return found


def test_sigkill_during_a_four_connection_write_leaves_a_consistent_file(tmp_path: Path) -> None:
    require_nbd("nbdkit", "nbdcopy")
    size = 64 << 20
    rng = random.Random(0x5107)
    cow, backing, _ = _image(tmp_path, size)
    with ubdcow.open(cow) as disk:
        current = np.frombuffer(disk.read(), dtype=np.uint8).copy()
    kills = {"server": 0, "client": 0}
    for trial in range(9):
        source = tmp_path / "source.img"
        new = np.frombuffer(rng.randbytes(size), dtype=np.uint8).copy()
        new[rng.randrange(size // 2) // PAGE * PAGE :][: 2 << 20] = 0  # a zero run: nbdcopy zeroes or trims it
        source.write_bytes(new.tobytes())
        victim = "none" if trial == 0 else "server" if trial % 2 else "client"
        server = Server(cow, tmp_path, "--writable")
        with server:
            assert server.proc is not None
            (nbdkit,) = _children(server.proc.pid)
            copy = subprocess.Popen(["nbdcopy", "--connections=4", "--request-size=65536", str(source), server.uri],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if victim == "none":
                assert copy.wait(timeout=120) == 0
            else:
                # kill once the server has written a random share of the disk: by progress, not by a timer, so
                # the kill lands mid-copy however fast this machine copies
                _wait_written(nbdkit, int(rng.uniform(0.1, 0.8) * size), copy)
            killed = copy.poll() is None
            if killed:
                kills[victim] += 1
                if victim == "server":
                    os.kill(nbdkit, signal.SIGKILL)
                else:
                    copy.kill()
            copy.wait(timeout=60)
            if killed and victim == "server":
                assert server.proc.wait(timeout=60) == 137  # serve saw nbdkit die, and says so
                server.stop()
                assert "killed by SIGKILL" in server.output, server.output
        assert "Traceback" not in server.output, server.output
        report = ubdcow.check(cow)
        assert (report.exit_code, report.mixed_pages) == (0, 0), report.as_dict()
        with ubdcow.open(cow) as disk:
            now = np.frombuffer(disk.read(), dtype=np.uint8)
        sectors = now.reshape(-1, SECTOR)
        old_ok = (sectors == current.reshape(-1, SECTOR)).all(axis=1)
        new_ok = (sectors == new.reshape(-1, SECTOR)).all(axis=1)
        assert (old_ok | new_ok).all(), f"trial {trial}: sectors neither old nor new: {np.flatnonzero(~(old_ok | new_ok))[:10]}"
        current = now.copy()
    print(f"OBSERVED: kills that landed mid-copy: {kills}")
    assert kills["server"] >= 3 and kills["client"] >= 3, kills  # the kills landed mid-copy


def _written(pid: int) -> int:
    """Bytes the process has passed to write system calls so far (``wchar`` of /proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{pid}/io")


def _wait_written(pid: int, target: int, copy: subprocess.Popen[bytes]) -> None:
    """Return once ``pid`` has written ``target`` bytes, or ``copy`` has ended."""
    deadline = time.monotonic() + 120
    while _written(pid) < target and copy.poll() is None:
        assert time.monotonic() < deadline, "the copy made no progress"
        time.sleep(0.001)


def test_extents_one_at_a_time_merge_kinds_and_scan_a_bounded_range(tmp_path: Path) -> None:
    """qemu-img walks the disk with req_one requests: each must cover a whole run of one kind (COW and backing
    data together), and no request may scan more than EXTENTS_SCAN (else the walk is quadratic)."""
    from ubdcow.nbd import EXTENTS_SCAN, ZERO, Export

    size = 4 << 20
    cow, backing, _ = _image(tmp_path, size)  # page 0 in the COW file, the rest backing data
    with ubdcow.open(cow, "r+") as disk:
        disk.discard(1 << 20, 8 * PAGE)
    export = Export(ubdcow.open(cow))
    try:
        assert export.extents(size, 0, req_one=True) == [(0, 1 << 20, 0)]  # COW page + backing: one data run
        assert export.extents(size, 0) == [(0, 1 << 20, 0), (1 << 20, 8 * PAGE, ZERO), ((1 << 20) + 8 * PAGE,
                                            size - (1 << 20) - 8 * PAGE, 0)]
        assert export.extents(size - (1 << 20), 1 << 20, req_one=True) == [(1 << 20, 8 * PAGE, ZERO)]
    finally:
        export.close()
    big = tmp_path / "big.cow"
    sparse = tmp_path / "sparse.img"
    with open(sparse, "wb") as f:
        f.truncate(4 * EXTENTS_SCAN)  # all hole: one zero run, longer than a scan
    ubdcow.create(big, sparse)
    export = Export(ubdcow.open(big))
    try:
        reply = export.extents(4 * EXTENTS_SCAN, 0)
        assert reply[0][0] == 0 and sum(n for _, n, _ in reply) == EXTENTS_SCAN
    finally:
        export.close()


# -- TLS, --run's variables, the docs' recipes (issue 21, items 6, 8, 9; issue 20, item 4) ---------------------
DOCS = Path(__file__).parent.parent / "docs" / "serve.md"


def _doc_block(needle: str) -> str:
    """The ```sh block of docs/serve.md that holds ``needle``."""
    blocks = re.findall(r"```sh\n(.*?)```", DOCS.read_text(), re.S)
    found = [b for b in blocks if needle in b]
    assert len(found) == 1, (needle, len(found))
    return found[0]


def _ubdcow_on_path(folder: Path) -> dict[str, str]:
    """A PATH whose ``ubdcow`` is this checkout's, run by this interpreter (as the docs' recipes call it)."""
    folder.mkdir(exist_ok=True)
    script = folder / "ubdcow"
    root = Path(__file__).parent.parent
    script.write_text(f'#!/bin/sh\nPYTHONPATH={root} exec {sys.executable} -m ubdcow "$@"\n')
    script.chmod(0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"}


def test_tls_options_are_checked_before_nbdkit_starts(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    cow, _, _ = _image(tmp_path)
    err = _refused(_serve(cow, "--tls-psk", tmp_path / "nonexist.psk"), "nonexist.psk", "cannot read the TLS PSK file",
                   "No such file or directory")
    assert err.startswith(f"ubdcow: {tmp_path / 'nonexist.psk'}: ")
    bad = tmp_path / "bad.psk"
    bad.write_text("alice:not-hex\n")
    _refused(_serve(cow, "--tls-psk", bad), str(bad), "no USERNAME:HEXKEY line", "psktool")
    empty = tmp_path / "certs"
    empty.mkdir()
    err = _refused(_serve(cow, "--tls-certificates", empty), str(empty), "ca-cert.pem, server-cert.pem, server-key.pem")
    assert "--tls-certificates" not in err  # nbdkit's "set --tls-certificates" lines never show
    (empty / "ca-cert.pem").write_text("x")
    _refused(_serve(cow, "--tls-certificates", empty), "lacks server-cert.pem, server-key.pem")
    _refused(_serve(cow, "--tls-certificates", tmp_path / "nowhere"), "does not exist")


def test_tls_psk_client_recipe_of_the_docs(tmp_path: Path) -> None:
    require_nbd("nbdkit", "nbdinfo")
    require_tool("openssl", "openssl")
    cow, _, _ = _image(tmp_path)
    os.rename(cow, tmp_path / "pc1.disk")
    block = _doc_block("tls-psk-file=keys.psk")
    env = dict(os.environ, **_ubdcow_on_path(tmp_path / "bin"))
    proc = subprocess.run(["sh", "-ec", block], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "export-size: 4194304" in proc.stdout and "newstyle-fixed with TLS" in proc.stdout, proc.stdout
    # and $uri alone carries no credentials: the failure the docs describe
    proc = _serve(tmp_path / "pc1.disk", "--tls-psk", tmp_path / "keys.psk", "--run", 'nbdinfo "$uri"')
    assert proc.returncode != 0 and "Insufficient credentials" in proc.stderr, proc.stderr


def test_run_exports_nbdkits_variables_to_a_script(tmp_path: Path) -> None:
    require_nbd("nbdkit", "nbdinfo")
    cow, _, _ = _image(tmp_path)
    look = tmp_path / "look.sh"
    look.write_text('#!/bin/sh\nset -e\nenv | grep -E "^(uri|nbd|unixsocket|port|tls|exportname)=" | sort > vars.txt\n'
                    'sh -c \'nbdinfo --size "$uri"\'\n')  # and a grandchild sees them too
    look.chmod(0o755)
    proc = subprocess.run(ubdcow_cmd("serve", cow, "--run", "./look.sh"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(4 << 20)
    found = dict(line.split("=", 1) for line in (tmp_path / "vars.txt").read_text().splitlines())
    assert found["uri"].startswith("nbd+unix://") and found["uri"] == found["nbd"]
    assert found["uri"].endswith("?socket=" + found["unixsocket"]) and found["unixsocket"].endswith("nbd.sock")
    assert found.get("port", "") == "" and found.get("exportname", "") == ""
    # the docs' script recipe
    os.rename(cow, tmp_path / "pc1.disk")
    env = dict(os.environ, **_ubdcow_on_path(tmp_path / "bin"))
    proc = subprocess.run(["sh", "-ec", _doc_block("./look.sh")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == str(4 << 20), proc


def test_docs_nbdfuse_recipe_gives_up_when_nbdfuse_fails(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    cow, _, _ = _image(tmp_path)
    os.rename(cow, tmp_path / "pc1.disk")
    bin_dir = tmp_path / "bin"
    env = dict(os.environ, **_ubdcow_on_path(bin_dir))
    fake = bin_dir / "nbdfuse"
    fake.write_text("#!/bin/sh\necho 'nbdfuse: fuse: device not found' >&2\nexit 1\n")
    fake.chmod(0o755)
    for needle in ("nbdfuse -r fuse/disk", "nbdfuse fuse/disk"):
        t0 = time.monotonic()
        proc = subprocess.run(["sh", "-ec", _doc_block(needle)], cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, env=env)
        assert proc.returncode == 1 and "nbdfuse failed" in proc.stderr, proc
        assert time.monotonic() - t0 < 30


def test_serve_exit_codes_as_documented(tmp_path: Path) -> None:
    """Without --run: 143 for SIGTERM (Ctrl-C's 130 is above), 0 when nbdkit itself is told to stop."""
    require_nbd("nbdkit")
    cow, _, _ = _image(tmp_path)
    with Server(cow, tmp_path) as server:
        assert server.stop(signal.SIGTERM) == 143
    with Server(cow, tmp_path) as server:
        assert server.proc is not None
        children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        nbdkit = [int(c) for c in children if Path(f"/proc/{c}/comm").read_text().strip() == "nbdkit"]
        assert len(nbdkit) == 1
        os.kill(nbdkit[0], signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
