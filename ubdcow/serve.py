"""Serve the virtual disk of a COW file over NBD by running nbdkit with ubdcow's plugin (:mod:`ubdcow.nbd`).

nbdkit speaks the protocol (Unix sockets, TCP, TLS, ``--run``, multi-conn);
this module checks what can be checked before it starts — nbdkit and its
Python plugin installed, the plugin's Python the same minor version as ours,
the COW and backing files usable, the socket path or port free — so that a
failure is one line, then runs it in the foreground and cleans up after it.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import shutil
import signal
import socket as _socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ._atomic import allowed_bits, current_umask
from ._signals import deferred, register, release
from .errors import ServeError
from .image import CowImage

#: Debian packages that provide nbdkit and its Python plugin
PACKAGES = "nbdkit nbdkit-plugin-python"
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbd.py")
_READY_TIMEOUT = 60.0


@dataclass
class ServeOptions:
    """What to serve and how; the defaults are the safe ones (read-only, a private Unix socket)."""

    cow: str
    backing: str | None = None
    writable: bool = False
    force: bool = False
    lock: bool = True
    socket: str | None = None
    port: int | None = None
    bind: str = "127.0.0.1"
    run: str | None = None
    tls_psk: str | None = None
    tls_certificates: str | None = None
    backing_holes: bool = False
    nbdkit_args: list[str] = field(default_factory=list)

    @property
    def tls(self) -> bool:
        return bool(self.tls_psk or self.tls_certificates)


def find_nbdkit() -> str:
    """Path of nbdkit, after checking its Python plugin embeds this interpreter's Python version."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise ServeError(None, "nbdkit is not installed", hint=f"apt-get install {PACKAGES}")
    try:
        proc = subprocess.run([nbdkit, "python", "--dump-plugin"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServeError(None, f"cannot run {nbdkit}: {exc}", hint=f"apt-get install {PACKAGES}") from None
    facts = dict(line.split("=", 1) for line in proc.stdout.decode(errors="replace").splitlines() if "=" in line)
    if proc.returncode != 0 or "python_version" not in facts:
        raise ServeError(None, "nbdkit's Python plugin is not installed", hint="apt-get install nbdkit-plugin-python")
    theirs = ".".join(facts["python_version"].split(".")[:2])
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if theirs != ours:
        raise ServeError(
            None,
            f"nbdkit's Python plugin embeds Python {theirs}, but ubdcow runs on Python {ours}: the packages it "
            "needs (numpy) cannot be loaded across versions",
            hint=f"use a Python {theirs} interpreter for ubdcow (e.g. a virtualenv made with python{theirs})",
        )
    return nbdkit


def check_image(opts: ServeOptions) -> tuple[os.stat_result, os.stat_result]:
    """Open the image as the server will (same errors as ``info``/``merge``), then close it; the stat
    results of the COW file and of its backing file."""
    with CowImage(
        opts.cow, "r+" if opts.writable else "r", backing=opts.backing, check_backing=not opts.force, lock=opts.lock
    ) as img:
        cow_fd, backing_fd = img.fds
        return os.fstat(cow_fd), os.fstat(backing_fd)


def socket_mode(gid: int, cow: os.stat_result, backing: os.stat_result, writable: bool) -> int:
    """The mode of a Unix socket of group ``gid`` that serves the disk: its group and others may connect only
    if they can read both files (and, with ``writable``, write the COW file), less the umask.

    Connecting takes write permission on the socket and gives all the server gives, so a class gets all
    three bits or none.
    """
    read = allowed_bits([cow, backing], gid)
    write = allowed_bits([cow], gid) if writable else 0o777
    mode = 0o700
    if read & 0o040 and write & 0o020:
        mode |= 0o070
    if read & 0o004 and write & 0o002:
        mode |= 0o007
    return mode & ~current_umask()


# sun_path holds 108 bytes with its NUL
_SUN_PATH = 108


def _staging_folder(final: str) -> str:
    """A new 0700 folder beside ``final`` (the same filesystem: the socket made there is linked at ``final``)."""
    folder = os.path.dirname(final)
    try:
        staging = tempfile.mkdtemp(prefix=".ubdcow-", dir=folder)
    except OSError as exc:
        raise ServeError(final, f"cannot create the socket in {folder}: {exc.strerror}") from None
    staged = os.path.join(staging, "s")
    if len(os.fsencode(staged)) >= _SUN_PATH:
        os.rmdir(staging)
        raise ServeError(
            final,
            f"socket folder path too long: serve first makes the socket at {staged} ({len(os.fsencode(staged))} "
            f"bytes), and a Unix socket's path holds at most {_SUN_PATH - 1}",
        )
    return staging


def _publish(staged: str, final: str, cow: os.stat_result, backing: os.stat_result, writable: bool) -> None:
    """Give the socket nbdkit made in the staging folder its mode, then link it at ``final``.

    nbdkit sets its own umask (022), so its socket would be open to everyone from the moment it listens;
    in a 0700 folder nobody else can reach it until it has the right mode.
    """
    try:
        os.chmod(staged, socket_mode(os.stat(staged).st_gid, cow, backing, writable))
        os.link(staged, final)
    except FileExistsError:
        raise ServeError(final, "the socket path exists (it appeared while the server started)") from None
    except OSError as exc:
        raise ServeError(final, f"cannot create the socket: {exc.strerror}") from None


def is_loopback(address: str) -> bool:
    """True for 127.0.0.0/8, ::1 and "localhost"."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_port(bind: str, port: int) -> None:
    """Refuse a TCP port that is already taken (nbdkit would fail with less context)."""
    try:
        infos = _socket.getaddrinfo(bind, port, type=_socket.SOCK_STREAM)
    except OSError as exc:
        raise ServeError(None, f"cannot bind to {bind}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    with _socket.socket(family, kind, proto) as probe:
        probe.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ServeError(None, f"port {port} on {bind} is not free: {exc.strerror or exc}") from None


#: the shell variables nbdkit's --run sets (nbdkit-captive(1)); exported so that scripts CMD runs see them
RUN_VARIABLES = ("uri", "nbd", "unixsocket", "port", "tls", "exportname")
#: the files nbdkit's --tls-certificates folder must hold for a server
SERVER_CERTIFICATES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def check_tls(opts: ServeOptions) -> None:
    """Refuse a TLS option nbdkit would fail on, in one line: a PSK file that cannot be read or holds no
    ``USERNAME:HEXKEY`` line, a certificates folder without the server's files."""
    if opts.tls_psk is not None:
        try:
            with open(opts.tls_psk, "rb") as f:
                text = f.read(1 << 20)
        except OSError as exc:
            raise ServeError(opts.tls_psk, f"cannot read the TLS PSK file: {exc.strerror}") from None
        keys = [line.split(b":", 1) for line in text.splitlines() if b":" in line]
        if not any(user and _is_hex(key.strip()) for user, key in keys):
            raise ServeError(
                opts.tls_psk,
                "not a TLS PSK file: no USERNAME:HEXKEY line",
                hint="make one with: psktool -u alice -p keys.psk (from gnutls-bin)",
            )
    if opts.tls_certificates is not None:
        folder = opts.tls_certificates
        if not os.path.isdir(folder):
            raise ServeError(folder, "the TLS certificates folder does not exist or is not a folder")
        missing = [name for name in SERVER_CERTIFICATES if not os.access(os.path.join(folder, name), os.R_OK)]
        if missing:
            raise ServeError(
                folder,
                f"the TLS certificates folder lacks {', '.join(missing)} (it needs {', '.join(SERVER_CERTIFICATES)}, "
                "readable)",
            )


def _is_hex(key: bytes) -> bool:
    try:
        return len(key) > 0 and len(key) % 2 == 0 and bool(bytes.fromhex(key.decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        return False


def run_script(command: str, ready: str | None = None) -> str:
    """The ``--run`` script: nbdkit's variables exported; a wait (60 s at most) for the file ``ready``, which
    ``serve`` makes once it has said it is ready (so that its line comes before the command's output); then
    ``command``, on its own lines."""
    wait = ""
    if ready is not None:
        flag = shlex.quote(ready)
        wait = f"i=0; while [ ! -e {flag} ] && [ $i -lt 3000 ]; do sleep 0.02; i=$((i + 1)); done; unset i\n"
    return f"export {' '.join(RUN_VARIABLES)}\n{wait}{command}"


def uri_of(opts: ServeOptions, socket_path: str | None) -> str:
    """The NBD URI a client connects to."""
    scheme = "nbds" if opts.tls else "nbd"
    if socket_path is not None:
        return f"{scheme}+unix:///?socket={socket_path}"
    host = opts.bind
    if host in ("0.0.0.0", "::", ""):  # every address: name this host, not the wildcard
        host = _socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{opts.port}"


def nbdkit_command(
    nbdkit: str, opts: ServeOptions, socket_path: str | None, pidfile: str, ready: str | None = None
) -> list[str]:
    """The nbdkit command line (foreground, exits with its parent)."""
    cmd = [nbdkit, "-f", "--exit-with-parent", "-P", pidfile]
    if socket_path is not None:
        cmd += ["-U", socket_path]
    else:
        cmd += ["-p", str(opts.port), "-i", opts.bind]
    if not opts.writable:
        cmd.append("-r")
    if opts.tls:
        cmd.append("--tls=require")
        cmd += [f"--tls-psk={opts.tls_psk}"] if opts.tls_psk else [f"--tls-certificates={opts.tls_certificates}"]
    if opts.run is not None:
        cmd += ["--run", run_script(opts.run, ready)]
    cmd += opts.nbdkit_args
    cmd += ["python", PLUGIN, f"cow={os.path.abspath(opts.cow)}"]
    if opts.backing is not None:
        cmd.append(f"backing={os.path.abspath(opts.backing)}")
    cmd += [f"writable={int(opts.writable)}", f"force={int(opts.force)}", f"lock={int(opts.lock)}"]
    if opts.backing_holes:
        cmd.append("backing-holes=1")
    return cmd


def plugin_environment() -> dict[str, str]:
    """Our environment, with this interpreter's import path for the plugin's embedded Python."""
    env = dict(os.environ)
    paths = [p for p in sys.path if p and not _is_stdlib(p)] + [os.path.dirname(os.path.dirname(PLUGIN))]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _is_stdlib(path: str) -> bool:
    """A folder of this interpreter's own standard library: nbdkit's Python has its own."""
    if "site-packages" in path or "dist-packages" in path:
        return False
    roots = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib")}
    full = os.path.abspath(path)
    return any(full == r or full.startswith(r + os.sep) for r in roots) or full.endswith(".zip")


def serve(
    opts: ServeOptions,
    *,
    on_ready: Callable[[str, int, str | None], object] | None = None,
    warn: Callable[[str], object] | None = None,
) -> int:
    """Run nbdkit until it stops; returns its exit status (with ``run``, the command's).

    ``on_ready(uri, pid, socket)`` is called once the server accepts connections
    (``pid``: nbdkit's; ``socket``: the Unix socket's path, None with TCP);
    ``warn(message)`` gets one-line warnings (e.g. TCP without TLS).
    KeyboardInterrupt and other exceptions in this process stop the server
    (SIGTERM, so that it flushes and releases its locks) before propagating.
    """
    nbdkit = find_nbdkit()
    cow_stat, backing_stat = _check_before_start(opts, warn)
    final = os.path.abspath(opts.socket) if opts.socket is not None else None
    private = staging = None
    proc: subprocess.Popen[bytes] | None = None
    linked = False

    def clean_up() -> None:
        if proc is not None:
            _stop(proc)
        if linked and final is not None:
            _remove_socket(final)
        for folder in (staging, private):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    # each folder, socket and process is made and recorded in one deferred section; clean_up is registered
    # before any of them and sees what was made: a signal at any instant leaves nothing behind (see _signals)
    with deferred():
        undo = register(clean_up)
    try:
        with deferred():
            private = tempfile.mkdtemp(prefix="ubdcow-serve-")  # mode 0700
        socket_path = None
        if final is not None:  # made in a 0700 folder beside PATH, then linked there (see _publish)
            with deferred():
                staging = _staging_folder(final)
            socket_path = os.path.join(staging, "s")
        elif opts.port is None:
            socket_path = os.path.join(private, "nbd.sock")
        pidfile = os.path.join(private, "nbdkit.pid")
        ready = os.path.join(private, "ready")
        cmd = nbdkit_command(nbdkit, opts, socket_path, pidfile, ready)
        with deferred():
            proc = subprocess.Popen(cmd, env=plugin_environment())
        if not _wait_ready(proc, pidfile):
            return 1 if proc.returncode in (None, 0) else proc.returncode
        if final is not None and socket_path is not None:
            with deferred():
                _publish(socket_path, final, cow_stat, backing_stat, opts.writable)
                linked = True
            socket_path = final
        if on_ready is not None:
            on_ready(uri_of(opts, socket_path), proc.pid, socket_path)
        with open(ready, "w"):  # --run's command may start (see run_script)
            pass
        return proc.wait()
    finally:
        with deferred():
            release(undo)
            clean_up()


def _check_before_start(
    opts: ServeOptions, warn: Callable[[str], object] | None
) -> tuple[os.stat_result, os.stat_result]:
    """Everything nbdkit would fail on, checked first with one clear line: the options, TLS files, the socket
    or port, and the image (its stats and its backing file's, returned)."""
    if opts.socket is not None and opts.port is not None:
        raise ServeError(None, "give --socket or --port, not both")
    check_tls(opts)
    if opts.socket is not None and os.path.lexists(opts.socket):
        raise ServeError(opts.socket, "the socket path exists (remove it, or choose another)")
    if opts.port is not None:
        check_port(opts.bind, opts.port)
        if not is_loopback(opts.bind) and not opts.tls and warn is not None:
            warn(
                f"warning: serving {opts.cow} on {opts.bind}:{opts.port} without TLS: anyone who can reach it can "
                "read" + (" and write" if opts.writable else "") + " the disk"
            )
    return check_image(opts)


def _wait_ready(proc: subprocess.Popen[bytes], pidfile: str) -> bool:
    """Wait until nbdkit listens (it writes its pid file then); False if it exited first."""
    deadline = time.monotonic() + _READY_TIMEOUT
    while not os.path.exists(pidfile):
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            raise ServeError(None, f"nbdkit did not start within {_READY_TIMEOUT:.0f} s")
        time.sleep(0.02)
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to nbdkit and all it started, until it exits (it then closes the image: flush, locks released);
    SIGKILL after 30 s.

    With ``--run`` nbdkit waits for the command, so the command (and what it started) is stopped too: the
    server it talks to is going away.
    """
    deadline = time.monotonic() + 30
    while proc.poll() is None:
        sig = signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, sig)
            except OSError:
                pass  # gone already
        try:
            proc.wait(timeout=0.5)  # again after that: a process the command started meanwhile
        except subprocess.TimeoutExpired:
            pass


def _descendants(pid: int) -> list[int]:
    """The live processes below ``pid`` (children, their children, ...), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        if fields and fields[0] != b"Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _remove_socket(path: str) -> None:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except OSError:
        pass
