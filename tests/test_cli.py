"""The command line's shape: entry points, --version, --help, usage errors."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import test_oracle_model as spec
from conftest import require_tool, run_cli

import ubdcow
from ubdcow.cli import build_parser

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.decode().strip() == f"ubdcow {ubdcow.__version__}"


def help_table(text: str) -> dict[str, str]:
    """The command table of ``ubdcow --help``: name -> its description (wrapped lines joined)."""
    table: dict[str, str] = {}
    section = text.split("positional arguments:", 1)[1].split("\n\n", 1)[0]
    for line in section.splitlines():
        match = re.match(r"^    (\S+)\s+(\S.*)$", line)
        if match and match[1] != "COMMAND":
            table[match[1]] = match[2]
            last = match[1]
        elif line.startswith(" " * 6) and table:
            table[last] += " " + line.strip()
    return table


def test_help_lists_every_command_with_a_description():
    proc = run_cli("--help")
    assert proc.returncode == 0
    table = help_table(proc.stdout.decode())
    assert sorted(table) == COMMANDS  # every command, once, each on its own line with a description
    registered = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0]._choices_actions}  # type: ignore[union-attr]
    for name, description in table.items():
        assert description == registered[name], name
        assert len(description.split()) >= 4, (name, description)
    assert len(set(table.values())) == len(table), "two commands share a description"


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


def test_demo_shows_each_commands_real_output(tmp_path):
    """Issue 21, item 13: every ``$ ubdcow ...`` line the demo prints is followed by that command's own output."""
    proc = run_cli("demo", "--keep", tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout.decode()
    assert "python -m" not in text and "$ python" not in text
    shown: list[tuple[list[str], str]] = []
    for block in text.split("\n$ ")[1:]:
        command, _, rest = block.partition("\n")
        output = [line for line in re.split(r"\n\n(?:== |demo: )", rest)[0].splitlines()
                  if not line.startswith(("   ok: ", "   FAILED: "))]
        shown.append((shlex.split(command), "\n".join(output).rstrip("\n") + "\n"))
    assert [words[:2] for words, _ in shown] == [["ubdcow", w] for w in ("create", "info", "map", "check", "merge")]
    for words, output in shown[1:4]:  # info, map, check: run again, as printed, the same output
        again = run_cli(*words[1:])
        assert again.returncode == 0 and again.stdout.decode() == output, (words, output)
    words, output = shown[4]  # merge: again over its own output; only the time differs
    again = run_cli(*words[1:], "--overwrite").stdout.decode()
    assert re.sub(r"in [0-9.]+ s$", "", again.rstrip()) == re.sub(r"in [0-9.]+ s$", "", output.rstrip())
    words, output = shown[0]  # create last: it replaces the overlay with an empty one
    assert run_cli(*words[1:], "--force").stdout.decode() == output


# -- consistency across commands --------------------------------------------------
def demo_files(tmp_path):
    assert run_cli("demo", "--keep", tmp_path).returncode == 0
    return tmp_path / "overlay.cow", tmp_path / "backing.img", tmp_path / "merged.img"


def json_invocations(tmp_path):
    cow, backing, merged = demo_files(tmp_path)
    spare = tmp_path / "spare.img"
    spare.write_bytes(backing.read_bytes())
    fs_cow, _ = fs_overlay(tmp_path)
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
        "mount": ["mount", tmp_path / "fs" / "ext4.img", tmp_path / "mnt"],  # needs FUSE: see json_ready
        "umount": ["umount", tmp_path / "mnt"],
        "du": ["du", tmp_path],
        "compact": ["compact", cow],
        "changes": ["changes", fs_cow],
        "demo": ["demo"],
        "ls": ["ls", fs_image(tmp_path), "/etc", "-l"],
        "cat": ["cat", tmp_path / "fs.img", "/etc/hostname", "/etc/big"],
        "get": ["get", tmp_path / "fs.img", "/etc", "-o", tmp_path / "got"],
    }


def fs_image(tmp_path: Path) -> Path:
    """``fs.img``: an ext4 made by ``mkfs.ext4 -d`` from the folder ``tree`` (the oracle of ls, cat, get; whole
    seconds, which is what mkfs keeps of a time)."""
    etc = tmp_path / "tree" / "etc"
    etc.mkdir(parents=True)
    (etc / "hostname").write_text("pc1\n")
    (etc / "big").write_bytes(os.urandom(3 << 20))
    (etc / "hostname").chmod(0o640)
    os.symlink("hostname", etc / "name")
    for path in (etc / "hostname", etc / "big", etc):
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    subprocess.run([require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-d", tmp_path / "tree", tmp_path / "fs.img",
                    "16M"], check=True, capture_output=True)  # fmt: skip
    return tmp_path / "fs.img"
def fs_overlay(tmp_path: Path) -> tuple[Path, Path]:
    """An empty overlay on a small ext4 model (for ``changes``), beside ``tmp_path`` (``du`` counts what is in it)."""
    folder = tmp_path.with_name(tmp_path.name + "-fs")
    (folder / "tree" / "etc").mkdir(parents=True, exist_ok=True)
    (folder / "tree" / "etc" / "hostname").write_text("pc1\n")
    model, cow = folder / "model.img", folder / "pc1.cow"
    if not cow.exists():
        subprocess.run([require_tool("mkfs.ext4", "e2fsprogs"), "-q", "-F", "-d", str(folder / "tree"), str(model),
                        "8M"], check=True, capture_output=True)  # fmt: skip
        ubdcow.create(cow, model)
    return cow, model


def json_ready(calls):
    """The invocations this machine can run: serve needs nbdkit (required in CI)."""
    from support.nbdlab import require_nbd

    try:
        require_nbd("nbdkit")
    except pytest.skip.Exception:
        calls = {k: v for k, v in calls.items() if k != "serve"}
    from support.fuselab import require_fuse, small_image

    try:  # mount and umount: FUSE (required in CI), an ext4 image and an empty folder
        require_fuse()
    except pytest.skip.Exception:
        return {k: v for k, v in calls.items() if k not in ("mount", "umount")}
    image, point = calls["mount"][1], calls["mount"][2]
    if not image.exists():
        small_image(image.parent, {"etc/hostname": (b"pc1\n", 0o644)})
    point.mkdir(exist_ok=True)
    return calls


def header_facts(path: Path) -> dict[str, object]:
    """What ``info --json`` must say of a COW file's header, its bits and its size on disk, from the model
    (tests/test_oracle_model.py: the spec's offsets and bits, no ubdcow code) and stat."""
    h = spec.read_header(path)
    st = path.stat()
    return {"version": h.version, "layout": h.layout, "backing_file": h.backing_file, "mtime": h.mtime,
            "size": h.size, "sectorsize": h.sectorsize, "alignment": h.alignment, "bitmap_offset": h.bitmap_offset,
            "bitmap_len": h.bitmap_len, "data_offset": h.data_offset, "sectors": h.sectors,
            "cow_sectors": len(spec.bits(path)), "cow_bytes": spec.cow_bytes(path), "mixed_pages": 0,
            "apparent_size": st.st_size, "allocated_size": st.st_blocks * 512}


def differing_pages(a: bytes, b: bytes) -> list[int]:
    return [i // 4096 for i in range(0, len(a), 4096) if a[i : i + 4096] != b[i : i + 4096]]


def test_every_command_accepts_json_and_prints_the_right_values(tmp_path):
    """Each command's ``--json`` output, value by value, against the model, stat and plain byte comparisons."""
    calls = json_invocations(tmp_path)
    assert sorted(calls) == COMMANDS
    cow, backing, merged, spare = (tmp_path / n for n in ("overlay.cow", "backing.img", "merged.img", "spare.img"))
    content = spec.disk(cow, backing)
    size = len(content)
    assert merged.read_bytes() == content  # the demo's own merge, judged by the model
    ran = set()

    def run(name: str) -> object:
        args = calls[name]
        proc = run_cli(*args[:1], "--json", *args[1:])
        assert proc.returncode == 0, (name, proc.stderr)
        ran.add(name)
        doc = json.loads(proc.stderr if name == "cat" else proc.stdout)  # serve too: its --json line stays on
        # stdout with --run; cat's goes to stderr (stdout carries the bytes)
        if name in ("info", "map", "check", "compact", "changes"):  # several COW files: {"disks": [...], "exit_code"}
            assert doc["exit_code"] == 0 and len(doc["disks"]) == 1
            doc = doc["disks"][0]
        return doc

    data = run("info")
    assert data == {**data, **header_facts(cow), "disk": str(cow), "in_use": False, "exit_code": 0}
    assert data["backing"]["path"] == str(backing) and data["backing"]["mtime_matches"] is True
    facts = ubdcow.info(cow).to_dict()
    assert facts.pop("file") == str(cow) and data == {"disk": str(cow), **facts, "exit_code": 0}

    data = run("create")
    new = tmp_path / "new.cow"
    assert data == {**data, **header_facts(new), "disk": str(new), "cow_sectors": 0, "cow_bytes": 0, "exit_code": 0}
    assert spec.disk(new, backing) == backing.read_bytes()

    data = run("map")
    set_bits, zero = set(spec.bits(cow)), set(spec.hole_sectors(cow))
    h = spec.read_header(cow)
    assert data["disk"] == str(cow) and data["exit_code"] == 0
    pos = 0
    for e in data["extents"]:
        assert e["start"] == pos and e["length"] > 0, e
        sectors = set(range(e["start"] // 512, -(-(e["start"] + e["length"]) // 512)))
        source = {"backing": sectors.isdisjoint(set_bits), "zero": sectors <= zero,
                  "cow": sectors <= set_bits - zero}
        assert source[e["source"]], e
        assert e["offset"] == (e["start"] if e["source"] == "backing" else h.data_offset + e["start"]), e
        pos += e["length"]
    assert pos == size and zero, "the demo's discard is a zero extent"

    data = run("check")
    assert data == {**data, "disk": str(cow), "status": "clean", "exit_code": 0, "findings": [], "mixed_pages": 0,
                    "stats": {"sectors": h.sectors, "written_sectors": len(set_bits), "hole_sectors": len(zero)}}

    data = run("merge")
    out = tmp_path / "m2.img"
    assert out.read_bytes() == content
    assert data == {**data, "disk": str(cow), "output": str(out), "size": size, "cow_bytes": spec.cow_bytes(cow),
                    "backing_bytes": size - spec.cow_bytes(cow),
                    "hole_bytes": sum(b - a for a, b in spec.hole_ranges(out))}

    assert run("compare") == {"disk": str(cow), "against": str(merged), "identical": True, "first_difference": None,
                              "size_a": size, "size_b": size, "exit_code": 0}

    data = run("rebase")
    assert data == {**data, "disk": str(cow), "backing_file": os.path.realpath(spare), "size": size,
                    "mtime": int(spare.stat().st_mtime), "copied_sectors": 0, "unsafe": False}
    assert spec.read_header(cow).backing_file == os.path.realpath(spare)
    assert spec.disk(cow, spare) == content

    data = run("diff")
    pages = differing_pages(backing.read_bytes(), content)
    zero_pages = [p for p in pages if not any(content[4096 * p : 4096 * p + 4096])]
    assert data == {**data, "disk": str(merged), "against": str(backing), "output": str(tmp_path / "d.cow"),
                    "size": size, "pages": len(pages),
                    "sectors": 8 * len(pages), "zero_sectors": 8 * len(zero_pages)}
    assert spec.disk(tmp_path / "d.cow", backing) == content

    data = run("convert")
    converted = tmp_path / "c.cow"
    assert data == {**data, "disk": str(cow), "output": str(converted), "layout": "v2", "source_layout": "v3",
                    "sectors": len(set_bits), "mixed_pages": 0, "filled_pages": 0}
    assert spec.read_header(converted).layout == "v2" and spec.disk(converted, spare) == content

    if "serve" in json_ready(calls):
        data = run("serve")
        assert data["disk"] == str(cow) and data["writable"] is False and data["uri"].startswith("nbd+unix")

    if "mount" in json_ready(calls):
        from support.fuselab import fuse_at, process_gone, take_down

        image, point = calls["mount"][1], calls["mount"][2]
        try:
            data = run("mount")
            pid = data["pid"]
            assert data == {"disk": str(image), "mountpoint": str(point), "pid": pid, "exit_code": 0}
            assert fuse_at(point) and (point / "etc" / "hostname").read_bytes() == b"pc1\n"
            assert os.path.realpath(f"/proc/{pid}/fd/0") == "/dev/null"  # the detached process serving it
            data = run("umount")
            assert data == {"disk": os.path.abspath(image), "mountpoint": str(point), "exit_code": 0}
            assert not fuse_at(point) and process_gone(pid, 10)
        finally:
            take_down(point)

    data = run("du")
    cows = sorted(p for p in tmp_path.iterdir() if p.is_file() and p.read_bytes()[:4] in (b"OOOM", b"MOOO"))
    files = {f["disk"]: (g, f) for g in data["groups"] for f in g["files"]}
    assert sorted(os.path.realpath(tmp_path / p) for p in files) == [str(p) for p in cows]
    for path, (group, f) in files.items():
        st = (tmp_path / path).stat()
        assert group["backing"] == f["backing_path"] == spec.read_header(tmp_path / path).backing_file
        assert (f["size"], f["apparent_size"], f["allocated_size"]) == (size, st.st_size, st.st_blocks * 512)
    for group in data["groups"]:
        assert group["overlays"] == len(group["files"]) and group["flat_size"] == size * len(group["files"])

    before = cow.stat().st_blocks * 512
    data = run("compact")
    assert data == {**data, "disk": str(cow), "dry_run": False, "allocated_before": before,
                    "allocated_after": cow.stat().st_blocks * 512, "mixed_pages": 0}
    assert data["reclaimed_bytes"] == data["allocated_before"] - data["allocated_after"]
    assert spec.disk(cow, spare) == content

    tree = tmp_path / "tree" / "etc"
    data = run("ls")
    assert data["disk"] == str(tmp_path / "fs.img") and data["errors"] == [] and data["exit_code"] == 0
    assert [e["path"] for e in data["entries"]] == ["/etc/big", "/etc/hostname", "/etc/name"]
    for e in data["entries"]:
        st = os.lstat(tree / e["path"].split("/")[-1])
        assert e == {**e, "mode": st.st_mode & 0o7777, "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size,
                     "nlink": st.st_nlink, "mtime_ns": 1_700_000_000 * 10**9} or e["type"] == "symlink", e
    assert data["entries"][2] == {**data["entries"][2], "type": "symlink", "target": "hostname", "size": 8}
    data = run("cat")
    assert data == {"disk": str(tmp_path / "fs.img"), "paths": ["/etc/hostname", "/etc/big"],
                    "bytes": 4 + (3 << 20), "errors": [], "exit_code": 0}
    data = run("get")
    got = tmp_path / "got"
    assert (got / "hostname").read_bytes() == b"pc1\n" and (got / "big").read_bytes() == (tree / "big").read_bytes()
    assert os.readlink(got / "name") == "hostname" and os.stat(got / "hostname").st_mode & 0o7777 == 0o640
    assert data == {**data, "disk": str(tmp_path / "fs.img"), "output": str(got), "paths": ["/etc"], "files": 2,
                    "dirs": 1, "symlinks": 1, "hard_links": 0, "special": 0, "bytes": 4 + (3 << 20), "errors": 0,
                    "exit_code": 0}
    data = run("changes")  # an overlay nothing was written to: no change, exit 0
    fs_cow, model = fs_overlay(tmp_path)
    assert data == {"disk": str(fs_cow), "against": str(model), "entries": [], "exit_code": 0}

    data = run("demo")
    assert data["ok"] is True and data["checks"] and all(c["ok"] for c in data["checks"])
    assert ran == set(json_ready(calls))


def test_quiet_prints_nothing_and_keeps_the_exit_code(tmp_path):
    calls = json_ready(json_invocations(tmp_path))
    try:
        for name, args in calls.items():  # (mount, then umount)
            if name in ("create", "merge", "diff", "convert"):
                args = [*args, "--overwrite"] if name != "create" else ["create", "--force", *args[1:]]
            proc = run_cli(*args[:1], "--quiet", *args[1:])
            assert proc.returncode == 0, (name, proc.stderr)
            assert proc.stdout == b"", name
    finally:
        if "mount" in calls:
            from support.fuselab import take_down

            take_down(calls["mount"][2])
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


def test_diff_help_speaks_of_pages_and_its_usage_errors_show_its_usage():
    """Issue 21, item 5: diff works in 4 KiB pages, and says so; a usage error prints diff's usage."""
    text = run_cli("diff", "--help").stdout.decode()
    assert "4 KiB pages" in text and "the sectors that differ" not in text
    proc = run_cli("diff", "--bogus", "a", "b", "-o", "c")
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert err.startswith("usage: ubdcow diff ") and "ubdcow diff: error: unrecognized arguments: --bogus" in err
