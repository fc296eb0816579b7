"""Drive a real User-Mode Linux guest (Debian's linux.uml) for tests.

The guest boots with the host's root as its filesystem (hostfs), runs a shell
script as init, and halts. The COW file is attached as /dev/ubdb. Files the
script writes under the host's paths are visible to the test afterwards.

:func:`kernel` is the one place that picks the kernel every guest boots:
``$UBDCOW_UML_KERNEL`` when set (CI sets it from ``tools/uml-kernel``, which
provisions a newer kernel where Debian's cannot run guests, e.g. on CPUs with
AMX), else ``linux.uml`` from PATH.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from pathlib import Path

import pytest
from conftest import find_tool, require_tool

PRELUDE = """#!/bin/sh
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sys /sys 2>/dev/null
echo UBDCOW-GUEST-START
"""
EPILOGUE = """
echo UBDCOW-GUEST-END
sync
halt -f
"""
#: what a checked guest command prints when it fails
FAIL = "UBDCOW-FAIL"
#: the Debian package of each host program a guest script runs (the guest runs the host's binaries)
GUEST_TOOLS = {"dd": "coreutils", "blkdiscard": "util-linux", "sha256sum": "coreutils"}


#: the environment variable that names the kernel to boot
KERNEL_ENV = "UBDCOW_UML_KERNEL"


def kernel() -> str:
    """Path of the UML kernel the guests boot (see the module); skips without one, or fails under
    UBDCOW_REQUIRE_UML=1. A ``$UBDCOW_UML_KERNEL`` that is not an executable file fails the test."""
    chosen = os.environ.get(KERNEL_ENV)
    if chosen:
        if not (os.path.isfile(chosen) and os.access(chosen, os.X_OK)):
            pytest.fail(f"{KERNEL_ENV}={chosen} is not an executable file")
        return chosen
    return require_tool("linux.uml")


def kernel_description() -> str:
    """One line for the pytest header: which kernel the guests boot, and its version."""
    chosen = os.environ.get(KERNEL_ENV)
    path = chosen or find_tool("linux.uml")
    if path is None:
        return "uml kernel: none (linux.uml is not installed and $UBDCOW_UML_KERNEL is not set): guest tests skip"
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, timeout=30)
        lines = proc.stdout.decode(errors="replace").split()
        version = lines[0] if proc.returncode == 0 and lines else f"cannot run (exit {proc.returncode})"
    except (OSError, subprocess.TimeoutExpired) as exc:
        version = f"cannot run ({exc})"
    return f"uml kernel: {path} ({version}; {'from $' + KERNEL_ENV if chosen else 'linux.uml from PATH'})"


class Guest:
    """The result of one guest run: its console text."""

    def __init__(self, console: str, returncode: int) -> None:
        self.console = console
        self.returncode = returncode

    @property
    def finished(self) -> bool:
        return "UBDCOW-GUEST-END" in self.console


def ubd_arg(
    cow: str | os.PathLike[str], backing: str | os.PathLike[str] | None = None, *, device: str = "ubdb", flags: str = ""
) -> str:
    """``ubdb=/abs/cow[,/abs/backing]`` (give the backing only if the recorded path is wrong)."""
    spec = os.path.abspath(cow)
    if backing is not None:
        spec += "," + os.path.abspath(backing)
    return f"{device}{flags}={spec}"


def run_guest(
    script: str,
    *ubd: str,
    workdir: str | os.PathLike[str],
    timeout: float = 120,
    mem: str = "96M",
    background: bool = False,
) -> Guest | subprocess.Popen[bytes]:
    """Boot a guest that runs ``script`` (shell, after /proc and /sys are mounted) with ``ubd`` devices.

    With ``background=True`` returns the running Popen (stdout is the console).
    """
    binary = kernel()
    workdir = Path(workdir)
    fd, path = tempfile.mkstemp(prefix="guest-", suffix=".sh", dir=workdir)
    with os.fdopen(fd, "w") as f:
        f.write(PRELUDE + script + EPILOGUE)
    os.chmod(path, 0o755)
    umid_dir = workdir / "uml-home"
    umid_dir.mkdir(exist_ok=True)
    cmd = [
        binary,
        f"mem={mem}",
        "rootfstype=hostfs",
        "rootflags=/",
        "rw",
        f"init={path}",
        *ubd,
        "con=null",
        "con0=fd:0,fd:1",
        f"uml_dir={umid_dir}",
    ]
    env = dict(os.environ, TMPDIR=str(workdir))
    if background:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    proc = subprocess.run(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=timeout
    )
    return Guest(proc.stdout.decode(errors="replace"), proc.returncode)


def guest(script: str, *ubd: str, workdir: str | os.PathLike[str], timeout: float = 120) -> Guest:
    """Run a guest to completion and assert it reached the end of its script."""
    result = run_guest(script, *ubd, workdir=workdir, timeout=timeout)
    assert isinstance(result, Guest)
    assert result.finished, "guest did not finish its script; console tail:\n" + result.console[-3000:]
    return result


def checked(cmd: str) -> str:
    """A guest script line that prints a :data:`FAIL` marker the test looks for when ``cmd`` fails."""
    return f"{cmd} || echo {FAIL}: {shlex.quote(cmd)}\n"


def need_guest_tools(*names: str) -> str:
    """Guest script lines asserting the host programs the guest runs (through hostfs) are there.

    A missing program skips the test, or fails it under UBDCOW_REQUIRE_UML=1 (the conftest rule).
    """
    lines = []
    for name in names:
        require_tool(name, GUEST_TOOLS.get(name, name))
        lines.append(checked(f"command -v {name} >/dev/null"))
    return "".join(lines)


def assert_no_failures(result: Guest) -> None:
    failures = [line for line in result.console.splitlines() if line.startswith(FAIL)]
    assert not failures, "guest commands failed:\n" + "\n".join(failures) + "\nconsole tail:\n" + result.console[-3000:]


def dump_devices(cows: list[Path], workdir: Path) -> list[bytes]:
    """Boot one guest with ``cows`` as /dev/ubdb, /dev/ubdc, ... (only the COW file on the command line:
    the recorded backing path must be right) and return each whole device as the kernel read it, with
    ``dd bs=4096 iflag=direct`` (larger or buffered reads return wrong data with this kernel)."""
    assert len(cows) <= 15
    devices = [f"ubd{chr(ord('b') + i)}" for i in range(len(cows))]
    dumps = [workdir / f"guest-dump-{dev}.img" for dev in devices]
    for dump in dumps:
        dump.unlink(missing_ok=True)
    script = need_guest_tools("dd")
    script += "".join(checked(f"dd if=/dev/{dev} of={shlex.quote(str(dump.resolve()))} bs=4096 iflag=direct "
                              "status=none") for dev, dump in zip(devices, dumps, strict=True))
    result = guest(script, *(ubd_arg(cow, device=dev) for cow, dev in zip(cows, devices, strict=True)),
                   workdir=workdir)
    assert_no_failures(result)
    return [dump.read_bytes() for dump in dumps]
