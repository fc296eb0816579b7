"""The model index cache (ubdcow/indexcache.py): private, reused, never stale, never trusted when damaged.

A changed model must never be served from a stale cache: the model is changed under the cache (a
read-write loop mount that moves the very file the overlay changed, with and without its mtime restored;
a raw write with the mtime restored) and the answer must be the kernel's (the overlay merged by uml_moo,
mounted read-only, against the changed model).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from support import changeslab as C
from support import jbd2lab
import pytest
from conftest import require_root, require_tool, run_cli

import ubdcow
import ubdcow.indexcache

BLOCK = 4096


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(ubdcow.indexcache.NO_CACHE_ENV, raising=False)
    return tmp_path / "xdg" / "ubdcow"


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the walks that build an index (in this process)."""
    found: list[int] = []
    real = ubdcow.indexcache.build_index
    monkeypatch.setattr(ubdcow.indexcache, "build_index", lambda *a: found.append(1) or real(*a))
    return found


@pytest.fixture
def lab(tmp_path: Path) -> tuple[Path, Path]:
    """A model and an overlay that wrote into /etc/passwd's first block, under the filesystem (no inode change)."""
    require_root("loop mounts")
    tree = tmp_path / "tree"
    C.make_tree(tree)
    model = C.make_model(tree, tmp_path / "model.img", "ext4", "120M")
    shutil.rmtree(tree)
    cow = tmp_path / "pc1.cow"
    ubdcow.create(cow, model)
    block = int(C.run(require_tool("debugfs", "e2fsprogs"), "-R", "bmap /etc/passwd 0", model).stdout.split()[0])
    with ubdcow.open(cow, "r+") as img:
        img.pwrite(b"changed by the overlay\n", block * BLOCK)
    return model, cow


def report(cow: Path) -> list[dict[str, object]]:
    return [e.as_dict() for e in ubdcow.changes(cow).entries]


def oracle(model: Path, cow: Path, folder: Path) -> list[dict[str, object]]:
    merged = folder / "merged.img"
    jbd2lab.merge_overlay(cow, model, merged)
    try:
        return C.expected(C.kernel_tree(model), C.kernel_tree(merged))
    finally:
        merged.unlink()


def index_files(cache: Path) -> list[str]:
    return sorted(n for n in os.listdir(cache) if n.endswith(".idx")) if cache.exists() else []


def test_the_index_is_kept_privately_and_used_again(lab: tuple[Path, Path], cache: Path, builds: list[int],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    model, cow = lab
    first = report(cow)
    assert first == [{"path": "/etc/passwd", "change": "modified", "type": "file", "fields": ["content"]}]
    assert len(builds) == 1
    (name,) = index_files(cache)
    assert stat.S_IMODE(os.lstat(cache).st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(cache / name).st_mode) == 0o600
    assert not any(n.endswith(".idx") or n.startswith(".tmp") for n in os.listdir(model.parent))  # not beside it
    assert report(cow) == first and len(builds) == 1  # the second run: from the cache
    # bypassed: neither read nor written
    shutil.rmtree(cache)
    assert [e.as_dict() for e in ubdcow.changes(cow, cache=False).entries] == first
    monkeypatch.setenv(ubdcow.indexcache.NO_CACHE_ENV, "1")
    assert report(cow) == first and len(builds) == 3 and not cache.exists()
    proc = run_cli("changes", cow, "--no-cache", env={"XDG_CACHE_HOME": str(cache.parent)})
    assert proc.returncode == 1 and not cache.exists()


@pytest.mark.parametrize("how", ["mtime-changed", "mtime-restored", "raw-write-mtime-restored"])
def test_a_changed_model_is_never_served_from_a_stale_cache(lab: tuple[Path, Path], cache: Path, builds: list[int],
                                                            tmp_path: Path, how: str) -> None:  # fmt: skip
    model, cow = lab
    before = report(cow)
    assert before == oracle(model, cow, tmp_path) and len(builds) == 1
    (old_index,) = index_files(cache)
    saved = os.stat(model)
    if how == "raw-write-mtime-restored":  # the data of another file: the superblock does not change, only ctime
        block = int(C.run("debugfs", "-R", "bmap /var/append 0", model).stdout.split()[0])
        with open(model, "r+b") as f:
            f.seek(block * BLOCK)
            f.write(b"the model changed too")
    else:  # the kernel moves the file the overlay changed: the index's names are now wrong
        point = tmp_path / "mnt"
        point.mkdir()
        C.run("mount", "-o", "loop", model, point)
        try:
            os.rename(point / "etc" / "passwd", point / "var" / "passwd-moved")
        finally:
            C.run("umount", point)
    if how == "mtime-changed":
        ubdcow.rebase(cow, model, unsafe=True)  # the overlay now records the model's new mtime
    else:
        os.utime(model, ns=(saved.st_atime_ns, saved.st_mtime_ns))
        assert os.stat(model).st_mtime_ns == saved.st_mtime_ns and os.stat(model).st_size == saved.st_size
    after = report(cow)
    assert len(builds) == 2, "the changed model was served from the cache"
    assert after == oracle(model, cow, tmp_path)
    if how != "raw-write-mtime-restored":
        assert after == [{"path": "/var/passwd-moved", "change": "modified", "type": "file", "fields": ["content"]}]
        assert after != before  # what the stale index would have said
    assert index_files(cache) != [old_index] and len(index_files(cache)) == 1  # the old one is gone


def test_a_damaged_cache_is_rebuilt_never_trusted(lab: tuple[Path, Path], cache: Path, builds: list[int]) -> None:
    model, cow = lab
    first = report(cow)
    (name,) = index_files(cache)
    path = cache / name
    good = path.read_bytes()
    damages = {
        "a flipped byte in the body": lambda b: b[:-100] + bytes([b[-100] ^ 1]) + b[-99:],
        "truncated": lambda b: b[: len(b) // 2],
        "empty": lambda b: b"",
        "garbage header": lambda b: b"UBDCOWIX\xff\xff\xff\x7f" + b[12:],
        "another magic": lambda b: b"X" + b[1:],
    }
    for what, damage in damages.items():
        path.write_bytes(damage(good))
        count = len(builds)
        assert report(cow) == first, what
        assert len(builds) == count + 1, f"{what}: the damaged index was used"
        assert path.read_bytes() == good, f"{what}: not rewritten"
    # a symbolic link in its place is not followed (and what it points at is left alone)
    elsewhere = cache.parent / "elsewhere"
    elsewhere.write_bytes(good)
    path.unlink()
    path.symlink_to(elsewhere)
    assert report(cow) == first and path.is_file() and not path.is_symlink() and elsewhere.read_bytes() == good
    # a cache folder that is a symbolic link is not used at all
    shutil.rmtree(cache)
    target = cache.parent / "target"
    target.mkdir()
    cache.symlink_to(target)
    count = len(builds)
    assert report(cow) == first and report(cow) == first and len(builds) == count + 2 and not os.listdir(target)


def test_two_processes_building_at_once_both_answer_and_leave_one_whole_index(lab: tuple[Path, Path], cache: Path,
                                                                              builds: list[int]) -> None:  # fmt: skip
    model, cow = lab
    env = dict(os.environ, XDG_CACHE_HOME=str(cache.parent))
    procs = [subprocess.Popen([sys.executable, "-m", "ubdcow", "changes", str(cow), "--json"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [1] * 4, [o[1] for o in outs]
    assert len({o[0] for o in outs}) == 1
    assert len(index_files(cache)) == 1 and not [n for n in os.listdir(cache) if n.startswith(".tmp")]
    assert report(cow) and not builds  # whole: read from the cache


def test_no_cache_beside_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, builds: list[int]) -> None:
    """XDG_CACHE_HOME set so that the cache folder would be the model's own folder: nothing is written there."""
    folder = tmp_path / "ubdcow"
    folder.mkdir(mode=0o700)
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "hostname").write_text("pc1\n")
    model = C.make_model(tree, folder / "model.img", "ext4", "16M")
    cow = tmp_path / "pc.cow"
    ubdcow.create(cow, model)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert report(cow) == [] and report(cow) == []
    assert os.listdir(folder) == ["model.img"] and len(builds) == 2
