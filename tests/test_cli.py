"""The command line's shape: entry points, --version, --help, usage errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import run_cli

import ubdcow
from ubdcow.cli import build_parser

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode().strip() == f"ubdcow {ubdcow.__version__}"


def test_help_lists_every_command_with_a_description():
    proc = run_cli("--help")
    assert proc.returncode == 0
    text = proc.stdout.decode()
    for name in COMMANDS:
        assert name in text


def test_every_command_has_help():
    for name in COMMANDS:
        proc = run_cli(name, "--help")
        assert proc.returncode == 0, name
        assert b"usage: ubdcow " + name.encode() in proc.stdout


def test_usage_errors_exit_2_without_traceback():
    for args in ([], ["no-such-command"], ["info"], ["create", "only-one"]):
        proc = run_cli(*args)
        assert proc.returncode == 2, args
        assert b"Traceback" not in proc.stderr


def test_console_script_runs_the_same_cli(tmp_path):
    exe = shutil.which("ubdcow", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "the console script 'ubdcow' is installed next to the interpreter"
    a = subprocess.run([exe, "--help"], capture_output=True)
    b = run_cli("--help")
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout


def test_missing_file_is_one_line(tmp_path):
    proc = run_cli("info", tmp_path / "nope.cow")
    assert proc.returncode == 1
    assert proc.stderr.decode().splitlines()[0].startswith(f"ubdcow: {tmp_path / 'nope.cow'}: ")
    assert b"Traceback" not in proc.stderr


def test_demo_runs_and_verifies():
    proc = run_cli("demo")
    assert proc.returncode == 0, proc.stderr
    assert b"all checks passed" in proc.stdout


# -- consistency across commands --------------------------------------------------
def demo_files(tmp_path):
    assert run_cli("demo", "--keep", tmp_path).returncode == 0
    return tmp_path / "overlay.cow", tmp_path / "backing.img", tmp_path / "merged.img"


def json_invocations(tmp_path):
    cow, backing, merged = demo_files(tmp_path)
    spare = tmp_path / "spare.img"
    spare.write_bytes(backing.read_bytes())
    return {
        "info": ["info", cow],
        "create": ["create", tmp_path / "new.cow", backing],
        "map": ["map", cow],
        "check": ["check", cow],
        "merge": ["merge", cow, "-o", tmp_path / "m2.img"],
        "compare": ["compare", cow, merged],
        "rebase": ["rebase", cow, "--backing", spare],
        "diff": ["diff", backing, merged, "-o", tmp_path / "d.cow"],
        "convert": ["convert", cow, "-o", tmp_path / "c.cow", "--layout", "v2"],
        "serve": ["serve", cow, "--run", "true"],  # needs nbdkit: see json_ready below
        "du": ["du", tmp_path],
        "compact": ["compact", cow],
        "demo": ["demo"],
    }


def json_ready(calls):
    """The invocations this machine can run: serve needs nbdkit (required in CI)."""
    from nbdlab import require_nbd

    try:
        require_nbd("nbdkit")
    except pytest.skip.Exception:
        calls = {k: v for k, v in calls.items() if k != "serve"}
    return calls


def test_every_command_accepts_json_and_prints_valid_json(tmp_path):
    calls = json_invocations(tmp_path)
    assert sorted(calls) == COMMANDS
    for name, args in json_ready(calls).items():
        proc = run_cli(*args[:1], "--json", *args[1:])
        assert proc.returncode == 0, (name, proc.stderr)
        # serve --run: the command owns stdout, the ready line goes to stderr
        data = json.loads(proc.stderr if name == "serve" else proc.stdout)
        assert isinstance(data, (dict, list)) and data, name
        if name == "serve":
            assert data["cow"] == str(args[1]) and data["writable"] is False and data["uri"].startswith("nbd+unix")


def test_quiet_prints_nothing_and_keeps_the_exit_code(tmp_path):
    calls = json_ready(json_invocations(tmp_path))
    for name, args in calls.items():
        if name in ("create", "merge", "diff", "convert"):
            args = [*args, "--overwrite"] if name != "create" else ["create", "--force", *args[1:]]
        proc = run_cli(*args[:1], "--quiet", *args[1:])
        assert proc.returncode == 0, (name, proc.stderr)
        assert proc.stdout == b"", name
    bad = run_cli("check", "--quiet", tmp_path / "nope.cow")
    assert bad.returncode == 1 and bad.stdout == b"" and bad.stderr.startswith(b"ubdcow: ")


def test_bytes_shows_exact_numbers(tmp_path):
    cow, _, _ = demo_files(tmp_path)
    human = run_cli("map", cow).stdout.decode()
    exact = run_cli("map", "--bytes", cow).stdout.decode()
    assert "MiB" in human and "MiB" not in exact
    # whole pages: page 0 and the last page (4 KiB each) for the two small writes, 16 KiB, 64 KiB discarded
    assert "totals: 24576 cow, 65536 zero, 4104192 backing" in exact


def run_on_tty(args):
    """Run the CLI with stderr on a pseudo-terminal; returns (exit code, what the terminal saw)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real terminal has a width
    proc = subprocess.Popen([sys.executable, "-m", "ubdcow", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=slave)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    proc.wait()
    os.close(master)
    return proc.returncode, seen.decode(errors="replace")


def test_progress_bar_only_on_a_terminal(tmp_path):
    backing = tmp_path / "b.img"
    backing.write_bytes(os.urandom(64 << 20))
    ubdcow.create(tmp_path / "o.cow", backing)
    code, terminal = run_on_tty(["merge", tmp_path / "o.cow", "-o", tmp_path / "a.img"])
    assert code == 0 and "merge" in terminal and "%" in terminal
    code, terminal = run_on_tty(["merge", "--quiet", tmp_path / "o.cow", "-o", tmp_path / "b2.img"])
    assert code == 0 and "%" not in terminal
    piped = run_cli("merge", tmp_path / "o.cow", "-o", tmp_path / "c.img")
    assert piped.returncode == 0 and b"%" not in piped.stderr
