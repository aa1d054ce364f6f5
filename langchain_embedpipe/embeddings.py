"""``EmbedPipeEmbeddings``: LangChain ``Embeddings`` whose every call goes through embedpipe."""

from __future__ import annotations

from typing import Any

from langchain_core.embeddings import DeterministicFakeEmbedding, Embeddings, FakeEmbeddings
from langchain_core.stores import ByteStore

from embedpipe import EmbeddingPipeline, Provider, Stats
from embedpipe.errors import ConfigurationError
from embedpipe.inputs import as_image
from embedpipe.providers.framework import FrameworkProvider
from langchain_embedpipe.store_cache import ByteStoreCache, KeyEncoder, ValueFormat


def wrap(underlying: Embeddings, *, warn_unnamed: bool = True) -> FrameworkProvider:
    """The core's provider over a LangChain ``Embeddings``, awaiting its own async methods where it has them.

    The core recognises ``OpenAIEmbeddings`` and ``AzureOpenAIEmbeddings`` (price, input
    limit, tokenizer, dimensions); LangChain's fake models state their size here.
    """
    cls = type(underlying)
    # Embeddings' default aembed_* run the blocking method in an executor: leave those to
    # the core's worker thread and await only the methods the class implements itself.
    own_adocs = cls.aembed_documents is not Embeddings.aembed_documents
    own_aquery = cls.aembed_query is not Embeddings.aembed_query
    provider = FrameworkProvider(
        underlying, framework="langchain",
        embed_documents=underlying.embed_documents, embed_query=underlying.embed_query,
        aembed_documents=underlying.aembed_documents if own_adocs else None,
        aembed_query=underlying.aembed_query if own_aquery else None,
        warn_unnamed=warn_unnamed)
    if provider.dimensions is None and isinstance(underlying, (DeterministicFakeEmbedding, FakeEmbeddings)):
        provider.dimensions = underlying.size
    return provider


class EmbedPipeEmbeddings(Embeddings):
    """LangChain ``Embeddings`` with embedpipe's cache, dedupe, batching, rate limits, retries and cost tracking.

    Wrap any LangChain model, ``EmbedPipeEmbeddings(OpenAIEmbeddings(), cache="sqlite:///emb.db")``,
    or name a core model, ``EmbedPipeEmbeddings(model="openai:text-embedding-3-small")``.
    Every other keyword is an :class:`~embedpipe.EmbeddingPipeline` option: ``cache``,
    ``dimensions``, ``rpm``, ``tpm``, ``max_concurrency``, ``budget_usd``, ``max_retries``...

    Queries are cached like documents (``cache_queries=False`` turns that off). A wrapped
    model's own retries are switched off, so they never stack on embedpipe's; so is
    ``OpenAIEmbeddings``' own length check, since embedpipe splits long texts itself
    (offline: its tokenizer ships with it, where LangChain's downloads one). To keep
    using a store that ``CacheBackedEmbeddings`` filled, see :meth:`from_bytes_store`.
    """

    def __init__(self, underlying: Embeddings | str | Provider | None = None, *,
                 model: str | Provider | None = None, cache_queries: bool = True, **options: Any) -> None:
        if isinstance(underlying, (str, Provider)) and model is None:
            underlying, model = None, underlying
        if (underlying is None) == (model is None):
            raise ConfigurationError("pass either a LangChain Embeddings to wrap or model='provider:name', "
                                     "exactly one of them")
        if options.get("errors", "raise") != "raise":
            raise ConfigurationError("LangChain's Embeddings return a vector for every text, so errors='raise'; "
                                     "use embedpipe.EmbeddingPipeline(errors='collect') to collect failures")
        if underlying is not None:
            if isinstance(underlying, EmbedPipeEmbeddings):
                raise ConfigurationError("this model already embeds through embedpipe; pass options to it instead")
            if not isinstance(underlying, Embeddings):
                raise ConfigurationError(f"underlying must be a LangChain Embeddings, not {type(underlying).__name__};"
                                         " use model='provider:name' for a core model")
            # No warning about a nameless model where nothing keys the cache by its name.
            keyed_elsewhere = "cache" in options and (options["cache"] is None
                                                      or isinstance(options["cache"], ByteStoreCache))
            model = wrap(underlying, warn_unnamed=not (options.get("namespace") or keyed_elsewhere))
        assert model is not None
        self.pipeline = EmbeddingPipeline(model, cache_queries=cache_queries, **options)
        cache = self.pipeline.cache
        if isinstance(cache, ByteStoreCache) and cache.count_tokens is None:
            # JSON entries CacheBackedEmbeddings wrote carry no token count: count as the model does.
            cache.count_tokens = self.pipeline.provider.tokenizer.count

    @classmethod
    def from_bytes_store(cls, underlying_embeddings: Embeddings, document_embedding_cache: ByteStore, *,
                         namespace: str = "", batch_size: int | None = None,
                         query_embedding_cache: bool | ByteStore = False, key_encoder: KeyEncoder = "sha1",
                         value_format: ValueFormat = "embedpipe", **options: Any) -> EmbedPipeEmbeddings:
        """A drop-in for ``CacheBackedEmbeddings.from_bytes_store``: same arguments, same store keys.

        A store ``CacheBackedEmbeddings`` filled (same ``namespace`` and ``key_encoder``) is
        read without calling the model; a stored vector is used only when its length is the
        model's dimensions. ``query_embedding_cache``: ``False`` leaves queries uncached,
        ``True`` caches them in the document store under the same keys, a ``ByteStore``
        holds them apart. ``batch_size``, as in LangChain, bounds the texts embedded between
        store writes: requests hold at most that many texts, and are never made larger than
        the model's own batch size for it. ``value_format``: see :class:`ByteStoreCache`
        (``"embedpipe"`` compact, the default; ``"langchain"`` JSON, for two-way use).
        Other keywords are :class:`~embedpipe.EmbeddingPipeline` options (``rpm``, ``tpm``...).
        """
        if "cache" in options or "cache_queries" in options:
            raise ConfigurationError("from_bytes_store caches in document_embedding_cache and, as "
                                     "query_embedding_cache says, queries; pass no cache= or cache_queries=")
        cache = ByteStoreCache(
            document_embedding_cache, namespace=namespace, key_encoder=key_encoder, value_format=value_format,
            query_store=None if isinstance(query_embedding_cache, bool) else query_embedding_cache)
        if batch_size is not None:
            options["batch_size"] = min(batch_size, FrameworkProvider.info.batch_size)
        return cls(underlying_embeddings, cache=cache, cache_queries=query_embedding_cache is not False, **options)

    # ------------------------------------------------------------------ LangChain's methods
    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Embed documents: cached texts are read, duplicates embedded once, the rest batched."""
        return self.pipeline.embed(texts)

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        """Async twin of :meth:`embed_documents`; batches run concurrently."""
        return await self.pipeline.aembed(texts)

    def embed_query(self, text: str) -> list[float]:
        """Embed a query (cached unless ``cache_queries=False``)."""
        return self.pipeline.embed_query(text)

    async def aembed_query(self, text: str) -> list[float]:
        """Async twin of :meth:`embed_query`."""
        return await self.pipeline.aembed_query(text)

    def embed_image(self, uris: list[str]) -> list[list[float]]:
        """Embed the images at ``uris`` (file paths), as ``OpenCLIPEmbeddings.embed_image`` does, through the
        same cache and batches: for text-to-image search with a model that embeds both (``local-clip:...``)."""
        return self.pipeline.embed([as_image(uri) for uri in uris])

    async def aembed_image(self, uris: list[str]) -> list[list[float]]:
        """Async twin of :meth:`embed_image`."""
        return await self.pipeline.aembed([as_image(uri) for uri in uris])

    # ------------------------------------------------------------------ embedpipe's side
    @property
    def model(self) -> str:
        """The core's ``provider:model`` spec (``langchain:<model>`` for a wrapped model)."""
        return self.pipeline.provider.spec

    @property
    def stats(self) -> Stats:
        """The core's counters: hits, misses, deduped, requests, tokens, cost_usd, saved_usd, retries..."""
        return self.pipeline.stats

    def close(self) -> None:
        """Release what the pipeline opened (cache connections, a provider built from a spec). Optional."""
        self.pipeline.close()

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        await self.pipeline.aclose()

    def __enter__(self) -> EmbedPipeEmbeddings:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EmbedPipeEmbeddings:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"EmbedPipeEmbeddings({self.pipeline!r})"

