"""Providers, chosen by spec string ``provider:name`` (split on the first colon only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from embedpipe.errors import ConfigurationError
from embedpipe.providers.base import BatchResult, Provider, ProviderInfo, Role, Tokenizer


def _float_only(opts: dict[str, Any]) -> dict[str, Any]:
    """Drop ``output_dtype`` for a provider that only returns floats: the engine quantizes those itself."""
    opts.pop("output_dtype", None)
    return opts


def _fake(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.fake import FakeProvider

    _float_only(opts)
    try:
        dims = int(name)
    except ValueError:
        raise ConfigurationError(f"fake:{name!r}: the fake provider takes its dimensions, e.g. 'fake:384'") from None
    return FakeProvider(dims, **{k: v for k, v in opts.items() if k in ("max_input_tokens",)})


def _local(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.local import LocalProvider

    _float_only(opts)
    return LocalProvider(name, **{k: v for k, v in opts.items() if k in ("device", "encode_batch_size", "precision")})


def _local_clip(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.local_clip import LocalCLIPProvider

    _float_only(opts)
    return LocalCLIPProvider(name, **{k: v for k, v in opts.items() if k in ("device", "precision", "decode_threads")})


def _openai(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.openai import OpenAIProvider

    return OpenAIProvider(name, **_float_only(opts))


def _cohere(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.cohere import CohereProvider

    return CohereProvider(name, **opts)


def _voyage(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.voyage import VoyageProvider

    return VoyageProvider(name, **opts)


def _azure(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.azure import AzureOpenAIProvider

    return AzureOpenAIProvider(name, **_float_only(opts))


def _gemini(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.gemini import GeminiProvider

    return GeminiProvider(name, **_float_only(opts))


def _bedrock(name: str, **opts: Any) -> Provider:
    from embedpipe.providers.bedrock import BedrockProvider

    return BedrockProvider(name, **opts)


#: spec prefix -> factory(name, **options); each imports its SDK only when used
PROVIDERS: dict[str, Callable[..., Provider]] = {
    "fake": _fake, "local": _local, "local-clip": _local_clip, "openai": _openai, "cohere": _cohere,
    "voyage": _voyage, "azure": _azure, "gemini": _gemini, "bedrock": _bedrock,
}


def provider_from_spec(spec: str, **options: Any) -> Provider:
    """Build a provider from a spec: ``"local:all-MiniLM-L6-v2"``, ``"cohere:embed-v4.0"``, ``"fake:384"``...

    ``options`` go to the provider's constructor (``api_key``, ``base_url``, ``dimensions`` and its own).
    ``output_dtype`` reaches only the providers that can ask for compact types (Cohere, Voyage,
    Bedrock); the others return floats, which the engine quantizes itself.
    """
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
