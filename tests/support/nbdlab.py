"""Helpers for the tests of ``ubdcow serve`` with real NBD clients (nbdkit, libnbd-bin, qemu-utils, fuse3).

- :func:`require_nbd` gates a client program: it skips with a reason when
  the program is absent, and fails instead under ``UBDCOW_REQUIRE_UML=1``
  (CI installs every package, see ``.ci/run``);
- :class:`Server`: ``ubdcow serve`` running in the background on a Unix
  socket of the test's folder, stopped with SIGTERM, whose exit status and
  output the test can check;
- :func:`serve_run`: ``ubdcow serve ... --run CMD`` in the foreground;
- :func:`nbd_map` / :func:`qemu_map`: the extents two independent clients
  report, as ``(start, length, is_zero)`` runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from conftest import require

import ubdcow

#: the program -> Debian package of every NBD tool the tests use
PACKAGES = {
    "nbdkit": "nbdkit nbdkit-plugin-python",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
    "nbdfuse": "libnbd-bin",
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "fusermount3": "fuse3",
}


def require_nbd(*names: str) -> None:
    """Skip (fail under UBDCOW_REQUIRE_UML=1) unless every program in ``names`` is installed.

    ``nbdkit`` also needs its Python plugin (``nbdkit python --dump-plugin``).
    """
    missing = [n for n in names if shutil.which(n) is None]
    if "nbdkit" in names and "nbdkit" not in missing:
        proc = subprocess.run(["nbdkit", "python", "--dump-plugin"], capture_output=True, timeout=60)
        if proc.returncode != 0:
            missing.append("nbdkit's python plugin")
    packages = sorted({PACKAGES.get(n, "nbdkit-plugin-python") for n in missing})
    require(not missing, f"{', '.join(missing)} not installed (apt-get install {' '.join(packages)})")


def ubdcow_cmd(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "ubdcow", *map(str, args)]


def serve_run(cow: str | os.PathLike[str], run: str, *args: str | os.PathLike[str], timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """``ubdcow serve COW ARGS --run RUN``, in the foreground; the script sees ``$uri``."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("UBDCOW_DEBUG", None)
    return subprocess.run(ubdcow_cmd("serve", cow, *args, "--run", run), capture_output=True, timeout=timeout,
                          env=full_env)


def shell_ok(proc: subprocess.CompletedProcess[bytes]) -> str:
    """Assert a ``serve --run`` session exited 0; return its combined output."""
    text = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{text[-4000:]}"
    return text


class Server:
    """``ubdcow serve COW --socket DIR/nbd.sock ARGS`` in the background (a context manager)."""

    def __init__(self, cow: str | os.PathLike[str], folder: Path, *args: str | os.PathLike[str]) -> None:
        self.socket = folder / "nbd.sock"
        self.uri = f"nbd+unix:///?socket={self.socket}"
        self.cmd = ubdcow_cmd("serve", cow, "--socket", self.socket, *args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = b""
        self.err = b""

    def __enter__(self) -> Server:
        env = dict(os.environ)
        env.pop("UBDCOW_DEBUG", None)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.socket.exists():
            if self.proc.poll() is not None:
                out, err = self.proc.communicate()
                raise AssertionError(f"serve exited {self.proc.returncode} before listening:\n"
                                     f"{(out + err).decode(errors='replace')}")
            assert time.monotonic() < deadline, "serve did not listen within 60 s"
            time.sleep(0.02)
        # the socket exists once nbdkit listens; a client connecting now is served
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` to serve and wait; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            out, err = self.proc.communicate()
            raise AssertionError("serve did not stop within 60 s of " + signal.Signals(sig).name) from None
        self.out += out
        self.err += err
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()

    @property
    def output(self) -> str:
        return (self.out + self.err).decode(errors="replace")


def run(cmd: list[str | os.PathLike[str]], timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run a client program, asserting success unless ``check=False``."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{(proc.stdout + proc.stderr).decode()[-3000:]}"
    return proc


Runs = list[tuple[int, int, bool]]


def _coalesce(runs: Runs) -> Runs:
    out: Runs = []
    for start, length, zero in runs:
        if length and out and out[-1][2] == zero and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, zero)
        elif length:
            out.append((start, length, zero))
    return out


def nbd_map(uri: str) -> list[dict[str, Any]]:
    """``nbdinfo --map --json URI``: the base:allocation extents, as libnbd reports them."""
    proc = run(["nbdinfo", "--map", "--json", uri])
    data = json.loads(proc.stdout)
    return list(data) if isinstance(data, list) else list(data.get("extents", data))


def nbd_zero_runs(uri: str) -> Runs:
    """``(start, length, reads_as_zero)`` from nbdinfo (type bit 2: zero)."""
    return _coalesce([(e["offset"], e["length"], bool(e["type"] & 2)) for e in nbd_map(uri)])


def qemu_zero_runs(uri: str) -> Runs:
    """The same from ``qemu-img map --output=json`` (an independent NBD client)."""
    proc = run(["qemu-img", "map", "-f", "raw", "--output=json", uri])
    return _coalesce([(e["start"], e["length"], bool(e["zero"])) for e in json.loads(proc.stdout)])


def qemu_data_runs(uri: str) -> Runs:
    """``(start, length, is_data)`` from ``qemu-img map``."""
    proc = run(["qemu-img", "map", "-f", "raw", "--output=json", uri])
    return _coalesce([(e["start"], e["length"], bool(e["data"])) for e in json.loads(proc.stdout)])


# -- a minimal NBD client, to send requests the real clients refuse to send -------------------------------

NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC, NBD_CMD_FLUSH, NBD_CMD_TRIM, NBD_CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
NBD_FLAG_READ_ONLY = 1 << 1


class RawClient:
    """The fixed-newstyle handshake (NBD_OPT_GO) and simple replies, from the protocol document.

    Each request returns the reply's error number (0 = success) and, for a
    successful read, the data: what a client really receives, including for
    requests libnbd and qemu check and refuse on their side.
    """

    def __init__(self, socket_path: str | os.PathLike[str]) -> None:
        import socket as _socket

        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(socket_path))
        self.handle = 0
        assert self._recv(16) == b"NBDMAGICIHAVEOPT"
        (flags,) = struct.unpack(">H", self._recv(2))
        assert flags & 1, "the server is not fixed-newstyle"
        self.sock.sendall(struct.pack(">I", 1 | (flags & 2)))  # FIXED_NEWSTYLE, NO_ZEROES if offered
        self.sock.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))  # GO, name ""
        self.size = -1
        self.flags = 0
        while True:
            magic, _option, kind, length = struct.unpack(">QIII", self._recv(20))
            assert magic == 0x3E889045565A9, hex(magic)
            data = self._recv(length)
            if kind == 1:  # ACK
                break
            assert not kind & 0x80000000, f"NBD_OPT_GO refused: {kind:#x} {data!r}"
            if kind == 3 and struct.unpack(">H", data[:2])[0] == 0:  # INFO, NBD_INFO_EXPORT
                self.size, self.flags = struct.unpack(">QH", data[2:12])

    def _recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the server closed the connection"
            out += chunk
        return out

    def request(self, kind: int, offset: int, length: int, data: bytes = b"", flags: int = 0) -> tuple[int, bytes]:
        """Send one request; returns ``(error, data)``."""
        self.handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, flags, kind, self.handle, offset, length) + data)
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        assert (magic, handle) == (0x67446698, self.handle), (hex(magic), handle)
        payload = self._recv(length) if kind == NBD_CMD_READ and error == 0 else b""
        return error, payload

    def read(self, offset: int, length: int) -> tuple[int, bytes]:
        return self.request(NBD_CMD_READ, offset, length)

    def close(self) -> None:
        try:
            self.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, NBD_CMD_DISC, 0, 0, 0))
        finally:
            self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_locks(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(POSIX|OFDLCK, READ|WRITE)`` of every lock /proc/locks shows on ``path``'s inode."""
    st = os.stat(path)
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks") as f:
        return [(p[1], p[3]) for p in (line.split() for line in f) if "->" not in p and len(p) > 5 and p[5] == key]


# -- shared set-ups ---------------------------------------------------------------------------------------


def random_overlay(folder: Path, size: int, rng: random.Random, name: str = "overlay.cow") -> tuple[Path, Path]:
    """A backing file of random bytes and an empty overlay on it."""
    backing = folder / "backing.img"
    backing.write_bytes(rng.randbytes(size))
    cow = folder / name
    ubdcow.create(cow, backing)
    return cow, backing


def ext4_overlay(folder: Path, seed: int, files: int, static_files: int,
                 name: str = "overlay.cow") -> tuple[dict[str, bytes], set[str], Path, Path]:
    """A model tree, its ext4 image (``mkfs.ext4 -d``) as the backing file and an empty overlay on it."""
    from . import fslab

    tree, folders = fslab.make_tree(folder / "tree", seed=seed, files=files, static_files=static_files)
    backing = folder / "backing.img"
    fslab.make_ext4(backing, folder / "tree", "48M")
    cow = folder / name
    ubdcow.create(cow, backing)
    return tree, folders, backing, cow


@contextlib.contextmanager
def fuse_mount(uri: str, folder: Path, writable: bool = False) -> Iterator[Path]:
    """The export as a file through ``nbdfuse``, loop-mounted (read-only unless ``writable``); yields the mount."""
    fuse_dir, mnt = folder / "fuse", folder / "mnt"
    fuse_dir.mkdir()
    mnt.mkdir()
    fuse = subprocess.Popen(["nbdfuse", *([] if writable else ["-r"]), str(fuse_dir / "disk"), uri])
    try:
        deadline = time.monotonic() + 30
        while not (fuse_dir / "disk").exists():
            assert fuse.poll() is None and time.monotonic() < deadline, "nbdfuse did not expose the disk"
            time.sleep(0.05)
        run(["mount", "-o", "loop" if writable else "loop,ro", fuse_dir / "disk", mnt])
        try:
            yield mnt
        finally:
            run(["umount", mnt])
    finally:
        run(["fusermount3", "-u", fuse_dir], check=False)
        fuse.wait(timeout=30)
