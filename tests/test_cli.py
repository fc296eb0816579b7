"""The command line's shape: entry points, --version, --help, usage errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

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
