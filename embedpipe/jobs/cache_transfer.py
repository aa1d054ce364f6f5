"""Move cached vectors in and out of a cache as Parquet, to warm one cache from vectors computed elsewhere.

An export holds every decodable entry as ``key`` (string), ``vector`` (list of float32)
and ``tokens`` (int32); importing it into another cache copies those entries as they are.
An import may instead hold ``text`` and ``vector`` (vectors made by another tool): the
keys are then derived from the text for the model you name, exactly as a pipeline of
that model would look them up, so its next run finds them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe import codec
from embedpipe.cache import CacheBackend
from embedpipe.errors import ConfigurationError, DimensionMismatchError

_ROWS = 10_000  # entries per Parquet row group and per cache write


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


def import_cache(cache: CacheBackend, path: str | os.PathLike[str], *, model: str | None = None,
                 dimensions: int | None = None, base_url: str | None = None, namespace: str | None = None) -> int:
    """Store the vectors of a Parquet file in ``cache``; return how many.

    A file with a ``key`` column (an :func:`export_cache`) is copied as it is. A file with
    ``text`` and ``vector`` needs the ``model`` (and ``dimensions``, ``base_url``) the
    vectors belong to, to derive each text's key as that model's pipeline would.
    """
    import pyarrow.parquet as pq

    from embedpipe.pipeline import EmbeddingPipeline

    source = Path(path)
    names = pq.ParquetFile(source).schema_arrow.names
    by_key = "key" in names
    if not by_key and "text" not in names:
        raise ConfigurationError(f"{source} needs a 'key' column (an embedpipe export) or a 'text' column; "
                                 f"it has {names}")
    pipe = None
    if not by_key:
        if model is None:
            raise ConfigurationError("importing vectors by text needs the model they were made with (--model)")
        # Builds keys only: no request is ever sent.
        pipe = EmbeddingPipeline(model, cache=cache, dimensions=dimensions, base_url=base_url, namespace=namespace,
                                 api_key="not-used")
    try:
        expected = pipe.expected_dims if pipe is not None else None
        columns = ["key" if by_key else "text", "vector"] + (["tokens"] if "tokens" in names else [])
        n = 0
        for batch in _rows(source, columns):
            vectors = [np.asarray(v, dtype=np.float32) for v in batch["vector"]]
            for v in vectors:
                if expected is not None and v.shape[0] != expected:
                    raise DimensionMismatchError(f"{source} holds {v.shape[0]}-dimensional vectors; {model} makes "
                                                 f"{expected}-dimensional ones")
                if not np.isfinite(v).all():
                    raise ConfigurationError(f"{source} holds a vector with NaN or infinite values")
            if by_key:
                keys = batch["key"]
                tokens = batch.get("tokens") or [0] * len(keys)
            else:
                assert pipe is not None
                texts = batch["text"]
                keys = cache.keys_for(pipe.key_material("document"), texts, "document")
                tokens = batch.get("tokens") or pipe.provider.tokenizer.count(texts)
            cache.set_many([(k, codec.encode(v, t or 0)) for k, v, t in zip(keys, vectors, tokens, strict=True)])
            n += len(keys)
        return n
    finally:
        if pipe is not None:
            pipe.close()


__all__ = ["export_cache", "import_cache"]
