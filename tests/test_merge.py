"""merge: exact output against real files and the real uml_moo; refusals; atomicity; sparseness."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MANIFEST, assert_one_line_error, require, require_tool, run_cli
from test_oracle_model import Model, cow_bytes
from test_oracle_model import disk as spec_disk

import ubdcow
from ubdcow._io import punch_hole
from ubdcow.merge import default_output, merge

NON_ODD = [c["name"] for c in MANIFEST if c["size"] % 512 == 0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "ubdcow-tmp" in p.name)


def test_every_conformance_case_merges_to_the_guests_bytes(case):
    out = case.dir / "merged.img"
    proc = run_cli("merge", case.cow, "-o", out, "--backing", case.backing, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert out.stat().st_size == case.meta["size"]
    assert sha(out) == case.meta["expected_sha256"]
    assert result["size"] == case.meta["size"]
    assert result["cow_bytes"] + result["backing_bytes"] == case.meta["size"]
    assert leftovers(case.dir) == []


@pytest.mark.uml
@pytest.mark.parametrize("name", NON_ODD)
def test_identical_to_uml_moo(unpack, name):
    moo = require_tool("uml_moo")
    c = unpack(name)
    subprocess.run([moo, "-b", str(c.backing), str(c.cow), str(c.dir / "moo.img")], check=True, capture_output=True)
    merge(c.cow, c.dir / "ours.img", backing=c.backing)
    assert (c.dir / "ours.img").read_bytes() == (c.dir / "moo.img").read_bytes()


@pytest.mark.uml
@pytest.mark.parametrize("name", ["v3-odd-size", "v1-rounding-tail"])
def test_odd_size_keeps_the_tail_that_uml_moo_drops(unpack, name):
    moo = require_tool("uml_moo")
    c = unpack(name)
    subprocess.run([moo, "-b", str(c.backing), str(c.cow), str(c.dir / "moo.img")], check=True, capture_output=True)
    merge(c.cow, c.dir / "ours.img", backing=c.backing)
    ours, theirs = (c.dir / "ours.img").read_bytes(), (c.dir / "moo.img").read_bytes()
    assert len(ours) == 1_000_000 and len(theirs) == 999_936
    assert ours[:999_936] == theirs[:999_936]
    assert ours == c.expected_bytes
    assert hashlib.sha256(theirs).hexdigest() == c.meta["uml_moo_sha256"]


def test_default_output_name_and_api_result(unpack):
    c = unpack("v3-mkcow-written")
    assert default_output("a/overlay.cow") == "a/overlay.img"
    assert default_output("disk") == "disk.img"
    proc = run_cli("merge", "overlay.cow", "--backing", "backing.img", cwd=c.dir)
    assert proc.returncode == 0, proc.stderr
    assert (c.dir / "overlay.img").read_bytes() == c.expected_bytes
    assert b"merged overlay.cow -> overlay.img" in proc.stdout
    started = time.monotonic()
    r = merge(c.cow, c.dir / "api.img", backing=c.backing)
    elapsed = time.monotonic() - started
    assert (r.size, r.cow_bytes, r.backing_bytes) == (c.meta["size"], 148 * 512, c.meta["size"] - 148 * 512)
    assert 0 < r.seconds <= elapsed, (r.seconds, elapsed)  # the merge's own duration, inside the call's
    assert r.output == str(c.dir / "api.img") and (c.dir / "api.img").read_bytes() == c.expected_bytes


def test_stdout_stream(unpack):
    c = unpack("v3-kernel-written")
    proc = run_cli("merge", c.cow, "--backing", c.backing, "-o", "-")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == c.expected_bytes
    assert b"merged" in proc.stderr


# -- refusals: one clear line, nothing written ------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (sha(p), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def test_existing_output_needs_overwrite(unpack):
    c = unpack("v3-kernel-written")
    out = c.dir / "out.img"
    out.write_bytes(b"keep me")
    before = snapshot(c.dir)
    proc = run_cli("merge", c.cow, "-o", out, "--backing", c.backing)
    assert_one_line_error(proc, str(out), "already exists")
    assert snapshot(c.dir) == before
    assert run_cli("merge", c.cow, "-o", out, "--backing", c.backing, "--overwrite").returncode == 0
    assert out.read_bytes() == c.expected_bytes


@pytest.mark.parametrize(
    "alias", ["backing-itself", "symlink-to-backing", "hardlink-to-backing", "cow-itself", "symlink-to-cow"]
)
def test_output_that_is_an_input_is_refused_even_with_overwrite(unpack, alias):
    c = unpack("v3-kernel-written")
    target = {"backing-itself": c.backing, "cow-itself": c.cow}.get(alias)
    if target is None:
        target = c.dir / "alias.img"
        source = c.backing if "backing" in alias else c.cow
        if alias.startswith("symlink"):
            target.symlink_to(source.name)
        else:
            os.link(source, target)
    before = snapshot(c.dir)
    proc = run_cli("merge", c.cow, "-o", target, "--backing", c.backing, "--overwrite")
    assert_one_line_error(proc, "output is the")
    assert snapshot(c.dir) == before


def test_mismatched_backing_needs_force(unpack):
    c = unpack("v3-mkcow-written")
    os.utime(c.backing, (1_577_836_800, 1_577_836_800))
    before = snapshot(c.dir)
    proc = run_cli("merge", c.cow, "--backing", c.backing)
    line = assert_one_line_error(proc, "mtime mismatch (1700000000 vs 1577836800) of COW header vs backing file")
    assert str(c.cow) in line
    assert b"hint:" in proc.stderr and b"rebase --unsafe" in proc.stderr
    assert snapshot(c.dir) == before
    assert run_cli("merge", c.cow, "--backing", c.backing, "--force").returncode == 0
    assert (c.dir / "overlay.img").read_bytes() == c.expected_bytes


def test_missing_backing_names_recorded_path(unpack):
    c = unpack("v3-mkcow-written")
    proc = run_cli("merge", c.cow)
    assert_one_line_error(proc, "/srv/ubdcow-fixtures/v3-mkcow-written/backing.img", "not found")
    assert not (c.dir / "overlay.img").exists()


def hold_lock(cow: Path, backing: Path) -> subprocess.Popen[bytes]:
    code = (
        "import sys, time, ubdcow\n"
        f"img = ubdcow.open({str(cow)!r}, 'r+', backing={str(backing)!r})\n"
        "print('LOCKED', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"LOCKED"
    return proc


def test_locked_cow_is_refused_naming_the_pid(unpack):
    c = unpack("v3-kernel-written")
    holder = hold_lock(c.cow, c.backing)
    try:
        before = snapshot(c.dir)
        proc = run_cli("merge", c.cow, "--backing", c.backing)
        assert_one_line_error(proc, str(c.cow), f"process {holder.pid}")
        assert snapshot(c.dir) == before
    finally:
        holder.kill()
        holder.wait()


def test_read_only_immutable_backing_is_untouched(unpack):
    c = unpack("v3-mkcow-written")
    data, mtime = c.backing.read_bytes(), c.backing.stat().st_mtime_ns
    os.chmod(c.backing, 0o444)
    chattr = subprocess.run([require_tool("chattr", "e2fsprogs"), "+i", str(c.backing)], capture_output=True)
    require(chattr.returncode == 0, f"chattr +i does not work here (needs root): {chattr.stderr.decode().strip()}")
    try:
        with pytest.raises(PermissionError):
            open(c.backing, "r+b")  # even root cannot write it now
        assert run_cli("merge", c.cow, "--backing", c.backing).returncode == 0
        assert (c.dir / "overlay.img").read_bytes() == c.expected_bytes
    finally:
        subprocess.run(["chattr", "-i", str(c.backing)], check=True)
    assert c.backing.read_bytes() == data and c.backing.stat().st_mtime_ns == mtime


# -- sparseness ----------------------------------------------------------------------
def build_sparse(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """A 64 MiB backing: data in the first 4 MiB (with a 1 MiB run of real zeros), the rest a hole.

    The expected disk is the model's (tests/test_oracle_model.py): the backing bytes with the writes
    replayed, and the spec's reading of the COW file must agree with it; ubdcow's reader plays no part.
    """
    backing = tmp_path / "b.img"
    head = os.urandom(1 << 20) + bytes(1 << 20) + os.urandom(2 << 20)
    with open(backing, "wb") as f:
        f.write(head)
        f.truncate(64 << 20)
    model = Model(head + bytes((64 << 20) - len(head)))
    cow = tmp_path / "o.cow"
    ubdcow.create(cow, backing)
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"\xab" * 8192, 40 << 20)  # data in the backing's hole
        model.write(40 << 20, b"\xab" * 8192)
        img.pwrite(bytes(1 << 20), 3 << 20)  # zeros over backing data
        model.zero(3 << 20, 1 << 20)
        img.write_zeroes(10 << 20, 1 << 20)  # set bits over a punched hole
        model.zero(10 << 20, 1 << 20)
    expected = bytes(model)
    assert spec_disk(cow, backing) == expected, "the COW file does not hold the writes (read by the spec)"
    return cow, backing, expected


def test_sparse_output_keeps_holes_and_makes_zero_ranges_holes(tmp_path):
    cow, _, expected = build_sparse(tmp_path)
    r = merge(cow, tmp_path / "out.img")
    out = tmp_path / "out.img"
    assert out.read_bytes() == expected
    assert (r.size, r.cow_bytes, r.backing_bytes) == (64 << 20, cow_bytes(cow), (64 << 20) - cow_bytes(cow))
    allocated = out.stat().st_blocks * 512
    # 1 MiB + 1 MiB of backing data and 8 KiB of COW data; the zero MiBs are holes
    assert allocated <= (2 << 20) + 8192 + 64 * 1024
    assert r.hole_bytes >= (64 << 20) - (2 << 20) - 8192 - 4096
    dense = merge(cow, tmp_path / "dense.img", sparse=False)
    assert (tmp_path / "dense.img").read_bytes() == expected
    assert (tmp_path / "dense.img").stat().st_blocks * 512 >= 64 << 20
    assert dense.hole_bytes == 0


def test_set_bit_over_a_hole_in_the_data_area_reads_zeros_not_backing(unpack):
    c = unpack("v3-discard")
    h = ubdcow.read_header(c.cow)
    raw = c.cow.read_bytes()
    # gzip lost the holes the guest's discards punched: punch again where set sectors hold zeros
    discarded = [
        s
        for first, count in c.meta["effective_extents"]
        for s in range(first, first + count)
        if not raw[h.data_offset + 512 * s : h.data_offset + 512 * s + 512].strip(b"\0")
    ]
    assert len(discarded) >= 64
    fd = os.open(c.cow, os.O_RDWR)
    try:
        runs: list[list[int]] = []
        for s in discarded:
            if runs and runs[-1][1] == s:
                runs[-1][1] = s + 1
            else:
                runs.append([s, s + 1])
        for a, b in runs:
            assert punch_hole(fd, h.data_offset + 512 * a, 512 * (b - a))
    finally:
        os.close(fd)
    merge(c.cow, c.dir / "out.img", backing=c.backing)
    assert (c.dir / "out.img").read_bytes() == c.expected_bytes
    with ubdcow.open(c.cow, backing=c.backing) as img:
        zero = [e for e in img.mapping() if e.source == "zero"]
    zero_sectors = {s for e in zero for s in range(e.start // 512, (e.start + e.length) // 512)}
    assert zero_sectors and zero_sectors <= set(discarded)
    for s in discarded:  # and the backing there is not zeros: falling through would show
        assert c.backing.read_bytes()[512 * s : 512 * s + 512].strip(b"\0")


# -- atomicity ------------------------------------------------------------------------
def big_image(tmp_path: Path, size: int = 1 << 30) -> Path:
    backing = tmp_path / "big.img"
    with open(backing, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(size >> 20):
            f.write(block)
    ubdcow.create(tmp_path / "big.cow", backing)
    return tmp_path / "big.cow"


def merge_child(cow: Path, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ubdcow", "merge", str(cow), "-o", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_temp(folder: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not leftovers(folder):
        assert proc.poll() is None, "merge finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_kill_9_never_leaves_a_file_at_the_final_path_and_the_next_run_cleans_up(tmp_path):
    cow = big_image(tmp_path)
    out = tmp_path / "out.img"
    for _ in range(3):
        proc = merge_child(cow, out)
        wait_for_temp(tmp_path, proc)
        time.sleep(0.05)
        proc.kill()
        proc.wait()
        assert not out.exists()
        stale = leftovers(tmp_path)
        assert stale and all(name.startswith(".out.img.") for name in stale)
    assert run_cli("merge", cow, "-o", out).returncode == 0
    assert leftovers(tmp_path) == []
    assert out.stat().st_size == 1 << 30


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_remove_the_temporary_file(tmp_path, sig, code):
    cow = big_image(tmp_path)
    out = tmp_path / "out.img"
    proc = merge_child(cow, out)
    wait_for_temp(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert b"Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


# -- a real guest boots the merged image ---------------------------------------------
@pytest.mark.uml
def test_a_real_guest_reads_the_merged_image_as_a_plain_disk(unpack):
    from support.uml import guest

    c = unpack("v3-odd-size")
    merged = c.dir / "merged.img"
    merge(c.cow, merged, backing=c.backing)
    dump = c.dir / "dump.img"
    guest(f"dd if=/dev/ubdb of={dump} bs=4096 iflag=direct 2>&1\n", f"ubdb={merged}", workdir=c.dir)
    # the device exposes whole sectors; the defined bytes are [0, size)
    assert dump.read_bytes()[: c.meta["size"]] == c.expected_bytes
