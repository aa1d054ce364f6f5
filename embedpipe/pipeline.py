"""The public facade: :class:`EmbeddingPipeline` holds configuration, the sync/async entry points and
the lifecycle. The work is done by :mod:`embedpipe.engine`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import numpy as np

from embedpipe import _runner, codec
from embedpipe._signature import check_keywords
from embedpipe.cache import CacheBackend, default_cache_url, resolve_cache
from embedpipe.config import DEFAULT_CACHE, PipelineConfig
from embedpipe.cost import Estimate
from embedpipe.engine.audio import AudioStage, Window, windows_of
from embedpipe.engine.budget import Budget
from embedpipe.engine.core import Engine
from embedpipe.engine.planning import Errors, OnLongInput
from embedpipe.engine.results import EmbeddingArray, EmbeddingResult, as_array, as_lists
from embedpipe.errors import ConfigurationError, InputTypeError, PipelineClosedError
from embedpipe.events import Hook, Hooks
from embedpipe.inputs import Audio, Input
from embedpipe.providers import Provider, Role, provider_from_spec
from embedpipe.quantize import QuantizedArray
from embedpipe.stats import Stats
from embedpipe.transcribers import Segment, Transcriber, transcriber_from

_DEFAULT: Any = object()


log = logging.getLogger("embedpipe")


class EmbeddingPipeline:
    """Embed inputs once: dedupe, cache by content hash, batch, rate-limit, retry, account for cost.

    ``model`` is a spec ``provider:name`` (``local:all-MiniLM-L6-v2``, ``fake:384``,
    ``openai:text-embedding-3-small``) or a :class:`~embedpipe.providers.Provider`.
    ``cache`` is a URL (``memory://``, ``sqlite:///path.db``, ``redis://host:6379/0``),
    a backend object, or ``None``; by default ``$EMBEDPIPE_CACHE`` or a SQLite file in
    the user's cache directory. ``cache_queries=False`` leaves queries uncached.
    ``hooks`` are callables that receive every :mod:`embedpipe.events` event.
    ``max_retries`` bounds retries of errors; 429s instead retry until their waits add up to
    ``max_rate_limit_wait`` seconds (``None``: 429s count as retries). ``precision`` is the local
    model's (``"fp32"``, ``"fp16"``/``"bf16"`` on CUDA, gated ``"int8"`` on the CPU; see README).
    Every option is kept in ``.config``, a :class:`~embedpipe.PipelineConfig`.
    """

    @check_keywords
    def __init__(self, model: str | Provider = "local:all-MiniLM-L6-v2", *, dimensions: int | None = None,
                 cache: str | CacheBackend | None = _DEFAULT, namespace: str | None = None,
                 batch_size: int | None = None, max_concurrency: int | None = None, rpm: int | None = None,
                 tpm: int | None = None, rate_limiter: Any = None, max_retries: int = 6,
                 max_rate_limit_wait: float | None = 300.0, timeout: float | None = 60.0,
                 max_batch_tokens: int | None = None,
                 on_long_input: OnLongInput = "split", budget_usd: float | None = None,
                 price_per_1m_tokens: float | None = None, api_key: str | None = None, base_url: str | None = None,
                 errors: Errors = "raise", cache_queries: bool = True, retry_wait: Any = None,
                 sleep: Callable[[float], Awaitable[None]] | None = None, hooks: Iterable[Hook] = (),
                 credentials: str | None = None, provider_options: dict[str, Any] | None = None,
                 precision: str | None = None, audio_to_text: Any = None, audio_window_s: float = 30.0,
                 output_dtype: str = "float32") -> None:
        config = PipelineConfig(
            model=model, dimensions=dimensions, cache=DEFAULT_CACHE if cache is _DEFAULT else cache,
            namespace=namespace, batch_size=batch_size, max_concurrency=max_concurrency, rpm=rpm, tpm=tpm,
            rate_limiter=rate_limiter, max_retries=max_retries, max_rate_limit_wait=max_rate_limit_wait,
            timeout=timeout, max_batch_tokens=max_batch_tokens,
            on_long_input=on_long_input, budget_usd=budget_usd, price_per_1m_tokens=price_per_1m_tokens,
            base_url=base_url, errors=errors, cache_queries=cache_queries, credentials=credentials,
            provider_options={**(provider_options or {}), **({"precision": precision} if precision else {})},
            hooks=tuple(hooks), retry_wait=retry_wait, sleep=sleep, audio_to_text=audio_to_text,
            audio_window_s=audio_window_s, output_dtype=output_dtype)
        self._setup(config, api_key)

    @classmethod
    def from_config(cls, config: PipelineConfig, *, api_key: str | None = None) -> EmbeddingPipeline:
        """The pipeline ``config`` describes (``PipelineConfig.build`` calls this)."""
        self = cls.__new__(cls)
        self._setup(config, api_key)
        return self

    def _setup(self, config: PipelineConfig, api_key: str | None) -> None:
        self.config = config
        #: kept only when passed explicitly, for pickling into worker processes
        self._api_key = api_key
        if isinstance(config.model, Provider):
            provider = config.model
        else:
            key = api_key or config.secret("api_key")
            opts: dict[str, Any] = {"dimensions": config.dimensions, "api_key": key, "base_url": config.base_url,
                                    "timeout": config.timeout, **config.provider_options}
            if config.output_dtype != "float32":
                opts["output_dtype"] = config.output_dtype  # the providers that return it natively ask for it
            provider = provider_from_spec(config.model, **{k: v for k, v in opts.items() if v is not None})
        self.provider = provider
        info = provider.info
        if config.dimensions is not None and info.dimensions is not None and config.dimensions > info.dimensions \
                and not info.handles_dimensions:
            raise ConfigurationError(f"dimensions={config.dimensions} is larger than {provider.spec}'s "
                                     f"{info.dimensions}")
        cache_arg = config.resolved_url("cache")
        if cache_arg == DEFAULT_CACHE:
            cache_arg = default_cache_url()
            if cache_arg.strip().lower() in ("", "none", "off"):  # EMBEDPIPE_CACHE=none disables it
                cache_arg = None
        self.cache = resolve_cache(cache_arg)
        price = config.price_per_1m_tokens if config.price_per_1m_tokens is not None else provider.price_per_1m_tokens
        if config.budget_usd is not None and price is None:
            raise ConfigurationError(
                f"budget_usd is set but the price of {provider.spec!r} is unknown; "
                "pass price_per_1m_tokens=... so the budget can be enforced")
        from embedpipe.limits import MemoryRateLimiter, rate_limiter_from

        # Without rpm/tpm a budget-less limiter still shares 429 cooldowns between requests.
        limiter_arg = config.resolved_url("rate_limiter")
        self.rate_limiter = rate_limiter_from(limiter_arg, rpm=config.rpm, tpm=config.tpm) or MemoryRateLimiter()
        #: the speech-to-text model Audio inputs go through (``audio_to_text``), or None
        self.transcriber: Transcriber | None = None
        audio = None
        if config.audio_to_text is not None:
            self.transcriber = transcriber_from(
                config.audio_to_text, **({"api_key": api_key or config.secret("api_key"), "base_url": config.base_url}
                                         if str(config.audio_to_text).startswith("openai:") else {}))
            audio = AudioStage(self.transcriber, self.cache, window_seconds=config.audio_window_s)
        namespace = config.namespace if config.namespace is not None else (self.cache.namespace if self.cache else None)
        native = config.output_dtype in getattr(provider, "native_output_dtypes", frozenset())
        self._engine = Engine(
            provider=provider, cache=self.cache, limiter=self.rate_limiter, budget=Budget(config.budget_usd, price),
            hooks=Hooks(config.hooks), dimensions=config.dimensions, namespace=namespace,
            batch_size=_batch_size(config.batch_size, info, provider.spec),
            max_batch_tokens=config.max_batch_tokens or info.max_batch_tokens,
            max_concurrency=config.max_concurrency or info.default_concurrency, max_retries=config.max_retries,
            concurrency_given=config.max_concurrency is not None,
            retry_wait=config.retry_wait, sleep=config.sleep, on_long_input=config.on_long_input,  # type: ignore[arg-type]
            errors=config.errors, cache_queries=config.cache_queries, price_per_1m=price,  # type: ignore[arg-type]
            max_rate_limit_wait=config.max_rate_limit_wait, audio=audio,
            value_format=codec.ValueFormat(config.output_dtype, native=native))  # type: ignore[arg-type]
        self._closed = False
        # Close only what this pipeline built from a spec or URL: objects passed in belong
        # to the caller, who may share them between pipelines.
        self._owned = [r for r, arg in ((provider, config.model), (self.cache, config.cache),
                                        (self.rate_limiter, config.rate_limiter),
                                        (self.transcriber, config.audio_to_text)) if r is not None and r is not arg]
        self._finalizer = weakref.finalize(self, _release, False, *self._owned)

    # ------------------------------------------------------------------ configuration, read back
    dimensions = property(lambda self: self.config.dimensions, doc="Matryoshka dimensions asked for, or None.")
    errors = property(lambda self: self._engine.errors, doc="'raise' or 'collect'.")
    budget_usd = property(lambda self: self.config.budget_usd, doc="The spend limit, or None.")
    price_per_1m_tokens = property(lambda self: self._engine.price, doc="USD per 1M tokens; None when unknown.")
    namespace = property(lambda self: self._engine.namespace, doc="The namespace that names the vector space.")
    max_concurrency = property(lambda self: self._engine.max_concurrency, doc="Requests in flight at once.")
    max_batch_tokens = property(lambda self: self._engine.max_batch_tokens, doc="Most tokens in one request.")
    hooks = property(lambda self: self._engine.hooks, doc="The subscribers (:class:`~embedpipe.events.Hooks`).")

    @property
    def batch_size(self) -> int:
        """Most inputs in one request."""
        return self._engine.batch_size

    @batch_size.setter
    def batch_size(self, value: int) -> None:
        self._engine.batch_size = value

    @property
    def max_tokens_in_flight(self) -> int | None:
        """Under rpm/tpm, the most tokens in flight at once, whatever the rates: what a crash may re-bill
        at most (``None``, the default: about token rate x latency; a job sets 1.5% of its size). Without
        rate limits, ``max_concurrency`` requests of moderate size are in flight and this is not used."""
        return self._engine.max_tokens_in_flight

    @max_tokens_in_flight.setter
    def max_tokens_in_flight(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigurationError(f"max_tokens_in_flight must be a positive integer or None, got {value!r}")
        self._engine.max_tokens_in_flight = value

    @property
    def expected_dims(self) -> int | None:
        """The length every returned vector has (``None`` until a provider reports it)."""
        return self._engine.expected_dims

    @property
    def stats(self) -> Stats:
        """A snapshot of the running total: the sum of every finished call's ``result.stats``."""
        return self._engine.total.snapshot()

    @property
    def spent_usd(self) -> float:
        """USD spent by this pipeline so far (from provider usage)."""
        return self._engine.budget.spent_usd

    def key_material(self, role: Role = "document") -> bytes:
        """The cache-key material naming this pipeline's vector space (see :func:`embedpipe.keys.key_material`)."""
        return self._engine.material(role)

    # ------------------------------------------------------------------ public API
    def embed(self, texts: Sequence[Input], *, errors: Errors | None = None) -> EmbeddingResult:
        """Embed documents; the vectors come back as lists, in the order of ``texts``.

        ``errors`` overrides the pipeline's ``errors`` option for this call.
        """
        self._open()
        return as_lists(*self._engine.run_sync(texts, "document", errors))

    async def aembed(self, texts: Sequence[Input], *, errors: Errors | None = None) -> EmbeddingResult:
        """Async twin of :meth:`embed`."""
        self._open()
        return as_lists(*await _runner.run_async(self._engine.run_async(texts, "document", errors)))

    def embed_array(self, texts: Sequence[Input], *, role: Role = "document",
                    errors: Errors | None = None) -> EmbeddingArray:
        """Embed into an (n, d) float32 array, without building Python lists."""
        self._open()
        return as_array(*self._engine.run_sync(texts, role, errors))

    async def aembed_array(self, texts: Sequence[Input], *, role: Role = "document",
                           errors: Errors | None = None) -> EmbeddingArray:
        """Async twin of :meth:`embed_array`."""
        self._open()
        return as_array(*await _runner.run_async(self._engine.run_async(texts, role, errors)))

    def embed_query(self, text: Input) -> list[float]:
        """Embed one query (the role enters the cache key where the provider tells them apart)."""
        self._open()
        out, failures, _, _ = self._engine.run_sync(_one(text), "query")
        return None if failures else out[0].tolist()  # type: ignore[return-value]  # None: failed, errors="collect"

    async def aembed_query(self, text: Input) -> list[float]:
        """Async twin of :meth:`embed_query`."""
        self._open()
        out, failures, _, _ = await _runner.run_async(self._engine.run_async(_one(text), "query"))
        return None if failures else out[0].tolist()  # type: ignore[return-value]

    # ------------------------------------------------------------------ compact output types
    @property
    def value_format(self) -> codec.ValueFormat:
        """How this pipeline's vectors are stored: float32, or its compact ``output_dtype``."""
        return self._engine.value_format

    def embed_quantized(self, texts: Sequence[Input], *, role: Role = "document") -> QuantizedArray:
        """Embed into the pipeline's ``output_dtype``: int8/uint8 with a scale per vector, or packed sign bits.

        The provider's own integers where it returns the type natively (Cohere, Voyage, Bedrock),
        else embedpipe's quantization of the float vectors; cached compactly either way.
        ``embed``/``embed_array`` give the same vectors as float32 (dequantized). A failure raises.
        """
        if not self.value_format.compact:
            raise ConfigurationError("this pipeline's output_dtype is float32: use embed_array, or pass "
                                     "output_dtype='int8' (uint8, binary, ubinary)")
        return self.value_format.quantized(np.asarray(self.embed_array(texts, role=role, errors="raise")))

    async def aembed_quantized(self, texts: Sequence[Input], *, role: Role = "document") -> QuantizedArray:
        """Async twin of :meth:`embed_quantized`."""
        if not self.value_format.compact:
            raise ConfigurationError("this pipeline's output_dtype is float32: use aembed_array")
        arr = await self.aembed_array(texts, role=role, errors="raise")
        return self.value_format.quantized(np.asarray(arr))

    # ------------------------------------------------------------------ chunks of one document
    def embed_chunks(self, document: str, chunks: Sequence[str] | Sequence[tuple[int, int]], *,
                     mode: str = "late") -> np.ndarray:
        """Vectors of ``document``'s ``chunks`` (their texts in order, or ``(start, end)`` spans): ``(n, d)``.

        ``mode="late"`` (local transformer models) runs the model over the whole document, in
        windows of its position limit with overlap, and mean-pools each chunk's tokens (Jina's
        late chunking), so each vector knows its context; cached per document and mode.
        ``mode="naive"`` embeds each chunk's text alone.
        """
        from embedpipe.late_chunking import embed_chunks

        self._open()
        return embed_chunks(self, document, chunks, mode=_mode(mode))

    async def aembed_chunks(self, document: str, chunks: Sequence[str] | Sequence[tuple[int, int]], *,
                            mode: str = "late") -> np.ndarray:
        """Async twin of :meth:`embed_chunks`."""
        from embedpipe.late_chunking import aembed_chunks

        self._open()
        return await aembed_chunks(self, document, chunks, mode=_mode(mode))

    def embed_chunks_many(self, documents: Sequence[tuple[str, Sequence[str] | Sequence[tuple[int, int]]]], *,
                          mode: str = "late") -> list[np.ndarray]:
        """:meth:`embed_chunks` for many ``(document, chunks)`` pairs; naive chunks share batched requests."""
        from embedpipe.late_chunking import chunk_spans, embed_chunks

        self._open()
        if _mode(mode) == "late":
            return [embed_chunks(self, doc, chunks, mode="late") for doc, chunks in documents]
        spans = [chunk_spans(doc, chunks) for doc, chunks in documents]
        flat = np.asarray(self.embed_array([doc[a:b] for (doc, _), sp in zip(documents, spans, strict=True)
                                            for a, b in sp]), dtype=np.float32)
        out, start = [], 0
        for sp in spans:
            out.append(flat[start:start + len(sp)])
            start += len(sp)
        return out

    def estimate(self, texts: Sequence[Input]) -> Estimate:
        """Tokens, cost, cached share, requests and ETA for ``texts``, with no provider call."""
        self._open()
        return self._engine.estimate(texts, self.config.rpm, self.config.tpm)

    def transcribe(self, audio: Audio) -> list[Segment]:
        """The timed segments of ``audio`` heard by ``audio_to_text`` (through the transcript cache)."""
        self._open()
        return list(self._engine.transcribe(audio).segments)

    def windows(self, audio: Audio) -> list[Window]:
        """The windows ``audio`` is embedded as (one chunk each, with ``start_s``/``end_s``)."""
        self._open()
        return windows_of(self._engine.transcribe(audio), self.config.audio_window_s)

    # ------------------------------------------------------------------ lifecycle
    def _open(self) -> None:
        if self._closed:
            raise PipelineClosedError("this EmbeddingPipeline is closed")

    def close(self) -> None:
        """Release the provider, cache connections and limiter. Idempotent."""
        if not self._closed:
            self._closed = True
            self._finalizer.detach()
            _release(True, *self._owned)

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        self.close()

    def __enter__(self) -> EmbeddingPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> EmbeddingPipeline:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __getstate__(self) -> dict[str, Any]:
        # Rebuilt from its config on unpickling: connections, loops and locks re-open in the new
        # process (LlamaIndex's num_workers pickles transforms). An API key travels only when it
        # was passed explicitly as api_key=; otherwise the new process reads its own environment.
        config = self.config
        if isinstance(config.model, Provider) or not isinstance(config.model, str):
            config = config.replace(model=self.provider)
        if config.cache is not None and not isinstance(config.cache, str):
            config = config.replace(cache=self.cache)
        if config.rate_limiter is not None and not isinstance(config.rate_limiter, str):
            raise TypeError("a pipeline with a rate_limiter object cannot be pickled; pass a URL instead")
        return {"config": config, "api_key": self._api_key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._setup(state["config"], state["api_key"])

    def __repr__(self) -> str:
        cache = type(self.cache).__name__ if self.cache else None
        return f"EmbeddingPipeline(model={self.provider.spec!r}, dimensions={self.dimensions}, cache={cache})"


def _batch_size(asked: int | None, info: Any, spec: str) -> int:
    """The inputs per request: what was asked, or the provider's; never above what its API accepts."""
    size = int(asked or info.batch_size)
    limit = info.max_batch_size
    if limit is not None and size > limit:
        log.warning("embedpipe: batch_size=%d is more than %s accepts in one request; using %d", size, spec, limit)
        size = limit
    return size


def _mode(mode: str) -> Any:
    if mode not in ("late", "naive"):
        raise ConfigurationError(f"mode={mode!r}: use 'late' or 'naive'")
    return mode


def _one(text: Input) -> list[Input]:
    if isinstance(text, (list, tuple)) or not (isinstance(text, str) or hasattr(text, "content_key")):
        raise InputTypeError(f"query must be a str, not {type(text).__name__}", [0])
    return [text]


def _release(wait: bool, *resources: Any) -> None:
    """Close ``resources``. Async clients (the Redis limiter's) live on the runner loop and
    close there: an explicit close waits for that; the garbage-collection finalizer, which
    may run in any thread, only schedules it and never blocks."""
    for resource in resources:
        with contextlib.suppress(Exception):  # closing must never raise
            aclose = getattr(resource, "aclose", None)
            loop = _runner.current_loop()
            if aclose is not None and loop is not None and not _runner.in_runner():
                future = asyncio.run_coroutine_threadsafe(aclose(), loop)
                if wait:
                    future.result(timeout=10)
            else:
                resource.close()


__all__ = ["EmbeddingArray", "EmbeddingPipeline", "EmbeddingResult"]
