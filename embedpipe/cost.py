"""Per-model facts (dims, input limit, price, tokenizer) and cost estimates."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInfo:
    """What embedpipe knows of a hosted embedding model."""

    dimensions: int
    max_input_tokens: int
    price_per_1m_tokens: float
    encoding: str
    matryoshka: bool


# OpenAI embedding models. Prices in USD per 1M input tokens and limits from OpenAI's
# pricing page and embeddings guide (https://openai.com/api/pricing,
# https://platform.openai.com/docs/guides/embeddings), as of 2026-11-23.
OPENAI_MODELS: dict[str, ModelInfo] = {
    "text-embedding-3-small": ModelInfo(1536, 8191, 0.02, "cl100k_base", True),
    "text-embedding-3-large": ModelInfo(3072, 8191, 0.13, "cl100k_base", True),
    "text-embedding-ada-002": ModelInfo(1536, 8191, 0.10, "cl100k_base", False),
}


def cost_of(tokens: int, price_per_1m_tokens: float | None) -> float | None:
    """USD for ``tokens`` at a price per million; ``None`` when the price is unknown."""
    if price_per_1m_tokens is None:
        return None
    return tokens * price_per_1m_tokens / 1_000_000


@dataclass(frozen=True)
class Estimate:
    """What embedding some texts will cost, computed without any API call."""

    texts: int                 #: inputs given
    unique: int                #: distinct valid texts
    cached: int                #: distinct texts already in the cache
    tokens: int                #: tokens to embed (uncached texts only)
    cost_usd: float | None     #: cost of those tokens; None when the price is unknown
    requests: int              #: provider requests needed
    eta_seconds: float | None  #: lower bound at the configured rpm/tpm; None without limits
    invalid: int = 0           #: inputs that would fail validation

    @property
    def cached_share(self) -> float:
        """Share of distinct texts already cached."""
        return self.cached / self.unique if self.unique else 1.0
