"""The hand-made corpus of bad input: ``python tests/support/bad_corpus.py`` rewrites tests/data/bad/.

Each file breaks one rule. Header-level files are complete files on disk;
files whose problem is their *backing* record a relative backing path that
:func:`setup_environment` turns into a directory, a FIFO, a dangling or
looping symlink (git cannot store FIFOs, so that happens at test time).

``RULES`` maps each file name to ``(kind, words)``: ``kind`` is "header"
(not a usable COW file: every command fails), "backing" (a valid COW file
whose backing file is unusable) or "truncated"; ``words`` must appear in the
one-line error (for backing rules: of the commands that need the backing).
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

HERE = Path(__file__).parent.parent  # tests/
BAD = HERE / "data" / "bad"
SIZE = 64 * 1024  # the virtual disk of the valid-looking files

sys.path.insert(0, str(HERE))
# The headers are assembled field by field at the spec's byte offsets (struct.pack in the model), not with
# ubdcow's make_header: a mistake shared by ubdcow's builder and its parser cannot hide in this corpus.
from test_oracle_model import build_header, parse  # noqa: E402

MTIME = 1_700_000_000
PATH = "/nonexistent/backing.img"
#: offset and struct format of each patchable field, per layout (the spec's table)
FIELDS = {
    "v1": {"version": (4, "<I"), "mtime": (264, "<I"), "size": (268, "<Q"), "sectorsize": (276, "<I")},
    "v2": {"version": (4, ">I"), "mtime": (4104, ">I"), "size": (4108, ">Q"), "sectorsize": (4116, ">I")},
    "v3": {"version": (4, ">I"), "mtime": (8, ">I"), "size": (12, ">Q"), "sectorsize": (20, ">I"),
           "alignment": (24, ">I"), "cow_format": (28, ">I")},
    "v3-broken": {"version": (4, ">I"), "mtime": (8, ">I"), "size": (16, ">Q"), "sectorsize": (24, ">I"),
                  "alignment": (28, ">I"), "cow_format": (32, ">I")},
}


def header(layout: str, path: str = PATH, **fields: int) -> bytearray:
    """A valid ``layout`` header (v1 little-endian, as an x86 kernel writes it) with some fields overwritten."""
    data = bytearray(build_header(layout, path, MTIME, SIZE, byteorder="little"))
    for name, value in fields.items():
        offset, fmt = FIELDS[layout][name]
        struct.pack_into(fmt, data, offset, value)
    return data


def v3(path: str = PATH, **fields: int) -> bytearray:
    """A v3 header (4128 bytes) with some big-endian fields (size included) overwritten."""
    return header("v3", path, **fields)


def v1(path: str = PATH, sectorsize: int = 512) -> bytearray:
    return header("v1", path, sectorsize=sectorsize)


def v2(path: str = PATH) -> bytearray:
    return header("v2", path)


def full(head: bytes | bytearray, size: int = SIZE, *, path: str = PATH) -> bytes:
    """A header followed by a zero bitmap and data area, as long as a fresh v3 COW file."""
    data_offset = parse(build_header("v3", path, MTIME, size)).data_offset
    return bytes(head) + bytes(data_offset + size - len(head))


def qcow2() -> bytes:
    # magic, version 3, no backing, cluster_bits 16, size 64 KiB, ...
    head = b"QFI\xfb" + struct.pack(">IQIIQ", 3, 0, 0, 16, SIZE) + bytes(72)
    return head + bytes(65536 - len(head))


def raw_ext4() -> bytes:
    data = bytearray(SIZE)
    data[1024 + 56 : 1024 + 58] = b"\x53\xef"  # ext2/3/4 superblock magic
    return bytes(data)


def raw_mbr() -> bytes:
    data = bytearray(SIZE)
    data[446:462] = bytes([0x80, 1, 1, 0, 0x83, 0xFE, 0xFF, 0xFF]) + struct.pack("<II", 2048, 100)
    data[510:512] = b"\x55\xaa"
    return bytes(data)


def no_nul(layout: str) -> bytes:
    if layout == "v1":
        data = v1()
        data[8:264] = b"A" * 256
    elif layout == "v2":
        data = v2()
        data[8:4104] = b"B" * 4096
    else:
        data = v3()
        data[32:4128] = b"C" * 4096
    return bytes(data)


def build() -> dict[str, tuple[bytes, str, str]]:
    """name -> (content, kind, words)."""
    files: dict[str, tuple[bytes, str, str]] = {
        "magic-qcow2.cow": (qcow2(), "header", "looks like a qcow2 image"),
        "magic-raw-ext4.cow": (raw_ext4(), "header", "not a UML COW file"),
        "magic-raw-mbr.cow": (raw_mbr(), "header", "not a UML COW file"),
        "magic-zeros.cow": (bytes(SIZE), "header", "not a UML COW file"),
        "magic-text.cow": (b"hello, this is not a disk image\n" * 200, "header", "not a UML COW file"),
        "magic-almost.cow": (b"OOOX" + bytes(v3()[4:]), "header", "not a UML COW file"),
        "magic-elf.cow": (b"\x7fELF\x02\x01\x01" + bytes(8000), "header", "not a UML COW file"),
        "empty.cow": (b"", "header", "not a UML COW file"),
        "three-bytes.cow": (b"OOO", "header", "not a UML COW file"),
    }
    for version in (0, 4, 5, 255, 0xFFFFFFFF, 0x03000000):
        files[f"version-{version:#x}.cow"] = (full(v3(version=version)), "header", "unsupported COW version")
    little_v2 = bytearray(v2())
    little_v2[0:8] = b"MOOO" + struct.pack("<I", 7)
    files["version-7-little.cow"] = (bytes(little_v2), "header", "unsupported COW version 7")
    # truncated at every header field boundary
    for cut in (4, 6, 8, 12, 20, 24, 28, 32, 36, 1000, 4127):
        files[f"truncated-v3-at-{cut}.cow"] = (bytes(v3()[:cut]), "header", "truncated")
    for cut in (8, 264, 268, 276, 279):
        files[f"truncated-v1-at-{cut}.cow"] = (bytes(v1()[:cut]), "header", "truncated")
    for cut in (8, 4104, 4108, 4116, 4119):
        files[f"truncated-v2-at-{cut}.cow"] = (bytes(v2()[:cut]), "header", "truncated")
    for ss in (0, 1, 3, 256, 1000, 2**31, 2**32 - 1):
        files[f"sectorsize-{ss}.cow"] = (full(v3(sectorsize=ss)), "header", "invalid sector size")
    files["sectorsize-3-v1.cow"] = (bytes(v1(sectorsize=3)) + bytes(SIZE), "header", "invalid sector size 3")
    files["sectorsize-negative-v1.cow"] = (bytes(v1(sectorsize=2**32 - 512)) + bytes(SIZE), "header",
                                           "invalid sector size")
    files["alignment-0.cow"] = (full(v3(alignment=0)), "header", "alignment is 0")
    files["alignment-3000.cow"] = (full(v3(alignment=3000)), "header", "not a power of two")
    files["alignment-12345.cow"] = (full(v3(alignment=12345)), "header", "not a power of two")
    files["cow-format-1.cow"] = (full(v3(cow_format=1)), "header", "unknown cow_format 1")
    files["cow-format-max.cow"] = (full(v3(cow_format=0xFFFFFFFF)), "header", "unknown cow_format")
    for layout in ("v1", "v2", "v3"):
        files[f"path-without-nul-{layout}.cow"] = (no_nul(layout) + bytes(SIZE), "header", "no NUL")
    files["size-overflow.cow"] = (bytes(v3(size=2**63 - 512)), "header", "too large")
    files["size-max.cow"] = (bytes(v3(size=2**64 - 1)), "header", "too large")
    files["size-zero.cow"] = (full(v3(size=0)), "header", "size is 0")
    # the same rules in the other layouts (their fields sit elsewhere: a parser reading the wrong offset shows)
    for layout in ("v1", "v2", "v3-broken"):
        tag = {"v1": "v1", "v2": "v2", "v3-broken": "broken"}[layout]
        files[f"{tag}-sectorsize-1000.cow"] = (full(header(layout, sectorsize=1000)), "header",
                                               "invalid sector size 1000")
        files[f"{tag}-sectorsize-0.cow"] = (full(header(layout, sectorsize=0)), "header", "invalid sector size 0")
        files[f"{tag}-size-0.cow"] = (full(header(layout, size=0)), "header", "size is 0")
        files[f"{tag}-size-max.cow"] = (bytes(header(layout, size=2**64 - 1)), "header", "too large")
    files["v1-version-9.cow"] = (full(header("v1", version=9)), "header", "unsupported COW version 9")  # little-endian
    for name, value, words in (("alignment-0", 0, "alignment is 0"), ("alignment-3000", 3000, "not a power of two")):
        files[f"broken-{name}.cow"] = (full(header("v3-broken", alignment=value)), "header", words)
    for cut in (12, 16, 24, 28, 36, 4132, 4135):
        files[f"truncated-broken-at-{cut}.cow"] = (bytes(header("v3-broken")[:cut]), "header", "truncated")
    broken = header("v3-broken")
    broken[36:4132] = b"D" * 4096
    files["path-without-nul-broken.cow"] = (full(broken), "header", "no NUL")
    swapped = bytearray(build_header("v1", PATH, MTIME, SIZE, sectorsize=3, byteorder="big"))  # "OOOM": big-endian
    files["sectorsize-3-v1-big-endian.cow"] = (full(swapped), "header", "invalid sector size 3")
    # valid headers, but the file stops early
    valid = v3()
    files["short-header-only.cow"] = (bytes(valid), "truncated", "shorter than its data offset")
    files["short-inside-bitmap.cow"] = (bytes(valid) + bytes(8192 - 4128 + 4), "truncated",
                                        "shorter than its data offset")
    files["short-before-data.cow"] = (bytes(valid) + bytes(12288 - 4128 - 1), "truncated",
                                      "shorter than its data offset")
    # valid COW files whose backing file is unusable (made at test time by setup_environment)
    for name, target, words in (
        ("backing-directory.cow", "backing-directory.d", "directory"),
        ("backing-fifo.cow", "backing-fifo.pipe", "FIFO"),
        ("backing-dev-zero.cow", "/dev/zero", "character device"),
        ("backing-dangling-link.cow", "backing-dangling.link", "not found"),
        ("backing-looping-link.cow", "backing-loop-a.link", "symbolic links"),
        ("backing-missing.cow", "backing-missing.img", "not found"),
        ("backing-itself.cow", "backing-itself.cow", "is the COW file itself"),
        ("backing-empty-path.cow", "", "no backing file is recorded"),
    ):
        # an empty v3 path would read as v3-broken (zeros at 32): that one is the broken layout on purpose
        files[name] = (full(build_header("v3" if target else "v3-broken", target, MTIME, SIZE),
                            path=target or "/x"), "backing", words)
    return files


def setup_environment(folder: Path) -> None:
    """Create, in a copy of the corpus, the odd backing files the "backing" rules point at."""
    (folder / "backing-directory.d").mkdir(exist_ok=True)
    if not (folder / "backing-fifo.pipe").exists():
        os.mkfifo(folder / "backing-fifo.pipe")
    for link, target in (("backing-dangling.link", "nowhere.img"), ("backing-loop-a.link", "backing-loop-b.link"),
                         ("backing-loop-b.link", "backing-loop-a.link")):
        if not os.path.lexists(folder / link):
            os.symlink(target, folder / link)


def write_corpus(dest: Path = BAD) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.cow"):
        old.unlink()
    files = build()
    manifest = {}
    for name, (content, kind, words) in sorted(files.items()):
        (dest / name).write_bytes(content)
        manifest[name] = {"kind": kind, "words": words}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")


def load_manifest(folder: Path = BAD) -> dict[str, dict[str, str]]:
    return json.loads((folder / "manifest.json").read_text())


if __name__ == "__main__":
    write_corpus()
    print(f"wrote {len(build())} files to {BAD}")
