"""A pipeline's configuration: one frozen, serialisable record of every option, with the defaults stated once.

>>> from embedpipe import PipelineConfig
>>> cfg = PipelineConfig(model="fake:8", cache="memory://", rpm=600)
>>> PipelineConfig.from_json(cfg.to_json()) == cfg
True
>>> with cfg.build() as pipe:
...     pipe.config.rpm
600

Secrets never enter the JSON: API keys are not fields at all, and passwords in the cache and
rate-limiter URLs are dropped by :meth:`PipelineConfig.to_json`. They come back when the
config is built: an API key from ``build(api_key=...)``, the provider's usual environment
variable (``OPENAI_API_KEY``…) or the ``credentials`` callable; a URL password from
``EMBEDPIPE_CACHE_PASSWORD`` / ``EMBEDPIPE_RATE_LIMITER_PASSWORD`` or the ``credentials``
callable. ``credentials`` is a dotted path ``"mypkg.creds:get_secret"`` to a callable taking
the name of what it must return (``"api_key"``, ``"cache"``, ``"rate_limiter"``) and returning
the secret or ``None``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from embedpipe.errors import ConfigurationError

if TYPE_CHECKING:
    from embedpipe.pipeline import EmbeddingPipeline

#: bump when a field changes meaning; from_json refuses what it cannot read
CONFIG_VERSION = 1
#: the cache value meaning "$EMBEDPIPE_CACHE, else a SQLite file in the user's cache directory"
DEFAULT_CACHE = "default"

_URL_FIELDS = ("cache", "rate_limiter")
_INTS = ("dimensions", "batch_size", "max_concurrency", "rpm", "tpm", "max_batch_tokens")


@dataclass(frozen=True)
class PipelineConfig:
    """Every option of :class:`~embedpipe.EmbeddingPipeline`, frozen; ``build()`` makes the pipeline.

    The fields are the pipeline's keyword arguments (see its docstring); ``model``,
    ``cache`` and ``rate_limiter`` may also hold objects, and ``hooks``, ``retry_wait`` and
    ``sleep`` are objects: such a config works in Python but :meth:`to_json` refuses it,
    naming the fields. ``provider_options`` are passed to the provider the spec builds
    (e.g. ``{"device": "cuda"}`` for ``local:``).
    """

    model: Any = "local:all-MiniLM-L6-v2"
    dimensions: int | None = None
    cache: Any = DEFAULT_CACHE
    namespace: str | None = None
    batch_size: int | None = None
    max_concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    rate_limiter: Any = None
    max_retries: int = 6
    max_rate_limit_wait: float | None = 300.0
    timeout: float | None = 60.0
    max_batch_tokens: int | None = None
    on_long_input: str = "split"
    budget_usd: float | None = None
    price_per_1m_tokens: float | None = None
    base_url: str | None = None
    errors: str = "raise"
    cache_queries: bool = True
    credentials: str | None = None
    provider_options: Mapping[str, Any] = field(default_factory=dict)
    hooks: tuple[Any, ...] = ()
    retry_wait: Any = None
    sleep: Any = None
    #: the speech-to-text model for Audio inputs: "local-whisper:tiny.en", "openai:whisper-1", a Transcriber, or None
    audio_to_text: Any = None
    #: the longest stretch of a recording embedded as one chunk, in seconds
    audio_window_s: float = 30.0
    output_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.on_long_input not in ("split", "truncate", "error"):
            raise ConfigurationError(f"on_long_input={self.on_long_input!r}: use 'split', 'truncate' or 'error'")
        if self.errors not in ("raise", "collect"):
            raise ConfigurationError(f"errors={self.errors!r}: use 'raise' or 'collect'")
        for name in _INTS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigurationError(f"{name}={value!r} must be a positive integer")
        if self.max_rate_limit_wait is not None and not self.max_rate_limit_wait >= 0:
            raise ConfigurationError(f"max_rate_limit_wait={self.max_rate_limit_wait!r} must be >= 0 seconds or None")
        from embedpipe.quantize import check_output_dtype

        check_output_dtype(self.output_dtype)
        if not self.audio_window_s > 0:
            raise ConfigurationError(f"audio_window_s={self.audio_window_s!r} must be > 0 seconds")
        if not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ConfigurationError(f"max_retries={self.max_retries!r} must be >= 0")
        if self.budget_usd is not None and self.budget_usd < 0:
            raise ConfigurationError(f"budget_usd={self.budget_usd!r} must be >= 0")
        if self.credentials is not None and ":" not in self.credentials:
            raise ConfigurationError(
                f"credentials={self.credentials!r} must be a dotted path 'package.module:callable'")
        if isinstance(self.cache, str) and self.cache.strip().lower() in ("none", "off"):
            object.__setattr__(self, "cache", None)  # --cache none: no cache at all
        object.__setattr__(self, "hooks", tuple(self.hooks or ()))
        object.__setattr__(self, "provider_options", dict(self.provider_options or {}))

    def replace(self, **changes: Any) -> PipelineConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ JSON
    def unserialisable(self) -> list[str]:
        """The fields that hold objects JSON cannot carry."""
        bad = [name for name in ("model", "cache", "rate_limiter", "audio_to_text")
               if not (getattr(self, name) is None or isinstance(getattr(self, name), str))]
        bad += [name for name in ("hooks", "retry_wait", "sleep") if getattr(self, name)]
        try:
            json.dumps(self.provider_options)
        except (TypeError, ValueError):
            bad.append("provider_options")
        return bad

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready fields, secrets removed. Raises :class:`ConfigurationError` naming fields
        that hold objects (a provider or cache object, hooks...)."""
        bad = self.unserialisable()
        if bad:
            raise ConfigurationError(
                f"this PipelineConfig cannot be serialised: {', '.join(bad)} hold(s) Python objects; pass specs and "
                "URLs instead (model='openai:…', cache='redis://…') and leave hooks/retry_wait/sleep unset")
        out: dict[str, Any] = {"version": CONFIG_VERSION}
        for f in fields(self):
            if f.name in ("hooks", "retry_wait", "sleep"):
                continue
            value = getattr(self, f.name)
            if f.name in _URL_FIELDS and isinstance(value, str):
                value = strip_password(value)
            if f.name == "base_url" and isinstance(value, str):
                value = strip_password(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        """JSON with no API key and no URL password; see :meth:`from_json`."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PipelineConfig:
        data = dict(data)
        version = data.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ConfigurationError(f"PipelineConfig version {version!r} is not {CONFIG_VERSION}; upgrade embedpipe")
        known = {f.name for f in fields(cls)} - {"hooks", "retry_wait", "sleep"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"unknown PipelineConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> PipelineConfig:
        """The config :meth:`to_json` wrote (secrets come back at :meth:`build`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(f"PipelineConfig JSON is invalid: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigurationError("PipelineConfig JSON must be an object")
        return cls.from_dict(data)

    # ------------------------------------------------------------------ building
    def secret(self, name: str) -> str | None:
        """The secret ``name`` (``"api_key"``, ``"cache"``, ``"rate_limiter"``) from the ``credentials``
        callable or the environment (``EMBEDPIPE_CACHE_PASSWORD``…; API keys: the provider's own variable,
        read by the provider)."""
        if self.credentials:
            value = load_callable(self.credentials)(name)
            if value:
                return str(value)
        if name != "api_key":
            return os.environ.get(f"EMBEDPIPE_{name.upper()}_PASSWORD") or None
        return None

    def resolved_url(self, name: str) -> Any:
        """The URL field ``name`` with its password restored from :meth:`secret` when it has none."""
        value = getattr(self, name)
        if not isinstance(value, str) or "://" not in value:
            return value
        if urlsplit(value).password is not None:
            return value
        secret = self.secret(name)
        return with_password(value, secret) if secret else value

    def build(self, *, api_key: str | None = None) -> EmbeddingPipeline:
        """The :class:`~embedpipe.EmbeddingPipeline` this config describes."""
        from embedpipe.pipeline import EmbeddingPipeline

        return EmbeddingPipeline.from_config(self, api_key=api_key)


def strip_password(url: str) -> str:
    """``url`` without the password of its user-info (``redis://:pw@h`` -> ``redis://h``)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"{parts.username}@{host}" if parts.username else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def with_password(url: str, secret: str) -> str:
    """``url`` with ``secret`` as its user-info password, unless it has one (the inverse of :func:`strip_password`)."""
    parts = urlsplit(url)
    if parts.password is not None:
        return url
    user = unquote(parts.username or "")
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"{quote(user, safe='')}:{quote(secret, safe='')}@{host}", parts.path,
                       parts.query, parts.fragment))


def load_callable(path: str) -> Callable[[str], Any]:
    """The callable a dotted path ``"package.module:attr"`` names."""
    module, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"credentials={path!r} cannot be imported: {exc}") from None
    if not callable(obj):
        raise ConfigurationError(f"credentials={path!r} is not callable")
    return obj  # type: ignore[no-any-return]


__all__ = ["CONFIG_VERSION", "DEFAULT_CACHE", "PipelineConfig", "load_callable", "strip_password", "with_password"]
