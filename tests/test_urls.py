"""embedpipe._urls: the one URL grammar (SQLAlchemy's slashes, options in the query) and the one redactor."""

from __future__ import annotations

import threading

import pytest

from embedpipe import _urls
from embedpipe._urls import file_url, parse_url, public_url, redact, redact_url, register_secret
from embedpipe.errors import ConfigurationError


@pytest.mark.parametrize("url,path", [
    ("sqlite:///relative.db", "relative.db"),
    ("sqlite:///sub/dir/c.db", "sub/dir/c.db"),
    ("sqlite:////absolute/c.db", "/absolute/c.db"),
    ("SQLITE:////tmp/with%20space.db", "/tmp/with space.db"),
    ("parquet:///vectors/", "vectors/"),
    ("jsonl:////srv/out.jsonl", "/srv/out.jsonl"),
])
def test_file_urls_follow_sqlalchemy_slashes(url: str, path: str) -> None:
    parsed = parse_url(url)
    assert parsed.scheme == url.split(":")[0].lower()
    assert parsed.host is None and parsed.file_path() == path


def test_server_urls_give_host_port_credentials_and_options() -> None:
    url = parse_url("redis://user:p%40ss@cache.internal:6380/2?ttl=7d&namespace=prod")
    assert (url.scheme, url.username, url.password, url.host, url.port, url.path) == \
        ("redis", "user", "p@ss", "cache.internal", 6380, "2")
    assert dict(url.options) == {"ttl": "7d", "namespace": "prod"}
    assert "p%40ss" not in str(url) and "p%40ss" not in repr(url)
    assert url.without_options("ttl") == "redis://user:p%40ss@cache.internal:6380/2?namespace=prod"
    assert url.without_options() == "redis://user:p%40ss@cache.internal:6380/2"
    # A file URL keeps its four slashes when options are dropped (urlunsplit would make it sqlite://abs).
    assert parse_url("sqlite:////abs/c.db?ttl=1h").without_options() == "sqlite:////abs/c.db"


def test_options_are_checked_against_the_known_ones() -> None:
    url = parse_url("sqlite:///c.db?ttl=1h&colour=red&size=2")
    with pytest.raises(ConfigurationError) as info:
        url.check_options(("ttl", "max_bytes"), "cache")
    message = str(info.value)
    assert "colour, size" in message and "sqlite:// takes max_bytes, ttl" in message
    parse_url("sqlite:///c.db?ttl=1h").check_options(("ttl",))  # known: no error
    with pytest.raises(ConfigurationError, match="given twice"):
        parse_url("memory://?ttl=1&ttl=2")


@pytest.mark.parametrize("url,message", [
    ("sqlite://host/c.db", "has no host"),
    ("sqlite://", "names no file"),
    ("relative.db", "not a backend URL"),
    ("redis://localhost:notaport/0", "invalid port"),
])
def test_malformed_urls_are_refused_clearly(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_url(url).file_path()


def test_file_url_takes_any_file_name_without_parsing() -> None:
    url = file_url("jsonl", "odd?name#1%.jsonl")
    assert url.file_path() == "odd?name#1%.jsonl" and url.scheme == "jsonl"
    assert file_url("parquet", "/abs/out").raw == "parquet:////abs/out"


@pytest.mark.parametrize("text,leaked,kept", [
    ("Authorization: Bearer abc.def-123", "abc.def-123", "Bearer ***"),
    ("Incorrect API key provided: sk-proj-AbCdEf0123456789XyZ_-w", "AbCdEf0123456789", "sk-***"),
    ("key sk-1234567890abcdefghij rejected", "1234567890abcdefghij", "sk-***"),
    ("OpenAI masks it: sk-abc1****************wxyz", "wxyz", "sk-***"),
    ("cannot reach redis://:hunter2@cache:6379/0", "hunter2", "redis://:***@cache:6379/0"),
    ("postgresql://app:s3cret@db.internal/embeddings failed", "s3cret", "postgresql://app:***@db.internal"),
    ("api_key=abcd1234efgh rejected", "abcd1234efgh", "api_key=***"),
])
def test_redact_masks_tokens_keys_and_url_passwords(text: str, leaked: str, kept: str) -> None:
    out = redact(text)
    assert leaked not in out and kept in out


def test_redact_leaves_ordinary_text_and_short_sk_words_alone() -> None:
    text = "HTTP 400: input is empty or whitespace only (see task-sk-1); retry at https://api.openai.com/v1"
    assert redact(text) == text


def test_redact_masks_secrets_passed_in_and_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_urls, "_registered", frozenset())
    assert redact("token XYZSECRET9 here", ["XYZSECRET9", None, ""]) == "token *** here"
    assert redact("key tiny", ["key"]) == "key tiny"  # too short to be a secret: never masks words
    register_secret("test")  # too short to clean every message with
    assert redact("a test message") == "a test message"
    register_secret("custom-key-Q7Q7Q7")
    assert redact("the server said custom-key-Q7Q7Q7 is revoked") == "the server said *** is revoked"
    # Registering from many threads at once loses none.
    values = [f"parallel-secret-{i:04d}" for i in range(64)]
    threads = [threading.Thread(target=register_secret, args=(v,)) for v in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(values) <= _urls.registered_secrets()
    assert "parallel-secret" not in redact(" ".join(values))


def test_redact_url_and_public_url() -> None:
    assert redact_url("redis://:pw@localhost:6379/0") == "redis://:***@localhost:6379/0"
    assert redact_url("postgresql://u:pw@h:5432/db?sslmode=require&password=x") == \
        "postgresql://u:***@h:5432/db?sslmode=require&password=***"
    assert redact_url("sqlite:////abs/c.db") == "sqlite:////abs/c.db"
    assert redact_url("sqlite://") == "sqlite://"
    assert public_url("https://u:p@api.example.com:8443/v1?api-version=1&token=t") == "https://api.example.com:8443/v1"
    assert public_url(None) is None
