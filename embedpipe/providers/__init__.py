"""Providers, chosen by spec string ``provider:name`` (split on the first colon only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from embedpipe.errors import ConfigurationError
from embedpipe.providers.base import BatchResult, Provider, ProviderInfo, Role, Tokenizer


def _fake(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.fake import FakeProvider

    try:
        dims = int(name)
    except ValueError:
        raise ConfigurationError(f"fake:{name!r}: the fake provider takes its dimensions, e.g. 'fake:384'") from None
    return FakeProvider(dims, **{k: v for k, v in opts.items() if k in ("max_input_tokens",)})


def _local(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.local import LocalProvider

    return LocalProvider(name, **{k: v for k, v in opts.items() if k in ("device", "encode_batch_size", "precision")})


def _openai(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.openai import OpenAIProvider

    return OpenAIProvider(name, **opts)


#: spec prefix -> factory(name, **options). Cohere, Voyage... register here.
PROVIDERS: dict[str, Callable[..., Provider]] = {"fake": _fake, "local": _local, "openai": _openai}


def provider_from_spec(spec: str, **options: Any) -> Provider:
    """Build a provider from ``"local:all-MiniLM-L6-v2"``, ``"fake:384"``, ``"openai:text-embedding-3-small"``..."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigurationError(
            f"model {spec!r} is not a spec 'provider:name'; known providers: {sorted(PROVIDERS)} "
            "(e.g. 'local:all-MiniLM-L6-v2', 'openai:text-embedding-3-small', 'fake:384')")
    kind, name = spec.split(":", 1)
    factory = PROVIDERS.get(kind.lower())
    if factory is None:
        raise ConfigurationError(f"unknown provider {kind!r} in model {spec!r}; known: {sorted(PROVIDERS)}")
    if not name:
        raise ConfigurationError(f"model {spec!r} names no model after '{kind}:'")
    return factory(name, **options)


__all__ = ["BatchResult", "PROVIDERS", "Provider", "ProviderInfo", "Role", "Tokenizer", "provider_from_spec"]
