"""Shared fixtures: the conformance corpus unpacked per test, and the real-tool gate."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

DATA = Path(__file__).parent / "data"
MANIFEST: list[dict[str, Any]] = json.loads((DATA / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST}
REQUIRE_UML = os.environ.get("UBDCOW_REQUIRE_UML") == "1"
#: header fields and geometry that the manifest records for every case
GEOMETRY_KEYS = ("version", "layout", "mtime", "size", "sectorsize", "alignment", "bitmap_offset", "bitmap_len",
                 "data_offset", "sectors")


def pytest_report_header() -> list[str]:
    """The UML kernel the guest tests boot and its version, so every log shows which kernel judged the run."""
    from support.uml import kernel_description

    return [kernel_description()]


def require(condition: object, message: str) -> None:
    """Skip the test with ``message`` unless ``condition`` holds; under UBDCOW_REQUIRE_UML=1 fail instead.

    CI sets UBDCOW_REQUIRE_UML=1 and runs as root with every real tool installed (``.ci/run``): there a
    missing tool, missing root or a filesystem feature that is absent is a failure, never a skip.
    """
    if condition:
        return
    if REQUIRE_UML:
        pytest.fail(f"UBDCOW_REQUIRE_UML=1 but {message}")
    pytest.skip(message)


def require_root(why: str) -> None:
    """``why`` needs root (CI runs as root): skip elsewhere, fail under UBDCOW_REQUIRE_UML=1."""
    require(os.geteuid() == 0, f"{why} needs root")


def find_tool(name: str) -> str | None:
    """Path of a program: PATH, then the sbin and bin folders (a non-root PATH often lacks sbin)."""
    path = shutil.which(name)
    for folder in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        if path is None and os.access(f"{folder}/{name}", os.X_OK):
            path = f"{folder}/{name}"
    return path


def require_tool(name: str, package: str = "uml-utilities user-mode-linux") -> str:
    """Path of a real tool (a UML tool unless ``package`` says otherwise); skip when it is absent, or
    fail instead under UBDCOW_REQUIRE_UML=1."""
    path = find_tool(name)
    require(path, f"{name} is not installed (apt-get install {package})")
    assert path is not None
    return path


@dataclass
class Case:
    """One unpacked conformance case."""

    name: str
    meta: dict[str, Any]
    dir: Path
    cow: Path
    backing: Path
    expected: Path

    @property
    def expected_bytes(self) -> bytes:
        return self.expected.read_bytes()


def run_atheris(harness: Path, corpus: Path, runs: int, *options: str, artifacts: Path, timeout: int = 600) -> None:
    """Run the atheris harness ``harness`` for ``runs`` inputs from ``corpus`` (fails under UBDCOW_REQUIRE_UML=1
    where atheris is missing, else skips); the run must end cleanly, having done every input."""
    try:
        import atheris
    except ImportError:
        atheris = None
    require(atheris, "atheris is not installed here (pip install atheris; it needs a prebuilt wheel or clang)")
    proc = subprocess.run(
        [sys.executable, str(harness), f"-runs={runs}", *options, f"-artifact_prefix={artifacts}/", str(corpus)],
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {runs} runs" in proc.stderr


def unpack_case(name: str, dest: Path) -> Case:
    """Unpack case ``name`` into ``dest`` and give the backing file the recorded mtime."""
    meta = CASES[name]
    dest.mkdir(parents=True, exist_ok=True)
    paths = {}
    for stem in ("backing.img", "overlay.cow", "expected.img"):
        target = dest / stem
        with gzip.open(DATA / name / f"{stem}.gz") as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        paths[stem] = target
    os.utime(paths["backing.img"], (meta["mtime"], meta["mtime"]))
    return Case(name, meta, dest, paths["overlay.cow"], paths["backing.img"], paths["expected.img"])


@pytest.fixture(scope="session", autouse=True)
def _run_tmpdir(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One temporary folder for the run (``TMPDIR``, which subprocesses inherit, and ``tempfile.tempdir``);
    the run fails if a test leaves anything in it (pytest's own ``tmp_path`` folders are elsewhere)."""
    tmp_path_factory.getbasetemp()  # fixed before TMPDIR changes: pytest keeps its last runs' folders
    folder = tempfile.mkdtemp(prefix="ubdcow-tests-")
    saved = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = folder
    try:
        yield folder
    finally:
        if saved[0] is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved[0]
        tempfile.tempdir = saved[1]
        left = sorted(os.listdir(folder))
        shutil.rmtree(folder, ignore_errors=True)
        if left:
            pytest.fail(f"the tests left files in the temporary folder ({folder}): {', '.join(left)}", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _private_index_cache(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """``changes`` keeps model indexes in $XDG_CACHE_HOME/ubdcow: the run's own folder, never the user's."""
    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(params=[c["name"] for c in MANIFEST])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    """Every conformance case, unpacked into a fresh folder."""
    return unpack_case(request.param, tmp_path / request.param)


@pytest.fixture
def unpack(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Unpack a named case: ``unpack("v3-discard")``."""

    def _unpack(name: str, sub: str | None = None) -> Case:
        return unpack_case(name, tmp_path / (sub or name))

    return _unpack


def run_cli(
    *args: str,
    cwd: str | os.PathLike[str] | None = None,
    input: bytes | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m ubdcow ARGS`` in a subprocess, capturing bytes."""
    full_env = dict(os.environ)
    full_env.pop("UBDCOW_DEBUG", None)
    if env:
        full_env.update(env)
    return subprocess.run(
        [sys.executable, "-m", "ubdcow", *map(str, args)],
        cwd=cwd,
        input=input,
        capture_output=True,
        env=full_env,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes], *needles: str) -> str:
    """A CLI failure: non-zero exit, no traceback, the first stderr line ``ubdcow: ...`` naming ``needles``."""
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"expected failure, got 0; stderr={err!r}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[0].startswith("ubdcow: "), lines
    assert all(line.startswith(("ubdcow: ", "hint: ")) for line in lines), lines
    assert len([line for line in lines if line.startswith("ubdcow: ")]) == 1, lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def fs_images(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """ext2/3/4 images of every layout in tests/support/fstree.py, each made once per session when first asked for."""
    from support.fstree import Images

    return Images(tmp_path_factory.mktemp("fs-images"))
