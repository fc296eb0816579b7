"""``ubdcow changes`` against the kernel's view: every kind of change, on ext2, ext3 and ext4.

The changes are made by the kernel itself on a read-write loop mount of a copy of the model (the same
workload the UML guests run in tests/test_changes_uml.py), and the overlay is that copy's difference from
the model (``ubdcow diff``, exact to the page). The expected report is computed by tests/support/changeslab.py from
two full walks of read-only loop mounts (lstat, readlink, xattrs, sha256 of every file), independently of
ubdcow, and ``ubdcow changes --json`` must equal it entry for entry.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from support import changeslab as C
import pytest
from conftest import require_root, run_cli

import ubdcow

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@dataclass
class Lab:
    """A model, the kernel's changed copy of it, the overlay holding the difference, and both views."""

    folder: Path
    model: Path
    changed: Path
    cow: Path
    old: dict[bytes, dict[str, Any]]
    new: dict[bytes, dict[str, Any]]


def make_lab(folder: Path, fstype: str, script: str | None = None) -> Lab:
    require_root("loop mounts")
    folder.mkdir(parents=True, exist_ok=True)
    tree = folder / "tree"
    C.make_tree(tree)
    model = C.make_model(tree, folder / "model.img", fstype)
    shutil.rmtree(tree)
    changed = C.modify(model, folder / "changed.img", script if script is not None else C.workload_script())
    cow = folder / "pc1.cow"
    ubdcow.diff(model, changed, cow)
    return Lab(folder, model, changed, cow, C.kernel_tree(model), C.kernel_tree(changed))


@pytest.fixture(scope="module", params=["ext2", "ext3", "ext4"])
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Lab:
    return make_lab(tmp_path_factory.mktemp(f"changes-{request.param}"), request.param)


@pytest.fixture(autouse=True)
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test its own cache folder (XDG_CACHE_HOME), never the user's."""
    cache = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def test_every_kind_of_change_is_reported_as_the_kernel_sees_it(lab: Lab) -> None:
    oracle = C.expected(lab.old, lab.new)
    doc, err = C.changes_json(lab.cow, code=1)
    assert err == ""
    assert doc["disks"][0]["disk"] == str(lab.cow) and doc["disks"][0]["against"] == str(lab.model)
    C.assert_same_report(C.entries(doc), oracle)
    # the workload did what it says: every kind of change is in the report
    kinds = {(e["change"], field) for e in oracle for field in e["fields"] or [""]}
    for kind in [("added", ""), ("deleted", ""), ("modified", "content"), ("modified", "type"),
                 ("modified", "target"), ("modified", "rdev"), ("metadata", "mode"), ("metadata", "uid"),
                 ("metadata", "gid"), ("metadata", "mtime"), ("metadata", "xattrs")]:  # fmt: skip
        assert kind in kinds, kind
    paths = {e["path"]: e for e in oracle}
    assert paths["/var/inplace"]["fields"] == ["content"]  # the mtime restored: the bytes still count
    assert "/var/same" not in paths  # identical bytes, mtime restored: no change
    assert "/opt" not in paths  # a directory's own mtime: not by default
    # inode numbers were reused: a deleted path's inode is now another file's
    deleted = {lab.old[os.fsencode(e["path"])]["inode"] for e in oracle if e["change"] == "deleted"}
    assert deleted & {lab.new[os.fsencode(e["path"])]["inode"] for e in oracle if e["change"] == "added"}


def test_all_adds_directory_times_ctime_atime_and_link_counts(lab: Lab) -> None:
    doc, _ = C.changes_json(lab.cow, "--all", code=1)
    C.assert_same_report(C.entries(doc), C.expected(lab.old, lab.new, all_fields=True))
    assert any(e["path"] == "/opt" and "mtime" in e["fields"] for e in C.entries(doc))


def test_paths_limit_the_report_to_their_subtrees(lab: Lab) -> None:
    under = [b"/etc", b"/srv/moved", b"/var/big", b"/nowhere"]
    args: list[str] = []
    for path in ("/etc/", "/srv/moved", "/var/big", "/nowhere", "/etc/hostname"):
        args += ["--path", path]
    doc, _ = C.changes_json(lab.cow, *args, code=1)
    C.assert_same_report(C.entries(doc), C.expected(lab.old, lab.new, under=under))
    doc, _ = C.changes_json(lab.cow, "--path", "/links", code=0)  # nothing changed there
    assert C.entries(doc) == []


def test_renames_pair_a_deleted_and_an_added_path_of_the_same_file(lab: Lab) -> None:
    doc, _ = C.changes_json(lab.cow, "--renames", code=1)
    oracle = C.expected_renames(C.expected(lab.old, lab.new), lab.old, lab.new, lab.model, lab.changed)
    C.assert_same_report(C.entries(doc), oracle)
    renamed = {e["from"]: e["path"] for e in C.entries(doc) if e["change"] == "renamed"}
    assert renamed["/etc/rename-me"] == "/etc/renamed" and renamed["/opt/moveme/m0"] == "/srv/moved/m0"
    assert not any(p.startswith("/reuse/") for p in renamed)  # a reused inode number is another file


def test_the_api_gives_the_same_records(lab: Lab) -> None:
    report = ubdcow.changes(lab.cow, details=True)
    assert report.method == "overlay" and report.reason is None
    assert [e.as_dict() for e in report.entries] == C.expected(lab.old, lab.new)
    chown = next(e for e in report.entries if e.path == "/etc/chown-me")
    assert chown.old is not None and chown.new is not None
    assert (chown.old.uid, chown.new.uid, chown.new.gid) == (0, 1000, 2000)


def test_a_raw_image_against_its_overlay_and_the_reverse(lab: Lab) -> None:
    """``changes MODEL --against COW``: what the model has that the overlay does not (the model is the new side);
    ``changes COW --against MODEL`` is the default; a copy of the model is compared in full, the same answer."""
    doc, _ = C.changes_json(lab.model, "--against", lab.cow, code=1)
    C.assert_same_report(C.entries(doc), C.expected(lab.new, lab.old))
    doc, _ = C.changes_json(lab.cow, "--against", lab.model, code=1)
    C.assert_same_report(C.entries(doc), C.expected(lab.old, lab.new))
    doc, err = C.changes_json(lab.changed, "--against", lab.model, code=1)
    assert "compared entry by entry" in err
    C.assert_same_report(C.entries(doc), C.expected(lab.old, lab.new))
    doc, _ = C.changes_json(lab.model, "--against", lab.model, code=0)
    assert C.entries(doc) == []


def test_two_overlays_on_one_model(tmp_path: Path, lab: Lab) -> None:
    """pc2 made other changes (some the same as pc1's, some conflicting): pc1 against pc2 is the difference of
    the two changed trees, found from the two overlays' blocks."""
    script = C.workload_script([
        "echo other > etc/newfile", "rm etc/delete-me", "chmod 640 etc/chmod-me", "echo pc2 > etc/hostname",
        "mkdir -p srv/www && echo hi > srv/www/index.html", "rm -rf opt/moveme/sub", "mv var/grow var/grown",
        "for i in $(seq 0 20); do echo \"pc2 $i\" > reuse/p$i; done", "setfattr -n user.pc -v 2 etc/passwd",
    ])  # fmt: skip
    changed2 = C.modify(lab.model, tmp_path / "changed2.img", script)
    cow2 = tmp_path / "pc2.cow"
    ubdcow.diff(lab.model, changed2, cow2)
    view2 = C.kernel_tree(changed2)
    doc, err = C.changes_json(lab.cow, "--against", cow2, code=1)
    assert err == ""
    C.assert_same_report(C.entries(doc), C.expected(view2, lab.new))
    doc, _ = C.changes_json(cow2, "--against", lab.cow, code=1)
    C.assert_same_report(C.entries(doc), C.expected(lab.new, view2))
    doc, _ = C.changes_json(lab.cow, "--against", lab.cow, code=0)
    assert C.entries(doc) == []


def test_two_overlays_that_made_the_same_new_file_differently(tmp_path: Path, lab: Lab) -> None:
    """Both guests created the same paths from the same model, so the kernel gave the new files the same inode
    numbers in both; their contents differ. Inodes outside the model's tree are compared too when neither side
    is the model."""
    views, cows = [], []
    for name, word in (("a", "one"), ("b", "two")):
        script = f"echo {word} > etc/brand-new && mkdir newdir && echo {word} > newdir/f && chmod 600 newdir/f"
        changed = C.modify(lab.model, tmp_path / f"{name}.img", script)
        cow = tmp_path / f"{name}.cow"
        ubdcow.diff(lab.model, changed, cow)
        views.append(C.kernel_tree(changed))
        cows.append(cow)
    a, b = views
    assert a[b"/etc/brand-new"]["inode"] == b[b"/etc/brand-new"]["inode"]
    assert a[b"/newdir/f"]["inode"] == b[b"/newdir/f"]["inode"]
    doc, err = C.changes_json(cows[0], "--against", cows[1], code=1)
    assert err == ""
    oracle = C.expected(b, a)
    assert {e["path"] for e in oracle} >= {"/etc/brand-new", "/newdir/f"}
    C.assert_same_report(C.entries(doc), oracle)
    for cow, view in zip(cows, views, strict=True):  # and each against the model: the new files are added
        doc, _ = C.changes_json(cow, code=1)
        C.assert_same_report(C.entries(doc), C.expected(lab.old, view))
