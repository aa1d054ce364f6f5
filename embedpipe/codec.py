"""Cache values: compact binary float32 with a 12-byte header.

Layout (little-endian): ``b"EP"`` magic, format version (u8), dtype code (u8),
dims (u32), token count of the text (u32), then ``dims`` float32 values. A value is
therefore ``4 * dims + 12`` bytes. It is never pickle and never JSON: decoding a
foreign or damaged value can only fail, never execute anything.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MAGIC = b"EP"
VERSION = 1
DTYPE_FLOAT32 = 1
_HEADER = struct.Struct("<2sBBII")
HEADER_SIZE = _HEADER.size  # 12


class CorruptValueError(ValueError):
    """A cache value that cannot be decoded as a vector of the expected dims."""


def encode(vector: np.ndarray, tokens: int) -> bytes:
    """Encode one vector and the token count of its text."""
    arr = np.ascontiguousarray(vector, dtype="<f4")
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-d vector, got shape {arr.shape}")
    return _HEADER.pack(MAGIC, VERSION, DTYPE_FLOAT32, arr.shape[0], max(0, int(tokens))) + arr.tobytes()


def encode_many(vectors: np.ndarray, tokens: Sequence[int]) -> list[bytes]:
    """Encode each row of an (n, d) array."""
    arr = np.ascontiguousarray(vectors, dtype="<f4")
    d = arr.shape[1]
    return [
        _HEADER.pack(MAGIC, VERSION, DTYPE_FLOAT32, d, max(0, int(t))) + row.tobytes()
        for row, t in zip(arr, tokens, strict=True)
    ]


@dataclass(frozen=True)
class Decoded:
    """Decoded values: ``positions`` of the values that decoded, their (n, d) rows and token counts."""

    positions: list[int]
    vectors: np.ndarray
    tokens: list[int]


def decode_header(value: bytes, dims: int | None) -> tuple[int, int]:
    """Check a value's header and size; return ``(dims, tokens)`` or raise :class:`CorruptValueError`."""
    if len(value) < HEADER_SIZE:
        raise CorruptValueError(f"value of {len(value)} bytes is shorter than the header")
    magic, version, dtype, d, tokens = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise CorruptValueError("not an embedpipe value (bad magic)")
    if version != VERSION or dtype != DTYPE_FLOAT32:
        raise CorruptValueError(f"unsupported value format version={version} dtype={dtype}")
    if dims is not None and d != dims:
        raise CorruptValueError(f"value holds {d} dims, expected {dims}")
    if len(value) != HEADER_SIZE + 4 * d:
        raise CorruptValueError(f"value of {len(value)} bytes does not hold {d} float32 values")
    return d, tokens


def decode_many(values: Sequence[bytes], dims: int | None) -> tuple[Decoded, list[int]]:
    """Decode values of equal dims in one pass.

    Returns the decoded rows (in order of the values that decoded) and the positions
    of values that are corrupt: bad header, wrong size or dims, or non-finite numbers.
    """
    good: list[int] = []
    bad: list[int] = []
    tokens: list[int] = []
    payloads: list[bytes] = []
    d_seen = dims
    for i, value in enumerate(values):
        try:
            d, t = decode_header(value, d_seen)
        except CorruptValueError:
            bad.append(i)
            continue
        d_seen = d
        good.append(i)
        tokens.append(t)
        payloads.append(value)
    if not good:
        return Decoded([], np.empty((0, dims or 0), dtype=np.float32), []), bad
    assert d_seen is not None
    # One join and one frombuffer for the whole batch: per-value numpy calls would
    # dominate the fully cached path.
    stride = HEADER_SIZE + 4 * d_seen
    buf = np.frombuffer(b"".join(payloads), dtype=np.uint8).reshape(len(payloads), stride)
    arr = buf[:, HEADER_SIZE:].copy().view("<f4").astype(np.float32, copy=False)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        keep = np.flatnonzero(finite)
        bad.extend(good[i] for i in np.flatnonzero(~finite))
        bad.sort()
        arr = arr[keep]
        tokens = [tokens[i] for i in keep]
        good = [good[i] for i in keep]
    return Decoded(good, arr, tokens), bad
