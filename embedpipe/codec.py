"""Cache values: compact binary vectors with a 12-byte header.

Layout (little-endian): ``b"EP"`` magic, format version (u8), dtype code (u8),
dims (u32), token count of the text (u32), then the payload. It is never pickle and
never JSON: decoding a foreign or damaged value can only fail, never execute anything.

* Version 1, float32 (code 1): ``dims`` float32 values, ``4 * dims + 12`` bytes. Float
  vectors are still written as version 1, so caches written before version 2 existed
  and caches read by older embedpipe releases stay valid both ways.
* Version 2, the compact output types of :mod:`embedpipe.quantize`:
  ``int8`` (code 2) and ``uint8`` (code 3): a float32 per-vector scale then ``dims``
  bytes, ``dims + 16`` bytes; ``binary`` (code 4) and ``ubinary`` (code 5): the sign bits
  packed eight to a byte, ``ceil(dims / 8) + 12`` bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from embedpipe.quantize import QUANTIZED_DTYPES, OutputDtype, QuantizedArray, packed_width

MAGIC = b"EP"
VERSION = 1
#: the version of values holding a compact output type
VERSION_COMPACT = 2
DTYPE_FLOAT32 = 1
DTYPE_CODES: dict[str, int] = {"float32": 1, "int8": 2, "uint8": 3, "binary": 4, "ubinary": 5}
_DTYPE_NAMES = {code: name for name, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<2sBBII")
HEADER_SIZE = _HEADER.size  # 12
_SCALE = struct.Struct("<f")


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


# ---------------------------------------------------------------------------------- compact types
def value_size(dims: int, dtype: OutputDtype = "float32") -> int:
    """Bytes one encoded value of ``dims`` dimensions takes, header included."""
    if dtype == "float32":
        return HEADER_SIZE + 4 * dims
    if dtype in ("int8", "uint8"):
        return HEADER_SIZE + _SCALE.size + dims
    if dtype in ("binary", "ubinary"):
        return HEADER_SIZE + packed_width(dims)
    raise ValueError(f"unknown dtype {dtype!r}")


def value_dtype(value: bytes) -> str:
    """The output type a value holds (``"float32"``, ``"int8"``…), or raise :class:`CorruptValueError`."""
    if len(value) < HEADER_SIZE:
        raise CorruptValueError(f"value of {len(value)} bytes is shorter than the header")
    magic, version, code, _, _ = _HEADER.unpack_from(value)
    if magic != MAGIC:
        raise CorruptValueError("not an embedpipe value (bad magic)")
    name = _DTYPE_NAMES.get(code)
    if name is None or version != (VERSION if name == "float32" else VERSION_COMPACT):
        raise CorruptValueError(f"unsupported value format version={version} dtype={code}")
    return name


def encode_quantized(q: QuantizedArray, tokens: Sequence[int]) -> list[bytes]:
    """Encode each vector of a :class:`~embedpipe.quantize.QuantizedArray` (version 2)."""
    code = DTYPE_CODES[q.dtype]
    scaled = q.dtype in ("int8", "uint8")
    out = []
    for row, scale, t in zip(q.values, q.scales, tokens, strict=True):
        head = _HEADER.pack(MAGIC, VERSION_COMPACT, code, q.dimensions, max(0, int(t)))
        out.append(head + (_SCALE.pack(float(scale)) if scaled else b"") + np.ascontiguousarray(row).tobytes())
    return out


@dataclass(frozen=True)
class DecodedQuantized:
    """Decoded compact values: ``positions`` of those that decoded, their vectors and token counts."""

    positions: list[int]
    vectors: QuantizedArray
    tokens: list[int]


def decode_quantized_many(values: Sequence[bytes], dims: int | None,
                          dtype: OutputDtype) -> tuple[DecodedQuantized, list[int]]:
    """Decode version-2 values of one compact ``dtype`` and equal dims.

    Returns the decoded vectors and the positions of corrupt values: bad header, another
    dtype (a float32 value where int8 is expected counts as corrupt: the key names the type),
    wrong size or dims, a non-finite or non-positive scale, or set padding bits.
    """
    if dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"decode_quantized_many takes one of {QUANTIZED_DTYPES}, not {dtype!r}")
    code = DTYPE_CODES[dtype]
    scaled = dtype in ("int8", "uint8")
    good: list[int] = []
    bad: list[int] = []
    tokens: list[int] = []
    rows: list[bytes] = []
    scales: list[float] = []
    d_seen = dims
    for i, value in enumerate(values):
        if len(value) < HEADER_SIZE:
            bad.append(i)
            continue
        magic, version, c, d, t = _HEADER.unpack_from(value)
        width = d if scaled else packed_width(d)
        if magic != MAGIC or version != VERSION_COMPACT or c != code or (d_seen is not None and d != d_seen) \
                or len(value) != HEADER_SIZE + (_SCALE.size if scaled else 0) + width:
            bad.append(i)
            continue
        offset = HEADER_SIZE
        if scaled:
            (scale,) = _SCALE.unpack_from(value, HEADER_SIZE)
            if not (np.isfinite(scale) and scale > 0):
                bad.append(i)
                continue
            scales.append(scale)
            offset += _SCALE.size
        else:
            # Bits past dims in the last byte are zero in every value we write.
            if d % 8 and value[-1] & ((1 << (8 - d % 8)) - 1):
                bad.append(i)
                continue
            scales.append(1.0)
        d_seen = d
        good.append(i)
        tokens.append(t)
        rows.append(value[offset:])
    d_out = d_seen or 0
    width = d_out if scaled else packed_width(d_out)
    np_dtype = np.int8 if dtype == "int8" else np.uint8
    arr = np.frombuffer(b"".join(rows), dtype=np_dtype).reshape(len(rows), width).copy()
    q = QuantizedArray(dtype, d_out, arr, np.asarray(scales, dtype=np.float32))
    return DecodedQuantized(good, q, tokens), bad


# ---------------------------------------------------------------------------------- one pipeline's format
class ValueFormat:
    """How one pipeline stores its vectors: float32, or a compact ``output_dtype`` (header version 2).

    The engine encodes and decodes through this, and always works on float32: a compact
    value decodes to its float view (:func:`~embedpipe.quantize.dequantize`), and a fresh
    vector is put through the same round trip (:meth:`roundtrip`), so a vector is the same
    whether it came from the provider or the cache. ``native``: the provider returns this
    type itself (its integers come back exactly, scale 1).
    """

    def __init__(self, dtype: OutputDtype = "float32", *, native: bool = False) -> None:
        self.dtype = dtype
        self.native = native

    @property
    def compact(self) -> bool:
        return self.dtype != "float32"

    def quantized(self, vectors: np.ndarray) -> QuantizedArray:
        """The compact form of float ``vectors`` (the provider's own integers when ``native``)."""
        from embedpipe.quantize import from_native, quantize

        arr = np.asarray(vectors, dtype=np.float32)
        if self.native and self.dtype in ("int8", "uint8"):
            # A native int8/uint8 float view holds the provider's integers (its scale is 1): take them back.
            offset = 0 if self.dtype == "int8" else 128  # dequantize gives uint8 as (v - 128) * scale
            return from_native(self.dtype, np.rint(arr).astype(np.int64) + offset, dimensions=arr.shape[1])
        return quantize(arr, self.dtype)

    def roundtrip(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` as this format gives them back (unchanged for float32)."""
        if not self.compact:
            return vectors
        from embedpipe.quantize import dequantize

        return dequantize(self.quantized(np.atleast_2d(vectors))).reshape(np.shape(vectors))

    def encode_many(self, vectors: np.ndarray, tokens: Sequence[int]) -> list[bytes]:
        if not self.compact:
            return encode_many(vectors, tokens)
        return encode_quantized(self.quantized(np.atleast_2d(vectors)), tokens)

    def encode(self, vector: np.ndarray, tokens: int) -> bytes:
        return self.encode_many(np.asarray(vector, dtype=np.float32)[None, :], [tokens])[0]

    def decode_many(self, values: Sequence[bytes], dims: int | None) -> tuple[Decoded, list[int]]:
        """Decode to float32 rows (see :func:`decode_many`); a value of another type counts as corrupt."""
        if not self.compact:
            return decode_many(values, dims)
        from embedpipe.quantize import dequantize

        q, bad = decode_quantized_many(values, dims, self.dtype)
        vectors = dequantize(q.vectors) if len(q.positions) else np.empty((0, dims or 0), dtype=np.float32)
        return Decoded(q.positions, vectors, q.tokens), bad


FLOAT32 = ValueFormat()
