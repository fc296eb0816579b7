"""The CRCs of ext4 and jbd2 checksums, as the kernel computes them (no inversion in or out).

- :func:`crc32c`: CRC-32C (Castagnoli, reflected), the kernel's ``crc32c(seed, buf, len)`` and
  e2fsprogs' ``ext2fs_crc32c_le``: ``crc32c(b"123456789", 0xFFFFFFFF) ^ 0xFFFFFFFF == 0xE3069283``.
- :func:`crc32_be`: CRC-32 with the polynomial 0x04C11DB7 fed most-significant bit first, the kernel's
  ``crc32_be`` (jbd2's v1 transaction checksums).

The standard library has neither: crc32_be comes from :func:`zlib.crc32` over bit-reversed bytes;
crc32c from a table of each byte value's contribution at each distance from the end of a
4 KiB chunk (4 MiB, built once on first use), so a block costs one numpy gather and one XOR reduction.
"""

from __future__ import annotations

import zlib

import numpy as np
import numpy.typing as npt

__all__ = ["crc32_be", "crc32c"]

_POLY_C = 0x82F63B78  # CRC-32C, reflected
_CHUNK = 4096
_SHORT = 64  # messages up to this length go through the byte loop


def _byte_table(poly: int) -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE_C = _byte_table(_POLY_C)
_distance: npt.NDArray[np.uint32] | None = None  # [4096 * 256]: row CHUNK-1-d holds the byte at distance d
_rows: npt.NDArray[np.intp] | None = None


def _distance_table() -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.intp]]:
    global _distance, _rows
    if _distance is None or _rows is None:
        table = np.array(_TABLE_C, dtype=np.uint32)
        rows = np.empty((_CHUNK, 256), dtype=np.uint32)
        current = table.copy()  # the register after a last byte of each value
        for d in range(_CHUNK):
            rows[_CHUNK - 1 - d] = current
            current = (current >> np.uint32(8)) ^ table[current & np.uint32(0xFF)]
        _distance = rows.reshape(-1)
        _rows = np.arange(_CHUNK, dtype=np.intp) * 256
    return _distance, _rows


def _crc32c_short(data: bytes | memoryview, crc: int) -> int:
    table = _TABLE_C
    for b in bytes(data):
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc


def crc32c(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """The CRC-32C register after ``data``, starting from ``seed`` (no inversion: the kernel's ``crc32c``)."""
    view = memoryview(data).cast("B")
    crc = seed & 0xFFFFFFFF
    if len(view) <= _SHORT:
        return _crc32c_short(view, crc)
    distance, rows = _distance_table()
    for start in range(0, len(view), _CHUNK):
        chunk = view[start : start + _CHUNK]
        n = len(chunk)
        if n < 4:
            crc = _crc32c_short(chunk, crc)
            continue
        values = np.frombuffer(chunk, dtype=np.uint8).astype(np.intp)
        # a seed is the same as XORing it into the first four bytes (little-endian)
        values[:4] ^= np.frombuffer(crc.to_bytes(4, "little"), dtype=np.uint8)
        crc = int(np.bitwise_xor.reduce(distance.take(rows[_CHUNK - n :] + values)))
    return crc


_REVERSED_BITS = bytes(int(f"{b:08b}"[::-1], 2) for b in range(256))


def _reverse32(x: int) -> int:
    return int(f"{x & 0xFFFFFFFF:032b}"[::-1], 2)


def crc32_be(data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """The big-endian CRC-32 register after ``data``, starting from ``seed`` (the kernel's ``crc32_be``)."""
    # crc32_be over data == bit-reversal of the reflected CRC-32 (zlib's) over bit-reversed bytes;
    # zlib inverts the register on the way in and out, which the XORs undo.
    reflected = bytes(data).translate(_REVERSED_BITS)
    register = zlib.crc32(reflected, _reverse32(seed) ^ 0xFFFFFFFF) ^ 0xFFFFFFFF
    return _reverse32(register)
