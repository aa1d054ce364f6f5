"""LocalEncoder on the real bundled all-MiniLM-L6-v2: exactness against sentence-transformers, the
prefix cut and its verify step, order after sorting, precision options and the int8 gate."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.errors import ConfigurationError
from embedpipe.providers.local import LocalProvider
from embedpipe.providers.local_encoder import (
    CUT_CHARS_PER_TOKEN,
    PrefixCut,
    _batch,
    cut_is_exact,
    cut_point,
    plan_batches,
    private_tokenizer,
    read_layout,
)

#: texts the BERT normaliser empties (control, zero-width, a lone combining accent): [CLS] [SEP] only
EMPTY_AFTER_NORMALISATION = ["\u200b", "\x00\x07", "\u0301", "\ufeff\u200b"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def mixed_200(corpus: list[dict[str, str]]) -> list[str]:
    """200 texts: 150 short-to-medium (their first 40-900 characters), 46 whole sections over max_seq, 4 empty."""
    texts = [r["text"] for r in corpus if r["text"].strip()]
    rng = np.random.default_rng(7)
    short = [texts[i][: int(rng.integers(40, 900))] for i in range(0, len(texts), len(texts) // 150)][:150]
    long = [t for t in texts[::7] if 1800 < len(t) < 6000][:46]
    out = short + long + EMPTY_AFTER_NORMALISATION
    assert len(out) == 200
    return out


def test_layout_read_from_modules_json(minilm_path: str) -> None:
    layout = read_layout(minilm_path)
    assert not isinstance(layout, str)
    assert (layout.pooling, layout.normalize, layout.max_seq_length) == ("mean", True, 256)


def test_matches_sentence_transformers_on_200_texts(local_provider: LocalProvider, mixed_200: list[str]) -> None:
    assert local_provider.encoder is not None, "MiniLM runs in the LocalEncoder"
    st = local_provider.model_object
    direct = st.encode(mixed_200, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
    ours = local_provider.embed_batch(mixed_200, "document").vectors
    cos = _cos(ours, direct)
    assert cos.min() >= 0.99999, f"text {int(cos.argmin())}: cosine {cos.min():.7f}"
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    # The same texts the same way through the engine, long ones cut where sentence-transformers cuts.
    tok = local_provider.tokenizer
    over = [i for i, n in enumerate(tok.count(mixed_200)) if n > local_provider.max_input_tokens]
    assert len(over) >= 40
    with EmbeddingPipeline(local_provider, cache=None, on_long_input="truncate") as pipe, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "inputs were truncated": expected
        piped = pipe.embed_array(mixed_200)
        assert pipe.stats.truncated == len(over)
    cos = _cos(piped, direct)
    assert cos.min() >= 0.99999, f"text {int(cos.argmin())} through the pipeline: cosine {cos.min():.7f}"


def test_truncate_cuts_where_sentence_transformers_cuts(local_provider: LocalProvider, mixed_200: list[str]) -> None:
    tok = local_provider.tokenizer
    limit = local_provider.max_input_tokens
    st_tok = local_provider.model_object.tokenizer
    for text in mixed_200[150:196]:
        prefix, n = tok.truncate(text, limit)
        assert n == limit and len(prefix) < len(text)
        st_ids = st_tok(text, truncation=True, max_length=limit + 2)["input_ids"]
        ours = local_provider.encoder.tokenizer.encode([prefix])[0].ids  # type: ignore[union-attr]
        assert ours == st_ids
    # Below the model's limit (a batch token cap), the cut stays on a word start.
    text = mixed_200[160]
    short, n = tok.truncate(text, 100)
    assert n <= 100 and tok.count([short]) == [n]


def test_count_with_cap_reads_only_the_prefix_and_stays_exact_under_it(local_provider: LocalProvider,
                                                                       mixed_200: list[str]) -> None:
    tok = local_provider.tokenizer
    exact = tok.count(mixed_200)
    capped = tok.count(mixed_200, cap=254)
    for e, c in zip(exact, capped, strict=True):
        if e <= 254:
            assert c == e
        else:
            assert 254 < c <= e
    assert any(c < e for e, c in zip(exact, capped, strict=True)), "some long text was counted from its prefix"


def test_prefix_cut_verify_reencodes_a_text_whose_cut_falls_short(local_provider: LocalProvider) -> None:
    enc_tok = local_provider.encoder.tokenizer  # type: ignore[union-attr]
    max_seq = enc_tok.max_seq
    chars = CUT_CHARS_PER_TOKEN * max_seq
    # Few tokens in the first `chars` characters (words far apart), many after: the cut alone
    # would end in fewer than max_seq tokens and miss ids the whole text has.
    text = "".join(f"word{i % 10}" + " " * 30 for i in range(100)) + "many short words here " * 200
    k = cut_point(text, chars)
    assert k is not None
    cut_only = _batch(enc_tok.model_tok, [text[:k]], special=True)[0].ids
    whole = _batch(enc_tok.model_tok, [text], special=True)[0].ids
    assert len(whole) == max_seq and cut_only != whole, "the cut alone would change the ids"
    before = enc_tok.cut.reencoded
    got = enc_tok.encode([text, "a normal text " * 300])
    assert got[0].ids == whole
    assert got[1].ids == _batch(enc_tok.model_tok, ["a normal text " * 300], special=True)[0].ids
    assert enc_tok.cut.reencoded == before + 1, "exactly the short cut was re-encoded"
    # And the count agrees with the whole text's under a cap.
    assert local_provider.tokenizer.count([text], cap=254)[0] > 254


def test_cut_guard_turns_the_cut_off_for_a_tokenizer_without_word_boundaries(minilm_path: str) -> None:
    spec = json.loads((Path(minilm_path) / "tokenizer.json").read_text(encoding="utf-8"))
    assert cut_is_exact(private_tokenizer(json.dumps(spec), max_length=256), 256, 2048)
    spec["pre_tokenizer"] = None  # words are no longer tokenized apart: a cut could change any id
    assert not cut_is_exact(private_tokenizer(json.dumps(spec), max_length=256), 256, 2048)
    off = PrefixCut(2048, enabled=False)
    assert off.cuts(["x " * 5000]) == [None]


def test_cut_point_keeps_whole_words() -> None:
    text = "alpha beta  gamma\tdelta " * 200
    k = cut_point(text, 1000)
    assert k is not None and k <= 1000 and not text[k - 1].isspace() and text[k].isspace()
    assert cut_point("short", 1000) is None
    assert cut_point("x" * 5000, 1000) is None, "no whitespace: keep the text whole"


def test_order_restored_after_sorting(local_provider: LocalProvider) -> None:
    texts = ["tiny", "a somewhat longer sentence about Python's asyncio event loop and its tasks",
             "mid length text about files", "x " * 200, "the with statement", "generators " * 40,
             "dict", "list comprehensions create lists from iterables in one expression"]
    one_by_one = np.stack([local_provider.embed_batch([t], "document").vectors[0] for t in texts])
    batches = plan_batches([len(t) for t in texts], batch_tokens=64, waste=0.15)
    assert len(batches) > 2 and [int(i) for b in batches for i in b] != list(range(len(texts)))
    together = local_provider.embed_batch(texts, "document").vectors
    assert _cos(together, one_by_one).min() >= 0.99999
    reordered = local_provider.embed_batch(texts[::-1], "document").vectors
    assert _cos(reordered[::-1], one_by_one).min() >= 0.99999


def test_plan_batches_respects_the_budget_and_padding_share() -> None:
    lengths = [256, 250, 240, 200, 100, 90, 10, 256]
    batches = plan_batches(lengths, batch_tokens=600)
    assert sorted(int(i) for b in batches for i in b) == list(range(8))
    for b in batches:
        assert len(b) * max(lengths[i] for i in b) <= 600 or len(b) == 1
    for b in plan_batches(lengths, batch_tokens=10_000, waste=0.15):
        longest = max(lengths[i] for i in b)
        assert all(lengths[i] >= 0.85 * longest for i in b)


def test_precision_options_are_checked_before_loading() -> None:
    with pytest.raises(ConfigurationError, match=r"int8.*CPU only"):
        LocalProvider("all-MiniLM-L6-v2", device="cuda", precision="int8")
    with pytest.raises(ConfigurationError, match="needs a CUDA device"):
        LocalProvider("all-MiniLM-L6-v2", device="cpu", precision="fp16")
    with pytest.raises(ConfigurationError, match="precision='fp64'"):
        LocalProvider("all-MiniLM-L6-v2", device="cpu", precision="fp64")


def test_spec_passes_precision_through() -> None:
    from embedpipe.providers import provider_from_spec

    with pytest.raises(ConfigurationError, match="needs a CUDA device"):
        provider_from_spec("local:all-MiniLM-L6-v2", precision="bf16", device="cpu")


# ------------------------------------------------------------------------------------ int8
@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return tmp_path_factory.mktemp("onnx")


@pytest.fixture(scope="module")
def int8_provider(minilm_path: str, int8_cache: Path) -> LocalProvider:
    """The int8 model, exported, quantized and gated on the bundled 256-text sample (once)."""
    return LocalProvider("all-MiniLM-L6-v2", device="cpu", precision="int8", onnx_cache_dir=str(int8_cache))


def test_int8_passes_the_gate_and_keeps_its_own_cache_keys(int8_provider: LocalProvider,
                                                           local_provider: LocalProvider, tmp_path: Path) -> None:
    onnx = int8_provider.encoder.onnx  # type: ignore[union-attr]
    assert onnx.gate.texts == 256 and onnx.gate.min_cosine >= 0.98
    assert int8_provider.identity() != local_provider.identity()
    url = f"sqlite:///{tmp_path}/v.db"
    texts = ["how do I read a file line by line", "asyncio gather versus wait"]
    with EmbeddingPipeline(local_provider, cache=url) as pipe:
        v32 = pipe.embed_array(texts)
    with EmbeddingPipeline(int8_provider, cache=url) as pipe:
        v8 = pipe.embed_array(texts)
        assert pipe.stats.hits == 0 and pipe.stats.embedded == 2, "int8 never reads fp32 vectors"
    assert _cos(v8, v32).min() >= 0.98
    # A second load reuses the cached model and its stored verdict.
    again = LocalProvider("all-MiniLM-L6-v2", device="cpu", precision="int8",
                          onnx_cache_dir=str(onnx.path.parent.parent))
    assert again.encoder.onnx.gate == onnx.gate  # type: ignore[union-attr]


def test_int8_gate_refuses_a_damaged_quantization(int8_provider: LocalProvider, tmp_path: Path,
                                                  corpus: list[dict[str, str]]) -> None:
    import onnx
    from onnx import numpy_helper

    source = int8_provider.encoder.onnx.path  # type: ignore[union-attr]
    damaged_root = tmp_path / "onnx"
    shutil.copytree(source.parent.parent, damaged_root)
    target = damaged_root / source.parent.name / source.name
    graph = onnx.load(str(target))
    rng = np.random.default_rng(0)
    damaged = 0
    for init in graph.graph.initializer:
        # Per-channel weight scales of the quantized matmuls: scramble them.
        if init.name.endswith("_scale") and init.data_type == onnx.TensorProto.FLOAT and init.dims:
            scale = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array((scale * rng.uniform(0.0, 3.0, scale.shape)).astype(np.float32),
                                                  init.name))
            damaged += 1
    assert damaged > 10
    onnx.save(graph, str(target))
    sample = [r["text"][:300] for r in corpus[:: len(corpus) // 24]][:24]
    with pytest.raises(ConfigurationError, match=r"int8.*refused.*lowest cosine"):
        LocalProvider("all-MiniLM-L6-v2", device="cpu", precision="int8", onnx_cache_dir=str(damaged_root),
                      int8_sample=sample)
