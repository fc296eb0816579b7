"""``ubdcow serve`` (nbdkit + ubdcow's Python plugin) against ``nbdkit file`` and against ``ubdcow.merge``.

The image is conftest.dense (random backing, 10% of its 4 KiB blocks dirty);
its merged raw image is made once (``ubdcow.merge``) and served by ``nbdkit
file -r``, the reference. Both servers are started once per session in the
background on Unix sockets of the bench folder (``python -m ubdcow serve COW
--socket PATH`` and ``nbdkit -f -U PATH file FILE -r``) and stopped at the end
(SIGTERM, then wait); only the clients are timed, not server start-up. Every
file is in the page cache before timing.

* sequential read: ``nbdcopy URI null:`` (default: 4 connections, 64 requests
  in flight, 256 KiB requests) from each server. Target at full size: ubdcow's
  throughput >= 0.5x nbdkit file's. The same with ``--connections=1`` is
  reported only.
* export to raw: ``qemu-img convert -f raw -O raw URI out.img`` from ubdcow
  serve against ``ubdcow.merge.merge(cow, out)`` of the same image (time
  ratio, reported only). The previous output is removed (and ``sync`` run)
  before each round, untimed. The converted image is checked once, byte for
  byte, against the merged one. A round that exceeds UBDCOW_BENCH_SERVE_TIMEOUT
  seconds (default 120) fails the test.

Skipped with a reason when nbdkit (with its Python plugin, same Python minor
version as this interpreter), nbdcopy or qemu-img is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ubdcow.errors import ServeError
from ubdcow.merge import merge
from ubdcow.serve import find_nbdkit

from .conftest import (
    SIZE,
    DenseImage,
    Measure,
    Results,
    check_ratios,
    files_equal,
    remove,
    settle,
    warm,
)

READ = pytest.mark.benchmark(group="serve: nbdcopy URI null: (sequential read, page cache warm)")
EXPORT = pytest.mark.benchmark(group="serve: qemu-img convert from ubdcow serve vs ubdcow.merge")

#: ubdcow serve's nbdcopy throughput relative to nbdkit file's (asserted at full size)
READ_TARGET = 0.5
_START_TIMEOUT = 60.0
#: seconds one qemu-img convert round may take before the test fails (a healthy one takes seconds at 2 GiB)
CONVERT_TIMEOUT = float(os.environ.get("UBDCOW_BENCH_SERVE_TIMEOUT", "").strip() or 120)
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less the terminating NUL


def _require_tools() -> str:
    """Path of nbdkit (with a usable Python plugin); skip with a reason unless nbdkit, nbdcopy, qemu-img exist."""
    try:
        nbdkit = find_nbdkit()
    except ServeError as exc:
        hint = getattr(exc, "hint", None)
        pytest.skip(f"ubdcow serve cannot run here: {exc}" + (f" ({hint})" if hint else ""))
    missing = {"nbdcopy": "libnbd-bin", "qemu-img": "qemu-utils"}
    absent = [name for name in missing if shutil.which(name) is None]
    if absent:
        pytest.skip(f"{', '.join(absent)} not installed (apt-get install {' '.join(missing[n] for n in absent)})")
    return nbdkit


@dataclass
class BackgroundServer:
    """A server process listening on a Unix socket; ``uri`` is what the clients connect to."""

    name: str
    cmd: list[str]
    socket: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def start(self) -> BackgroundServer:
        env = dict(os.environ)
        env.pop("UBDCOW_DEBUG", None)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while not self.socket.exists():  # nbdkit creates the socket once it listens
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited {self.proc.returncode} before listening:\n{self.output()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name} did not listen within {_START_TIMEOUT:.0f} s:\n{self.output()}")
            time.sleep(0.02)
        return self

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            pytest.fail(f"{self.name} is not running (exit {self.proc and self.proc.returncode}):\n{self.output()}")

    def stop(self) -> None:
        """SIGTERM (ubdcow serve passes it on to nbdkit, which closes the image), SIGKILL after 30 s."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


@pytest.fixture(scope="session")
def serve_dir(bench_dir: Path) -> Iterator[Path]:
    path = bench_dir / "serve"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def socket_dir(serve_dir: Path) -> Iterator[Path]:
    """Where the sockets go: the bench folder, or a private one in /tmp if its path is too long for a socket."""
    if len(str(serve_dir / "ubdcow.sock")) <= _SUN_PATH_MAX:
        yield serve_dir
        return
    path = Path(tempfile.mkdtemp(prefix="ubdcow-bench-sock-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def nbdkit_path() -> str:
    return _require_tools()


@pytest.fixture(scope="session")
def merged(dense: DenseImage, serve_dir: Path) -> Path:
    """The merged raw image of the dense COW file (made once), in the page cache."""
    out = serve_dir / "merged.img"
    merge(dense.cow, out, backing=dense.backing)
    assert os.path.getsize(out) == dense.size
    settle()
    warm(out)
    return out


@pytest.fixture(scope="session")
def ubdcow_server(nbdkit_path: str, dense: DenseImage, socket_dir: Path, serve_dir: Path) -> Iterator[BackgroundServer]:
    """``python -m ubdcow serve COW --backing B --socket PATH`` (read-only) for the session."""
    socket = socket_dir / "ubdcow.sock"
    cmd = [sys.executable, "-m", "ubdcow", "serve", str(dense.cow), "--backing", str(dense.backing)]
    server = BackgroundServer("ubdcow serve", [*cmd, "--socket", str(socket), "-q"], socket, serve_dir / "ubdcow.log")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def file_server(nbdkit_path: str, merged: Path, socket_dir: Path, serve_dir: Path) -> Iterator[BackgroundServer]:
    """The reference: ``nbdkit -f -U PATH file MERGED -r`` for the session."""
    socket = socket_dir / "file.sock"
    cmd = [nbdkit_path, "-f", "-U", str(socket), "file", str(merged), "-r"]
    server = BackgroundServer("nbdkit file", cmd, socket, serve_dir / "file.log")
    try:
        yield server.start()
    finally:
        server.stop()


def _nbdcopy(uri: str, *extra: str) -> None:
    proc = subprocess.run(["nbdcopy", *extra, uri, "null:"], stdin=subprocess.DEVNULL, capture_output=True)
    if proc.returncode != 0:
        raise AssertionError(f"nbdcopy {uri} exited {proc.returncode}: {(proc.stdout + proc.stderr).decode()[-2000:]}")


def _time_nbdcopy(measure: Measure, key: str, server: BackgroundServer, dense: DenseImage, merged: Path,
                  *extra: str) -> None:
    server.check_alive()
    warm(dense.backing, dense.cow, merged)
    _nbdcopy(server.uri, *extra)  # once untimed: the server's first reads (imports, mmap faults) out of the rounds
    measure(key, lambda: _nbdcopy(server.uri, *extra))
    server.check_alive()


# -- sequential read: nbdcopy URI null: ------------------------------------------------------------


@READ
def test_serve_nbdcopy_file(measure: Measure, file_server: BackgroundServer, dense: DenseImage, merged: Path) -> None:
    _time_nbdcopy(measure, "serve.nbdcopy.nbdkit_file", file_server, dense, merged)


@READ
def test_serve_nbdcopy_ubdcow(
    measure: Measure, ubdcow_server: BackgroundServer, dense: DenseImage, merged: Path
) -> None:
    _time_nbdcopy(measure, "serve.nbdcopy.ubdcow", ubdcow_server, dense, merged)


@READ
def test_serve_nbdcopy_file_1conn(
    measure: Measure, file_server: BackgroundServer, dense: DenseImage, merged: Path
) -> None:
    _time_nbdcopy(measure, "serve.nbdcopy.nbdkit_file.connections=1", file_server, dense, merged, "--connections=1")


@READ
def test_serve_nbdcopy_ubdcow_1conn(
    measure: Measure, ubdcow_server: BackgroundServer, dense: DenseImage, merged: Path
) -> None:
    _time_nbdcopy(measure, "serve.nbdcopy.ubdcow.connections=1", ubdcow_server, dense, merged, "--connections=1")


def _throughput_note(results: Results, key: str) -> None:
    best = results.best(key)
    if best is not None:
        results.notes.append(f"{key}: {SIZE / best / 1e9:.2f} GB/s ({SIZE / best / (1 << 30):.2f} GiB/s), best round")


def test_serve_nbdcopy_ratios(results: Results, pytestconfig: pytest.Config) -> None:
    """ubdcow serve's nbdcopy throughput relative to nbdkit file's (min of N rounds each)."""
    for key in (
        "serve.nbdcopy.nbdkit_file",
        "serve.nbdcopy.ubdcow",
        "serve.nbdcopy.nbdkit_file.connections=1",
        "serve.nbdcopy.ubdcow.connections=1",
    ):
        _throughput_note(results, key)
    rows = [
        results.throughput_ratio(
            "serve nbdcopy: ubdcow serve / nbdkit file (throughput)",
            "serve.nbdcopy.ubdcow",
            "serve.nbdcopy.nbdkit_file",
            ">=",
            READ_TARGET,
        )
    ]
    if results.best("serve.nbdcopy.ubdcow.connections=1") is not None:
        rows.append(
            results.throughput_ratio(
                "serve nbdcopy 1 conn: ubdcow serve / nbdkit file (thrpt)",
                "serve.nbdcopy.ubdcow.connections=1",
                "serve.nbdcopy.nbdkit_file.connections=1",
            )
        )
        rows.append(
            results.throughput_ratio(
                "serve nbdcopy ubdcow: 1 conn / 4 conns (throughput)",
                "serve.nbdcopy.ubdcow.connections=1",
                "serve.nbdcopy.ubdcow",
            )
        )
    check_ratios(pytestconfig, rows)


# -- export to raw: qemu-img convert from ubdcow serve vs ubdcow.merge --------------------------------


def _fresh(out: Path):  # type: ignore[no-untyped-def]
    def setup() -> None:
        remove(out)
        settle()

    return setup


@EXPORT
def test_serve_qemu_img_convert(
    measure: Measure, ubdcow_server: BackgroundServer, dense: DenseImage, merged: Path, serve_dir: Path
) -> None:
    ubdcow_server.check_alive()
    out = serve_dir / "converted.img"
    cmd = ["qemu-img", "convert", "-q", "-f", "raw", "-O", "raw", ubdcow_server.uri, str(out)]

    def run() -> None:
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=CONVERT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"qemu-img convert from ubdcow serve did not finish within {CONVERT_TIMEOUT:g} s "
                "(UBDCOW_BENCH_SERVE_TIMEOUT). Known cause: qemu asks block status with req_one=1 and "
                "ubdcow.nbd.Export.extents answers each such request by scanning the bitmap from the offset "
                "to the end of the disk and returns one COW/backing run at a time: quadratic in the dirty runs",
                pytrace=False,
            )
        if proc.returncode != 0:
            raise AssertionError(f"qemu-img convert exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")

    warm(dense.backing, dense.cow)
    measure("serve.export.qemu_img_convert", run, setup=_fresh(out))
    ubdcow_server.check_alive()
    assert files_equal(out, merged), "qemu-img convert's image (from ubdcow serve) differs from ubdcow.merge's"
    remove(out)


@EXPORT
def test_serve_merge(measure: Measure, dense: DenseImage, serve_dir: Path) -> None:
    out = serve_dir / "merge-out.img"
    warm(dense.backing, dense.cow)
    measure("serve.export.ubdcow_merge", lambda: merge(dense.cow, out, backing=dense.backing), setup=_fresh(out))
    remove(out)


def test_serve_export_ratios(results: Results, pytestconfig: pytest.Config) -> None:
    rows = [
        results.time_ratio(
            "serve export: qemu-img convert (ubdcow serve) / merge (time)",
            "serve.export.qemu_img_convert",
            "serve.export.ubdcow_merge",
        )
    ]
    check_ratios(pytestconfig, rows)
