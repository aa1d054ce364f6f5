"""embedpipe: production embedding for RAG apps — cache, dedupe, batch, rate-limit, retry, cost.

>>> from embedpipe import EmbeddingPipeline
>>> with EmbeddingPipeline("fake:8", cache="memory://") as pipe:
...     len(pipe.embed(["a", "b", "a"]))
3
"""

from __future__ import annotations

from embedpipe.cache import CacheBackend, MemoryCache, SQLiteCache, cache_from_url
from embedpipe.config import PipelineConfig
from embedpipe.cost import Estimate
from embedpipe.errors import (
    BudgetExceededError,
    DimensionMismatchError,
    EmbeddingFailedError,
    EmbedPipeError,
    Failure,
    InvalidInputError,
    PipelineClosedError,
)
from embedpipe.inputs import Audio, Image, Input, Item
from embedpipe.pipeline import EmbeddingArray, EmbeddingPipeline, EmbeddingResult
from embedpipe.providers import Provider, ProviderInfo, provider_from_spec
from embedpipe.stats import Stats

__version__ = "0.1.0"

__all__ = [
    "Audio",
    "BudgetExceededError",
    "CacheBackend",
    "DimensionMismatchError",
    "EmbedPipeError",
    "EmbeddingArray",
    "EmbeddingFailedError",
    "EmbeddingPipeline",
    "EmbeddingResult",
    "Estimate",
    "Failure",
    "Image",
    "Input",
    "InvalidInputError",
    "Item",
    "MemoryCache",
    "PipelineClosedError",
    "PipelineConfig",
    "Provider",
    "ProviderInfo",
    "SQLiteCache",
    "Stats",
    "cache_from_url",
    "provider_from_spec",
    "__version__",
]
