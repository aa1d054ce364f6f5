"""Move cached vectors in and out of a cache as Parquet, to warm one cache from vectors computed elsewhere.

An export holds every decodable entry as ``key`` (string), ``vector`` (list of float32)
and ``tokens`` (int32); importing it into another cache copies those entries as they are.
An import may instead hold ``text`` and ``vector`` (vectors made by another tool), in a
Parquet file or in a vector database (a pgvector table, a Qdrant, Chroma, LanceDB or
Milvus collection, named by its sink URL): the keys are then derived from the text for the
model you name, exactly as a pipeline of that model would look them up, so its next run
finds them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe import codec
from embedpipe._urls import redact, redact_url
from embedpipe.cache import CacheBackend
from embedpipe.errors import ConfigurationError, DimensionMismatchError

log = logging.getLogger("embedpipe.jobs")

_ROWS = 10_000  # entries per Parquet row group and per cache write
#: the least cosine between an imported vector and the model's own for its text: providers are not
#: bit-exact from call to call (OpenAI's differ around 1e-3), another model is far below
_SAME_VECTOR = 0.99


def export_cache(cache: CacheBackend, path: str | os.PathLike[str]) -> tuple[int, int]:
    """Write every entry of ``cache`` that decodes as a vector to a Parquet file; return ``(written, skipped)``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("key", pa.string()), ("vector", pa.list_(pa.float32())), ("tokens", pa.int32())])
    written = skipped = 0
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        keys: list[str] = []
        vectors: list[np.ndarray] = []
        tokens: list[int] = []

        def flush() -> None:
            if keys:
                offsets = np.concatenate([[0], np.cumsum([len(v) for v in vectors])]).astype(np.int32)
                values = pa.array(np.concatenate(vectors).astype(np.float32), pa.float32())
                writer.write_table(pa.Table.from_arrays(
                    [pa.array(keys, pa.string()), pa.ListArray.from_arrays(pa.array(offsets), values),
                     pa.array(tokens, pa.int32())], schema=schema))
                keys.clear()
                vectors.clear()
                tokens.clear()

        for key, value in cache.items():
            try:
                dims, count = codec.decode_header(value, None)
            except codec.CorruptValueError:
                skipped += 1  # not an embedpipe vector (another tool's value sharing the store)
                continue
            vector = np.frombuffer(value, dtype="<f4", offset=codec.HEADER_SIZE, count=dims)
            if not np.isfinite(vector).all():
                skipped += 1
                continue
            keys.append(key)
            vectors.append(vector)
            tokens.append(count)
            written += 1
            if len(keys) >= _ROWS:
                flush()
        flush()
    os.replace(tmp, target)
    return written, skipped


def _rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    missing = [c for c in columns if c not in f.schema_arrow.names]
    if missing:
        raise ConfigurationError(f"{path} has no {missing} column(s); it has {f.schema_arrow.names}")
    for batch in f.iter_batches(batch_size=_ROWS, columns=columns):
        yield batch.to_pydict()


def _database_pairs(url: str, text_field: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """The (texts, vectors) batches of the vector database ``url`` names (any database sink's URL)."""
    from embedpipe import registry

    sink = registry.sinks.from_url(url)
    pairs = getattr(sink, "pairs", None)
    if pairs is None:
        raise ConfigurationError(f"{redact_url(url)} is not a vector database this command can read")
    try:
        yield from pairs(text_field, _ROWS)
    finally:
        sink.close()


def _check_sample(texts: list[str], vectors: np.ndarray, source: str, *, model: str, dimensions: int | None,
                  base_url: str | None, size: int) -> None:
    """Embed a few of ``texts`` with ``model`` and compare with ``vectors``; warn and go on if the model cannot."""
    from embedpipe.pipeline import EmbeddingPipeline

    sample = min(size, len(texts))
    if not sample:
        return
    try:
        with EmbeddingPipeline(model, cache=None, dimensions=dimensions, base_url=base_url) as checker:
            made = np.asarray(checker.embed_array(texts[:sample]), dtype=np.float32)
    except Exception as exc:  # no key, no network, no local model: the check is best effort
        log.warning("embedpipe: %s could not embed a sample to check the vectors of %s (%s); importing unchecked",
                    model, source, redact(str(exc)))
        return
    theirs = vectors[:sample]
    cosine = np.sum(made * theirs, axis=1) / (np.linalg.norm(made, axis=1) * np.linalg.norm(theirs, axis=1))
    worst = float(np.min(cosine))
    if not worst >= _SAME_VECTOR:
        raise ConfigurationError(
            f"the vectors of {source} are not what {model} makes for their texts (cosine {worst:.3f} on a sample of "
            f"{sample}): another model, dimensions or text field made them; nothing was imported")


def import_cache(cache: CacheBackend, path: str | os.PathLike[str], *, model: str | None = None,
                 dimensions: int | None = None, base_url: str | None = None, namespace: str | None = None,
                 text_field: str = "text", check_sample: int = 3) -> int:
    """Store the vectors of a Parquet file or a vector database in ``cache``; return how many.

    A Parquet file with a ``key`` column (an :func:`export_cache`) is copied as it is. A file
    with ``text_field`` and ``vector`` columns, or a vector database named by the URL of its
    sink (``postgresql://...?table=docs``, ``qdrant://``, ``qdrant+local://``, ``chroma://``,
    ``lancedb://``, ``milvus://``), needs the ``model`` (and ``dimensions``, ``base_url``)
    the vectors belong to, to derive each text's key as that model's pipeline would.
    Before anything is stored, the vectors' dimensions are checked against the model's, and
    ``check_sample`` texts are embedded with the model and compared (skipped, with a
    warning, when the model cannot be reached).
    """
    from embedpipe.pipeline import EmbeddingPipeline

    is_url = isinstance(path, str) and "://" in path
    source = redact_url(str(path)) if is_url else str(path)
    by_key = False
    if not is_url:
        import pyarrow.parquet as pq

        names = pq.ParquetFile(Path(path)).schema_arrow.names
        by_key = "key" in names
        if not by_key and text_field not in names:
            raise ConfigurationError(f"{source} needs a 'key' column (an embedpipe export) or a {text_field!r} "
                                     f"column (--text-field); it has {names}")
        if by_key:
            return _import_keys(cache, Path(path), "tokens" in names)
    if model is None:
        raise ConfigurationError("importing vectors by text needs the model they were made with (--model)")
    batches: Iterator[tuple[list[str], np.ndarray]]
    if is_url:
        batches = _database_pairs(str(path), text_field)
    else:
        batches = (_stacked(source, b[text_field], b["vector"]) for b in _rows(Path(path), [text_field, "vector"]))
    # Builds keys only: no request is ever sent.
    pipe = EmbeddingPipeline(model, cache=cache, dimensions=dimensions, base_url=base_url, namespace=namespace,
                             api_key="not-used")
    try:
        expected = pipe.expected_dims
        n = 0
        for texts, vectors in batches:
            if vectors.ndim != 2 or (expected is not None and vectors.shape[1] != expected):
                raise DimensionMismatchError(f"{source} holds {vectors.shape[-1]}-dimensional vectors; {model} makes "
                                             f"{expected}-dimensional ones; nothing more was imported")
            if not np.isfinite(vectors).all():
                raise ConfigurationError(f"{source} holds a vector with NaN or infinite values")
            if n == 0 and check_sample:
                _check_sample(texts, vectors, source, model=model, dimensions=dimensions, base_url=base_url,
                              size=check_sample)
            keys = cache.keys_for(pipe.key_material("document"), texts, "document")
            tokens = pipe.provider.tokenizer.count(texts)
            cache.set_many([(k, codec.encode(v, t or 0)) for k, v, t in zip(keys, vectors, tokens, strict=True)])
            n += len(keys)
        return n
    finally:
        pipe.close()


def _stacked(source: str, texts: list[Any], vectors: list[Any]) -> tuple[list[str], np.ndarray]:
    """A Parquet batch's texts and vectors, the vectors as one matrix (all of one length, or an error)."""
    lengths = {len(v) for v in vectors}
    if len(lengths) > 1:
        raise DimensionMismatchError(f"{source} holds vectors of several lengths ({sorted(lengths)})")
    return [str(t) for t in texts], np.asarray(vectors, dtype=np.float32).reshape(len(vectors), -1)


def _import_keys(cache: CacheBackend, source: Path, has_tokens: bool) -> int:
    """Copy an :func:`export_cache` file's entries into ``cache`` as they are."""
    n = 0
    for batch in _rows(source, ["key", "vector"] + (["tokens"] if has_tokens else [])):
        vectors = [np.asarray(v, dtype=np.float32) for v in batch["vector"]]
        if not all(np.isfinite(v).all() for v in vectors):
            raise ConfigurationError(f"{source} holds a vector with NaN or infinite values")
        keys = batch["key"]
        tokens = batch.get("tokens") or [0] * len(keys)
        cache.set_many([(k, codec.encode(v, t or 0)) for k, v, t in zip(keys, vectors, tokens, strict=True)])
        n += len(keys)
    return n


__all__ = ["export_cache", "import_cache"]
