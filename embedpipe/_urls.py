"""Backend URLs: parse them by one grammar, and keep secrets out of every message embedpipe builds.

The grammar is SQLAlchemy's, for every scheme: ``scheme://[user[:password]@]host[:port][/path][?options]``
for servers, and for files ``scheme:///relative/path`` or ``scheme:////absolute/path`` (the
third slash ends the empty host). Options go in the query string.

:func:`redact` is the one redactor: error messages, dead-letter reasons and stored URLs
all pass through it. Providers call :func:`register_secret` with their API key once, and
from then on no text cleaned here can carry it.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

from embedpipe.errors import ConfigurationError

__all__ = ["URL", "file_url", "parse_url", "public_url", "redact", "redact_url", "register_secret",
           "registered_secrets"]

#: what a redacted secret becomes
MASK = "***"
#: query options whose values are secrets (``?password=``, ``?api_key=``, ``?token=``)
_SECRET_OPTION = re.compile(r"(?i)pass|secret|token|key|auth|credential")


@dataclass(frozen=True)
class URL:
    """A parsed backend URL. ``options`` is the query string, one value per name."""

    raw: str
    scheme: str
    username: str | None
    password: str | None
    host: str | None
    port: int | None
    #: the path after the host, without its leading ``/`` (``sqlite:///a.db`` -> ``a.db``,
    #: ``sqlite:////tmp/a.db`` -> ``/tmp/a.db``), percent-decoded
    path: str
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def netloc(self) -> str:
        """The ``user:password@host:port`` part, as written."""
        return urlsplit(self.raw).netloc

    def __str__(self) -> str:
        return redact_url(self.raw)

    def __repr__(self) -> str:
        return f"URL({redact_url(self.raw)!r})"

    def file_path(self, what: str = "backend") -> str:
        """The filesystem path of a file-backed URL; raises when it has a host or names nothing."""
        shown = redact_url(self.raw)
        hint = f"use {self.scheme}:///relative/path or {self.scheme}:////absolute/path"
        if self.netloc:
            raise ConfigurationError(f"{shown!r}: a {what} URL has no host ({self.netloc!r}); {hint}")
        if not self.path:
            raise ConfigurationError(f"{shown!r} names no file for the {what}; {hint}")
        return self.path

    def check_options(self, known: Iterable[str], what: str | None = None) -> None:
        """Raise :class:`ConfigurationError` naming any option not in ``known``, and listing the known ones."""
        allowed = set(known)
        unknown = sorted(set(self.options) - allowed)
        if unknown:
            takes = ", ".join(sorted(allowed)) if allowed else "no options"
            raise ConfigurationError(f"unknown option(s) {', '.join(unknown)} in {what or self.scheme} URL "
                                     f"{redact_url(self.raw)!r}; {self.scheme}:// takes {takes}")

    def without_options(self, *names: str) -> str:
        """The URL as written, less the named options (all options when none are named)."""
        parts = urlsplit(self.raw)
        keep = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if names and k not in names]
        query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in keep)
        return _unsplit(parts.scheme, parts.netloc, parts.path, query)


def parse_url(url: str, what: str = "backend") -> URL:
    """Split ``url`` into scheme, credentials, host, port, path and options (see the module's grammar)."""
    if not isinstance(url, str):
        raise ConfigurationError(f"a {what} URL must be a string, not {type(url).__name__}")
    if "://" not in url:
        raise ConfigurationError(f"{redact_url(url)!r} is not a {what} URL: write scheme://..., "
                                 "e.g. sqlite:///relative.db or redis://localhost:6379/0")
    parts = urlsplit(url.strip())
    try:
        port = parts.port
    except ValueError:
        raise ConfigurationError(f"invalid port in {what} URL {redact_url(url)!r}") from None
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in options:
            raise ConfigurationError(f"option {name!r} given twice in {what} URL {redact_url(url)!r}")
        options[name] = value
    # SQLAlchemy: the first slash after the host separates it from the path, so "///a" is
    # the relative "a" and "////a" the absolute "/a".
    path = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    return URL(raw=url.strip(), scheme=parts.scheme.lower(), username=_unquoted(parts.username),
               password=_unquoted(parts.password), host=parts.hostname, port=port, path=path,
               options=MappingProxyType(options))


def file_url(scheme: str, path: str | os.PathLike[str], options: Mapping[str, str] | None = None) -> URL:
    """The URL of the file at ``path`` for a file-backed scheme, built without parsing (any file name works)."""
    p = os.fspath(path)
    return URL(raw=f"{scheme}:///{quote(p)}", scheme=scheme.lower(), username=None, password=None, host=None,
               port=None, path=p, options=MappingProxyType(dict(options or {})))


def _unquoted(value: str | None) -> str | None:
    return None if value is None else unquote(value)


# -- redaction ----------------------------------------------------------------------------------------

_lock = threading.Lock()
_registered: frozenset[str] = frozenset()

# Shorter values are too likely to be ordinary words; a real key is far longer. A registered
# secret cleans every message of the process, so it must be longer still: a test key such as
# "test" would otherwise mask that word everywhere.
_MIN_SECRET = 4
_MIN_REGISTERED = 8

_PATTERNS = (
    # scheme://user:password@host -> the password masked, the user kept (it says which account).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s/@:]*:)[^\s/@]+@"), rf"\1{MASK}@"),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=\-]+"), rf"\1{MASK}"),
    # OpenAI-style keys: sk-, sk-proj-, sk-svcacct-... SDK messages quote them partly starred.
    (re.compile(r"\bsk-[A-Za-z0-9_\-*]{16,}"), f"sk-{MASK}"),
    (re.compile(r"(?i)((?:api[_-]?key|access[_-]?token|secret|password)[\"']?\s*[=:]\s*[\"']?)[^\s\"'&,;]+"),
     rf"\1{MASK}"),
)


def register_secret(value: str | None) -> None:
    """Treat ``value`` (an API key, a password) as a secret in every text :func:`redact` cleans, from now on.

    Values shorter than 8 characters are ignored: masking them everywhere would mangle ordinary words.
    """
    global _registered
    if not value or len(value) < _MIN_REGISTERED:
        return
    with _lock:
        _registered = _registered | {value}


def registered_secrets() -> frozenset[str]:
    """The values :func:`register_secret` has been given."""
    return _registered


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with ``secrets``, registered secrets, bearer tokens, ``sk-`` keys and URL passwords masked."""
    text = str(text)
    # Longest first, so a secret that contains another is masked whole.
    for secret in sorted({s for s in secrets if s and len(s) >= _MIN_SECRET} | _registered, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def redact_url(url: str) -> str:
    """``url`` with its password, and the values of options named like secrets, masked."""
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError:
        return redact(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{MASK}@{host}"
    pairs = []
    for pair in filter(None, parts.query.split("&")):
        name, eq, _ = pair.partition("=")
        pairs.append(f"{name}={MASK}" if eq and _SECRET_OPTION.search(name) else pair)
    query = "&".join(pairs)
    if netloc == parts.netloc and query == parts.query:
        return redact(url)
    return redact(_unsplit(parts.scheme, netloc, parts.path, query, parts.fragment))


def _unsplit(scheme: str, netloc: str, path: str, query: str = "", fragment: str = "") -> str:
    # Not urlunsplit: it drops the "//" of an empty host, turning sqlite:////abs.db into sqlite://abs.db.
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "") + (f"#{fragment}" if fragment else "")


def public_url(url: str | None) -> str | None:
    """``url`` fit to store: scheme, host, port and path only, never credentials or a query that may carry a token."""
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
