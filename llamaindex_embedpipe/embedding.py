"""``EmbedPipeEmbedding``: a LlamaIndex ``BaseEmbedding`` whose every call goes through embedpipe."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Literal, cast

import llama_index.core.instrumentation as instrument
from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import BaseModel, Field, PrivateAttr
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.constants import DEFAULT_EMBED_BATCH_SIZE
from llama_index.core.instrumentation.events.embedding import EmbeddingEndEvent, EmbeddingStartEvent

from embedpipe import EmbeddingPipeline, EmbeddingResult, Provider, Stats
from embedpipe.errors import ConfigurationError
from embedpipe.limits import RateLimiter
from embedpipe.providers.framework import FrameworkProvider

log = logging.getLogger("embedpipe")
dispatcher = instrument.get_dispatcher(__name__)  # type: ignore[attr-defined]  # re-exported without __all__

#: BaseEmbedding fields with LlamaIndex's own meaning, which embedpipe replaces: name -> (default, what to use)
_REPLACED: dict[str, tuple[Any, str]] = {
    "rate_limiter": (None, "embedpipe limits requests and tokens itself: pass rpm=..., tpm=... or "
                           "rate_limiter='redis://host:6379/0?key=NAME' to EmbedPipeEmbedding"),
    "embeddings_cache": (None, "embedpipe caches by content hash and model itself: pass "
                               "cache='sqlite:///embeddings.db' (or 'memory://', 'redis://...') to EmbedPipeEmbedding"),
    "embed_batch_size": (DEFAULT_EMBED_BATCH_SIZE, "embedpipe plans batches by count and tokens itself: pass "
                                                   "batch_size=... or max_batch_tokens=... to EmbedPipeEmbedding"),
}
_SECRET_NAME = re.compile(r"key|token|secret|passw|credential|auth|header|cookie", re.IGNORECASE)
_NOT_SETTINGS = {"class_name", "callback_manager", "embeddings_cache", "rate_limiter"}


def _replaced_error(name: str) -> ConfigurationError:
    return ConfigurationError(f"EmbedPipeEmbedding does not use LlamaIndex's {name}; {_REPLACED[name][1]}")


_DROP: Any = object()


def _clean(value: Any) -> Any:
    """``value`` as JSON with every key named like a secret left out; ``_DROP`` if it is not JSON."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        kept = {str(k): _clean(v) for k, v in value.items() if not _SECRET_NAME.search(str(k))}
        return {k: v for k, v in sorted(kept.items()) if v is not _DROP}
    if isinstance(value, (list, tuple)):
        items = [_clean(v) for v in value]
        return _DROP if any(v is _DROP for v in items) else items
    return _DROP


def _settings(obj: BaseEmbedding) -> dict[str, Any]:
    """The wrapped model's settings for ``to_dict``: JSON values only, nothing named like a secret."""
    try:
        data = obj.to_dict()
    except Exception:  # a model that cannot serialise itself is still identified by its class
        data = {}
    settings = _clean({k: v for k, v in data.items() if k not in _NOT_SETTINGS})
    return {"class": f"{type(obj).__module__}.{type(obj).__qualname__}", **settings}


def _provider(embed_model: BaseEmbedding) -> FrameworkProvider:
    """The core's provider over a LlamaIndex model, called through the batch methods subclasses implement.

    The blocking methods run in embedpipe's worker threads, at most ``max_concurrency`` at
    once. The async ones would bind the model's async client to embedpipe's private loop,
    where the caller's own ``await model.aget_...`` could no longer use it.
    """
    if embed_model.embeddings_cache is not None or embed_model.rate_limiter is not None:
        log.warning("embedpipe: the wrapped %s's embeddings_cache and rate_limiter are not used; "
                    "embedpipe's cache and limits apply", type(embed_model).__name__)
    # Partials of a module function, not bound methods: LlamaIndex wraps these methods in
    # span proxies that cannot be pickled, and the provider must travel to worker processes.
    return FrameworkProvider(
        embed_model, framework="llamaindex",
        embed_documents=partial(_invoke, embed_model, "_get_text_embeddings"),
        embed_query=partial(_invoke, embed_model, "_get_query_embedding"))


def _invoke(obj: Any, method: str, arg: Any) -> Any:
    return getattr(obj, method)(arg)


class EmbedPipeEmbedding(BaseEmbedding):
    """A LlamaIndex embedding model that embeds through an :class:`embedpipe.EmbeddingPipeline`.

    Wrap any LlamaIndex model, ``EmbedPipeEmbedding(OpenAIEmbedding(), cache="sqlite:///e.db", tpm=1_000_000)``,
    or name a core model, ``EmbedPipeEmbedding(model="openai:text-embedding-3-small")``. Every
    other keyword is an :class:`~embedpipe.EmbeddingPipeline` option (``cache``, ``rpm``, ``tpm``,
    ``max_concurrency``, ``budget_usd``...).

    Batch calls hand the whole list to the core, which dedupes, serves cached texts, and
    plans token-aware batches with bounded concurrency: LlamaIndex's ``embed_batch_size``,
    ``embeddings_cache`` and ``rate_limiter`` are not used, and setting them is an error.
    ``to_dict()`` names the model, never its credentials, so IngestionCache keys survive
    a key rotation.
    """

    model: str = Field(default="", frozen=True, description="The embedpipe model spec, provider:model.")
    dimensions: int | None = Field(default=None, frozen=True, description="Output dimensions asked of the model.")
    namespace: str | None = Field(default=None, frozen=True, description="The vector space's name in the cache key.")
    wrapped: dict[str, Any] | None = Field(
        default=None, frozen=True, description="The wrapped LlamaIndex model's settings, secrets left out.")

    _pipeline: EmbeddingPipeline = PrivateAttr()
    _secrets: tuple[str, ...] = PrivateAttr(default=())

    def __init__(self, embed_model: BaseEmbedding | str | None = None, *, model: str | Provider | None = None,
                 callback_manager: CallbackManager | None = None, **options: Any) -> None:
        if isinstance(embed_model, str) and model is None:
            embed_model, model = None, embed_model
        # Fields LlamaIndex passes back in from_dict() and copies: accepted at their defaults only.
        for name, (default, _) in _REPLACED.items():
            if name in options and name != "rate_limiter" and options.pop(name) != default:
                raise _replaced_error(name)
        options.pop("model_name", None)
        num_workers = options.pop("num_workers", None)
        wrapped = options.pop("wrapped", None)
        if options.get("errors", "raise") != "raise":
            raise ConfigurationError("EmbedPipeEmbedding must return a vector for every text, so errors='raise'; "
                                     "use EmbedPipeTransform to keep going and collect failures as dead letters")
        limiter = options.get("rate_limiter")
        if limiter is not None and not isinstance(limiter, (str, RateLimiter)):
            raise _replaced_error("rate_limiter")

        secrets = [options.get("api_key")]
        if embed_model is not None:
            if model is not None:
                raise ConfigurationError("pass either a LlamaIndex embed_model to wrap or a core model spec, not both")
            if isinstance(embed_model, EmbedPipeEmbedding):
                raise ConfigurationError("this model already embeds through embedpipe; pass options to it instead")
            if not isinstance(embed_model, BaseEmbedding):
                raise ConfigurationError(f"embed_model must be a LlamaIndex BaseEmbedding, not "
                                         f"{type(embed_model).__name__}; use model='provider:name' for a core model")
            pipeline = EmbeddingPipeline(_provider(embed_model), **options)
            wrapped = _settings(embed_model)
            secrets.append(getattr(embed_model, "api_key", None))
        elif wrapped is not None:
            raise ConfigurationError("a wrapped model cannot be rebuilt from its dict (its credentials are not in it); "
                                     "build EmbedPipeEmbedding(embed_model, ...) again")
        else:
            pipeline = EmbeddingPipeline(**options) if model is None else EmbeddingPipeline(model, **options)

        fields: dict[str, Any] = {
            "model_name": pipeline.provider.model, "model": pipeline.provider.spec,
            "dimensions": pipeline.dimensions, "namespace": pipeline.namespace, "wrapped": wrapped,
            "callback_manager": callback_manager, "num_workers": num_workers}
        super().__init__(**fields)
        self._pipeline = pipeline
        self._secrets = tuple(s for s in secrets if isinstance(s, str) and s)

    @classmethod
    def class_name(cls) -> str:
        return "EmbedPipeEmbedding"

    @property
    def secrets(self) -> tuple[str, ...]:
        """The API keys this embedding holds, which dead-letter reasons must never show."""
        return self._secrets

    # ------------------------------------------------------------------ embedpipe's side
    @property
    def pipeline(self) -> EmbeddingPipeline:
        """The core pipeline every call goes through (its ``stats``, ``estimate``, ``cache``...)."""
        return self._pipeline

    @property
    def stats(self) -> Stats:
        """The pipeline's counters: cache hits, requests, tokens, cost, retries..."""
        return self._pipeline.stats

    def close(self) -> None:
        """Release what the pipeline opened (cache connections, limiter); a wrapped model stays the caller's."""
        self._pipeline.close()

    async def aclose(self) -> None:
        """Async twin of :meth:`close`."""
        await self._pipeline.aclose()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _REPLACED and value != _REPLACED[name][0]:
            raise _replaced_error(name)
        super().__setattr__(name, value)

    def to_payload(self) -> dict[str, Any]:
        return {"class_name": self.class_name(), "model_name": self.model_name, "model": self.model,
                "dimensions": self.dimensions}

    # ------------------------------------------------------------------ LlamaIndex's methods
    def _get_query_embedding(self, query: str) -> Embedding:
        return self._pipeline.embed_query(query)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await self._pipeline.aembed_query(query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return cast(Embedding, self._pipeline.embed([text])[0])

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return cast(Embedding, (await self._pipeline.aembed([text]))[0])

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return list(self._pipeline.embed(texts))

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return list(await self._pipeline.aembed(texts))

    # BaseEmbedding cuts the list into embed_batch_size pieces and gathers them all at once;
    # here the core gets the whole list. (DispatcherSpanMixin wraps both in spans.)
    def get_text_embedding_batch(self, texts: list[str], show_progress: bool = False,
                                 **kwargs: Any) -> list[Embedding]:
        """Embed ``texts`` in one core call: dedupe, cache, token-aware batches, bounded concurrency."""
        return cast(list[Embedding], list(self.embed_result(texts)))

    async def aget_text_embedding_batch(self, texts: list[str], show_progress: bool = False,
                                        **kwargs: Any) -> list[Embedding]:
        """Async twin of :meth:`get_text_embedding_batch`."""
        return cast(list[Embedding], list(await self.aembed_result(texts)))

    def embed_result(self, texts: list[Any], errors: Literal["raise", "collect"] = "raise") -> EmbeddingResult:
        """Embed ``texts`` and return the pipeline's whole result (vectors, failures, stats), with LlamaIndex's
        embedding events around the call."""
        with self._events(texts) as call:
            call.result = self._pipeline.embed(texts, errors=errors)
        return call.result

    async def aembed_result(self, texts: list[Any], errors: Literal["raise", "collect"] = "raise") -> EmbeddingResult:
        """Async twin of :meth:`embed_result`."""
        with self._events(texts) as call:
            call.result = await self._pipeline.aembed(texts, errors=errors)
        return call.result

    @contextmanager
    def _events(self, texts: list[Any]) -> Iterator[_Outcome]:
        """LlamaIndex's embedding events around one call, as BaseEmbedding sends them (failed texts left out)."""
        model_dict = self.to_payload()
        dispatcher.event(EmbeddingStartEvent(model_dict=model_dict))
        call = _Outcome()
        with self.callback_manager.event(CBEventType.EMBEDDING,
                                         payload={EventPayload.SERIALIZED: model_dict}) as event:
            yield call
            done = [i for i, v in enumerate(call.result) if v is not None]
            # An image is reported by its name (its path): LlamaIndex's events carry strings.
            chunks = [t if isinstance(t, str) else str(getattr(t, "name", t)) for t in (texts[i] for i in done)]
            embeddings = [call.result[i] for i in done]
            event.on_end(payload={EventPayload.CHUNKS: chunks, EventPayload.EMBEDDINGS: embeddings})
        dispatcher.event(EmbeddingEndEvent(chunks=chunks, embeddings=embeddings))

    # ------------------------------------------------------------------ pickling
    # BaseComponent re-runs __init__ from the public fields on unpickling, which would lose the
    # pipeline: pydantic's own state keeps the private attributes (the pipeline re-opens itself).
    def __getstate__(self) -> dict[Any, Any]:
        return picklable_state(self)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        BaseModel.__setstate__(self, state)


class _Outcome:
    """The result of one evented call, set inside :meth:`EmbedPipeEmbedding._events`."""

    result: EmbeddingResult

    def __init__(self) -> None:
        self.result = EmbeddingResult()


def picklable_state(model: BaseModel) -> dict[Any, Any]:
    """pydantic's pickle state, with a fresh callback manager where the caller's handlers cannot travel."""
    import pickle

    state = BaseModel.__getstate__(model)
    fields = dict(state["__dict__"])
    manager = fields.get("callback_manager")
    if manager is not None:
        try:
            pickle.dumps(manager)
        except Exception:
            fields["callback_manager"] = CallbackManager([])
    state["__dict__"] = fields
    return state
