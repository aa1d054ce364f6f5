"""Compact output types: int8/uint8 with a per-vector scale, and sign bits packed eight to a byte.

Providers that return these types natively (Cohere's ``embedding_types``, Voyage's
``output_dtype``) are asked for them and their integers are wrapped by :func:`from_native`;
for the others embedpipe quantizes float vectors itself with :func:`quantize`. Either way
the result is a :class:`QuantizedArray`, which :func:`dequantize` turns back into float32
for scoring and :mod:`embedpipe.codec` stores compactly.

Conventions (the ones Cohere and Voyage use, so native and local results agree):

* ``int8``: values in [-127, 127]; ``value * scale`` approximates the float vector.
* ``uint8``: ``int8 + 128``, same scale.
* ``binary`` / ``ubinary``: bit ``i`` is 1 where dimension ``i`` is positive, packed
  big-endian eight dimensions per byte (``numpy.packbits``). ``ubinary`` presents each
  byte as an unsigned integer, ``binary`` as a signed one by offset (``ubinary - 128``).
  Both hold the same bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from embedpipe.errors import ConfigurationError, InvalidResponseError

OutputDtype = Literal["float32", "int8", "uint8", "binary", "ubinary"]
#: every accepted ``output_dtype``; ``"float32"`` is the default and means no quantization
OUTPUT_DTYPES: tuple[str, ...] = get_args(OutputDtype)
#: the compact ones
QUANTIZED_DTYPES: tuple[str, ...] = ("int8", "uint8", "binary", "ubinary")
_BITS = ("binary", "ubinary")


def check_output_dtype(value: object, *, where: str = "output_dtype") -> OutputDtype:
    """Return ``value`` as an :data:`OutputDtype` or raise a :class:`ConfigurationError` naming it."""
    if value not in OUTPUT_DTYPES:
        raise ConfigurationError(f"{where}={value!r}: use one of {list(OUTPUT_DTYPES)}")
    return value  # type: ignore[return-value]


def packed_width(dimensions: int) -> int:
    """Bytes that hold ``dimensions`` sign bits."""
    return (dimensions + 7) // 8


@dataclass(frozen=True)
class QuantizedArray:
    """``n`` vectors in a compact output type.

    ``values``: int8 ``(n, d)`` for ``int8``; uint8 ``(n, d)`` for ``uint8``; uint8
    ``(n, ceil(d/8))`` packed bits for ``binary`` and ``ubinary``. ``scales``: float32 ``(n,)``,
    what ``int8`` values are multiplied by to approximate the floats (1.0 for a provider's own
    quantization, whose scale is the same for every vector, so scores rank alike; 1.0 for bits).
    ``dimensions``: the vector's length in dimensions (bits for the binary types).
    """

    dtype: OutputDtype
    dimensions: int
    values: np.ndarray
    scales: np.ndarray

    def __post_init__(self) -> None:
        if self.dtype not in QUANTIZED_DTYPES:
            raise ValueError(f"QuantizedArray dtype {self.dtype!r} is not one of {QUANTIZED_DTYPES}")
        width = packed_width(self.dimensions) if self.dtype in _BITS else self.dimensions
        want = np.int8 if self.dtype == "int8" else np.uint8
        if self.values.ndim != 2 or self.values.shape[1] != width or self.values.dtype != want:
            raise ValueError(f"{self.dtype} values of {self.dimensions} dims must be {np.dtype(want).name} "
                             f"(n, {width}); got {self.values.dtype} {self.values.shape}")
        if self.scales.shape != (self.values.shape[0],):
            raise ValueError(f"scales of shape {self.scales.shape} do not match {self.values.shape[0]} vectors")

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def take(self, rows: Sequence[int] | np.ndarray) -> QuantizedArray:
        """The vectors at ``rows``, in that order."""
        idx = np.asarray(rows, dtype=np.intp)
        return QuantizedArray(self.dtype, self.dimensions, self.values[idx], self.scales[idx])

    def dequantize(self) -> np.ndarray:
        """Float32 ``(n, d)`` for scoring: see :func:`dequantize`."""
        return dequantize(self)

    def tolist(self) -> list[list[int]]:
        """Each vector as the provider's integers: int8, uint8, or packed bytes (signed for ``binary``)."""
        if self.dtype == "binary":
            return (self.values.astype(np.int16) - 128).tolist()  # type: ignore[no-any-return]
        return self.values.tolist()  # type: ignore[no-any-return]

    @property
    def nbytes_per_vector(self) -> int:
        """Bytes of values per vector (the scale adds 4 for ``int8``/``uint8`` in the codec)."""
        return int(self.values.shape[1])


def quantize(vectors: np.ndarray, dtype: OutputDtype) -> QuantizedArray:
    """Quantize float vectors ``(n, d)``: int8/uint8 scaled per vector by its largest magnitude, bits by sign."""
    dtype = check_output_dtype(dtype)
    if dtype == "float32":
        raise ValueError("float32 is not a quantized type; keep the float vectors")
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected an (n, d) array, got shape {arr.shape}")
    n, d = arr.shape
    if dtype in _BITS:
        return QuantizedArray(dtype, d, np.packbits(arr > 0, axis=1), np.ones(n, dtype=np.float32))
    peak = np.abs(arr).max(axis=1) if d else np.zeros(n, dtype=np.float32)
    # A zero vector keeps scale 1.0 (its values are all zero anyway): a scale is always > 0.
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(arr / scales[:, None]), -127, 127).astype(np.int8)
    if dtype == "uint8":
        return QuantizedArray(dtype, d, (q.astype(np.int16) + 128).astype(np.uint8), scales)
    return QuantizedArray(dtype, d, q, scales)


def from_native(dtype: OutputDtype, rows: Sequence[Sequence[int]] | np.ndarray, *,
                dimensions: int | None = None) -> QuantizedArray:
    """Wrap a provider's own quantized integers (Cohere ``embedding_types``, Voyage ``output_dtype``).

    ``rows`` are int8 or uint8 values, or packed bytes for the binary types (signed by offset for
    ``binary``). ``dimensions`` is the vector's length (default: 8 bits per byte for the binary
    types). Raises :class:`~embedpipe.errors.InvalidResponseError` for values out of range or
    ragged rows, since the provider's answer is then unusable.
    """
    dtype = check_output_dtype(dtype)
    try:
        raw = np.asarray(rows, dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise InvalidResponseError(f"{dtype} embeddings are not rows of integers: {exc}") from None
    if raw.ndim != 2:
        raise InvalidResponseError(f"{dtype} embeddings have shape {raw.shape}, not (n, d)")
    lo, hi = (-128, 127) if dtype in ("int8", "binary") else (0, 255)
    if raw.size and (raw.min() < lo or raw.max() > hi):
        raise InvalidResponseError(f"{dtype} embedding values out of [{lo}, {hi}]")
    n, width = raw.shape
    if dtype == "int8":
        values = raw.astype(np.int8)
        dims = width
    elif dtype == "uint8":
        values = raw.astype(np.uint8)
        dims = width
    else:
        values = (raw + 128 if dtype == "binary" else raw).astype(np.uint8)
        dims = dimensions if dimensions is not None else 8 * width
        if packed_width(dims) != width:
            raise InvalidResponseError(f"{width} packed bytes cannot hold {dims} dimensions")
    if dimensions is not None and dims != dimensions:
        raise InvalidResponseError(f"{dtype} embeddings have {dims} dimensions, expected {dimensions}")
    return QuantizedArray(dtype, dims, values, np.ones(n, dtype=np.float32))


def dequantize(q: QuantizedArray) -> np.ndarray:
    """Float32 ``(n, d)`` for scoring: int8 times its scale; uint8 less 128 times its scale; bits as ±1."""
    if q.dtype in _BITS:
        bits = np.unpackbits(q.values, axis=1, count=q.dimensions)
        return bits.astype(np.float32) * 2.0 - 1.0
    centred = q.values.astype(np.float32) - (128.0 if q.dtype == "uint8" else 0.0)
    out: np.ndarray = (centred * q.scales[:, None]).astype(np.float32, copy=False)
    return out


def hamming_distances(query: QuantizedArray, corpus: QuantizedArray) -> np.ndarray:
    """Bits that differ between each query vector and each corpus vector: ``(n_query, n_corpus)`` int.

    Binary vectors score by Hamming distance (smaller is closer); for sign bits it ranks like
    the dot product of the ±1 vectors, ``d - 2 * hamming``.
    """
    if query.dtype not in _BITS or corpus.dtype not in _BITS:
        raise ValueError("hamming_distances takes binary or ubinary vectors")
    if query.dimensions != corpus.dimensions:
        raise ValueError(f"{query.dimensions}-bit queries against {corpus.dimensions}-bit vectors")
    x = np.bitwise_xor(query.values[:, None, :], corpus.values[None, :, :])
    return np.unpackbits(x, axis=2).sum(axis=2, dtype=np.int64)  # type: ignore[no-any-return]


def concat(parts: Sequence[QuantizedArray]) -> QuantizedArray:
    """Join arrays of one dtype and dimensions, in order (batches back into one call's result)."""
    if not parts:
        raise ValueError("concat needs at least one QuantizedArray")
    first = parts[0]
    for p in parts[1:]:
        if p.dtype != first.dtype or p.dimensions != first.dimensions:
            raise ValueError(f"cannot join {p.dtype}/{p.dimensions} with {first.dtype}/{first.dimensions}")
    return QuantizedArray(first.dtype, first.dimensions, np.concatenate([p.values for p in parts]),
                          np.concatenate([p.scales for p in parts]))


def as_output(vectors: np.ndarray, quantized: QuantizedArray | None, dtype: OutputDtype) -> QuantizedArray:
    """What a call with ``output_dtype=dtype`` returns: the provider's native values if it sent them, else ours."""
    if quantized is not None:
        if quantized.dtype != dtype:
            raise InvalidResponseError(f"asked for {dtype} embeddings, got {quantized.dtype}")
        return quantized
    return quantize(vectors, dtype)


__all__ = ["OUTPUT_DTYPES", "QUANTIZED_DTYPES", "OutputDtype", "QuantizedArray", "as_output", "check_output_dtype",
           "concat", "dequantize", "from_native", "hamming_distances", "packed_width", "quantize"]
