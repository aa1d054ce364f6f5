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


@dataclass(frozen=True)
class Price:
    """USD per million input tokens of one hosted model, with where and when it was read."""

    usd_per_1m_tokens: float
    source: str
    as_of: str


_COHERE = "https://cohere.com/pricing"
_VOYAGE = "https://docs.voyageai.com/docs/pricing"
_GEMINI = "https://ai.google.dev/gemini-api/docs/pricing"
_BEDROCK = "https://aws.amazon.com/bedrock/pricing/"
_OPENAI = "https://openai.com/api/pricing"

#: provider -> model -> price. A model missing here has an unknown price (``None``), never $0.
#: Azure OpenAI bills the OpenAI models at OpenAI's list prices (the deployment's model decides).
PRICES: dict[str, dict[str, Price]] = {
    "openai": {m: Price(i.price_per_1m_tokens, _OPENAI, "2026-11-23") for m, i in OPENAI_MODELS.items()},
    "cohere": {
        "embed-v4.0": Price(0.12, _COHERE, "2026-12-02"),
        "embed-english-v3.0": Price(0.10, _COHERE, "2026-12-02"),
        "embed-multilingual-v3.0": Price(0.10, _COHERE, "2026-12-02"),
        "embed-english-light-v3.0": Price(0.10, _COHERE, "2026-12-02"),
        "embed-multilingual-light-v3.0": Price(0.10, _COHERE, "2026-12-02"),
    },
    "voyage": {
        "voyage-4-large": Price(0.12, _VOYAGE, "2026-12-02"),
        "voyage-4": Price(0.06, _VOYAGE, "2026-12-02"),
        "voyage-4-lite": Price(0.02, _VOYAGE, "2026-12-02"),
        "voyage-3.5": Price(0.06, _VOYAGE, "2026-12-02"),
        "voyage-3.5-lite": Price(0.02, _VOYAGE, "2026-12-02"),
        "voyage-3-large": Price(0.18, _VOYAGE, "2026-12-02"),
        "voyage-code-3": Price(0.18, _VOYAGE, "2026-12-02"),
        "voyage-finance-2": Price(0.12, _VOYAGE, "2026-12-02"),
        "voyage-law-2": Price(0.12, _VOYAGE, "2026-12-02"),
        "voyage-multilingual-2": Price(0.12, _VOYAGE, "2026-12-02"),
    },
    # Gemini API paid tier, standard (not batch) requests.
    "gemini": {
        "gemini-embedding-001": Price(0.15, _GEMINI, "2026-12-02"),
    },
    # On-demand, us-east-1: Titan v2 $0.00002 and Cohere Embed $0.0001 per 1,000 input tokens.
    "bedrock": {
        "amazon.titan-embed-text-v2:0": Price(0.02, _BEDROCK, "2026-12-02"),
        "cohere.embed-english-v3": Price(0.10, _BEDROCK, "2026-12-02"),
        "cohere.embed-multilingual-v3": Price(0.10, _BEDROCK, "2026-12-02"),
    },
}


#: provider -> the share of the list price its Batch API bills, and the completion window asked for.
#: OpenAI's Batch API bills half, within 24 hours (https://platform.openai.com/docs/guides/batch,
#: as of 2026-12-02); Azure OpenAI's global batch deployments the same ("50% less cost than global
#: standard", https://learn.microsoft.com/azure/ai-foundry/openai/how-to/batch, as of 2026-12-02).
#: Voyage's batch endpoint bills a third less, but its SDK (voyageai 0.5) has no client for it: not here.
BATCH_DISCOUNTS: dict[str, float] = {"openai": 0.5, "azure": 0.5}
BATCH_COMPLETION_WINDOW = "24h"


def batch_price_of(provider: str, price_per_1m_tokens: float | None) -> float | None:
    """USD per million tokens through ``provider``'s Batch API; ``None`` without one or without a price."""
    discount = BATCH_DISCOUNTS.get(provider)
    if discount is None or price_per_1m_tokens is None:
        return None
    return price_per_1m_tokens * discount


def price_of(provider: str, model: str) -> float | None:
    """USD per million input tokens of ``provider``'s ``model``; ``None`` when no table knows it."""
    price = PRICES.get(provider, {}).get(model)
    return price.usd_per_1m_tokens if price is not None else None


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
    #: seconds of audio to transcribe (recordings without a cached transcript); their cost is in ``cost_usd``,
    #: their transcripts' tokens are not known until heard, so not in ``tokens``
    audio_seconds: float = 0.0

    @property
    def cached_share(self) -> float:
        """Share of distinct texts already cached."""
        return self.cached / self.unique if self.unique else 1.0
