"""Write an `.npz` whose arrays are mostly a run of trailing zeros, without ever building the zeros.

Gemma Scope's params.npz holds W_enc [2304, 16384] and W_dec [16384, 2304] whatever the twin's scale
(SAE-Lens's loader takes both sizes from the repo and folder names), 302 MB of float32 per SAE if
written out. The twin's stand-ins are non-zero only on a few coordinates laid out first in the file
(W_enc's first rows; W_dec's first columns, stored in Fortran order), so each array's bytes are a
short head and a long zero tail. `np.load` reads any zip of `.npy` members, stored or deflated, so
the twin writes them deflated, as `np.savez_compressed` would, and builds the deflate stream and the
CRC-32 of the tail arithmetically:

- deflate: the head is compressed by a fresh compressor and closed with a full flush (byte-aligned,
  no reference into later data); a block of Z zeros compressed the same way once is repeated for the
  tail (each copy only refers back inside itself); a last compressor finishes the remainder. The
  concatenation is one valid raw-deflate stream.
- CRC-32: appending n zero bytes is linear in the CRC register, so it is one 32x32 matrix over GF(2)
  raised to the n-th power by squaring (zlib's crc32_combine does the same).

`tests/load/test_sae_families.py` checks the bytes against `np.savez_compressed` read back, on random heads.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

ZERO_BLOCK = 1 << 20  # zeros compressed once and repeated
_LEVEL = 6  # zipfile's default deflate level; it only affects the head
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, so the same arrays give the same bytes


@dataclass(frozen=True)
class ZeroTailArray:
    """An array of `shape` and `dtype` whose data, in file order (`fortran_order` or C), is
    `head` (any shape, same dtype) followed by zeros."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    head: np.ndarray

    def __post_init__(self):
        if self.head.dtype != self.dtype or self.head.size > int(np.prod(self.shape)):
            raise ValueError(f"head {self.head.dtype}[{self.head.size}] does not fit {self.dtype}{list(self.shape)}")

    @classmethod
    def of(cls, array: np.ndarray) -> ZeroTailArray:
        """Any array, written whole (its zeros included): for the small members."""
        fortran = array.flags.f_contiguous and not array.flags.c_contiguous
        data = array.T if fortran else np.ascontiguousarray(array)
        return cls(tuple(array.shape), array.dtype, fortran, np.ascontiguousarray(data).reshape(-1))

    def npy_header(self) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                   "fortran_order": self.fortran_order, "shape": self.shape})
        return buf.getvalue()

    def zero_bytes(self) -> int:
        return (int(np.prod(self.shape)) - self.head.size) * self.dtype.itemsize


def _gf2_times(matrix: list[int], vector: int) -> int:
    out, i = 0, 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, column) for column in matrix]


@lru_cache(maxsize=1)
def _zero_byte_operator() -> list[int]:
    """The CRC-32 register's update for one zero byte, as 32 columns."""
    one_bit = [0xEDB88320] + [1 << i for i in range(31)]  # reflected polynomial: shift right, xor on carry
    two_bits = _gf2_square(one_bit)
    four_bits = _gf2_square(two_bits)
    return _gf2_square(four_bits)


def crc32_zero_extend(crc: int, n: int) -> int:
    """zlib.crc32(b"\\0" * n, crc), in O(log n) matrix squarings."""
    register = crc ^ 0xFFFFFFFF
    operator = _zero_byte_operator()
    while n:
        if n & 1:
            register = _gf2_times(operator, register)
        n >>= 1
        if n:
            operator = _gf2_square(operator)
    return register ^ 0xFFFFFFFF


@lru_cache(maxsize=1)
def _compressed_zero_block() -> bytes:
    compressor = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15)
    return compressor.compress(bytes(ZERO_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)


def _deflate(head: bytes, zeros: int) -> bytes:
    first = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15)
    parts = [first.compress(head), first.flush(zlib.Z_FULL_FLUSH)]
    blocks, rest = divmod(zeros, ZERO_BLOCK)
    parts.append(_compressed_zero_block() * blocks)
    last = zlib.compressobj(_LEVEL, zlib.DEFLATED, -15)
    parts += [last.compress(bytes(rest)), last.flush(zlib.Z_FINISH)]
    return b"".join(parts)


def npz_bytes(arrays: dict[str, ZeroTailArray]) -> bytes:
    """A deflated .npz holding `arrays` (members `<name>.npy`, in the given order)."""
    out = io.BytesIO()
    central = []
    for name, array in arrays.items():
        head = array.npy_header() + array.head.tobytes()
        zeros = array.zero_bytes()
        data = _deflate(head, zeros)
        crc = crc32_zero_extend(zlib.crc32(head), zeros)
        size = len(head) + zeros
        member = f"{name}.npy".encode()
        if size >= 0xFFFFFFFF or out.tell() >= 0xFFFFFFFF:
            raise ValueError(f"{name}: members of 4 GiB and more need zip64, which this writer does not do")
        offset = out.tell()
        out.write(struct.pack("<4s5H3I2H", b"PK\x03\x04", 20, 0, 8, 0, _DOS_DATE, crc, len(data), size,
                              len(member), 0))
        out.write(member)
        out.write(data)
        central.append(struct.pack("<4s6H3I5H2I", b"PK\x01\x02", 20, 20, 0, 8, 0, _DOS_DATE, crc, len(data), size,
                                   len(member), 0, 0, 0, 0, 0, offset) + member)
    start = out.tell()
    for entry in central:
        out.write(entry)
    out.write(struct.pack("<4s4H2IH", b"PK\x05\x06", 0, 0, len(central), len(central), out.tell() - start, start, 0))
    return out.getvalue()
