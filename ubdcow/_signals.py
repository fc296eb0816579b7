"""SIGTERM and SIGINT as exceptions that never leave debris, wherever they land.

The command line routes both signals through :func:`install`: SIGTERM raises
:class:`Terminated` and SIGINT KeyboardInterrupt, in the main thread, at the
instruction it was running, so that ``with`` blocks and ``finally`` clauses
remove what the command made. Three rules make that safe at any instant:

* Code that must not stop half-way runs in a :func:`deferred` section:
  making a temporary file, folder, thread or child process together with
  :func:`register`-ing its undo, and each clean-up. A signal that arrives
  there is raised when the section ends.
* A clean-up starts with :func:`release` (in its deferred section): what was
  registered after it is undone first (a writer thread stops before its
  output is closed), then its own undo is forgotten. A signal that lands
  just before a clean-up's section, so that it never starts, leaves the undo
  registered: :func:`undo_all` runs it on the way out (the CLI's exit path,
  and ``atexit`` for library users).
* Only the first signal is raised. Later ones are ignored, so the clean-up
  the first one started runs to its end.

Without :func:`install` (ubdcow used as a library) the signals keep the
program's own handlers; sections and undos work the same, in the main
thread only (signals are handled there).
"""

from __future__ import annotations

import atexit
import itertools
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

__all__ = ["Terminated", "deferred", "install", "restore", "ignore", "register", "release", "undo_all", "forked"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so that cleanup code runs."""


class _State:
    depth = 0  # deferred sections open in the main thread
    pending: int | None = None  # the signal that arrived in one
    raised = False  # a signal was raised already: ignore the others


_state = _State()
_undos: dict[int, Callable[[], object]] = {}  # registered undos, oldest first
_keys = itertools.count(1)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _raise(signum: int) -> None:
    _state.raised = True
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated


def _handler(signum: int, frame: FrameType | None) -> None:
    if _state.raised:
        return
    if _state.depth:
        if _state.pending is None:
            _state.pending = signum
        return
    _raise(signum)


def install() -> dict[int, _Handler]:
    """Route SIGTERM and SIGINT through the rules above (main thread only); returns the previous handlers."""
    _state.pending, _state.raised = None, False
    return {sig: signal.signal(sig, _handler) for sig in SIGNALS}


def restore(previous: dict[int, _Handler]) -> None:
    """Put back the handlers :func:`install` returned."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def ignore() -> None:
    """Ignore both signals from now on (the work is over: its exit code stands)."""
    _state.raised = True
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class deferred:  # (lower case: used like a function, ``with deferred():``)
    """A section that a signal does not interrupt: the signal is raised when the section ends.

    Sections nest; only those of the main thread count (signals are handled there).
    """

    def __enter__(self) -> None:
        # a signal that comes before the next line is raised before the section starts: nothing to undo
        self._counted = _main_thread()
        if self._counted:
            _state.depth += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._counted:
            return
        _state.depth -= 1
        if _state.depth == 0 and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            _raise(signum)  # (an exception on its way out becomes its __context__)


def register(undo: Callable[[], object]) -> int:
    """Record ``undo`` (idempotent) for what was just made; call it in the deferred section that made it.

    Returns the key its clean-up gives :func:`release` (0, and nothing recorded, outside the main thread).
    """
    if not _main_thread():
        return 0
    key = next(_keys)
    _undos[key] = undo
    return key


def release(key: int) -> None:
    """The start of a clean-up: undo what was registered after ``key``, latest first, then forget ``key``."""
    if not key or not _main_thread():
        return
    for later in sorted((k for k in _undos if k > key), reverse=True):
        _run(later)
    _undos.pop(key, None)


def undo_all() -> None:
    """Run every undo still registered, latest first: clean-ups a signal kept from starting."""
    if _main_thread():
        for key in sorted(_undos, reverse=True):
            _run(key)


def forked() -> None:
    """In a child just forked (from inside a deferred section): none of the parent's sections or undos are its
    own; a signal that came since the fork is raised now."""
    _undos.clear()
    _state.depth = 0
    if _state.pending is not None and not _state.raised:
        signum, _state.pending = _state.pending, None
        _raise(signum)
    _state.pending = None


def _run(key: int) -> None:
    undo = _undos.pop(key, None)
    if undo is not None:
        try:
            undo()
        except Exception:  # the way out goes on: remove what else can be removed
            pass


atexit.register(undo_all)
