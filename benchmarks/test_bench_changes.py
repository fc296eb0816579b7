"""``ubdcow changes``: what a VM changed, against the root pipeline users run today; growth; a lab; memory.

The model is the Debian bookworm minbase tree (conftest.model_tree: ~6,700 entries) made into a 2 GiB ext4
image with ``mkfs.ext4 -d``; the overlay is written by a real UML guest that mounts it, installs every
package of ``.cache/bench-debs`` with ``dpkg -i`` in a chroot (60 Debian bookworm packages: network tools,
editors, their libraries, downloaded once with ``apt-get download``; 55 of them, the biggest translation
  carriers left out) and edits files by hand (/etc, a
removed documentation folder, a chmod). Images and overlays are made once and kept in the git-ignored
``.cache/bench-changes`` (never written after: the overlays record their model's mtime).

- **one overlay**: ``ubdcow changes pc.cow --json`` (a fresh process, the model's index warm in the cache
  folder) against the root pipeline: ``ubdcow merge`` of the overlay into a raw image, loop mounts of the
  model and the merged image read-only, ``diff -rq --no-dereference`` of the two trees, unmount.
  Target: <= 0.25x. The cold figure (no index cached: one walk of the model) is reported.
- **growth**: the same guest workload on a model with 8x the entries (the minbase tree and seven more
  trees of its shape: its folders, symlinks and files, each file cut to its first 256 bytes):
  ``changes`` there, index warm, against the small model's. Target: <= 1.5x; cold reported.
- **lab**: ``ubdcow changes`` of 20 overlays of the small model in one invocation (index warm) against one.
  Target: <= 3x.
- **memory**: the peak RSS (``ru_maxrss``) of a child running ``ubdcow changes`` with no index cached on an
  overlay of a model of 1,000,000 entries (100,000 below full size): at most 200 MiB, asserted at every size.

Each report is checked once, outside the timed part, against ``diff -rq`` of the kernel's loop mounts.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import ubdcow

from .conftest import CACHE, FULL, MiB, Measure, Results, _system_tool, check_ratios, model_tree, settle, warm

GROUP = pytest.mark.benchmark(group="changes")
STORE = CACHE / "bench-changes"
DEBS = CACHE / "bench-debs"
GROWTH = 8
LAB = 20
MEMORY_ENTRIES = 1_000_000 if FULL else 100_000
RSS_LIMIT = 200 * MiB
UBDCOW = [sys.executable, "-m", "ubdcow"]

#: packages of .cache/bench-debs left out (mostly translations): the guest changes about 1,000 entries
SKIP = "nano_*|psmisc_*|procps_*|iptables_*|vim-common_*"
#: the guest's work, in the root of the mounted model (cwd): packages, then edits by hand
WORKLOAD = r"""
export PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive
mount -t proc proc proc
mkdir -p tmp/debs && for deb in {debs}/*.deb; do case ${{deb##*/}} in {skip}) ;; *) cp $deb tmp/debs/;; esac; done
chroot . sh -c 'dpkg -i --force-depends /tmp/debs/*.deb' > tmp/dpkg.log 2>&1 || echo dpkg said $?
rm -rf tmp/debs
echo '10.0.0.1 router' >> etc/hosts
echo lab-pc1 > etc/hostname
for i in $(seq 1 60); do echo "net.ipv4.conf.eth$i.forwarding = 1" > etc/sysctl.d/$i-lab.conf; done
mkdir -p root/lab && for i in $(seq 1 100); do echo "note $i" > root/lab/note$i.txt; done
rm -rf usr/share/doc/perl-base usr/share/doc/gzip usr/share/locale/de
chmod 0600 etc/shadow; chmod 0700 root
mv etc/motd etc/motd.orig
umount proc
"""


@dataclass(frozen=True)
class Lab:
    model: Path
    cow: Path
    entries: int


def _run(*cmd: str | Path, timeout: float = 1800, **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
    return proc  # type: ignore[no-any-return]


def _guest(cow: Path, body: str, folder: Path) -> None:
    """Boot a UML guest that mounts /dev/ubdb (``cow``) on a host folder and runs ``body`` there."""
    kernel = shutil.which("linux.uml") or "/usr/bin/linux.uml"
    if not os.access(kernel, os.X_OK):
        pytest.skip("linux.uml is not installed (user-mode-linux)")
    mnt = folder / "mnt"
    mnt.mkdir(exist_ok=True)
    script = folder / "guest.sh"
    script.write_text(f"#!/bin/sh\nmount -t proc proc /proc\nmount -t ext4 /dev/ubdb {mnt}\ncd {mnt}\n{body}\n"
                      f"cd /\nsync\numount {mnt} && echo GUEST-DONE\nhalt -f\n")  # fmt: skip
    script.chmod(0o755)
    (folder / "uml").mkdir(exist_ok=True)
    cmd = [kernel, "mem=384M", "rootfstype=hostfs", "rootflags=/", "rw", f"init={script}", f"ubdb={cow}",
           "con=null", "con0=fd:0,fd:1", f"uml_dir={folder / 'uml'}"]  # fmt: skip
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=1800,
                          env=dict(os.environ, TMPDIR=str(folder)), start_new_session=True)  # fmt: skip
    console = proc.stdout.decode(errors="replace")
    assert "GUEST-DONE" in console, console[-3000:]


def _count(tree: Path) -> int:
    return sum(len(d) + len(f) for _, d, f in os.walk(tree))


def _grown_tree(tree: Path, folder: Path) -> Path:
    """The model tree, and GROWTH - 1 more trees of its shape under /srv/mirrorN (files cut to 256 bytes)."""
    out = folder / "grown"
    _run("cp", "-a", tree, out)
    for n in range(1, GROWTH):
        top = out / "srv" / f"mirror{n}"
        for root, dirs, files in os.walk(tree):
            where = top / os.path.relpath(root, tree)
            where.mkdir(parents=True, exist_ok=True)
            for name in dirs:
                src = os.path.join(root, name)
                if os.path.islink(src):
                    os.symlink(os.readlink(src), where / name)
            for name in files:
                src = os.path.join(root, name)
                if os.path.islink(src):
                    os.symlink(os.readlink(src), where / name)
                elif os.path.isfile(src):
                    with open(src, "rb") as f:
                        (where / name).write_bytes(f.read(256))
                else:
                    (where / name).write_bytes(b"")  # a device or fifo of the tree: an empty file here
    return out


def _lab(name: str, tree: Path, size: str) -> Lab:
    """A model image of ``tree`` and the guest's overlay on it, made once and kept in .cache/bench-changes."""
    model, cow = STORE / f"{name}.img", STORE / f"{name}.cow"
    done = STORE / f"{name}.done"
    if not done.exists():
        mkfs = _system_tool("mkfs.ext4")
        if mkfs is None:
            pytest.skip("mkfs.ext4 is not installed (e2fsprogs)")
        if os.geteuid() != 0:
            pytest.skip("making the benchmark overlay needs root (a chroot in the guest keeps file owners)")
        if not list(DEBS.glob("*.deb")):
            pytest.skip(f"no packages in {DEBS} (apt-get download them there)")
        STORE.mkdir(parents=True, exist_ok=True)
        for path in (model, cow):
            path.unlink(missing_ok=True)
        _run(mkfs, "-q", "-F", "-d", tree, model, size)
        ubdcow.create(cow, model)
        with tempfile.TemporaryDirectory(dir=STORE) as folder:
            _guest(cow, WORKLOAD.format(debs=DEBS.resolve(), skip=SKIP), Path(folder))
        done.write_text(str(_count(tree)))
    warm(model, cow)
    return Lab(model, cow, int(done.read_text()))


@pytest.fixture(scope="module")
def small() -> Lab:
    tree, kind = model_tree()
    if kind != "debootstrap":
        pytest.skip("the changes benchmark needs the Debian minbase tree (debootstrap) for dpkg -i")
    return _lab("minbase", tree, "2G")


@pytest.fixture(scope="module")
def big(small: Lab) -> Lab:
    tree, _ = model_tree()
    if not (STORE / "grown.done").exists():
        with tempfile.TemporaryDirectory(dir=STORE) as folder:
            return _lab("grown", _grown_tree(tree, Path(folder)), "4G")
    return _lab("grown", tree, "4G")


@pytest.fixture
def xdg(bench_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache folder of the test's own: ``ubdcow changes`` keeps the model index there."""
    folder = bench_dir / "xdg"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


def changes(*cows: Path) -> dict[str, object]:
    proc = subprocess.run([*UBDCOW, "changes", *map(str, cows), "--json"], capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def cold(xdg: Path) -> None:
    shutil.rmtree(xdg / "ubdcow", ignore_errors=True)


# -- the root pipeline -----------------------------------------------------------------------------------


class Pipeline:
    """``ubdcow merge`` + two read-only loop mounts + ``diff -rq --no-dereference`` (+ unmounts)."""

    def __init__(self, lab: Lab, folder: Path) -> None:
        if os.geteuid() != 0:
            pytest.skip("the root pipeline needs root (loop mounts)")
        self.lab, self.merged = lab, folder / "merged.img"
        self.old, self.new = folder / "old", folder / "new"
        self.old.mkdir(exist_ok=True)
        self.new.mkdir(exist_ok=True)

    def setup(self) -> None:
        self.merged.unlink(missing_ok=True)
        settle()

    def __call__(self) -> str:
        _run(*UBDCOW, "merge", "-q", self.lab.cow, "-o", self.merged)
        _run("mount", "-o", "loop,ro", self.lab.model, self.old)
        try:
            _run("mount", "-o", "loop,ro,noload", self.merged, self.new)
            try:
                proc = subprocess.run(["diff", "-rq", "--no-dereference", str(self.old), str(self.new)],
                                      capture_output=True, text=True, timeout=1800)  # fmt: skip
                assert proc.returncode == 1, proc.stderr[-2000:]
                return proc.stdout
            finally:
                if subprocess.run(["umount", str(self.new)]).returncode:
                    subprocess.run(["umount", "-l", str(self.new)])
        finally:
            if subprocess.run(["umount", str(self.old)]).returncode:
                subprocess.run(["umount", "-l", str(self.old)])


def _agrees(report: dict[str, object], diff: str, old: Path, new: Path) -> None:
    """Every path ``diff -rq`` names is in the report (as added, deleted or modified), and every added, deleted
    or content-modified path of the report is under one diff names."""
    entries = report["disks"][0]["entries"]  # type: ignore[index]
    by_path = {e["path"]: e for e in entries}
    named: dict[str, set[str]] = {"added": set(), "deleted": set(), "modified": set()}
    for line in diff.splitlines():
        if line.startswith("Only in "):
            where, name = line[len("Only in ") :].split(": ", 1)
            side = "deleted" if where == str(old) or where.startswith(f"{old}/") else "added"
            root = old if side == "deleted" else new
            named[side].add("/" + os.path.relpath(os.path.join(where, name), root))
            continue
        m = re.fullmatch(r"(?:Files|Symbolic links) (.+) and (.+) differ|File (.+) is an? .+ while file (.+) is an? .+",
                         line)  # fmt: skip
        assert m is not None, line
        named["modified"].add("/" + os.path.relpath(m.group(1) or m.group(3), old))
    for change, paths in named.items():
        for path in paths:
            assert path in by_path, f"diff -rq: {change} {path}, not in the report"
            assert by_path[path]["change"] == change, (path, by_path[path], change)
    tops = named["added"] | named["deleted"]
    for e in entries:
        if e["change"] in ("added", "deleted"):
            assert any(e["path"] == t or e["path"].startswith(t + "/") for t in tops), e
        elif e["change"] == "modified" and e["type"] != "dir":
            assert e["path"] in named["modified"], e


# -- one overlay, growth --------------------------------------------------------------------------------


@GROUP
def test_root_pipeline(measure: Measure, small: Lab, bench_dir: Path, results: Results, xdg: Path) -> None:
    pipeline = Pipeline(small, bench_dir)
    diff = pipeline()
    report = changes(small.cow)
    _agrees(report, diff, pipeline.old, pipeline.new)
    count = len(report["disks"][0]["entries"])  # type: ignore[index]
    assert count >= 900, f"the guest changed only {count} entries"
    results.notes.append(f"changes: small model {small.entries} entries, overlay {count} changed entries, "
                         f"{os.stat(small.cow).st_blocks * 512 / MiB:.0f} MiB of COW data")  # fmt: skip
    measure("changes: root pipeline (merge + mounts + diff -rq)", pipeline, setup=pipeline.setup)


@GROUP
def test_one_overlay_warm(measure: Measure, small: Lab, xdg: Path) -> None:
    changes(small.cow)
    measure("changes: one overlay, index warm", lambda: changes(small.cow))


@GROUP
def test_one_overlay_cold(measure: Measure, small: Lab, xdg: Path) -> None:
    measure("changes: one overlay, index cold", lambda: changes(small.cow), setup=lambda: cold(xdg))


@GROUP
def test_grown_warm(measure: Measure, big: Lab, small: Lab, xdg: Path, results: Results) -> None:
    report = changes(big.cow)
    count = len(report["disks"][0]["entries"])  # type: ignore[index]
    assert big.entries >= GROWTH * small.entries, (big.entries, small.entries)
    results.notes.append(f"changes: grown model {big.entries} entries ({big.entries / small.entries:.1f}x), "
                         f"overlay {count} changed entries")  # fmt: skip
    measure("changes: grown model, index warm", lambda: changes(big.cow))


@GROUP
def test_grown_cold(measure: Measure, big: Lab, xdg: Path) -> None:
    measure("changes: grown model, index cold", lambda: changes(big.cow), setup=lambda: cold(xdg))


# -- a lab ----------------------------------------------------------------------------------------------


@GROUP
def test_lab(measure: Measure, small: Lab, bench_dir: Path, xdg: Path) -> None:
    folder = bench_dir / "lab"
    folder.mkdir(exist_ok=True)
    cows = []
    for i in range(LAB):
        cow = folder / f"pc{i + 1:02d}.cow"
        _run("cp", "--sparse=always", small.cow, cow)
        cows.append(cow)
    warm(*cows)
    one = changes(small.cow)["disks"][0]["entries"]  # type: ignore[index]
    report = changes(*cows)
    assert len(report["disks"]) == LAB and all(d["entries"] == one for d in report["disks"])  # type: ignore[index]
    measure(f"changes: a lab of {LAB} overlays, index warm", lambda: changes(*cows))


def test_ratios(results: Results, pytestconfig: pytest.Config) -> None:
    rows = [
        results.time_ratio("changes one overlay (warm) / root pipeline", "changes: one overlay, index warm",
                           "changes: root pipeline (merge + mounts + diff -rq)", "<=", 0.25),
        results.time_ratio("changes one overlay (cold) / root pipeline", "changes: one overlay, index cold",
                           "changes: root pipeline (merge + mounts + diff -rq)"),
        results.time_ratio(f"changes growth: {GROWTH}x entries / small model (warm)",
                           "changes: grown model, index warm", "changes: one overlay, index warm", "<=", 1.5),
        results.time_ratio(f"changes growth: {GROWTH}x entries / small model (cold)",
                           "changes: grown model, index cold", "changes: one overlay, index cold"),
        results.time_ratio(f"changes lab: {LAB} overlays / one overlay (warm)",
                           f"changes: a lab of {LAB} overlays, index warm", "changes: one overlay, index warm",
                           "<=", 3.0),
    ]  # fmt: skip
    check_ratios(pytestconfig, rows)


# -- memory ---------------------------------------------------------------------------------------------


def test_memory(bench_dir: Path, results: Results, pytestconfig: pytest.Config) -> None:
    """Peak RSS of ``ubdcow changes`` (index built: nothing cached) on an overlay of a MEMORY_ENTRIES model."""
    mkfs = _system_tool("mkfs.ext4")
    if mkfs is None:
        pytest.skip("mkfs.ext4 is not installed (e2fsprogs)")
    tree = bench_dir / "many"
    per = 1000
    for d in range(MEMORY_ENTRIES // per):
        folder = tree / f"d{d:04d}"
        folder.mkdir(parents=True)
        for i in range(per - 1):
            os.close(os.open(folder / f"f{i:04d}", os.O_CREAT | os.O_WRONLY, 0o644))
    image = bench_dir / "many.img"
    _run(mkfs, "-q", "-F", "-N", str(MEMORY_ENTRIES * 11 // 10), "-d", tree, image, "4G", timeout=3600)
    shutil.rmtree(tree)
    cow = bench_dir / "many.cow"
    ubdcow.create(cow, image)
    with tempfile.TemporaryDirectory(dir=bench_dir) as folder:
        _guest(cow, "echo changed > d0007/f0042; rm d0500/f0001; mkdir d0999/new; chmod 600 d0001/f0001",
               Path(folder))  # fmt: skip
    code = (
        "import json, resource, subprocess, sys\n"
        "from ubdcow.cli.app import main\n"
        f"code = main(['changes', {str(cow)!r}, '--json', '--no-cache'])\n"
        "print(json.dumps({'code': code, 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), "
        "file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600)
    last = json.loads(proc.stderr.strip().splitlines()[-1])
    assert last["code"] == 1, proc.stderr[-2000:]
    paths = [e["path"] for e in json.loads(proc.stdout)["disks"][0]["entries"]]
    assert paths == ["/d0001/f0001", "/d0007/f0042", "/d0500/f0001", "/d0999/new"], paths
    rss = last["rss"] * 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # (this process: for the note only)
    results.notes.append(f"changes memory: {MEMORY_ENTRIES} entries, peak RSS {rss / MiB:.1f} MiB "
                         f"(the benchmark process: {base / 1024:.0f} MiB)")  # fmt: skip
    rows = [results.value_ratio(f"changes on a {MEMORY_ENTRIES}-entry model: peak RSS / 200 MiB", rss, RSS_LIMIT,
                                f"{rss / MiB:.1f} MiB", "<=", 1.0)]  # fmt: skip
    check_ratios(pytestconfig, rows)
