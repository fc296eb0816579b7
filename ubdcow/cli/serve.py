"""``serve``: the virtual disk to NBD clients, through nbdkit and ubdcow's plugin."""

from __future__ import annotations

import argparse
import json

from .base import Command, Output, UsageError, add_cow


def _arguments(p: argparse.ArgumentParser) -> None:
    add_cow(p, "the COW file to serve")
    p.add_argument("--backing", metavar="PATH", help="use this backing file instead of the recorded one (only read)")
    p.add_argument(
        "--writable",
        action="store_true",
        help="let clients write, trim and zero (default: read-only); takes the write lock",
    )
    p.add_argument(
        "--force", action="store_true", help="serve even if the backing file's size or mtime differs from the header"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        metavar="PATH",
        help="listen on this Unix socket (must not exist; removed at exit). Default: a socket in a new private "
        "folder (mode 0700), removed at exit",
    )
    where.add_argument("--port", metavar="N", type=int, help="listen on TCP port N instead of a Unix socket")
    p.add_argument(
        "--bind",
        metavar="ADDR",
        help="with --port: the address to listen on (default: 127.0.0.1; another one without TLS prints a warning); "
        "refused without --port",
    )
    p.add_argument(
        "--run",
        metavar="CMD",
        help="run the shell command CMD with $uri (and nbdkit's other variables: $unixsocket, $port, $tls, "
        "$exportname) set and exported, stop the server when it exits, and exit with its status (e.g. "
        "--run 'nbdcopy \"$uri\" disk.img')",
    )
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--tls-psk", metavar="FILE", help="require TLS with the pre-shared keys in FILE (nbdkit's format)")
    tls.add_argument(
        "--tls-certificates", metavar="DIR", help="require TLS with the X.509 certificates in DIR (nbdkit's layout)"
    )
    p.add_argument(
        "--backing-holes",
        action="store_true",
        help="report the backing file's data as unallocated holes, so that qemu-img convert -B BACKING copies only "
        "what the COW file holds (qemu-img compare and map then take those ranges for zeros)",
    )
    p.add_argument(
        "--no-lock",
        action="store_true",
        help="DANGEROUS: do not take the lock that keeps a running guest out (its writes would change the disk under "
        "the clients, and with --writable both would corrupt it)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="when ready, print one line of JSON instead (uri, cow, writable, socket, port, pid of nbdkit)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="do not print the URI")


def cmd_serve(args: argparse.Namespace, out: Output) -> int:
    """``ubdcow serve``: the exit code is nbdkit's, or with ``--run`` the command's."""
    from ..serve import ServeOptions, serve

    if args.port is None and args.bind is not None:
        raise UsageError("--bind needs --port (without --port the disk is served on a Unix socket)")
    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a TCP port (1-65535)")
    opts = ServeOptions(
        cow=args.cow,
        backing=args.backing,
        writable=args.writable,
        force=args.force,
        lock=not args.no_lock,
        socket=args.socket,
        port=args.port,
        bind=args.bind or "127.0.0.1",
        run=args.run,
        tls_psk=args.tls_psk,
        tls_certificates=args.tls_certificates,
        backing_holes=args.backing_holes,
    )
    # With --run the command owns stdout (it may stream the disk there): the "serving" line goes to stderr;
    # the --json line stays on stdout (one JSON document there, before the command's output).
    stream = out.stderr if args.run is not None and not out.json else out.stdout

    def ready(uri: str, pid: int, socket: str | None) -> None:
        if out.json:  # printed while serving: the exit code is not known yet (docs/cli.md, "JSON output")
            facts = {"disk": args.cow, "uri": uri, "writable": args.writable, "socket": socket, "port": args.port}
            print(json.dumps({**facts, "pid": pid}), file=stream, flush=True)
            out.documented = True
        elif not out.quiet:
            mode = "writable" if args.writable else "read-only"
            print(f"serving {args.cow} ({mode}) at {uri}", file=stream, flush=True)

    def warn(message: str) -> None:
        print(message, file=out.stderr, flush=True)

    rc = serve(opts, on_ready=ready, warn=warn)
    if rc < 0:  # nbdkit itself died (with --run, the command's own status is never negative)
        print(f"ubdcow: the server (nbdkit) was killed by {_signal_name(-rc)}", file=out.stderr)
        return 128 - rc  # as a shell reports it
    return rc


def _signal_name(number: int) -> str:
    import signal

    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


SERVE = Command(
    "serve",
    "serve the virtual disk over NBD (nbdkit)",
    "Serve the virtual disk of COW to NBD clients (qemu-img, nbdcopy, nbdinfo, nbdfuse, guestfish) by running nbdkit "
    "with ubdcow's Python plugin in the foreground, until Ctrl-C, SIGTERM or the end of --run CMD. Read-only unless "
    "--writable. The COW file's lock is held while serving (a write lock with --writable), so a running guest makes "
    "serve refuse, and a guest started meanwhile is refused. Needs the Debian packages nbdkit and "
    "nbdkit-plugin-python, whose Python must be this one's version. Exit: 1 on errors, 2 usage errors, with --run "
    "CMD's status; without --run, 130 when stopped with Ctrl-C, 143 with SIGTERM (0 if nbdkit itself was told "
    "to stop). See docs/serve.md.",
    _arguments,
    cmd_serve,
)
