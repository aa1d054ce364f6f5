"""The value codec: compact, self-describing, and never trusting what it reads."""

from __future__ import annotations

import numpy as np
import pytest

from embedpipe import codec


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
