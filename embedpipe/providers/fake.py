"""Deterministic vectors from a hash of the text: for tests and dry runs, no model needed."""

from __future__ import annotations

import hashlib

import numpy as np

from embedpipe.providers.base import BatchResult, Provider, ProviderInfo, Role


def fake_vector(text: str, dimensions: int) -> np.ndarray:
    """The unit vector ``fake:<dimensions>`` gives ``text``: seeded by SHA-256 of the text."""
    seed = int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "little")
    v = np.random.default_rng(seed).standard_normal(dimensions).astype(np.float32)
    v /= np.linalg.norm(v)
    return v


class FakeProvider(Provider):
    """``fake:<dims>``: free, instant and deterministic; counts tokens with cl100k_base."""

    name = "fake"
    info = ProviderInfo(batch_size=512, default_concurrency=4, price_per_1m_units=0.0)

    def __init__(self, dimensions: int = 384, *, max_input_tokens: int | None = None) -> None:
        if dimensions < 1:
            raise ValueError(f"fake provider dimensions must be positive, got {dimensions}")
        super().__init__(str(dimensions), info=ProviderInfo(
            batch_size=512, default_concurrency=4, price_per_1m_units=0.0, dimensions=dimensions,
            max_input_tokens=max_input_tokens))
        self.native_dimensions = dimensions

    async def aembed_batch(self, texts: list[str], role: Role) -> BatchResult:
        # No I/O: computing inline is cheaper than a worker thread.
        vectors = np.stack([fake_vector(t, self.native_dimensions) for t in texts])
        return BatchResult(vectors, tokens=sum(self.tokenizer.count(texts)))
