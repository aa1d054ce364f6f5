"""``ByteStoreCache``: a LangChain ``ByteStore`` as an embedpipe cache, with LangChain's keys and values.

It lets :meth:`EmbedPipeEmbeddings.from_bytes_store <langchain_embedpipe.EmbedPipeEmbeddings.from_bytes_store>`
read and write the very store a ``CacheBackedEmbeddings`` filled. It only translates:

* keys: ``namespace`` + the key encoder of the text, exactly as LangChain derives them
  (``langchain_classic/embeddings/cache.py``), instead of embedpipe's content hash;
* values: LangChain's JSON float lists become embedpipe's codec on the way in; on the
  way out, vectors are written in the codec (``value_format="embedpipe"``) or as
  LangChain's JSON (``value_format="langchain"``).

Dedupe, batching and validation stay in the core. A JSON entry whose length is not the
model's dimensions fails the core's dims check, so it is re-embedded, never returned.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import numpy as np
from langchain_core.stores import ByteStore

from embedpipe import codec
from embedpipe.cache import CacheBackend
from embedpipe.errors import ConfigurationError

KeyEncoder = Callable[[str], str] | Literal["sha1", "blake2b", "sha256", "sha512"]
ValueFormat = Literal["embedpipe", "langchain"]

#: LangChain's uuid5 namespace for SHA-1 keys (``NAMESPACE_UUID`` in langchain_classic/embeddings/cache.py)
LANGCHAIN_NAMESPACE_UUID = uuid.UUID(int=1985)

# Keys of a separate query store carry this tag between keys_for() and the store calls;
# it never reaches a store. No LangChain key encoder yields a NUL.
_QUERY_TAG = "\x00query\x00"

# Texts of keys asked for but not yet read back (see ByteStoreCache._pending); past this
# many, the oldest are forgotten: a JSON hit whose text is forgotten counts 0 tokens saved.
_MAX_PENDING = 100_000

TokenCounter = Callable[[list[str]], list[int]]


def langchain_key_encoder(namespace: str = "", key_encoder: KeyEncoder = "sha1") -> Callable[[str], str]:
    """The function ``CacheBackedEmbeddings.from_bytes_store`` maps a text to its store key with.

    ``"sha1"`` is ``namespace`` + uuid5 of the SHA-1 hex digest; ``"blake2b"``, ``"sha256"``
    and ``"sha512"`` are ``namespace`` + the hex digest. A callable is used as is and, as in
    LangChain, takes no ``namespace``.
    """
    if callable(key_encoder):
        if namespace:
            raise ConfigurationError("do not pass namespace with a custom key_encoder; "
                                     "add any prefix inside the encoder itself (LangChain's rule)")
        return key_encoder
    if key_encoder == "sha1":
        def sha1_key(text: str) -> str:
            digest = hashlib.sha1(text.encode("utf-8"), usedforsecurity=False).hexdigest()
            return f"{namespace}{uuid.uuid5(LANGCHAIN_NAMESPACE_UUID, digest)}"

        return sha1_key
    if key_encoder in ("blake2b", "sha256", "sha512"):
        algorithm = getattr(hashlib, key_encoder)

        def hex_key(text: str) -> str:
            return f"{namespace}{algorithm(text.encode('utf-8')).hexdigest()}"

        return hex_key
    raise ConfigurationError(f"key_encoder={key_encoder!r}: use 'sha1', 'blake2b', 'sha256', 'sha512' "
                             "or a callable that encodes keys")


class ByteStoreCache(CacheBackend):
    """A LangChain ``ByteStore`` (LocalFileStore, InMemoryByteStore, RedisStore...) as an embedpipe cache.

    ``namespace`` and ``key_encoder`` mean what they mean in ``CacheBackedEmbeddings.from_bytes_store``,
    so a store it filled is read as is. ``query_store`` holds query vectors apart, as
    LangChain's ``query_embedding_cache=<ByteStore>`` does; without it queries (when the
    pipeline caches them) share the document store and its keys, as with ``True``.

    ``value_format`` is what gets written:

    * ``"embedpipe"`` (default): embedpipe's compact binary float32 (``4 * dims + 12``
      bytes, about a quarter of JSON's size). ``CacheBackedEmbeddings`` cannot read it.
    * ``"langchain"``: LangChain's JSON float list, so ``CacheBackedEmbeddings`` and
      embedpipe can share the store both ways.

    Entries in either format are read. A JSON entry is read as float32; it carries no token
    count, so its text is counted with ``count_tokens`` (the wrapped model's tokenizer when
    :class:`EmbedPipeEmbeddings` builds the pipeline, else cl100k_base), and ``saved_usd``
    counts its hits like any other. The core's dims check applies to it:
    one of another length is re-embedded. A model that states no dimensions (LangChain has
    no way to ask) learns them from its first response; until then only entries of one
    length per call are accepted. ``clear()`` removes every key under ``namespace`` (the
    whole store when the namespace is empty or the encoder is custom).
    """

    def __init__(self, store: ByteStore, *, namespace: str = "", key_encoder: KeyEncoder = "sha1",
                 query_store: ByteStore | None = None, value_format: ValueFormat = "embedpipe",
                 count_tokens: TokenCounter | None = None) -> None:
        super().__init__()
        self.count_tokens = count_tokens
        # LangChain's keys are hashes, so a JSON hit's text (to count its tokens) is known only
        # from keys_for(): key -> text, held until get_many reads the key back, with a count of
        # the lookups still to come (two concurrent calls may ask for one text).
        self._pending: dict[str, str] = {}
        self._pending_refs: Counter[str] = Counter()
        self._pending_lock = threading.Lock()
        if value_format not in ("embedpipe", "langchain"):
            raise ConfigurationError(f"value_format={value_format!r}: use 'embedpipe' (compact) or "
                                     "'langchain' (JSON, readable by CacheBackedEmbeddings)")
        self.store = store
        self.query_store = query_store
        self.value_format: ValueFormat = value_format
        self.key_prefix = namespace if isinstance(key_encoder, str) else ""
        self.encode_key = langchain_key_encoder(namespace, key_encoder)
        if not namespace and isinstance(key_encoder, str):
            warnings.warn(
                "embedpipe: namespace='' (LangChain's default): nothing in the cache key names the embedding "
                "model, so a vector another model stored for the same text would be taken for this one's "
                "(only a length that differs from this model's dimensions is caught). Keep '' only to read a "
                "cache CacheBackedEmbeddings wrote that way; otherwise pass namespace=<model name>.",
                UserWarning, stacklevel=3)

    # -- keys ---------------------------------------------------------------------------
    def keys_for(self, material: bytes, texts: Sequence[str], role: str) -> list[str]:
        # LangChain's keys name the text only: ``material`` (model, role) is not in them.
        tag = _QUERY_TAG if role == "query" and self.query_store is not None else ""
        keys = [tag + self.encode_key(t) for t in texts]
        with self._pending_lock:
            for key, text in zip(keys, texts, strict=True):
                self._pending[key] = text
                self._pending_refs[key] += 1
            while len(self._pending) > _MAX_PENDING:  # keys asked for and never read (an import)
                oldest = next(iter(self._pending))
                del self._pending[oldest], self._pending_refs[oldest]
        return keys

    def _texts_read(self, keys: Sequence[str]) -> list[str | None]:
        """The texts of ``keys`` (``None`` where unknown), forgetting those no lookup still needs."""
        with self._pending_lock:
            texts = [self._pending.get(k) for k in keys]
            for key in keys:
                if key in self._pending_refs:
                    self._pending_refs[key] -= 1
                    if self._pending_refs[key] <= 0:
                        del self._pending_refs[key]
                        self._pending.pop(key, None)
        return texts

    def _route(self, keys: Sequence[str]) -> list[tuple[ByteStore, list[int], list[str]]]:
        """Split tagged keys into (store, positions, store keys) groups."""
        if self.query_store is None:
            return [(self.store, list(range(len(keys))), list(keys))]
        groups: dict[bool, tuple[list[int], list[str]]] = {False: ([], []), True: ([], [])}
        for i, key in enumerate(keys):
            query = key.startswith(_QUERY_TAG)
            groups[query][0].append(i)
            groups[query][1].append(key[len(_QUERY_TAG):] if query else key)
        return [(self.query_store if query else self.store, idx, raw)
                for query, (idx, raw) in groups.items() if idx]

    # -- values -------------------------------------------------------------------------
    def _read_all(self, keys: Sequence[str], values: list[bytes | None]) -> list[bytes | None]:
        """Stored values in embedpipe's codec; LangChain JSON lists converted, their texts' tokens counted."""
        texts = self._texts_read(keys)
        converted: list[tuple[int, np.ndarray]] = []
        for i, value in enumerate(values):
            if value is None or value[:2] == codec.MAGIC:
                continue
            try:
                vector = np.asarray(json.loads(value), dtype=np.float32)
            except (ValueError, TypeError):
                continue  # not a vector: the core counts it corrupt and re-embeds
            if vector.ndim == 1:
                converted.append((i, vector))
        if not converted:
            return values
        known = [(i, text) for i, _ in converted if (text := texts[i]) is not None]
        tokens = dict(zip([i for i, _ in known], self._counter()([t for _, t in known]), strict=True))
        out = list(values)
        for i, vector in converted:
            out[i] = codec.encode(vector, tokens.get(i, 0))
        return out

    def _counter(self) -> TokenCounter:
        if self.count_tokens is None:
            from embedpipe.tokens import TiktokenTokenizer

            # The core's default tokenizer, as Provider.tokenizer's.
            self.count_tokens = TiktokenTokenizer.for_encoding("cl100k_base").count
        return self.count_tokens

    def _written(self, items: Sequence[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
        if self.value_format == "embedpipe" or not items:
            return list(items)
        decoded, _ = codec.decode_many([v for _, v in items], None)
        return [(items[p][0], json.dumps(row.tolist()).encode())
                for p, row in zip(decoded.positions, decoded.vectors, strict=True)]

    # -- blocking API ---------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        for store, idx, raw in self._route(keys):
            for i, value in zip(idx, store.mget(raw), strict=True):
                out[i] = value
        out = self._read_all(keys, out)
        self._count(out)
        return out

    def set_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        written = self._written(items)
        for store, idx, raw in self._route([k for k, _ in written]):
            store.mset([(k, written[i][1]) for i, k in zip(idx, raw, strict=True)])

    def delete(self, keys: Sequence[str]) -> None:
        for store, _, raw in self._route(keys):
            store.mdelete(raw)

    def yield_keys(self, prefix: str | None = None) -> Iterator[str]:
        yield from self.store.yield_keys(prefix=prefix)
        if self.query_store is not None:
            for key in self.query_store.yield_keys(prefix=prefix):
                yield _QUERY_TAG + key

    def clear(self) -> None:
        self.delete(list(self.yield_keys(self.key_prefix or None)))

    # -- async twins: the store's own async methods -----------------------------------
    async def aget_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        for store, idx, raw in self._route(keys):
            for i, value in zip(idx, await store.amget(raw), strict=True):
                out[i] = value
        out = self._read_all(keys, out)
        self._count(out)
        return out

    async def aset_many(self, items: Sequence[tuple[str, bytes]]) -> None:
        written = self._written(items)
        for store, idx, raw in self._route([k for k, _ in written]):
            await store.amset([(k, written[i][1]) for i, k in zip(idx, raw, strict=True)])

    async def adelete(self, keys: Sequence[str]) -> None:
        for store, _, raw in self._route(keys):
            await store.amdelete(raw)

    # -- pickling: the pending texts and their lock stay in this process ---------------------
    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        for name in ("_pending", "_pending_refs", "_pending_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._pending = {}
        self._pending_refs = Counter()
        self._pending_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"ByteStoreCache({type(self.store).__name__}, namespace={self.key_prefix!r}, "
                f"value_format={self.value_format!r})")
