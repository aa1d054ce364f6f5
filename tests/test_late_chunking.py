"""Late chunking: window bookkeeping, equality with the model's own token outputs, joins, cache keys, naive vs late."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from embedpipe.chunking import StableSplitter
from embedpipe.chunking.late import LateChunker, contextual_token_outputs, pool_spans, token_spans
from embedpipe.errors import ConfigurationError


def _toy_run(windows: list[list[int]]) -> list[np.ndarray]:
    """A stand-in "model" whose output says which token it saw at which place of which window."""
    return [np.array([[tid, place, w] for place, tid in enumerate(win)], dtype=float)
            for w, win in enumerate(windows)]


@pytest.mark.parametrize("n, max_length, overlap", [(5, 12, 3), (10, 12, 0), (11, 12, 3), (100, 12, 3),
                                                    (101, 12, 9), (37, 7, 1)])
def test_windows_keep_every_token_once_with_its_left_context(n: int, max_length: int, overlap: int) -> None:
    ids = list(range(1000, 1000 + n))
    out = contextual_token_outputs(ids, _toy_run, max_length=max_length, overlap=overlap, prefix=[1], suffix=[2])
    assert out[:, 0].tolist() == ids  # continuous: no token lost, repeated or reordered at a join
    body = max_length - 2
    first_window = out[:, 2] == 0
    assert first_window[:min(n, body)].all()
    # After the first window, each kept output had `overlap` tokens of the same window before it.
    assert (out[~first_window, 1] >= 1 + overlap).all()


def test_window_settings_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="overlap"):
        contextual_token_outputs([1, 2], _toy_run, max_length=4, overlap=2, prefix=[0], suffix=[0])
    with pytest.raises(ConfigurationError, match="no room"):
        contextual_token_outputs([1, 2], _toy_run, max_length=2, overlap=0, prefix=[0], suffix=[0])
    with pytest.raises(ValueError, match="no tokens"):
        contextual_token_outputs([], _toy_run, max_length=8, overlap=0)


def test_token_spans_and_pooling() -> None:
    offsets = [(0, 3), (4, 9), (9, 10), (11, 15)]
    assert token_spans(offsets, [(0, 10), (10, 15)]) == [(0, 3), (3, 4)]
    with pytest.raises(ValueError, match="chunk 1"):
        token_spans(offsets, [(0, 4), (5, 8)])
    tokens = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    assert pool_spans(tokens, [(0, 2), (2, 3)]).tolist() == [[1.0, 0.0], [0.0, 1.0]]


# -- the real model ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chunker(local_provider: Any) -> LateChunker:
    return LateChunker.from_sentence_transformer(local_provider.model_object)


def _document(corpus: list[dict[str, str]], min_tokens: int, max_tokens: int, tokenizer: Any) -> str:
    for doc in corpus:
        n = len(tokenizer(doc["text"], add_special_tokens=False, verbose=False)["input_ids"])
        if min_tokens <= n <= max_tokens:
            return doc["text"]
    pytest.skip(f"no section of {min_tokens}-{max_tokens} tokens")


def test_uses_the_models_position_limit_not_the_sentence_transformers_cut(chunker: LateChunker,
                                                                          local_provider: Any) -> None:
    assert chunker.max_length == 512
    assert local_provider.model_object.max_seq_length == 256


def test_one_window_without_overlap_equals_mean_pooling_of_the_models_token_outputs(
        chunker: LateChunker, local_provider: Any, corpus: list[dict[str, str]]) -> None:
    import torch

    model = local_provider.model_object
    text = _document(corpus, 300, 500, model.tokenizer)
    spans = StableSplitter(48).split_spans(text)
    assert len(spans) >= 4
    got = LateChunker(chunker.tokenizer, chunker.run, 512, overlap=0).embed_spans(text, spans)
    # Reference: the tokenizer's own encoding with its special tokens, one plain forward pass.
    enc = model.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
    offsets = enc.pop("offset_mapping")[0].tolist()
    with torch.inference_mode():
        hidden = model[0].auto_model(**enc).last_hidden_state[0].numpy()
    for k, (s, e) in enumerate(spans):
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and s <= a < e]  # specials have (0, 0)
        ref = hidden[inside].mean(axis=0)
        ref /= np.linalg.norm(ref)
        assert np.allclose(got[k], ref, atol=1e-5), k


def test_windowed_outputs_are_continuous_across_a_join(chunker: LateChunker, local_provider: Any,
                                                       corpus: list[dict[str, str]]) -> None:
    """Windows of 128 positions against one window of 512 over the same ~400-token document.

    A token's output depends on all of its context, so no window shorter than the document
    reproduces the one-window outputs; what overlap must achieve is that the tokens right
    after a join match them as well as the window's other tokens do (no seam), where with no
    overlap they start cold and match worse.
    """
    text = _document(corpus, 380, 500, chunker.tokenizer)
    ids = chunker.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    prefix, suffix = [chunker.tokenizer.cls_token_id], [chunker.tokenizer.sep_token_id]
    whole = contextual_token_outputs(ids, chunker.run, max_length=512, overlap=0, prefix=prefix, suffix=suffix)

    def windowed(overlap: int) -> tuple[np.ndarray, float, float]:
        out = contextual_token_outputs(ids, chunker.run, max_length=128, overlap=overlap, prefix=prefix,
                                       suffix=suffix)
        assert out.shape == whole.shape
        cos = (out * whole).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(whole, axis=1)
        joins = range(126, len(ids), 126 - overlap)  # first kept token of each window after the first
        near = np.concatenate([cos[j:j + 8] for j in joins])
        return out, float(near.mean()), float(cos.mean())

    _, near_joins, overall = windowed(64)
    _, near_cold, _ = windowed(0)
    assert near_joins >= overall - 0.03, (near_joins, overall)
    assert near_cold < near_joins - 0.03, (near_cold, near_joins)


def test_late_beats_naive_on_title_similarity(local_provider: Any, corpus: list[dict[str, str]]) -> None:
    """On >= 50 pydocs sections of >= 4 chunks: chunk vs section-title cosine, late above naive."""
    from embedpipe import EmbeddingPipeline
    from embedpipe.late_chunking import embed_chunks

    pipe = EmbeddingPipeline(local_provider)
    splitter = StableSplitter(64)
    sections = []
    for doc in corpus:
        if 1500 <= len(doc["text"]) <= 3000:
            spans = splitter.split_spans(doc["text"])
            if len(spans) >= 4:
                sections.append((doc, spans))
        if len(sections) == 50:
            break
    assert len(sections) == 50
    titles = np.asarray(pipe.embed_array([d["title"] for d, _ in sections], role="query"))
    late, naive = [], []
    for (doc, spans), title in zip(sections, titles, strict=True):
        late.append(float((embed_chunks(pipe, doc["text"], spans, mode="late") @ title).mean()))
        naive.append(float((embed_chunks(pipe, doc["text"], spans, mode="naive") @ title).mean()))
    assert np.mean(late) > np.mean(naive), (np.mean(late), np.mean(naive))


def test_embed_chunks_caches_late_vectors_per_document_and_mode(local_provider: Any) -> None:
    from embedpipe import EmbeddingPipeline
    from embedpipe.late_chunking import aembed_chunks, embed_chunks

    pipe = EmbeddingPipeline(local_provider, cache="memory://")
    doc_a = "The parser reads a file. It returns a tree of nodes. Each node has a kind and children."
    doc_b = "A cache stores vectors. It returns a tree of nodes. Keys are hashes of the text."
    shared = "It returns a tree of nodes."
    chunks_a = ["The parser reads a file.", shared, "Each node has a kind and children."]
    first = embed_chunks(pipe, doc_a, chunks_a)
    assert first.shape == (3, 384) and first.dtype == np.float32
    assert np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    entries = len(list(pipe.cache.yield_keys()))
    assert entries == 3
    again = embed_chunks(pipe, doc_a, [(0, 24), (25, 52), (53, 87)])
    assert np.array_equal(first, again) and len(list(pipe.cache.yield_keys())) == 3  # spans, same keys
    assert np.array_equal(asyncio.run(aembed_chunks(pipe, doc_a, chunks_a)), first)
    # The same chunk text in another document is another context, so another vector and key.
    b = embed_chunks(pipe, doc_b, ["A cache stores vectors.", shared, "Keys are hashes of the text."])
    assert len(list(pipe.cache.yield_keys())) == 6
    assert not np.allclose(b[1], first[1], atol=1e-3)
    naive = embed_chunks(pipe, doc_a, chunks_a, mode="naive")
    assert np.allclose(naive[1], np.asarray(pipe.embed_array([shared]))[0])
    assert not np.allclose(naive[1], first[1], atol=1e-3)
    reduced = embed_chunks(EmbeddingPipeline(local_provider, dimensions=128), doc_a, chunks_a)
    assert reduced.shape == (3, 128)


def test_embed_chunks_names_bad_input() -> None:
    from embedpipe import EmbeddingPipeline
    from embedpipe.late_chunking import embed_chunks

    pipe = EmbeddingPipeline("fake:8")
    with pytest.raises(ConfigurationError, match="local transformer"):
        embed_chunks(pipe, "Some text here.", ["Some text"], mode="late")
    with pytest.raises(ValueError, match="chunk 1"):
        embed_chunks(pipe, "Some text here.", ["Some", "absent"], mode="naive")
    with pytest.raises(ValueError, match="chunk 0"):
        embed_chunks(pipe, "Some text here.", [(5, 99)], mode="naive")
    with pytest.raises(ConfigurationError, match="mode"):
        embed_chunks(pipe, "Some text here.", ["Some"], mode="eager")  # type: ignore[arg-type]
    assert embed_chunks(pipe, "Some text here.", ["Some", "text"], mode="naive").shape == (2, 8)


def test_the_pipeline_embeds_chunks_late_naive_and_many(local_provider: Any, tmp_path: Any) -> None:
    import asyncio

    from embedpipe import EmbeddingPipeline
    from embedpipe.errors import ConfigurationError

    doc_a = "Lists are mutable sequences. They hold items of any type. Tuples are immutable sequences instead."
    doc_b = "A dictionary maps keys to values. Keys must be hashable. Sets hold unique hashable items."
    chunks_a = ["Lists are mutable sequences.", "They hold items of any type.", "Tuples are immutable sequences"]
    chunks_b = [(0, 33), (34, 57), (58, len(doc_b))]
    with EmbeddingPipeline(local_provider, cache=f"sqlite:///{tmp_path}/c.db") as pipe:
        late = pipe.embed_chunks(doc_a, chunks_a)
        assert late.shape == (3, 384)
        assert np.allclose(np.linalg.norm(late, axis=1), 1.0, atol=1e-5)
        naive = pipe.embed_chunks(doc_a, chunks_a, mode="naive")
        assert np.allclose(naive, np.asarray(pipe.embed_array(chunks_a)), atol=1e-6)
        assert not np.allclose(late, naive, atol=1e-3)  # late vectors carry their context
        assert np.allclose(asyncio.run(pipe.aembed_chunks(doc_a, chunks_a)), late, atol=1e-6)
        many = pipe.embed_chunks_many([(doc_a, chunks_a), (doc_b, chunks_b)], mode="naive")
        assert [m.shape for m in many] == [(3, 384), (3, 384)] and np.allclose(many[0], naive, atol=1e-6)
        assert np.allclose(pipe.embed_chunks_many([(doc_b, chunks_b)])[0], pipe.embed_chunks(doc_b, chunks_b))
        with pytest.raises(ConfigurationError, match="mode='early'"):
            pipe.embed_chunks(doc_a, chunks_a, mode="early")
