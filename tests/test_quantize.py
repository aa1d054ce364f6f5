"""Compact output types: quantizing, the providers' native integers, and scoring them back."""

from __future__ import annotations

import numpy as np
import pytest

from embedpipe.errors import ConfigurationError, InvalidResponseError
from embedpipe.quantize import (
    check_output_dtype,
    concat,
    dequantize,
    from_native,
    hamming_distances,
    quantize,
)


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_int8_keeps_a_per_vector_scale_and_the_cosine() -> None:
    v = unit(50, 384) * np.linspace(0.1, 10, 50, dtype=np.float32)[:, None]  # very different magnitudes
    q = quantize(v, "int8")
    assert q.values.dtype == np.int8 and q.values.shape == (50, 384) and q.scales.shape == (50,)
    assert np.abs(q.values).max() == 127  # each vector uses the full range whatever its magnitude
    back = dequantize(q)
    np.testing.assert_allclose(back, v, atol=float(q.scales.max()) / 2 + 1e-6)
    cos = (back * v).sum(1) / np.linalg.norm(back, axis=1) / np.linalg.norm(v, axis=1)
    assert cos.min() > 0.999


def test_uint8_is_int8_offset_by_128_with_the_same_scale() -> None:
    v = unit(4, 16, 1)
    i8, u8 = quantize(v, "int8"), quantize(v, "uint8")
    np.testing.assert_array_equal(u8.values.astype(np.int16) - 128, i8.values)
    np.testing.assert_array_equal(u8.scales, i8.scales)
    np.testing.assert_allclose(dequantize(u8), dequantize(i8))


def test_zero_vector_quantizes_to_zeros() -> None:
    q = quantize(np.zeros((1, 8), np.float32), "int8")
    assert q.scales[0] == 1.0 and not q.values.any()


@pytest.mark.parametrize("d", [8, 12, 384])
def test_binary_packs_signs_and_scores_like_the_sign_vectors(d: int) -> None:
    v = unit(6, d, 2)
    q = quantize(v, "ubinary")
    assert q.values.shape == (6, (d + 7) // 8)
    signs = np.where(v > 0, 1.0, -1.0)
    np.testing.assert_array_equal(dequantize(q), signs)
    ham = hamming_distances(q.take([0]), q)
    np.testing.assert_array_equal(d - 2 * ham[0], signs @ signs[0])  # Hamming ranks like the ±1 dot product
    assert ham[0, 0] == 0


def test_binary_lists_signed_bytes_by_offset() -> None:
    v = unit(2, 16, 3)
    b, ub = quantize(v, "binary"), quantize(v, "ubinary")
    np.testing.assert_array_equal(b.values, ub.values)  # same bits
    assert b.tolist() == [[x - 128 for x in row] for row in ub.tolist()]
    assert from_native("binary", b.tolist()).values.tolist() == ub.values.tolist()


def test_native_values_are_checked() -> None:
    assert from_native("int8", [[-128, 0, 127]]).values.dtype == np.int8
    with pytest.raises(InvalidResponseError, match="out of"):
        from_native("int8", [[200]])
    with pytest.raises(InvalidResponseError, match="out of"):
        from_native("ubinary", [[-1]])
    with pytest.raises(InvalidResponseError, match=r"integers|shape"):
        from_native("uint8", [[1, 2], [3]])
    with pytest.raises(InvalidResponseError, match="expected 16"):
        from_native("int8", [[1, 2, 3]], dimensions=16)
    with pytest.raises(InvalidResponseError, match="cannot hold"):
        from_native("ubinary", [[1, 2]], dimensions=24)


def test_dtype_option_is_checked_and_arrays_join() -> None:
    with pytest.raises(ConfigurationError, match="output_dtype='int4'"):
        check_output_dtype("int4")
    a, b = quantize(unit(2, 8), "int8"), quantize(unit(3, 8, 1), "int8")
    joined = concat([a, b])
    assert len(joined) == 5 and joined.take([4]).values.tolist() == b.take([2]).values.tolist()
    with pytest.raises(ValueError, match="cannot join"):
        concat([a, quantize(unit(1, 8), "binary")])
