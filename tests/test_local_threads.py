"""The local model shared by threads: counting and encoding at once (Hardening I, defect #6).

Before, the provider's token counting called the very Hugging Face tokenizer that
``SentenceTransformer.encode`` used; each call rewrites that tokenizer's truncation and padding,
so a count in one thread could switch them off between another thread's set-up and its
encoding ("Unable to create tensor... activate truncation and/or padding"), or make a count
come back truncated. The real bundled model, real threads, no mocks.
"""

from __future__ import annotations

import threading

import numpy as np

from embedpipe.providers.local import LocalProvider


def test_counting_and_encoding_at_once(local_provider: LocalProvider, corpus: list[dict[str, str]]) -> None:
    tok = local_provider.tokenizer
    limit = local_provider.max_input_tokens
    # Texts over the model's input, where truncation and padding matter, but short enough to encode fast.
    long_texts = [r["text"] for r in corpus if 300 < len(r["text"]) // 4 < 500][:3]
    short = ["a short text", "another, shorter"]
    batch = long_texts + short
    expected_counts = tok.count(long_texts + short)
    assert max(expected_counts) > limit
    expected_windows = [tok.split(t, limit) for t in long_texts]
    expected_vectors = local_provider.embed_batch(batch, "document").vectors
    errors: list[BaseException] = []
    stop = threading.Event()

    def count() -> None:
        try:
            while not stop.is_set():
                assert tok.count(long_texts + short) == expected_counts
                assert [tok.split(t, limit) for t in long_texts[:1]] == expected_windows[:1]
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    def encode() -> None:
        try:
            for _ in range(12):
                if stop.is_set():
                    return
                got = local_provider.embed_batch(batch, "document").vectors
                np.testing.assert_allclose(got, expected_vectors, atol=1e-5)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    counters = [threading.Thread(target=count) for _ in range(2)]
    encoders = [threading.Thread(target=encode) for _ in range(2)]
    for t in counters + encoders:
        t.start()
    for t in encoders:
        t.join()
    stop.set()
    for t in counters:
        t.join()
    assert not errors, f"{len(errors)} thread(s) failed; first: {errors[0]!r}"
