"""Compact output types end to end: the pipeline's output_dtype, its cache values, native providers, jobs and sinks.

Against the fake model (exact float vectors), the provider test server's Cohere route
driven through the cohere SDK (native int8), real SQLite caches and real Parquet/JSONL files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedpipe import EmbeddingPipeline, jobs
from embedpipe.cache import SQLiteCache
from embedpipe.codec import value_dtype, value_size
from embedpipe.errors import ConfigurationError
from embedpipe.providers.fake import fake_vector
from embedpipe.quantize import quantize
from tests.provider_servers import ProviderTestServer, expected_float, server_int8
from tests.test_jobs import make_records, write_jsonl

TEXTS = ["alpha beta", "gamma delta", "epsilon", "alpha beta"]


@pytest.mark.parametrize("dtype", ["int8", "uint8", "binary", "ubinary"])
def test_the_pipeline_returns_and_caches_its_output_dtype(tmp_path: Path, dtype: str) -> None:
    cache = SQLiteCache(tmp_path / "c.db")
    floats = np.stack([fake_vector(t, 64) for t in TEXTS])
    want = quantize(floats, dtype)  # type: ignore[arg-type]
    with EmbeddingPipeline("fake:64", cache=cache, output_dtype=dtype) as pipe:
        first = pipe.embed_quantized(TEXTS)
        np.testing.assert_array_equal(first.values, want.values)
        np.testing.assert_allclose(first.scales, want.scales, rtol=1e-6)
        as_float = np.asarray(pipe.embed_array(TEXTS))  # the same vectors, dequantized: a cache hit now
        again = pipe.embed_quantized(TEXTS)
        assert pipe.stats.embedded == 3 and pipe.stats.hits >= 3
    np.testing.assert_array_equal(again.values, first.values)
    np.testing.assert_allclose(as_float, first.dequantize(), rtol=1e-6)
    values = [v for _, v in cache.items()]
    assert {value_dtype(v) for v in values} == {dtype}  # stored compactly, not as float32
    assert {len(v) for v in values} == {value_size(64, dtype)}  # type: ignore[arg-type]

    # float32 and compact values of one model are separate cache entries
    with EmbeddingPipeline("fake:64", cache=cache) as plain:
        np.testing.assert_allclose(plain.embed_array(TEXTS[:1])[0], floats[0], rtol=1e-6)
        assert plain.stats.embedded == 1
    cache.close()


def test_a_float32_pipeline_refuses_embed_quantized_and_a_bad_dtype_is_named() -> None:
    with EmbeddingPipeline("fake:8", cache=None) as pipe, pytest.raises(ConfigurationError, match="float32"):
        pipe.embed_quantized(["x"])
    with pytest.raises(ConfigurationError, match="output_dtype"):
        EmbeddingPipeline("fake:8", cache=None, output_dtype="int4")


def test_a_native_provider_hands_back_its_own_integers_through_the_cache(tmp_path: Path) -> None:
    with ProviderTestServer() as server:
        cache = f"sqlite:///{tmp_path}/c.db"
        opts = {"base_url": server.url, "api_key": "co-test", "output_dtype": "int8", "cache": cache}
        with EmbeddingPipeline("cohere:embed-v4.0", **opts) as pipe:  # type: ignore[arg-type]
            first = pipe.embed_quantized(["zeta", "eta"])
        with EmbeddingPipeline("cohere:embed-v4.0", **opts) as pipe:  # type: ignore[arg-type]
            again = pipe.embed_quantized(["zeta", "eta"])  # from the cache
            assert pipe.stats.hits == 2 and pipe.stats.embedded == 0
        led = server.ledger("cohere")
        assert led.requests == 1 and led.bodies[0]["embedding_types"] == ["int8"]
    want = np.stack([server_int8(expected_float("cohere", "embed-v4.0", "search_document", t))
                     for t in ("zeta", "eta")])
    np.testing.assert_array_equal(first.values.astype(np.int64), want)
    np.testing.assert_array_equal(again.values, first.values)


def test_cohere_batch_size_is_capped_at_what_its_api_takes(caplog: pytest.LogCaptureFixture) -> None:
    with ProviderTestServer() as server:
        with EmbeddingPipeline("cohere:embed-english-v3.0", base_url=server.url, api_key="co-test", cache=None,
                               batch_size=200) as pipe:
            assert pipe.embed_array([f"text {i}" for i in range(150)]).shape == (150, 1024)
        led = server.ledger("cohere")
        assert max(led.batch_sizes) == 96 and led.rejected == 0
    assert "batch_size=200 is more than" in caplog.text


def test_jobs_write_compact_vectors_to_parquet_and_jsonl_and_refuse_stores_that_cannot(tmp_path: Path) -> None:
    records = make_records(30)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    args = {"model": "fake:64", "cache": "memory://", "chunk_size": 10}
    out = tmp_path / "out"
    assert jobs.run(src, out=out, output_dtype="int8", **args).exit_code == 0
    table = pq.read_table(out)
    assert table.schema.field("vector").type == pa.list_(pa.int8(), 64) and "scale" in table.column_names
    for row in table.to_pylist():
        text = next(r["text"] for r in records if r["id"] == row["id"])
        q = quantize(fake_vector(text, 64)[None, :], "int8")
        assert row["vector"] == q.values[0].tolist() and row["scale"] == pytest.approx(float(q.scales[0]))

    bits = tmp_path / "bits"
    assert jobs.run(src, out=bits, output_dtype="binary", **args).exit_code == 0
    assert pq.read_table(bits).schema.field("vector").type == pa.binary(8)  # 64 bits in 8 bytes

    lines = tmp_path / "v.jsonl"
    assert jobs.run(src, out=lines, output_dtype="int8", **args).exit_code == 0
    first = json.loads(lines.read_text().splitlines()[0])
    assert all(isinstance(x, int) and -127 <= x <= 127 for x in first["vector"])

    from llama_index.core.vector_stores import SimpleVectorStore

    store = SimpleVectorStore()
    with pytest.raises(ConfigurationError, match="cannot store int8 vectors"):
        jobs.run(src, out=store, state=tmp_path / "s.sqlite", output_dtype="int8", **args)
    assert not store.data.embedding_dict
