"""SIGTERM and SIGINT at any instant of merge, compact, convert, diff, serve and demo: a clean exit, nothing left.

Each trial runs the real command line (``python -m ubdcow``) in a subprocess and signals it once, on one of
two schedules that together cover the whole run:

* a time grid: 0 ms (inside the interpreter's start-up), and delays spread over the work as calibration
  runs measured it, timed from the moment ubdcow's handlers are in place to a little past the end;
* events: the test watches the process through /proc and signals it the moment its state first shows a
  step: its handlers installed, the temporary file made, the writer thread started, an fsync, the output
  renamed into place, nbdkit started, the socket made.

What the test saw just before the signal is the trial's phase (counted in the summary line each test
prints). Every trial must end with exit 0 (the work had finished), 143 (SIGTERM) or 130 (SIGINT), no
traceback or internal error, no temporary file, folder, socket or process of the run left, the output
absent or complete and right, and the inputs unchanged (compact: its COW file's disk reads the same).
Disks are judged by the spec's decoder of the files' bytes (tests/test_oracle_model.py, no ubdcow code);
the inputs' disk also by the real uml_moo. A signal that lands before ubdcow's code runs (the
interpreter's start-up, about 0.2 s) meets Python's own handlers: the process dies of the signal (a
shell reports 143 or 130), or for a SIGINT while the interpreter imports its site module, exits 1 with
Python's "Fatal Python error"; it has made nothing yet.

The last tests deliver SIGTERM inside one step itself (in this process, through ``main``): between
making the merge's writer thread and starting it (the race of issue 20), as the temporary file is
made, in the final rename, during the clean-up after an error, as nbdkit starts; and at both
boundaries of every deferred section of a run (ubdcow/_signals.py): just before it starts (it never
runs, so what it would have cleaned must go on the way out) and inside it (raised as it ends).

UBDCOW_SIGNAL_TRIALS sets the grid trials per command and signal; setting it also gives SIGINT every event
trigger. The default (2, and SIGINT only the middle event) runs the file in under a minute; a campaign of
hundreds of trials: UBDCOW_SIGNAL_TRIALS=30.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REQUIRE_UML, find_tool, require_tool
from support.nbdlab import require_nbd
from test_oracle_model import disk as spec_disk

import ubdcow

MiB = 1 << 20
PAGE = 4096
SIZE = 16 * MiB
GRID = int(os.environ.get("UBDCOW_SIGNAL_TRIALS", "2"))
CAMPAIGN = "UBDCOW_SIGNAL_TRIALS" in os.environ
SIGNALS = {"SIGTERM": (signal.SIGTERM, 143), "SIGINT": (signal.SIGINT, 130)}
#: x86-64 system call numbers the phases name (read from /proc/PID/syscall)
SYSCALLS = {74: "fsync", 75: "fsync", 82: "rename", 264: "rename", 316: "rename", 86: "link", 265: "link",
            285: "fallocate", 77: "ftruncate"}
TRIAL_ENV = "UBDCOW_SIGNAL_TRIAL"
#: how far into a run each phase is: an event trigger fires at its phase or at any later one it skipped to
RANK: dict[str, float] = {
    "start-up": 0, "handlers": 0.5, "checks": 1, "set-up": 1, "compacting": 1, "compacting (fsync)": 1,
    "compacting (fallocate)": 1, "compacting (ftruncate)": 1, "folders made": 2, "temporary file": 2, "touring": 2,
    "nbdkit starting": 3, "writer thread running": 3, "fsync": 4, "rename": 5, "link": 5, "renamed": 6,
    "serving": 6, "finishing": 8, "exited": 9,
}


# -- the inputs ---------------------------------------------------------------------------------


@dataclass
class Inputs:
    """A backing file, a COW file on it, and the disk both make."""

    dir: Path
    backing: Path
    cow: Path
    flat: Path  # the disk as a raw image (diff's MODIFIED)
    disk_sha: str
    backing_sha: str
    cow_sha: str

    def disk_of(self, cow: Path) -> str:
        """The sha256 of the disk of ``cow`` on the backing file, by the spec's decoder of the file's bytes
        (tests/test_oracle_model.py: no ubdcow code)."""
        return hashlib.sha256(spec_disk(cow, self.backing)).hexdigest()


def sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Inputs:
    """16 MiB of random backing data; the COW file rewrites a third of its pages: some with the backing's
    own bytes (compact gives those back), some with new data, some with zeros, and some sectors alone
    (mixed pages, which convert fills from the backing file)."""
    d = tmp_path_factory.mktemp("signals")
    rng = random.Random(0x5167)
    backing, cow, flat = d / "backing.img", d / "overlay.cow", d / "flat.img"
    disk = bytearray(rng.randbytes(SIZE))
    backing.write_bytes(disk)
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as image:
        for page in rng.sample(range(SIZE // PAGE), SIZE // PAGE // 3):
            off = page * PAGE
            kind = rng.random()
            if kind < 0.35:
                data = bytes(disk[off : off + PAGE])  # the backing's own bytes
            elif kind < 0.8:
                data = rng.randbytes(PAGE)
            elif kind < 0.9:
                data = bytes(PAGE)
            else:
                off += 512 * rng.randrange(8)
                data = rng.randbytes(512)
            image.pwrite(data, off)
            disk[off : off + len(data)] = data
    flat.write_bytes(disk)
    made = Inputs(d, backing, cow, flat, hashlib.sha256(disk).hexdigest(), sha(backing), sha(cow))
    assert made.disk_of(cow) == made.disk_sha, "the spec decoder reads another disk than the one written"
    if REQUIRE_UML or find_tool("uml_moo"):  # and so does the real uml_moo
        subprocess.run([require_tool("uml_moo"), "-b", str(backing), str(cow), str(d / "moo.img")], check=True,
                       capture_output=True, timeout=120)
        assert sha(d / "moo.img") == made.disk_sha, "uml_moo reads another disk than the one written"
        (d / "moo.img").unlink()
    return made


# -- watching a run ----------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def syscall(pid: int) -> str | None:
    """The system call the process's main thread is blocked in, by name where the phases name it."""
    if platform.machine() != "x86_64":
        return None
    try:
        first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    except (OSError, IndexError):
        return None
    return SYSCALLS.get(int(first)) if first.lstrip("-").isdigit() else None


def children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


def processes_of(token: str) -> list[tuple[int, str]]:
    """Live processes whose environment holds the trial's token (the command, nbdkit, the --run command)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if f"{TRIAL_ENV}={token}".encode() not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            stat = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()
            if stat[0] != b"Z":
                found.append((int(entry), Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()))
        except (OSError, IndexError):
            continue
    return found


@dataclass
class Command:
    """One command under test: how to run it in a trial folder, and what its phases look like."""

    name: str
    argv: Callable[[Inputs, Path], list[str]]
    #: the trial folder's names that are the command's finished output
    outputs: tuple[str, ...] = ()
    #: the phases an event trigger waits for (see :func:`phase`)
    events: tuple[str, ...] = ()
    prepare: Callable[[Inputs, Path], None] | None = None
    #: checks a finished output (the trial folder, the inputs); returns a failure or None
    check_output: Callable[[Inputs, Path], str | None] | None = None
    serves: bool = False


def phase(cmd: Command, pid: int, trial: Path, tmp: Path) -> str:
    """What the run is doing, from /proc and the folders (just before a signal)."""
    status = proc_status(pid)
    if not status or status.get("State", "").startswith("Z"):
        return "exited"
    bit = 1 << (signal.SIGTERM - 1)
    if int(status.get("SigIgn", "0"), 16) & bit:
        return "finishing"  # the work is over, its exit code set: signals are ignored from here
    if not int(status.get("SigCgt", "0"), 16) & bit:
        return "start-up"
    names = os.listdir(trial)
    call = syscall(pid)
    if cmd.serves:
        if any(tmp.glob("*/nbdkit.pid")):
            return "serving"  # nbdkit writes its pid file once it listens
        if children(pid):
            return "nbdkit starting"
        if any(tmp.iterdir()):
            return "folders made"
        return "checks"
    if cmd.name == "compact":
        return f"compacting ({call})" if call else "compacting"
    if cmd.name == "demo":
        return "touring" if any(tmp.iterdir()) else "set-up"  # its folder is in TMPDIR
    if any(name in names for name in cmd.outputs):
        return "renamed"
    if call in ("rename", "link", "fsync"):
        return call
    if any(name.endswith(".ubdcow-tmp") for name in names):
        return "writer thread running" if int(status.get("Threads", "1")) > 1 else "temporary file"
    return "set-up"


# -- the commands ----------------------------------------------------------------------------


def _same_bytes(name: str) -> Callable[[Inputs, Path], str | None]:
    def check(inp: Inputs, trial: Path) -> str | None:
        return None if sha(trial / name) == inp.disk_sha else f"{name} is not the disk"

    return check


def _cow_disk(name: str) -> Callable[[Inputs, Path], str | None]:
    def check(inp: Inputs, trial: Path) -> str | None:
        return None if inp.disk_of(trial / name) == inp.disk_sha else f"{name}'s disk is wrong"

    return check


def _fresh_cow(inp: Inputs, trial: Path) -> None:
    shutil.copyfile(inp.cow, trial / "overlay.cow")  # a sparse copy is not needed: the disk is what counts
    shutil.copystat(inp.cow, trial / "overlay.cow")


def _compacted(inp: Inputs, trial: Path) -> str | None:
    return None if inp.disk_of(trial / "overlay.cow") == inp.disk_sha else "compact changed the disk"


COMMANDS = {
    "merge": Command("merge", lambda i, t: ["merge", str(i.cow), "-o", str(t / "out.img")], ("out.img",),
                     ("handlers", "temporary file", "writer thread running", "fsync", "renamed"),
                     check_output=_same_bytes("out.img")),
    "merge --no-sparse": Command(
        "merge", lambda i, t: ["merge", "--no-sparse", "--no-reflink", str(i.cow), "-o", str(t / "out.img")],
        ("out.img",), ("temporary file", "writer thread running", "fsync", "renamed"),
        check_output=_same_bytes("out.img")),
    "compact": Command("compact", lambda i, t: ["compact", str(t / "overlay.cow"), "--backing", str(i.backing)],
                       events=("handlers", "compacting (fsync)", "compacting (fallocate)"), prepare=_fresh_cow,
                       check_output=_compacted),
    "convert": Command("convert", lambda i, t: ["convert", str(i.cow), "--layout", "v2", "-o", str(t / "new.cow")],
                       ("new.cow",), ("handlers", "temporary file", "fsync", "renamed"),
                       check_output=_cow_disk("new.cow")),
    "diff": Command("diff", lambda i, t: ["diff", str(i.backing), str(i.flat), "-o", str(t / "diff.cow")],
                    ("diff.cow",), ("handlers", "temporary file", "fsync", "renamed"),
                    check_output=_cow_disk("diff.cow")),
    "demo": Command("demo", lambda i, t: ["demo"], events=("handlers", "touring")),
    "serve --socket": Command("serve", lambda i, t: ["serve", str(i.cow), "--socket", str(t / "nbd.sock")],
                              events=("handlers", "folders made", "nbdkit starting", "serving"), serves=True),
    "serve --run": Command("serve", lambda i, t: ["serve", str(i.cow), "--run", 'nbdinfo --size "$uri" && sleep 0.3'],
                           events=("handlers", "folders made", "nbdkit starting", "serving"), serves=True),
}


# -- one trial -----------------------------------------------------------------------------------


@dataclass
class Trial:
    returncode: int
    stderr: str
    phase: str
    seconds: float  # from the start of the process to its end
    ready: float | None = None  # unsignalled runs: when its signal handlers were seen installed


def run_trial(cmd: Command, inp: Inputs, trial: Path, sig: int | None, *, delay: float | None = None,
              after_handlers: bool = False, event: str | None = None, timeout: float = 120) -> Trial:
    """Run the command once; signal it ``delay`` seconds after its start (or ``after_handlers``: after its
    signal handlers were seen installed), or when its phase first is ``event``."""
    trial.mkdir()
    tmp = trial.parent / (trial.name + "-tmp")  # the command's TMPDIR (serve's private folder)
    tmp.mkdir()
    if cmd.prepare is not None:
        cmd.prepare(inp, trial)
    token = uuid.uuid4().hex
    # one thread until merge starts its writer (numpy's OpenBLAS would start a pool of its own)
    env = dict(os.environ, TMPDIR=str(tmp), OPENBLAS_NUM_THREADS="1", **{TRIAL_ENV: token})
    env.pop("UBDCOW_DEBUG", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ubdcow", *cmd.argv(inp, trial)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen = "not signalled"
    ready = None
    try:
        if sig is None:  # watch the start-up end
            while ready is None and proc.poll() is None:
                if phase(cmd, proc.pid, trial, tmp) not in ("start-up", "exited"):
                    ready = time.monotonic() - t0
        elif delay is not None:
            start_up_ends = time.monotonic() + 60
            while after_handlers and phase(cmd, proc.pid, trial, tmp) == "start-up":
                assert time.monotonic() < start_up_ends, "no signal handlers in 60 s"
            time.sleep(delay)
            seen = phase(cmd, proc.pid, trial, tmp)
            proc.send_signal(sig)
        elif event is not None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                now = phase(cmd, proc.pid, trial, tmp)
                if now == "exited":
                    seen = f"missed {event!r} (exited)"
                    break
                if now == event or RANK.get(now, 1) > RANK[event]:
                    proc.send_signal(sig)
                    seen = now
                    break
            else:
                seen = f"missed {event!r} (no sign of it in 60 s)"
                proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            states = [(pid, proc_status(pid).get("State"), line) for pid, line in processes_of(token)]
            for pid, *_ in states:
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"{cmd.name}: still running {timeout} s after the signal (phase {seen!r}): {states}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = Trial(proc.returncode, err.decode(errors="replace"), seen, time.monotonic() - t0, ready)
    try:
        problems = judge(cmd, inp, trial, tmp, sig, result, token)
    finally:
        for pid, _ in processes_of(token):  # never leave a process behind, even when the trial fails
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    what = signal.Signals(sig).name if sig else "no signal"
    assert not problems, (f"ubdcow {' '.join(cmd.argv(inp, trial))}: {what} in phase {seen!r}: " + "; ".join(problems)
                          + f"\nstderr:\n{result.stderr[-3000:]}")
    shutil.rmtree(trial)
    shutil.rmtree(tmp)
    return result


def judge(cmd: Command, inp: Inputs, trial: Path, tmp: Path, sig: int | None, result: Trial, token: str) -> list[str]:
    problems = []
    code = {signal.SIGTERM: 143, signal.SIGINT: 130}.get(sig, 0) if sig is not None else 0
    allowed = {0, code}
    if result.phase == "start-up" and sig is not None:
        allowed.add(-sig)  # Python's own handler: died of the signal before ubdcow's code ran
        if sig == signal.SIGINT and "Fatal Python error" in result.stderr and \
                result.stderr.rstrip().endswith("KeyboardInterrupt"):
            allowed.add(1)  # KeyboardInterrupt while the interpreter imports its site module: Python's exit 1
    if result.returncode not in allowed:
        problems.append(f"exit {result.returncode}, not one of {sorted(allowed)}")
    if "internal error" in result.stderr or ("Traceback" in result.stderr and result.phase != "start-up"):
        problems.append("a traceback or internal error on stderr")
    # what the run leaves: nothing but its finished output (and compact's COW file)
    deadline = time.monotonic() + 5
    while (left := processes_of(token)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if left:
        problems.append(f"processes left running: {left}")
    expected = set(cmd.outputs) | ({"overlay.cow"} if cmd.prepare is not None else set())
    names = set(os.listdir(trial))
    if names - expected:
        problems.append(f"left in the output folder: {sorted(names - expected)}")
    if os.listdir(tmp):
        problems.append(f"left in TMPDIR: {os.listdir(tmp)}")
    present = [name for name in cmd.outputs if name in names]
    if result.returncode == 0 and cmd.outputs and not present:
        problems.append("exit 0 without the output")
    if cmd.check_output is not None and (present or cmd.prepare is not None):
        failure = cmd.check_output(inp, trial)
        if failure:
            problems.append(failure)
    for path, before in inp_fingerprints(inp).items():
        if fingerprint(path) != before:
            problems.append(f"{path.name} changed")
    return problems


_FINGERPRINTS: dict[Path, tuple[int, int, int]] = {}


def inp_fingerprints(inp: Inputs) -> dict[Path, tuple[int, int, int]]:
    """The inputs' size, mtime and ctime, as first seen (any write changes them)."""
    for path in (inp.backing, inp.cow, inp.flat):
        _FINGERPRINTS.setdefault(path, fingerprint(path))
    return {path: _FINGERPRINTS[path] for path in (inp.backing, inp.cow, inp.flat)}


# -- the sweeps -----------------------------------------------------------------------------------


RUNTIME: dict[str, tuple[float, float]] = {}  # a command's start-up (until its handlers) and its work after


def _requirements(cmd: Command) -> None:
    if cmd.serves:
        require_nbd("nbdkit", "nbdinfo")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
@pytest.mark.parametrize("signame", list(SIGNALS))
def test_a_signal_at_any_instant_leaves_a_clean_exit_and_nothing_behind(
    name: str, signame: str, inputs: Inputs, tmp_path: Path
) -> None:
    cmd = COMMANDS[name]
    _requirements(cmd)
    sig, _ = SIGNALS[signame]
    inp_fingerprints(inputs)
    counter = iter(range(1_000_000))

    def folder() -> Path:
        return tmp_path / f"t{next(counter)}"

    # calibration, once a command: the whole run without a signal, twice (the first is cold), and when its
    # handlers are in place (serve --socket runs until signalled: timed until it serves, then stopped)
    if name not in RUNTIME:
        runs = []
        for _ in range(2 if CAMPAIGN else 1):
            if cmd.serves and "--run" not in cmd.argv(inputs, tmp_path):
                ready = run_trial(cmd, inputs, folder(), sig, event="handlers").seconds
                runs.append((ready, run_trial(cmd, inputs, folder(), sig, event="serving").seconds))
            else:
                calibration = run_trial(cmd, inputs, folder(), None)
                assert calibration.returncode == 0, calibration.stderr
                runs.append((calibration.ready or 0.0, calibration.seconds))
        RUNTIME[name] = min(r for r, _ in runs), max(0.05, sum(t - r for r, t in runs) / len(runs))
    ready, work = RUNTIME[name]
    rng = random.Random(f"{name} {signame}")
    phases: collections.Counter[str] = collections.Counter()
    codes: collections.Counter[int] = collections.Counter()
    # the time grid: 0 ms (inside the interpreter's start-up); in a campaign every tenth trial somewhere in
    # the start-up; the others in equal slices of the work, timed from the moment the handlers are in place
    # to a little past the end
    slices = [i for i in range(1, GRID) if not (CAMPAIGN and i % 10 == 1)]
    for i in range(GRID):
        if i == 0 or i not in slices:
            trial = run_trial(cmd, inputs, folder(), sig, delay=0.0 if i == 0 else ready * rng.random())
        else:
            delay = 1.1 * work * (slices.index(i) + rng.random()) / len(slices)
            trial = run_trial(cmd, inputs, folder(), sig, delay=delay, after_handlers=True)
        phases[trial.phase] += 1
        codes[trial.returncode] += 1
    # the events: the moment each step first shows (SIGINT takes the same paths as SIGTERM with another
    # exception: outside a campaign only the middle event)
    events = list(cmd.events if sig == signal.SIGTERM or CAMPAIGN else cmd.events[len(cmd.events) // 2 :][:1])
    while events:
        trial = run_trial(cmd, inputs, folder(), sig, event=events.pop(0))
        phases[trial.phase] += 1
        codes[trial.returncode] += 1
        if trial.phase.startswith("missed") and not events and "handlers" not in phases:
            events.append("handlers")  # too brief to see this time: the work's first instant instead
    print(f"\n{name} {signame}: {sum(phases.values())} trials (start-up {ready:.2f} s, work {work:.2f} s); phases "
          + ", ".join(f"{k}: {v}" for k, v in sorted(phases.items())) + "; exits "
          + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())))
    # the sweep reached the work itself, not only the start-up and the end
    assert set(phases) - {"start-up", "finishing", "exited"} - {p for p in phases if p.startswith("missed")}, phases
    assert all(fingerprint(p) == f for p, f in inp_fingerprints(inputs).items())
    assert (sha(inputs.backing), sha(inputs.cow)) == (inputs.backing_sha, inputs.cow_sha), "an input changed"


# -- the exact instants: a signal delivered inside the step itself (in this process, through the CLI's main) --


def _sigterm_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # handled at the next instruction of this (the main) thread


def _main(*argv: str) -> int:
    from ubdcow.cli.app import main

    return main(list(argv))


def _temporaries(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if "ubdcow-tmp" in name)


def test_sigterm_between_making_the_writer_thread_and_starting_it(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of issue 20: a signal after the writer thread is made and before it runs. The clean-up once
    joined a thread that never started (``RuntimeError: cannot join thread before it is started``, exit 70)."""
    import threading

    started = []
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "ubdcow-merge-writer":
            _sigterm_self()
            started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    out = tmp_path / "out.img"
    assert _main("merge", "--no-reflink", str(inputs.cow), "-o", str(out)) == 143
    assert started and not started[0].is_alive(), "the writer thread was not stopped"
    assert not out.exists() and _temporaries(tmp_path) == []


def test_sigterm_as_the_temporary_file_is_made(inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkstemp = tempfile.mkstemp
    made = []

    def mkstemp(*args, **kwargs):  # type: ignore[no-untyped-def]
        fd, path = real_mkstemp(*args, **kwargs)
        made.append(path)
        _sigterm_self()
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    out = tmp_path / "new.cow"
    assert _main("convert", str(inputs.cow), "--layout", "v2", "-o", str(out)) == 143
    assert made and not out.exists() and _temporaries(tmp_path) == []


@pytest.mark.parametrize("step", ["link", "unlink"])
def test_sigterm_in_the_final_rename(inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     step: str) -> None:
    """A signal as the output is linked into place, or as the temporary name is removed after: the output is
    complete, and no temporary file is left."""
    real = getattr(os, step)
    seen = []

    def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = real(*args, **kwargs)
        if "ubdcow-tmp" in str(args[0]) and not seen:
            seen.append(args[0])
            _sigterm_self()
        return result

    monkeypatch.setattr(os, step, wrapped)
    out = tmp_path / "diff.cow"
    code = _main("diff", str(inputs.backing), str(inputs.flat), "-o", str(out))
    monkeypatch.undo()
    assert seen and code == 143
    assert _temporaries(tmp_path) == []
    assert inputs.disk_of(out) == inputs.disk_sha  # the output is there, and complete


def test_sigterm_while_the_temporary_file_is_removed_after_an_error(
    inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clean-up of a failed merge (the backing file changed) is not cut short by a signal."""
    merge_module = importlib.import_module("ubdcow.merge")  # (the package's ``merge`` is the function)

    def changed(img: object, before: os.stat_result) -> None:
        monkeypatch.setattr(os, "close", closing)
        raise ubdcow.ImageIOError(str(inputs.backing), "backing file changed during the merge", errno=5)

    real_close = os.close

    def closing(fd: int) -> None:
        _sigterm_self()  # arrives while AtomicFile.abort runs: after it, not in the middle
        real_close(fd)

    monkeypatch.setattr(merge_module, "_backing_unchanged", changed)
    out = tmp_path / "out.img"
    assert _main("merge", str(inputs.cow), "-o", str(out)) == 143
    monkeypatch.undo()
    assert not out.exists() and _temporaries(tmp_path) == []


@pytest.mark.parametrize("run", [False, True])
def test_sigterm_as_nbdkit_starts(inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: bool) -> None:
    """A signal the moment nbdkit is started: it is stopped, and the socket, the staging and private folders
    go."""
    require_nbd("nbdkit")
    serve_module = importlib.import_module("ubdcow.serve")

    real_popen = subprocess.Popen
    started: list[subprocess.Popen[bytes]] = []

    def popen(*args, **kwargs):  # type: ignore[no-untyped-def]
        proc = real_popen(*args, **kwargs)
        if "-f" in args[0]:  # the server, not the --dump-plugin check
            started.append(proc)
            _sigterm_self()
        return proc

    monkeypatch.setattr(serve_module.subprocess, "Popen", popen)
    token = uuid.uuid4().hex
    monkeypatch.setenv(TRIAL_ENV, token)  # inherited by nbdkit and the --run command
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # serve's private folder goes there
    extra = ["--run", "sleep 30"] if run else ["--socket", str(tmp_path / "nbd.sock")]
    assert _main("serve", str(inputs.cow), *extra) == 143
    assert started and started[0].poll() is not None, "nbdkit was left running"
    left = [p for p in processes_of(token) if p[0] != os.getpid()]
    assert not left, f"left running: {left}"
    assert os.listdir(tmp_path / "tmp") == [] and sorted(os.listdir(tmp_path)) == ["tmp"]


def test_a_deferred_section_holds_the_signal_to_its_end_and_only_the_first_signal_is_raised() -> None:
    from ubdcow import _signals

    previous = _signals.install()
    steps = []
    try:
        with pytest.raises(_signals.Terminated):
            with _signals.deferred():
                with _signals.deferred():
                    _sigterm_self()
                    time.sleep(0.01)
                    steps.append("inner section ran to its end")
                steps.append("outer section ran to its end")  # sections nest: still held
            steps.append("after the sections")  # not reached: raised as the outer one ended
        _sigterm_self()  # later signals: ignored (the clean-up of the first runs to its end)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        steps.append("later signals ignored")
    finally:
        _signals.restore(previous)
    assert steps == ["inner section ran to its end", "outer section ran to its end", "later signals ignored"]


# -- every boundary of every deferred section: a signal just before it starts, and one inside it ------------


def _in_process_commands(inputs: Inputs, out: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """The commands run through ``main`` here: argv, and the names in ``out`` a finished run may leave."""
    return {
        "merge": (["merge", str(inputs.cow), "-o", str(out / "out.img")], ("out.img",)),
        "convert": (["convert", str(inputs.cow), "--layout", "v2", "-o", str(out / "new.cow")], ("new.cow",)),
        "diff": (["diff", str(inputs.backing), str(inputs.flat), "-o", str(out / "diff.cow")], ("diff.cow",)),
        "demo": (["demo", "-q"], ()),
        "serve": (["serve", str(inputs.cow), "--socket", str(out / "nbd.sock"), "--run", "true"], ()),
    }


@pytest.mark.parametrize("name", ["merge", "convert", "diff", "demo", "serve"])
def test_a_signal_at_each_boundary_of_each_deferred_section(
    name: str, inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal just before each deferred section of a run starts (the section never runs: its clean-up must
    then happen on the way out), and one inside each (raised as it ends): 143, nothing left, the output
    absent or complete."""
    from ubdcow import _signals

    if name == "serve":
        require_nbd("nbdkit")
    real_enter = _signals.deferred.__enter__
    plan: dict[str, object] = {"count": 0, "at": 0, "how": ""}

    def enter(self: _signals.deferred) -> None:
        plan["count"] = int(plan["count"]) + 1  # type: ignore[call-overload]
        if plan["count"] == plan["at"] and plan["how"] == "before":
            _signals._raise(signal.SIGTERM)  # as the handler does for a signal that lands here
        real_enter(self)
        if plan["count"] == plan["at"] and plan["how"] == "inside":
            _sigterm_self()  # held until the section ends

    monkeypatch.setattr(_signals.deferred, "__enter__", enter)
    token = uuid.uuid4().hex
    monkeypatch.setenv(TRIAL_ENV, token)  # inherited by nbdkit and --run's command

    def trial(at: int, how: str) -> int:
        out, tmp = tmp_path / f"{how}-{at}", tmp_path / f"{how}-{at}-tmp"
        out.mkdir()
        tmp.mkdir()
        argv, finished = _in_process_commands(inputs, out)[name]
        plan.update(count=0, at=at, how=how)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        code = _main(*argv)
        left = [p for p in processes_of(token) if p[0] != os.getpid()]
        assert not left, f"{how} section {at}: left running: {left}"
        assert os.listdir(tmp) == [], f"{how} section {at}: left in TMPDIR: {os.listdir(tmp)}"
        names = set(os.listdir(out))
        assert names <= set(finished), f"{how} section {at}: left: {sorted(names - set(finished))}"
        for present in names:
            check = _same_bytes(present) if present.endswith(".img") else _cow_disk(present)
            assert check(inputs, out) is None, f"{how} section {at}: {present} is there but not complete"
        return code

    assert trial(0, "") == 0  # no signal: count the sections of a whole run
    sections = int(plan["count"])  # type: ignore[call-overload]
    assert sections >= 2, sections
    for at in range(1, sections + 1):
        for how in ("before", "inside"):
            assert trial(at, how) == 143, f"a signal {how} section {at} of {sections}"
    print(f"\n{name}: {sections} deferred sections, a signal at both boundaries of each: {2 * sections} runs")
