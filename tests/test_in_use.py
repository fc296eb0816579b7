"""``info`` and ``check`` see every lock the writing commands see (issue 21, item 3).

A read-only ``serve`` holds nbdkit's read lock (an open-file-description lock); a running UML guest holds
the kernel's POSIX write lock. Both make ``compact`` and ``rebase --unsafe`` refuse, naming the holder, so
``info`` must say "in use" with the same pid, whatever the lock's kind.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import require_tool, run_cli
from support.nbdlab import Server, require_nbd
from test_engine_uml import _kill_group, _wait_for
from support.uml import run_guest, ubd_arg

import ubdcow


def _overlay(folder: Path) -> tuple[Path, Path]:
    backing, cow = folder / "backing.img", folder / "overlay.cow"
    backing.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as disk:
        disk.pwrite(b"written", 8192)
    return backing, cow


def _refused_by(cow: Path, backing: Path) -> set[int]:
    """The pids that compact and rebase --unsafe name when they refuse ``cow``."""
    pids = set()
    for args in (("compact", cow), ("rebase", "--unsafe", cow, "--backing", backing)):
        proc = run_cli(*args)
        assert proc.returncode == 1, proc
        err = proc.stderr.decode()
        assert "is locked by process" in err, err
        pids.add(int(re.search(r"locked by process (\d+)", err).group(1)))  # type: ignore[union-attr]
    return pids


def _info_and_check(cow: Path) -> tuple[dict, str, dict]:  # type: ignore[type-arg]
    proc = run_cli("info", "--json", cow)
    assert proc.returncode == 0, proc
    facts = json.loads(proc.stdout)["disks"][0]
    human = run_cli("info", cow)
    assert human.returncode == 0, human
    check = run_cli("check", "--json", cow)
    return facts, human.stdout.decode(), json.loads(check.stdout)["disks"][0]


def test_info_sees_the_read_lock_of_a_read_only_serve(tmp_path: Path) -> None:
    require_nbd("nbdkit")
    backing, cow = _overlay(tmp_path)
    with Server(cow, tmp_path) as server:
        assert server.proc is not None
        refused = _refused_by(cow, backing)
        facts, human, check = _info_and_check(cow)
        assert facts["in_use"] is True and facts["lock"] == "read"
        assert {facts["locked_by"]} == refused
        assert Path(f"/proc/{facts['locked_by']}/comm").read_text().strip() == "nbdkit"
        assert f"in use:         yes, read-locked by process {facts['locked_by']} (nbdkit)" in human
        assert [f["code"] for f in check["findings"]] == ["in-use"]
        assert str(facts["locked_by"]) in check["findings"][0]["message"] and check["exit_code"] == 0
    facts, human, check = _info_and_check(cow)
    assert (facts["in_use"], facts["lock"], facts["locked_by"]) == (False, None, None)
    assert "in use:         no" in human and check["findings"] == []


def test_info_sees_the_write_lock_of_a_running_guest(tmp_path: Path) -> None:
    require_tool("linux.uml")
    backing, cow = _overlay(tmp_path)
    proc = run_guest("exec 3</dev/ubdb\necho UBDCOW-READY\nsleep 30\n", ubd_arg(cow), workdir=tmp_path,
                     background=True)
    assert isinstance(proc, subprocess.Popen)
    try:
        _wait_for(proc, b"UBDCOW-READY", timeout=60)
        refused = _refused_by(cow, backing)
        facts, human, check = _info_and_check(cow)
        assert facts["in_use"] is True and facts["lock"] == "write"
        assert {facts["locked_by"]} == refused
        assert Path(f"/proc/{facts['locked_by']}/comm").read_text().strip() == "linux.uml"
        assert f"in use:         yes, locked by process {facts['locked_by']} (linux.uml)" in human
        assert [f["code"] for f in check["findings"]] == ["in-use"]
    finally:
        _kill_group(proc)
