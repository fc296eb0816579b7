"""The UML COW header: the four on-disk layouts, parsing, building, geometry.

This is the only module that uses construct; every construct error is turned
into a :class:`~ubdcow.errors.CorruptHeaderError` here.

Layouts (all packed):

* ``v1``: magic, version, backing_file[256], mtime u32, size u64,
  sectorsize i32 -- in the byte order of the magic (host order when written).
* ``v2``: as v1 with a 4096-byte path field; big-endian.
* ``v3``: magic, version, mtime u32, size u64, sectorsize, alignment,
  cow_format, backing_file[4096]; big-endian.
* ``v3-broken``: v3 as unpacked 64-bit builds wrote it before 2005, with four
  padding bytes after mtime and four at the end.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Literal

import construct as cs

from ._io import open_file
from .errors import (
    CorruptHeaderError,
    NotACowFileError,
    UnsupportedSectorSizeError,
    UnsupportedVersionError,
    io_error,
)

__all__ = [
    "MAGIC",
    "SECTOR_SIZE",
    "SECTOR_SHIFT",
    "PAGE_SIZE",
    "PAGE_SHIFT",
    "PAGE_SECTORS",
    "LAYOUTS",
    "MAX_HEADER_SIZE",
    "CowHeader",
    "Layout",
    "geometry",
    "header_size",
    "make_header",
    "parse_header",
    "read_header",
    "read_header_from",
    "sniff",
    "has_cow_magic",
]

MAGIC = 0x4F4F4F4D
#: The unit of the kernel's bitmap and data area, whatever the header says: one bit, 512 bytes of data.
SECTOR_SIZE = 512
SECTOR_SHIFT = 9
#: A 4 KiB page of the virtual disk: 8 sectors, one bitmap byte. The Linux ubd driver misreads a page whose
#: bits are mixed (some set, some clear) in multi-page requests, so every writer keeps pages whole.
PAGE_SIZE = 4096
PAGE_SHIFT = 12
PAGE_SECTORS = 8
MAX_OFFSET = 2**63 - 1

Layout = Literal["v1", "v2", "v3", "v3-broken"]
#: The byte order the kernel on this host reads v1 headers in.
HOST_ORDER: Literal["little", "big"] = "little" if sys.byteorder == "little" else "big"
LAYOUTS: tuple[Layout, ...] = ("v1", "v2", "v3", "v3-broken")


def _v1(int32: cs.Construct, int64: cs.Construct) -> cs.Struct:
    return cs.Struct(
        "magic" / int32,
        "version" / int32,
        "backing_file" / cs.Bytes(256),
        "mtime" / int32,
        "size" / int64,
        "sectorsize" / int32,
    )


_STRUCTS: dict[tuple[Layout, str], cs.Struct] = {
    ("v1", "little"): _v1(cs.Int32ul, cs.Int64ul),
    ("v1", "big"): _v1(cs.Int32ub, cs.Int64ub),
    ("v2", "big"): cs.Struct(
        "magic" / cs.Int32ub,
        "version" / cs.Int32ub,
        "backing_file" / cs.Bytes(4096),
        "mtime" / cs.Int32ub,
        "size" / cs.Int64ub,
        "sectorsize" / cs.Int32ub,
    ),
    ("v3", "big"): cs.Struct(
        "magic" / cs.Int32ub,
        "version" / cs.Int32ub,
        "mtime" / cs.Int32ub,
        "size" / cs.Int64ub,
        "sectorsize" / cs.Int32ub,
        "alignment" / cs.Int32ub,
        "cow_format" / cs.Int32ub,
        "backing_file" / cs.Bytes(4096),
    ),
    ("v3-broken", "big"): cs.Struct(
        "magic" / cs.Int32ub,
        "version" / cs.Int32ub,
        "mtime" / cs.Int32ub,
        cs.Padding(4),
        "size" / cs.Int64ub,
        "sectorsize" / cs.Int32ub,
        "alignment" / cs.Int32ub,
        "cow_format" / cs.Int32ub,
        "backing_file" / cs.Bytes(4096),
        cs.Padding(4),
    ),
}

_PATH_FIELD = {"v1": 256, "v2": 4096, "v3": 4096, "v3-broken": 4096}
_VERSION = {"v1": 1, "v2": 2, "v3": 3, "v3-broken": 3}
# Offset of the four bytes that tell v3 from v3-broken: the path in v3,
# cow_format (always 0) in v3-broken.
_BROKEN_PROBE = slice(32, 36)


def header_size(layout: Layout) -> int:
    """Size in bytes of the header struct of ``layout``."""
    return int(_STRUCTS[(layout, "little" if layout == "v1" else "big")].sizeof())


MAX_HEADER_SIZE = max(header_size(layout) for layout in LAYOUTS)


def _round_up(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def geometry(layout: Layout, size: int, sectorsize: int, alignment: int) -> tuple[int, int, int]:
    """Return ``(bitmap_offset, bitmap_len, data_offset)`` exactly as the kernel computes them.

    v1 and v2 keep the historical formula, which for some sizes gives one
    bitmap byte fewer than the sectors need.
    """
    hsize = header_size(layout)
    if layout in ("v1", "v2"):
        bitmap_offset = hsize
        bitmap_len = (size + sectorsize - 1) // (8 * sectorsize)
        data_offset = _round_up(bitmap_offset + bitmap_len, sectorsize)
    else:
        bitmap_offset = _round_up(hsize, alignment)
        sectors = (size + sectorsize - 1) // sectorsize
        bitmap_len = (sectors + 7) // 8
        data_offset = _round_up(bitmap_offset + bitmap_len, alignment)
    return bitmap_offset, bitmap_len, data_offset


@dataclass(frozen=True)
class CowHeader:
    """A parsed (or to-be-written) COW header with its derived geometry."""

    layout: Layout
    backing_file_raw: bytes
    mtime: int
    size: int
    sectorsize: int = SECTOR_SIZE
    alignment: int = 4096
    cow_format: int = 0
    byteorder: Literal["little", "big"] = "big"
    version: int = field(init=False)
    backing_file: str = field(init=False)
    header_size: int = field(init=False)
    bitmap_offset: int = field(init=False)
    bitmap_len: int = field(init=False)
    data_offset: int = field(init=False)
    #: ceil(size / sectorsize): the sectors of the virtual disk.
    sectors: int = field(init=False)

    def __post_init__(self) -> None:
        if self.layout in ("v1", "v2"):
            # v1/v2 have no alignment field: the data area is sector aligned.
            object.__setattr__(self, "alignment", self.sectorsize)
        if self.layout != "v1":
            object.__setattr__(self, "byteorder", "big")
        object.__setattr__(self, "version", _VERSION[self.layout])
        object.__setattr__(self, "backing_file", os.fsdecode(self.backing_file_raw))
        object.__setattr__(self, "header_size", header_size(self.layout))
        if self.sectorsize > 0 and _is_pow2(self.alignment):
            bo, bl, do = geometry(self.layout, self.size, self.sectorsize, self.alignment)
        else:  # only reachable for headers that fail validate()
            bo = bl = do = 0
        object.__setattr__(self, "bitmap_offset", bo)
        object.__setattr__(self, "bitmap_len", bl)
        object.__setattr__(self, "data_offset", do)
        object.__setattr__(self, "sectors", -(-self.size // self.sectorsize) if self.sectorsize > 0 else 0)

    @property
    def mapped_sectors(self) -> int:
        """Sectors that have a bit the kernel honours: ``min(sectors, 8 * bitmap_len)``.

        Smaller than :attr:`sectors` only for v1/v2 files hit by the rounding bug.
        """
        return min(self.sectors, 8 * self.bitmap_len)

    @property
    def file_size(self) -> int:
        """Length of a freshly created COW file: ``data_offset + size``."""
        return self.data_offset + self.size

    def replace(self, **changes: object) -> CowHeader:
        """Return a copy with some fields changed (geometry is recomputed)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        fields.update(changes)
        return CowHeader(**fields)  # type: ignore[arg-type]

    def validate(self, filename: str | os.PathLike[str] | None = None) -> None:
        """Raise :class:`CorruptHeaderError` if a field holds an impossible value."""

        def bad(message: str) -> CorruptHeaderError:
            return CorruptHeaderError(filename, message)

        if not (_is_pow2(self.sectorsize) and 512 <= self.sectorsize <= 65536):
            raise bad(f"invalid sector size {self.sectorsize} (must be a power of two from 512 to 65536)")
        if self.layout in ("v3", "v3-broken"):
            if self.alignment == 0:
                raise bad("alignment is 0")
            if not _is_pow2(self.alignment):
                raise bad(f"alignment {self.alignment} is not a power of two")
            if self.cow_format != 0:
                raise bad(f"unknown cow_format {self.cow_format} (0, the bitmap format, is the only one defined)")
        if self.size == 0:
            raise bad("virtual disk size is 0")
        if not 0 <= self.mtime < 2**32:
            raise bad(f"mtime {self.mtime} does not fit the header's 32-bit field")
        if self.data_offset + self.sectors * SECTOR_SIZE > MAX_OFFSET or self.size >= 2**64:
            raise bad(f"virtual size {self.size} is too large: the data area would end past 2^63 bytes")

    def require_io_support(self, filename: str | os.PathLike[str] | None = None) -> None:
        """Raise :class:`UnsupportedSectorSizeError` unless the image can be read and written."""
        if self.sectorsize != SECTOR_SIZE:
            raise UnsupportedSectorSizeError(
                filename,
                f"unsupported sector size {self.sectorsize}: the kernel and uml_moo disagree on such files, "
                "so ubdcow only reads, writes and merges images with 512-byte sectors",
            )

    def to_bytes(self) -> bytes:
        """Build the on-disk header (``header_size`` bytes; the path field's tail is zeroed)."""
        width = _PATH_FIELD[self.layout]
        if b"\0" in self.backing_file_raw:
            raise ValueError("backing file path contains a NUL byte")
        if self.layout == "v3" and not self.backing_file_raw:
            # four zero bytes where the path starts are how readers tell the broken layout
            raise ValueError("a v3 header needs a backing file path (an empty one reads as the broken layout)")
        if len(self.backing_file_raw) >= width:
            raise ValueError(
                f"backing file path is {len(self.backing_file_raw)} bytes; "
                f"the {self.layout} header holds at most {width - 1}"
            )
        values = {
            "magic": MAGIC,
            "version": self.version,
            "backing_file": self.backing_file_raw.ljust(width, b"\0"),
            "mtime": self.mtime,
            "size": self.size,
            "sectorsize": self.sectorsize,
            "alignment": self.alignment,
            "cow_format": self.cow_format,
        }
        try:
            return bytes(_STRUCTS[(self.layout, self.byteorder)].build(values))
        except cs.ConstructError as exc:
            raise ValueError(f"cannot build a {self.layout} header: {exc}") from None


def make_header(
    layout: Layout,
    backing_file: str | bytes | os.PathLike[str],
    mtime: int,
    size: int,
    *,
    sectorsize: int = SECTOR_SIZE,
    alignment: int = 4096,
    byteorder: Literal["little", "big"] | None = None,
) -> CowHeader:
    """Return a header that validates and can be written.

    ``byteorder`` only matters for v1, whose fields the kernel reads in the
    host's order: the default is this host's. Raises :class:`ValueError` for
    values no header can hold (the caller's mistake, not a corrupt file).
    """
    if byteorder is None:
        byteorder = HOST_ORDER
    raw = os.fsencode(backing_file)
    header = CowHeader(
        layout=layout,
        backing_file_raw=raw,
        mtime=mtime,
        size=size,
        sectorsize=sectorsize,
        alignment=alignment,
        byteorder=byteorder if layout == "v1" else "big",
    )
    try:
        header.validate()
    except CorruptHeaderError as exc:
        raise ValueError(exc.message) from None
    header.to_bytes()  # raises ValueError for a path that does not fit
    return header


def has_cow_magic(data: bytes) -> bool:
    """Whether ``data`` (a file's first bytes) starts with the COW magic, in either byte order."""
    return data[:4] in (b"OOOM", b"MOOO")


def sniff(data: bytes) -> str | None:
    """Name the kind of file ``data`` (the first bytes) looks like when it is not a COW file."""
    if data[:4] == b"QFI\xfb":
        return "a qcow2 image"
    if data[:4] == b"\x7fELF":
        return "an ELF executable"
    if data[:3] == b"\x1f\x8b\x08":
        return "a gzip file"
    if len(data) >= 1080 and data[1080:1082] == b"\x53\xef":
        return "a raw disk image (ext2/3/4 filesystem)"
    if len(data) >= 512 and data[510:512] == b"\x55\xaa":
        return "a raw disk image (MBR partition table)"
    if data and not data.strip(b"\0"):
        return "all zeros at the start: a raw disk image?"
    return None


def parse_header(data: bytes, filename: str | os.PathLike[str] | None = None) -> CowHeader:
    """Parse and validate a COW header from the first bytes of a file.

    ``data`` should hold at least :data:`MAX_HEADER_SIZE` bytes when the file
    has that many. Raises :class:`NotACowFileError`,
    :class:`UnsupportedVersionError` or :class:`CorruptHeaderError`.
    """
    data = bytes(data[:MAX_HEADER_SIZE])
    if len(data) < 8:
        if has_cow_magic(data):
            raise CorruptHeaderError(filename, f"header truncated: the file is only {len(data)} bytes")
        raise NotACowFileError(filename, f"not a UML COW file (only {len(data)} bytes long)")
    if data[:4] == b"OOOM":
        byteorder: Literal["little", "big"] = "big"
    elif data[:4] == b"MOOO":
        byteorder = "little"
    else:
        what = sniff(data)
        raise NotACowFileError(filename, "not a UML COW file (bad magic" + (f"; looks like {what})" if what else ")"))
    version = int.from_bytes(data[4:8], byteorder)
    layout: Layout
    if version == 1:
        layout = "v1"
    elif version == 2:
        layout = "v2"
    elif version == 3:
        if len(data) < _BROKEN_PROBE.stop:
            raise CorruptHeaderError(filename, f"header truncated: the file is only {len(data)} bytes")
        layout = "v3-broken" if data[_BROKEN_PROBE] == b"\0\0\0\0" else "v3"
    else:
        raise UnsupportedVersionError(filename, f"unsupported COW version {version} (known versions are 1, 2 and 3)")

    need = header_size(layout)
    if len(data) < need:
        raise CorruptHeaderError(
            filename, f"header truncated: the {layout} header is {need} bytes but the file has only {len(data)}"
        )
    struct = _STRUCTS[(layout, byteorder if layout == "v1" else "big")]
    try:
        fields = struct.parse(data[:need])
    except cs.ConstructError as exc:  # pragma: no cover - lengths are checked above
        raise CorruptHeaderError(filename, f"cannot parse the {layout} header: {exc}") from None

    path_field: bytes = fields.backing_file
    nul = path_field.find(b"\0")
    if nul < 0:
        raise CorruptHeaderError(filename, "the backing file path field has no NUL terminator")
    header = CowHeader(
        layout=layout,
        backing_file_raw=path_field[:nul],  # bytes after the NUL are garbage in real files
        mtime=fields.mtime,
        size=fields.size,
        sectorsize=fields.sectorsize,
        alignment=fields.get("alignment", fields.sectorsize),
        cow_format=fields.get("cow_format", 0),
        byteorder=byteorder if layout == "v1" else "big",
    )
    header.validate(filename)
    return header


def read_header_from(fd: int, filename: str | os.PathLike[str] | None = None) -> CowHeader:
    """Read and parse the header of an open file descriptor (positional read at 0)."""
    try:
        data = os.pread(fd, MAX_HEADER_SIZE, 0)
    except OSError as exc:
        raise io_error(filename or "<fd>", exc, "cannot read the header") from None
    return parse_header(data, filename)


def read_header(path: str | os.PathLike[str]) -> CowHeader:
    """Open ``path`` read-only and parse its header."""
    fd, _ = open_file(path, os.O_RDONLY, what="COW file")
    try:
        return read_header_from(fd, path)
    finally:
        os.close(fd)
