"""The value codec: compact, self-describing, and never trusting what it reads."""

from __future__ import annotations

import numpy as np
import pytest

from embedpipe import codec
from embedpipe.quantize import quantize


def test_roundtrip_and_size() -> None:
    v = np.random.default_rng(0).standard_normal(1536).astype(np.float32)
    blob = codec.encode(v, tokens=321)
    assert len(blob) <= 4 * 1536 + 64
    assert len(blob) == 4 * 1536 + codec.HEADER_SIZE
    decoded, bad = codec.decode_many([blob], 1536)
    assert bad == []
    assert decoded.tokens == [321]
    np.testing.assert_array_equal(decoded.vectors[0], v)


@pytest.mark.parametrize("blob", [
    b"",
    b"garbage" * 100,
    b'[0.1, 0.2, 0.3]',  # JSON, as LangChain stores it
    codec.encode(np.ones(8, np.float32), 1)[:-1],  # truncated
    codec.encode(np.ones(16, np.float32), 1),  # wrong dims
    b"EP\x09\x01" + bytes(8 + 32),  # future version
    codec.encode(np.array([1, np.nan] + [0] * 6, np.float32), 1),  # NaN
    codec.encode(np.array([np.inf] + [0] * 7, np.float32), 1),
])
def test_corrupt_values_are_rejected(blob: bytes) -> None:
    good = codec.encode(np.ones(8, np.float32), 5)
    decoded, bad = codec.decode_many([good, blob, good], 8)
    assert bad == [1]
    assert decoded.positions == [0, 2]
    assert decoded.vectors.shape == (2, 8)


def test_encode_many_matches_encode() -> None:
    arr = np.random.default_rng(1).standard_normal((5, 12)).astype(np.float32)
    tokens = [1, 2, 3, 4, 5]
    assert codec.encode_many(arr, tokens) == [codec.encode(r, t) for r, t in zip(arr, tokens, strict=True)]


# ------------------------------------------------------------------------ compact types (version 2)

@pytest.mark.parametrize(("dtype", "size"), [("float32", 4 * 384 + 12), ("int8", 384 + 16), ("uint8", 384 + 16),
                                             ("binary", 48 + 12), ("ubinary", 48 + 12)])
def test_value_sizes(dtype: str, size: int) -> None:
    assert codec.value_size(384, dtype) == size  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
@pytest.mark.parametrize("d", [384, 13])
def test_compact_roundtrip(dtype: str, d: int) -> None:
    v = np.random.default_rng(4).standard_normal((3, d)).astype(np.float32)
    q = quantize(v, dtype)  # type: ignore[arg-type]
    blobs = codec.encode_quantized(q, [7, 8, 9])
    assert all(len(b) == codec.value_size(d, dtype) for b in blobs)  # type: ignore[arg-type]
    assert {codec.value_dtype(b) for b in blobs} == {dtype}
    decoded, bad = codec.decode_quantized_many(blobs, d, dtype)  # type: ignore[arg-type]
    assert bad == [] and decoded.positions == [0, 1, 2] and decoded.tokens == [7, 8, 9]
    np.testing.assert_array_equal(decoded.vectors.values, q.values)
    np.testing.assert_array_equal(decoded.vectors.scales, q.scales)


def test_version_1_values_still_decode_and_float_stays_version_1() -> None:
    old = b"EP\x01\x01" + (4).to_bytes(4, "little") + (3).to_bytes(4, "little") + np.ones(4, "<f4").tobytes()
    assert codec.encode(np.ones(4, np.float32), 3) == old  # float32 writes exactly what version 1 wrote
    decoded, bad = codec.decode_many([old], 4)
    assert bad == [] and decoded.tokens == [3] and codec.value_dtype(old) == "float32"


def test_a_value_of_another_type_is_corrupt_for_the_key() -> None:
    v = np.random.default_rng(5).standard_normal((1, 16)).astype(np.float32)
    int8 = codec.encode_quantized(quantize(v, "int8"), [1])[0]
    bits = codec.encode_quantized(quantize(v, "binary"), [1])[0]
    flt = codec.encode(v[0], 1)
    assert codec.decode_quantized_many([flt, bits, int8], 16, "int8")[1] == [0, 1]
    assert codec.decode_many([int8, flt], 16)[1] == [0]
    assert codec.decode_quantized_many([bits], 16, "ubinary")[1] == [0]  # binary and ubinary are told apart


def _with_scale(blob: bytes, scale: float) -> bytes:
    import struct

    return blob[:codec.HEADER_SIZE] + struct.pack("<f", scale) + blob[codec.HEADER_SIZE + 4:]


@pytest.mark.parametrize("damage", ["truncated", "nan_scale", "zero_scale", "wrong_dims", "padding_bits", "empty"])
def test_corrupt_compact_values_are_rejected(damage: str) -> None:
    v = np.random.default_rng(6).standard_normal((1, 12)).astype(np.float32)
    dtype = "ubinary" if damage == "padding_bits" else "int8"
    good = codec.encode_quantized(quantize(v, dtype), [2])[0]  # type: ignore[arg-type]
    blob = {"truncated": good[:-1], "nan_scale": _with_scale(good, float("nan")),
            "zero_scale": _with_scale(good, 0.0), "empty": b"",
            "wrong_dims": codec.encode_quantized(quantize(np.ones((1, 16), np.float32), "int8"), [2])[0],
            "padding_bits": good[:-1] + bytes([good[-1] | 0x01])}[damage]
    decoded, bad = codec.decode_quantized_many([good, blob, good], 12, dtype)  # type: ignore[arg-type]
    assert bad == [1] and decoded.positions == [0, 2] and len(decoded.vectors) == 2
