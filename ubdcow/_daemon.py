"""Detaching a long-lived child (``mount``'s daemon): the one place that forks, redirects and reports back.

:func:`detach` forks once; the child starts a new session (no controlling terminal), moves to ``/``,
points descriptors 0, 1 and 2 at ``/dev/null`` (so that ``out=$(ubdcow mount ...)`` returns: the
caller's stdout and stderr are not held open) and runs ``work(ready)``. The parent waits on a pipe
for one record: ``ready(info)`` from the child (the parent returns ``info`` with the child's pid) or
the child's failure, which the parent raises as the same :class:`~ubdcow.errors.UbdCowError` line.
What the child has to say after that goes to the system log (``syslog``, as ``ubdcow-mount[pid]``).

A signal that stops the parent before the child is ready stops the child too (its undo is registered
in the same deferred section as the fork, see :mod:`ubdcow._signals`): nothing stays mounted.
"""

from __future__ import annotations

import json
import os
import signal
import syslog
import time
from collections.abc import Callable
from typing import Any

from . import _signals, errors
from .errors import UbdCowError

__all__ = ["detach", "system_log"]

#: what the parent waits for a child that was told to stop, before SIGKILL
STOP_GRACE = 10.0
EXIT_INTERNAL = 70


def system_log(ident: str) -> Callable[[str], None]:
    """A function that writes one line to the system log as ``ident[pid]`` (facility daemon, level error)."""
    syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_DAEMON)

    def log(line: str) -> None:
        syslog.syslog(syslog.LOG_ERR, line)

    return log


def _send(fd: int, record: dict[str, Any]) -> bool:
    data = (json.dumps(record) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:  # the parent is gone (killed): nothing to tell
        return False
    return True


def _error(record: dict[str, Any]) -> UbdCowError:
    """The child's error as the parent raises it: the same class when it is a plain UbdCowError subclass (the
    line only: what the child can fail with before it is ready carries no hint)."""
    cls = getattr(errors, str(record.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, UbdCowError)):
        cls = errors.MountError
    try:
        return cls(record.get("filename"), str(record.get("message")))  # type: ignore[no-any-return]
    except TypeError:
        return errors.MountError(record.get("filename"), str(record.get("message")))


def _child(write_end: int, work: Callable[[Callable[[dict[str, Any]], None]], None], ident: str) -> int:
    """The detached child: the exit code of ``work``; every failure before ``ready`` goes to the parent."""
    told = False
    log = system_log(ident)

    def ready(info: dict[str, Any]) -> None:
        nonlocal told
        if not told:
            told = True
            _send(write_end, {"ready": {**info, "pid": os.getpid()}})
            os.close(write_end)

    def fail(record: dict[str, Any], line: str) -> None:
        if told or not _send(write_end, record):
            log(line)

    try:
        work(ready)
        return 0
    except UbdCowError as exc:
        fail({"type": type(exc).__name__, "filename": exc.filename, "message": exc.message}, str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except _signals.Terminated:
        return 143
    except BaseException as exc:  # a bug: one line, to the parent or the log
        message = f"internal error: {type(exc).__name__}: {exc}"
        fail({"type": "MountError", "filename": None, "message": message}, message)
        return EXIT_INTERNAL


def detach(work: Callable[[Callable[[dict[str, Any]], None]], None], *, ident: str) -> dict[str, Any]:
    """Run ``work(ready)`` in a detached child; return what it passed to ``ready`` (plus ``pid``) once it has.

    ``work`` raises a :class:`~ubdcow.errors.UbdCowError` to fail (the parent raises it); it returns
    when its job is over (the child then exits 0). SIGTERM and Ctrl-C reach it as in the CLI.
    """
    with _signals.deferred():
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns from here
            code = EXIT_INTERNAL
            try:
                os.close(read_end)
                _signals.forked()
                os.setsid()
                os.chdir("/")
                null = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(null, fd)
                os.close(null)
                code = _child(write_end, work, ident)
            except KeyboardInterrupt:  # a signal between the fork and the work: nothing was made
                code = 130
            except _signals.Terminated:
                code = 143
            finally:
                os._exit(code)
        os.close(write_end)
        key = _signals.register(lambda: _stop(pid))
    try:
        record = _receive(read_end)
    finally:
        os.close(read_end)
    with _signals.deferred():
        if "ready" in record:
            _signals.release(key)
            return dict(record["ready"])
        _signals.release(key)
        _reap(pid)
    if "message" in record:
        raise _error(record)
    raise errors.MountError(None, "the mount process ended before the folder was ready (see the system log)")


def _receive(fd: int) -> dict[str, Any]:
    """The child's one record, or {} when it closed the pipe without one (it died)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    try:
        record = json.loads(data.decode()) if data.strip() else {}
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _stop(pid: int) -> None:
    """SIGTERM the child (it unmounts what it mounted), then SIGKILL after :data:`STOP_GRACE` seconds."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    _reap(pid)
