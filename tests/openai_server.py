"""OpenAI-compatible embeddings server that injects faults, for tests and benchmarks.

The server speaks the real ``POST /v1/embeddings`` wire format, so the real
``openai`` SDK, LangChain, LlamaIndex and embedpipe's own providers can be
pointed at it with ``base_url=server.base_url``.  Everything a flaky production
endpoint does can be switched on, at construction or between calls:

* token-bucket rate limits (``rpm``/``tpm`` over a ``window`` of seconds) with
  OpenAI's ``x-ratelimit-*`` headers and ``retry-after-ms`` on 429;
* scripted faults ("the next 3 requests fail with 503") and seeded random
  faults: 429, 500, 503, ``insufficient_quota``, stalls, dropped connections,
  shuffled ``data``, NaN vectors, wrong dimensions (one row, or every row of
  one response), wrong item count;
* malformed 200s, as proxies and broken upstreams send them: an HTML page
  (``html``), a body that is not JSON (``not_json``), JSON cut off mid-way
  (``truncated``), items without their ``embedding`` (``missing_embedding``);
* an error that echoes the request's ``Authorization`` header (``echo_auth``),
  as some gateways do, for testing that keys never leak;
* NaN in a given fraction of rows, drawn per row (``nan_rows``), and
  ``corrupt`` substrings whose inputs always come back as NaN inside an
  otherwise good 200;
* OpenAI's validation errors: empty input, context length, dimensions, and
  "poison" substrings that make any request containing them fail;
* fixed and per-token latency;
* Azure OpenAI's path, ``/openai/deployments/{name}/embeddings`` (``api-version``
  ignored; the model is the body's, else the deployment's name).

Per-request faults (:data:`FaultKind`) are queued with ``fail_next``/``script``
or drawn with ``set_fault_rate``; per-row ones (``nan_rows``, ``corrupt``) and
everything else are :class:`ServerConfig` fields set with ``configure``.  Both
work alike in process (:class:`ServerControl`) and out of it
(:class:`RemoteControl`)::

    server.control.fail_next("html", times=2)       # two proxy pages, then good answers
    server.control.fail_next("wrong_dims_all")      # one response of 1535-d vectors
    server.control.configure(nan_rows=0.01)          # 1% of rows carry a NaN
    server.control.configure(corrupt=["BAD ROW"])    # texts holding it always come back NaN

The Batch API is there too: ``/v1/files`` (multipart upload, list, get, content, delete)
and ``/v1/batches`` (create, retrieve, list newest first with ``after``/``limit``, cancel),
also under ``/openai/`` for Azure. A batch goes validating, in_progress (its lines answered
in order, evenly over ``batch_in_progress_s``, as the embeddings endpoint would answer them,
``batch_line_errors`` lines failing with a 500), finalizing, completed, on a fast clock
evaluated at each request; ``script_batches("expired@0.5", "cancelled@0.25", "failed")``
decides the next batches' fates. Output and error files appear when a batch ends; its
completed lines are billed at ``batch_discount`` of the list price (``ledger.billed_usd``).

Vectors are deterministic (see :func:`expected_vector`), and a ledger records
what a real provider would have billed, so tests can assert on cost as well as
on results.

In-process use::

    with running_server(rpm=3, window=1.0) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="test")
        server.control.fail_next("unavailable", times=2)
        ...
        assert server.ledger.times_billed["hello"] == 1

Out of process (for tests that kill clients, and for benchmarks)::

    python -m tests.openai_server --port 8123 --rpm 500 --tpm 1000000 --window 60

with ``GET /_ledger`` and ``POST /_control`` (see :class:`RemoteControl` and
:class:`ServerProcess`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Literal, cast, get_args

import httpx
import numpy as np
import numpy.typing as npt
import tiktoken
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

__all__ = [
    "DEFAULT_MODEL",
    "FAULT_KINDS",
    "MAX_INPUT_TOKENS",
    "NATIVE_DIMS",
    "READY_PREFIX",
    "DimensionsMode",
    "FaultKind",
    "LedgerSnapshot",
    "OpenAITestServer",
    "RemoteControl",
    "ServerConfig",
    "ServerControl",
    "ServerProcess",
    "TokenBucket",
    "cl100k_encoding",
    "create_app",
    "expected_vector",
    "expected_vectors",
    "format_go_duration",
    "main",
    "running_server",
]

DEFAULT_MODEL: Final = "text-embedding-3-small"
"""Model assumed by :func:`expected_vector` when none is given."""

NATIVE_DIMS: Final[Mapping[str, int]] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
"""Output width of OpenAI's embedding models when no ``dimensions`` is sent."""

LIST_PRICES: Final[Mapping[str, float]] = {
    "text-embedding-3-small": 0.02,
    "text-embedding-3-large": 0.13,
    "text-embedding-ada-002": 0.10,
}
"""OpenAI's list prices in USD per 1M tokens (https://openai.com/api/pricing, as of 2026-11-23)."""

MAX_INPUT_TOKENS: Final = 8191
"""Longest input (in cl100k tokens) OpenAI's embedding models accept."""

READY_PREFIX: Final = "OPENAI_TEST_SERVER_READY "
"""Line prefix the CLI prints, followed by the base URL, once it accepts connections."""

FaultKind = Literal[
    "rate_limit",
    "server_error",
    "unavailable",
    "insufficient_quota",
    "stall",
    "drop",
    "drop_after",
    "shuffle",
    "nan",
    "wrong_dims",
    "wrong_dims_all",
    "wrong_count",
    "html",
    "not_json",
    "truncated",
    "missing_embedding",
    "echo_auth",
]
"""A fault the server can inject into one embeddings request.

``rate_limit``/``server_error``/``unavailable``/``insufficient_quota`` answer
429/500/503/429 without doing any work.  ``stall`` waits ``stall_seconds``
before handling the request normally (and gives up, billing nothing, if the
client disconnects first).  ``drop`` closes the connection without answering;
``drop_after`` does the work and bills it, then closes the connection, as when
a response is lost on the way back.  ``shuffle``, ``nan``, ``wrong_dims`` (one
row one element short), ``wrong_dims_all`` (every row one element short: 1535-d
for a 1536-d model), ``wrong_count``, ``truncated`` (the JSON cut in half) and
``missing_embedding`` (items with ``object`` and ``index`` only) corrupt an
otherwise successful (and billed) 200.  ``html`` (a ``text/html`` login page)
and ``not_json`` (``application/json`` whose body is plain text) are what a
proxy in front of the provider answers: status 200, nothing billed.
``echo_auth`` answers ``echo_auth_status`` (401 by default) with a message that
repeats the request's ``Authorization`` header verbatim.
"""

FAULT_KINDS: Final[tuple[FaultKind, ...]] = get_args(FaultKind)

_FAULT_ALIASES: Final[Mapping[str, FaultKind]] = {
    "429": "rate_limit",
    "500": "server_error",
    "503": "unavailable",
}

DimensionsMode = Literal["reject", "ignore", "honour"]
"""How models other than ``text-embedding-3-*`` treat a ``dimensions`` parameter."""

_DIMENSIONS_MODES: Final[tuple[DimensionsMode, ...]] = get_args(DimensionsMode)

_ORGANIZATION: Final = "org-embedpipe-test"
_RATE_LIMIT_DOCS: Final = "Visit https://platform.openai.com/account/rate-limits to learn more."
_INVALID_INPUT: Final = (
    "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
)
# Key under which the outermost ASGI callable stashes the server's own `send`,
# whose bound instance owns the socket; Starlette wraps `send` before endpoints see it.
_RAW_SEND_KEY: Final = "embedpipe.test_server.raw_send"
_REPO_ROOT: Final = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------
# Tokenizer and vectors
# --------------------------------------------------------------------------

# Copied from tiktoken_ext/openai_public.py (cl100k_base); kept here because
# tiktoken.get_encoding() downloads the ranks on first use, which tests cannot.
_CL100K_PAT_STR: Final = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
_CL100K_SPECIAL_TOKENS: Final[Mapping[str, int]] = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|endofprompt|>": 100276,
}


@functools.cache
def cl100k_encoding() -> tiktoken.Encoding:
    """Return tiktoken's cl100k_base encoding, built offline from bpe-openai's copy of its ranks.

    All OpenAI embedding models (``text-embedding-3-*`` and ada-002) tokenize
    with cl100k_base, so it counts tokens for usage, limits and billing.
    """
    # find_spec locates the package without importing it: importing bpe_openai
    # loads its native tokenizer, which costs about a second.
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or spec.origin is None:
        raise RuntimeError("bpe-openai is not installed; the test server reads cl100k_base's ranks from it")
    ranks_file = Path(spec.origin).parent / "data" / "cl100k_base.tiktoken.gz"
    ranks: dict[bytes, int] = {}
    for line in gzip.decompress(ranks_file.read_bytes()).splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        name="cl100k_base",
        pat_str=_CL100K_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=dict(_CL100K_SPECIAL_TOKENS),
    )


@functools.lru_cache(maxsize=4096)
def _cached_vector(text: str, dims: int, model: str) -> npt.NDArray[np.float32]:
    """Compute (once per recent key) the read-only vector behind :func:`expected_vector`."""
    digest = hashlib.sha256(f"{model}\x00{text}".encode()).digest()
    generator = np.random.default_rng(int.from_bytes(digest, "little"))
    raw = generator.standard_normal(dims)
    vector: npt.NDArray[np.float32] = (raw / np.linalg.norm(raw)).astype(np.float32)
    vector.flags.writeable = False
    return vector


def expected_vector(text: str, dims: int, model: str = DEFAULT_MODEL) -> npt.NDArray[np.float32]:
    """Return the embedding the server answers for ``text`` at ``dims`` dimensions.

    The vector is float32 and L2-normalised, drawn from a numpy Generator seeded
    with SHA-256 of ``model`` and ``text``.  Generators draw sequentially, so a
    shorter vector is the renormalised prefix of a longer one, like OpenAI's
    shortened ``text-embedding-3`` embeddings.  Token-array inputs are decoded
    with cl100k_base first, so they get the vector of their text.
    """
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    vector: npt.NDArray[np.float32] = _cached_vector(text, dims, model).copy()
    return vector


def expected_vectors(texts: Sequence[str], dims: int, model: str = DEFAULT_MODEL) -> npt.NDArray[np.float32]:
    """Stack :func:`expected_vector` for each text into a ``(len(texts), dims)`` matrix."""
    matrix = np.empty((len(texts), dims), dtype=np.float32)
    for row, text in enumerate(texts):
        matrix[row] = _cached_vector(text, dims, model)
    return matrix


def format_go_duration(seconds: float) -> str:
    """Format a duration the way OpenAI's ``x-ratelimit-reset-*`` headers do (Go's ``time.Duration``).

    Rounded up to whole milliseconds, so a client that waits the advertised
    time is never early: ``0s``, ``12ms``, ``1s``, ``8.64s``, ``6m0s``, ``1h2m5.5s``.
    """
    millis = max(0, math.ceil(seconds * 1000))
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, fraction = divmod(rest, 1000)
    secs = f"{whole}.{fraction:03d}".rstrip("0") if fraction else str(whole)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# --------------------------------------------------------------------------
# Configuration, rate limits, ledger
# --------------------------------------------------------------------------


def _normalise_fault(fault: str | None) -> FaultKind | None:
    """Map a fault name or alias (``"503"``) to its kind; ``None`` and ``"ok"`` mean no fault."""
    if fault is None or fault == "ok":
        return None
    kind = _FAULT_ALIASES.get(fault, fault)
    for known in FAULT_KINDS:
        if kind == known:
            return known
    raise ValueError(f"unknown fault {fault!r}; expected one of {', '.join(FAULT_KINDS)}")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """Everything that shapes the server's answers; replaced wholesale by :meth:`ServerControl.configure`."""

    rpm: int | None = 10_000
    """Request bucket capacity per ``window``; ``None`` disables the limit and its headers."""
    tpm: int | None = 10_000_000
    """Token bucket capacity per ``window``; ``None`` disables the limit and its headers."""
    window: float = 60.0
    """Seconds over which an empty bucket refills completely (tests use 1-2 s)."""
    default_dims: int = 384
    """Native width of models that are neither in :data:`NATIVE_DIMS` nor in ``model_dims``."""
    model_dims: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Extra or overriding native widths per model name."""
    dimensions_mode: DimensionsMode = "reject"
    """What non-``text-embedding-3`` models do with ``dimensions``: 400, ignore it, or honour it."""
    max_input_tokens: int = MAX_INPUT_TOKENS
    """Longest single input; a longer one fails the whole request with 400."""
    max_batch_size: int = 2048
    """Most inputs per request."""
    max_request_tokens: int = 300_000
    """Most tokens summed over one request's inputs."""
    poison: tuple[str, ...] = ()
    """Substrings that make any request containing them fail with an input-specific 400."""
    corrupt: tuple[str, ...] = ()
    """Substrings whose inputs always come back with a NaN in their vector (in a billed 200)."""
    nan_rows: float = 0.0
    """Probability, drawn per row of every 200, that the row carries a NaN (other rows stay valid)."""
    echo_auth_status: int = 401
    """HTTP status of the ``echo_auth`` fault's error (401; 500 makes it retryable)."""
    latency: float = 0.0
    """Seconds added before every successful answer."""
    latency_per_token: float = 0.0
    """Seconds added per input token before every successful answer."""
    stall_seconds: float = 30.0
    """How long a ``stall`` fault holds a request before handling it."""
    retry_after_ms: int = 50
    """``retry-after-ms`` sent with injected ``rate_limit`` faults."""
    should_retry: bool | None = None
    """If set, error responses carry ``x-should-retry: true|false``, which the openai SDK obeys."""
    quota_exhausted: bool = False
    """Answer every request with 429 ``insufficient_quota``."""
    bill_abandoned: bool = False
    """Bill an admitted request whose client leaves before the answer, as a provider that did the work
    would (a killed client's requests in flight): what a crash re-bills is then measurable."""
    fault_rates: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """Probability per fault kind of hitting a request no scripted fault claims (sum <= 1)."""
    seed: int = 0
    """Seed of the generator behind ``fault_rates`` and fault details, for reproducible runs."""
    transcript: str = "the embedding pipeline caches vectors"
    """What ``/v1/audio/transcriptions`` hears in any WAV upload, its sentences spread evenly over the audio."""
    prices: Mapping[str, float] = dataclasses.field(default_factory=lambda: dict(LIST_PRICES))
    """USD per 1M input tokens per model, for the ledger's ``billed_usd`` (an unknown model bills $0)."""
    batch_discount: float = 0.5
    """Share of the list price a Batch API line is billed at (OpenAI and Azure: half)."""
    batch_validating_s: float = 0.2
    """Seconds a new batch stays ``validating`` (the fast clock of the batch lifecycle)."""
    batch_in_progress_s: float = 1.0
    """Seconds a batch spends ``in_progress``: its lines finish evenly over this time, in order."""
    batch_finalizing_s: float = 0.2
    """Seconds a batch stays ``finalizing`` (or ``cancelling``) before its output and error files appear."""
    batch_line_errors: tuple[str, ...] = ()
    """Substrings whose batch lines fail with a 500 in the error file (the same texts embed fine directly)."""

    def __post_init__(self) -> None:
        """Validate the values and normalise aliases and JSON shapes (lists, string keys)."""
        if self.window <= 0:
            raise ValueError(f"window must be > 0, got {self.window}")
        for name in ("rpm", "tpm"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {limit}")
        if self.dimensions_mode not in _DIMENSIONS_MODES:
            raise ValueError(f"dimensions_mode must be one of {_DIMENSIONS_MODES}, got {self.dimensions_mode!r}")
        if self.default_dims < 1 or any(dims < 1 for dims in self.model_dims.values()):
            raise ValueError("model widths must be >= 1")
        rates: dict[str, float] = {}
        for fault, probability in self.fault_rates.items():
            kind = _normalise_fault(fault)
            if kind is None or not 0.0 <= probability <= 1.0:
                raise ValueError(f"invalid fault rate {fault!r}: {probability!r}")
            rates[kind] = rates.get(kind, 0.0) + float(probability)
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to more than 1: {rates}")
        markers: dict[str, tuple[str, ...]] = {}
        for name in ("poison", "corrupt", "batch_line_errors"):
            value = getattr(self, name)
            markers[name] = (value,) if isinstance(value, str) else tuple(value)
            if any(not marker for marker in markers[name]):
                raise ValueError(f"{name} substrings must be non-empty")
        if not 0.0 <= self.nan_rows <= 1.0:
            raise ValueError(f"nan_rows must be a probability in [0, 1], got {self.nan_rows}")
        if not 400 <= self.echo_auth_status <= 599:
            raise ValueError(f"echo_auth_status must be an HTTP error status, got {self.echo_auth_status}")
        # Frozen dataclass: normalised values are written around the freeze.
        object.__setattr__(self, "fault_rates", rates)
        object.__setattr__(self, "poison", markers["poison"])
        object.__setattr__(self, "corrupt", markers["corrupt"])
        object.__setattr__(self, "batch_line_errors", markers["batch_line_errors"])
        object.__setattr__(self, "prices", {str(k): float(v) for k, v in self.prices.items()})
        if not 0.0 <= self.batch_discount <= 1.0:
            raise ValueError(f"batch_discount must be in [0, 1], got {self.batch_discount}")
        object.__setattr__(self, "model_dims", {str(k): int(v) for k, v in self.model_dims.items()})

    def native_dims(self, model: str) -> int:
        """Return the width ``model`` answers with when no ``dimensions`` is requested."""
        return self.model_dims.get(model) or NATIVE_DIMS.get(model) or self.default_dims

    def to_json(self) -> dict[str, Any]:
        """Return the configuration as JSON-compatible data (accepted back by ``ServerConfig(**data)``)."""
        data = dataclasses.asdict(self)
        data["poison"] = list(self.poison)
        data["corrupt"] = list(self.corrupt)
        data["batch_line_errors"] = list(self.batch_line_errors)
        return data


class TokenBucket:
    """A bucket of ``capacity`` units that refills continuously, completely in ``window`` seconds."""

    def __init__(self, capacity: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        """Create a full bucket."""
        self.capacity = capacity
        self.rate = capacity / window
        self._clock = clock
        self._level = float(capacity)
        self._stamp = clock()

    def level(self) -> float:
        """Return the units available now."""
        now = self._clock()
        self._level = min(self.capacity, self._level + (now - self._stamp) * self.rate)
        self._stamp = now
        return self._level

    def wait_for(self, amount: float) -> float:
        """Return the seconds until ``amount`` units are available (infinite above capacity)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level()) / self.rate)

    def take(self, amount: float) -> None:
        """Remove ``amount`` units (callers check :meth:`wait_for` first)."""
        self._level = self.level() - amount

    def time_to_full(self) -> float:
        """Return the seconds until the bucket is full again (OpenAI's "reset" time)."""
        return (self.capacity - self.level()) / self.rate


@dataclasses.dataclass(frozen=True)
class LedgerSnapshot:
    """What the server has billed and answered, as of one moment.

    Tokens are billed only for requests the server completed: every 200, plus
    ``drop_after`` faults.  Requests that failed, were dropped before any work,
    or whose client left during a stall or latency wait bill nothing.
    """

    times_billed: Mapping[str, int]
    """Text -> how many times it was billed (token-array inputs appear as their decoded text)."""
    tokens_billed: Mapping[str, int]
    """Text -> tokens billed for it, summed over all its billings."""
    billed_tokens: int
    """Tokens billed in total."""
    requests_total: int
    """Embeddings requests received, whatever happened to them."""
    status_counts: Mapping[int, int]
    """HTTP status -> embeddings responses sent with it."""
    connections_dropped: int
    """Connections closed without an answer (``drop`` and ``drop_after`` faults, shutdown during a wait)."""
    requests_abandoned: int
    """Requests whose client disconnected while the server was waiting (stall, latency)."""
    stalls: int
    """Stall faults applied."""
    rows_corrupted: int = 0
    """Rows sent with a NaN because of ``nan_rows`` or ``corrupt`` (not the ``nan`` fault)."""
    billed_usd: float = 0.0
    """Dollars billed: direct tokens at the list price, batch lines at ``batch_discount`` of it."""
    batch_billed_tokens: int = 0
    """Tokens billed for Batch API lines (also counted in ``billed_tokens`` and ``times_billed``)."""
    files_uploaded: int = 0
    """Files uploaded to ``/v1/files``."""
    batches_created: int = 0
    """Batches created with ``POST /v1/batches``."""
    batch_submissions: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Text -> how many created batches held it as an input (a text submitted twice shows 2)."""
    batch_statuses: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Batch id -> its status when the snapshot was taken (as last advanced by a request)."""

    @property
    def requests_ok(self) -> int:
        """Return the number of 200 responses."""
        return self.status_counts.get(200, 0)

    @property
    def responses_429(self) -> int:
        """Return the number of 429 responses (rate limits and quota)."""
        return self.status_counts.get(429, 0)

    def to_json(self) -> dict[str, Any]:
        """Return the snapshot as JSON-compatible data (what ``GET /_ledger`` sends)."""
        data = dataclasses.asdict(self)
        data["status_counts"] = {str(status): count for status, count in self.status_counts.items()}
        data["requests_ok"] = self.requests_ok
        data["responses_429"] = self.responses_429
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LedgerSnapshot:
        """Rebuild a snapshot from :meth:`to_json`'s output."""
        fields = {field.name for field in dataclasses.fields(cls)}
        values = {name: value for name, value in data.items() if name in fields}
        values["status_counts"] = {int(status): count for status, count in data["status_counts"].items()}
        return cls(**values)


@dataclasses.dataclass
class _Ledger:
    """Mutable counters behind :class:`LedgerSnapshot`; guarded by the control's lock."""

    times_billed: Counter[str] = dataclasses.field(default_factory=Counter)
    tokens_billed: Counter[str] = dataclasses.field(default_factory=Counter)
    billed_tokens: int = 0
    requests_total: int = 0
    status_counts: Counter[int] = dataclasses.field(default_factory=Counter)
    connections_dropped: int = 0
    requests_abandoned: int = 0
    stalls: int = 0
    rows_corrupted: int = 0
    billed_usd: float = 0.0
    batch_billed_tokens: int = 0
    files_uploaded: int = 0
    batches_created: int = 0
    batch_submissions: Counter[str] = dataclasses.field(default_factory=Counter)
    batch_statuses: dict[str, str] = dataclasses.field(default_factory=dict)

    def snapshot(self) -> LedgerSnapshot:
        return LedgerSnapshot(
            times_billed=dict(self.times_billed),
            tokens_billed=dict(self.tokens_billed),
            billed_tokens=self.billed_tokens,
            requests_total=self.requests_total,
            status_counts=dict(self.status_counts),
            connections_dropped=self.connections_dropped,
            requests_abandoned=self.requests_abandoned,
            stalls=self.stalls,
            rows_corrupted=self.rows_corrupted,
            billed_usd=self.billed_usd,
            batch_billed_tokens=self.batch_billed_tokens,
            files_uploaded=self.files_uploaded,
            batches_created=self.batches_created,
            batch_submissions=dict(self.batch_submissions),
            batch_statuses=dict(self.batch_statuses),
        )


@dataclasses.dataclass(frozen=True)
class _Admission:
    """The rate limiter's verdict on one request."""

    admitted: bool
    limit_type: Literal["requests", "tokens"] = "requests"
    retry_after: float = 0.0
    limit: int = 0
    used: int = 0
    requested: int = 0


class _FaultShortcuts:
    """``fail_next`` and ``set_fault_rate``, written once over ``script``, ``config`` and ``configure``."""

    @property
    def config(self) -> ServerConfig:
        raise NotImplementedError

    def script(self, *faults: FaultKind | str | None) -> None:
        raise NotImplementedError

    def configure(self, **changes: Any) -> ServerConfig:
        raise NotImplementedError

    def fail_next(self, fault: FaultKind | str, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` requests (after faults already queued)."""
        self.script(*([fault] * times))

    def set_fault_rate(self, fault: FaultKind | str, probability: float) -> None:
        """Set the probability that a request with no scripted fault gets ``fault`` (0 removes it)."""
        kind = _normalise_fault(fault)
        if kind is None:
            raise ValueError("a fault kind is required")
        rates = {k: v for k, v in self.config.fault_rates.items() if k != kind}
        if probability:
            rates[kind] = probability
        self.configure(fault_rates=rates)


class ServerControl(_FaultShortcuts):
    """Runtime state of one server: configuration, fault script, rate buckets and ledger.

    Thread-safe: tests call it from their own thread while the server runs in
    another.  :class:`RemoteControl` offers the same methods over HTTP.
    """

    def __init__(self, config: ServerConfig | None = None) -> None:
        """Start from ``config`` (defaults if omitted), which :meth:`reset` returns to."""
        self._initial = config or ServerConfig()
        self._lock = threading.Lock()
        self._config = self._initial
        self._script: deque[FaultKind | None] = deque()
        self._ledger = _Ledger()
        self._rng = random.Random(self._initial.seed)
        self._requests: TokenBucket | None = None
        self._tokens: TokenBucket | None = None
        self._rebuild_buckets()
        # Batch state has its own lock: advancing a batch embeds its lines, which takes ``_lock``.
        self._batch_lock = threading.RLock()
        self._files: dict[str, _StoredFile] = {}
        self._batches: dict[str, _Batch] = {}
        self._batch_fates: deque[str] = deque()

    # -- public API ---------------------------------------------------------

    @property
    def config(self) -> ServerConfig:
        """Return the configuration in force."""
        return self._config

    @property
    def ledger(self) -> LedgerSnapshot:
        """Return a snapshot of what has been billed and answered so far."""
        with self._lock:
            return self._ledger.snapshot()

    @property
    def pending_faults(self) -> tuple[FaultKind | None, ...]:
        """Return the scripted faults not yet consumed (``None`` entries pass a request through)."""
        with self._lock:
            return tuple(self._script)

    def configure(self, **changes: Any) -> ServerConfig:
        """Change configuration fields (see :class:`ServerConfig`) from the next request on.

        Changing ``rpm``, ``tpm`` or ``window`` refills the buckets; changing
        ``seed`` reseeds the fault generator.
        """
        with self._lock:
            old = self._config
            self._config = dataclasses.replace(old, **changes)
            if (old.rpm, old.tpm, old.window) != (self._config.rpm, self._config.tpm, self._config.window):
                self._rebuild_buckets()
            if "seed" in changes:
                self._rng = random.Random(self._config.seed)
            return self._config

    def script(self, *faults: FaultKind | str | None) -> None:
        """Queue faults for the next requests, one each, in order; ``None`` or ``"ok"`` lets one through.

        Scripted faults take precedence over ``fault_rates``.  Each embeddings
        request consumes one entry, whatever else happens to it.
        """
        kinds = [_normalise_fault(fault) for fault in faults]
        with self._lock:
            self._script.extend(kinds)

    def clear_faults(self) -> None:
        """Drop scripted faults and fault rates, and leave quota exhaustion."""
        with self._lock:
            self._script.clear()
        self.configure(fault_rates={}, quota_exhausted=False)

    def reset_ledger(self) -> None:
        """Zero the ledger."""
        with self._lock:
            self._ledger = _Ledger()

    def reset(self) -> None:
        """Return to the construction-time state: configuration, faults, full buckets, empty ledger, seed."""
        with self._lock:
            self._config = self._initial
            self._script.clear()
            self._ledger = _Ledger()
            self._rng = random.Random(self._initial.seed)
            self._rebuild_buckets()
        with self._batch_lock:
            self._files.clear()
            self._batches.clear()
            self._batch_fates.clear()

    def script_batches(self, *fates: str) -> None:
        """Decide the fate of the next batches created, one each: ``"completed"`` (the default),
        ``"failed"``, ``"expired@0.5"`` (half its lines done, then the window runs out) or
        ``"cancelled@0.5"`` (cancelled once half its lines are done)."""
        for fate in fates:
            _parse_fate(fate)
        with self._batch_lock:
            self._batch_fates.extend(fates)

    def state(self) -> dict[str, Any]:
        """Return configuration and pending script as JSON-compatible data (what ``/_control`` answers)."""
        return {"config": self._config.to_json(), "pending_faults": list(self.pending_faults)}

    # -- files and batches ----------------------------------------------------

    def _add_file(self, filename: str, purpose: str, data: bytes, *, uploaded: bool = True) -> _StoredFile:
        stored = _StoredFile(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, data, int(time.time()))
        with self._batch_lock:
            self._files[stored.id] = stored
        if uploaded:
            with self._lock:
                self._ledger.files_uploaded += 1
        return stored

    def _file(self, file_id: str) -> _StoredFile:
        with self._batch_lock:
            stored = self._files.get(file_id)
        if stored is None:
            raise _APIError(404, f"No such File object: {file_id}", param="file_id")
        return stored

    def _create_batch(self, input_file_id: str, endpoint: str, window: str,
                      metadata: dict[str, str] | None) -> _Batch:
        with self._batch_lock:
            stored = self._files.get(input_file_id)
            if stored is None:
                raise _APIError(404, f"No such File object: {input_file_id}", param="input_file_id")
            if stored.purpose != "batch":
                raise _APIError(400, f"File {input_file_id} was not uploaded with purpose 'batch'.",
                                param="input_file_id")
            if endpoint not in _BATCH_ENDPOINTS:
                raise _APIError(400, f"Invalid endpoint {endpoint!r}; this server batches {_BATCH_ENDPOINTS}.",
                                param="endpoint")
            if window != "24h":
                raise _APIError(400, f"Invalid completion_window {window!r}: only '24h' is supported.",
                                param="completion_window")
            lines, invalid = _validate_batch_file(stored.data, endpoint)
            fate, share = _parse_fate(self._batch_fates.popleft() if self._batch_fates else "completed")
            batch = _Batch(f"batch_{uuid.uuid4().hex[:24]}", input_file_id, endpoint, window, metadata,
                           int(time.time()), time.monotonic(), lines, fate=fate, stop_fraction=share,
                           invalid=invalid)
            self._batches[batch.id] = batch
        with self._lock:
            self._ledger.batches_created += 1
            for line in lines:
                raw = line["body"].get("input")
                for text in raw if isinstance(raw, list) else [raw]:
                    if isinstance(text, str):
                        self._ledger.batch_submissions[text] += 1
            self._ledger.batch_statuses[batch.id] = batch.status
        return batch

    def _batch(self, batch_id: str) -> _Batch:
        with self._batch_lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                raise _APIError(404, f"No such Batch object: {batch_id}", param="batch_id")
            self._advance(batch)
            return batch

    def _cancel_batch(self, batch_id: str) -> _Batch:
        with self._batch_lock:
            batch = self._batch(batch_id)
            if batch.status in BATCH_FINAL or batch.status == "cancelling":
                if batch.status != "cancelled":
                    raise _APIError(409, f"Cannot cancel a batch with status '{batch.status}'.")
                return batch
            batch.cancel_requested = time.monotonic()
            self._advance(batch)
            return batch

    def _advance(self, batch: _Batch) -> None:
        """Move ``batch`` along the fast clock: validating, in_progress (lines done evenly, in order),
        finalizing, then completed; or expired/cancelled part-way (as scripted or asked), or failed."""
        config = self._config
        now = time.monotonic()
        if batch.status in BATCH_FINAL:
            return
        t_in = batch.started + config.batch_validating_s
        if now < t_in and batch.cancel_requested is None:
            return
        if batch.invalid or batch.fate == "failed":
            self._finish(batch, "failed", ())
            return
        n = len(batch.lines)
        span = config.batch_in_progress_s
        limit = n if batch.fate == "completed" else math.floor(n * batch.stop_fraction)
        until = now
        if batch.cancel_requested is not None:
            until = min(now, batch.cancel_requested)
            limit = min(limit, n if span <= 0 else max(0, math.floor((batch.cancel_requested - t_in) / span * n)))
        if batch.status == "validating":
            batch.status = "in_progress"
            batch.stamps["in_progress"] = int(time.time())
        due = n if span <= 0 else max(0, min(n, math.floor((until - t_in) / span * n)))
        target = min(due, limit)
        while batch.done < target:
            self._run_line(batch, batch.lines[batch.done])
            batch.done += 1
        stopped = batch.cancel_requested is not None or batch.fate in ("expired", "cancelled")
        if batch.done < n and not (stopped and batch.done >= limit):
            self._note_status(batch)
            return
        end = t_in + (batch.done / n * span if n else 0.0)
        if batch.cancel_requested is not None:
            end = max(end, batch.cancel_requested) if batch.fate == "completed" else min(end, batch.cancel_requested)
        if batch.done < n and batch.fate == "expired" and batch.cancel_requested is None:
            # The window ran out: what was done is kept (and billed), the rest is reported expired.
            self._finish(batch, "expired", batch.lines[batch.done:], code="batch_expired",
                         message="This request could not be executed before the completion window expired.")
            return
        closing = "finalizing" if batch.done == n else "cancelling"
        if closing not in batch.stamps:
            batch.status = closing
            batch.stamps[closing] = int(time.time())
        if now < end + config.batch_finalizing_s:
            self._note_status(batch)
            return
        if closing == "finalizing":
            self._finish(batch, "completed", ())
        else:
            self._finish(batch, "cancelled", batch.lines[batch.done:], code="batch_cancelled",
                         message="This request was not executed because the batch was cancelled.")

    def _run_line(self, batch: _Batch, line: dict[str, Any]) -> None:
        """Answer one batch line as the embeddings endpoint would (billed at the batch price)."""
        config = self._config
        custom_id = str(line["custom_id"])
        try:
            parsed = _parse_request(line["body"], config)
            if any(marker in text for text in parsed.texts for marker in config.batch_line_errors):
                raise _APIError(500, "The server had an error while processing your request.", type="server_error")
        except _APIError as error:
            batch.failed += 1
            batch.errors.append(_batch_line(custom_id, status=error.status, body=json.dumps(error.body).encode()))
            return
        payload = _build_payload(parsed, None, self)
        self._bill(parsed.texts, parsed.token_counts, parsed.model, batch=True)
        batch.completed += 1
        batch.output.append(_batch_line(custom_id, status=200, body=payload))

    def _finish(self, batch: _Batch, status: str, left: Sequence[dict[str, Any]], *, code: str = "",
                message: str = "") -> None:
        for line in left:
            batch.failed += 1
            batch.errors.append(_batch_line(str(line["custom_id"]), error={"code": code, "message": message}))
        if batch.output:
            out = self._add_file(f"{batch.id}_output.jsonl", "batch_output", ("\n".join(batch.output) + "\n").encode(),
                                uploaded=False)
            batch.output_file_id = out.id
        if batch.errors:
            err = self._add_file(f"{batch.id}_error.jsonl", "batch_output", ("\n".join(batch.errors) + "\n").encode(),
                                uploaded=False)
            batch.error_file_id = err.id
        batch.status = status
        batch.stamps[status] = int(time.time())
        self._note_status(batch)

    def _note_status(self, batch: _Batch) -> None:
        with self._lock:
            self._ledger.batch_statuses[batch.id] = batch.status

    # -- used by the app ----------------------------------------------------

    def _rebuild_buckets(self) -> None:
        config = self._config
        self._requests = TokenBucket(config.rpm, config.window) if config.rpm is not None else None
        self._tokens = TokenBucket(config.tpm, config.window) if config.tpm is not None else None

    def _begin_request(self) -> FaultKind | None:
        """Count an embeddings request and pick its fault: scripted first, then by ``fault_rates``."""
        with self._lock:
            self._ledger.requests_total += 1
            if self._script:
                return self._script.popleft()
            rates = self._config.fault_rates
            if not rates:
                return None
            # One draw per request keeps a seeded run reproducible whatever the rates are.
            draw, cumulative = self._rng.random(), 0.0
            for kind, probability in rates.items():
                cumulative += probability
                if draw < cumulative:
                    return cast(FaultKind, kind)
            return None

    def _random_index(self, size: int) -> int:
        with self._lock:
            return self._rng.randrange(size)

    def _permutation(self, size: int) -> list[int]:
        with self._lock:
            order = list(range(size))
            self._rng.shuffle(order)
        if size > 1 and order == sorted(order):
            # A shuffle fault must be visible: never hand back the original order.
            order.reverse()
        return order

    def _corrupt_rows(self, texts: Sequence[str]) -> list[int]:
        """Pick the rows of a 200 that get a NaN: ``corrupt`` matches always, others with ``nan_rows``."""
        config = self._config
        rows = []
        with self._lock:
            for row, text in enumerate(texts):
                # Draw only when nan_rows is on, so other seeded runs see the same fault sequence.
                drawn = config.nan_rows > 0 and self._rng.random() < config.nan_rows
                if drawn or any(marker in text for marker in config.corrupt):
                    rows.append(row)
            self._ledger.rows_corrupted += len(rows)
        return rows

    def _admit(self, tokens: int) -> _Admission:
        """Take one request and ``tokens`` tokens from the buckets, or say why and for how long not."""
        with self._lock:
            checks = [
                (bucket, amount, kind)
                for bucket, amount, kind in (
                    (self._requests, 1, "requests"),
                    (self._tokens, tokens, "tokens"),
                )
                if bucket is not None
            ]
            worst: _Admission | None = None
            for bucket, amount, kind in checks:
                wait = bucket.wait_for(amount)
                if wait > 0 and (worst is None or wait > worst.retry_after):
                    worst = _Admission(
                        admitted=False,
                        limit_type=cast(Literal["requests", "tokens"], kind),
                        retry_after=wait,
                        limit=bucket.capacity,
                        used=bucket.capacity - math.floor(bucket.level()),
                        requested=amount,
                    )
            if worst is not None:
                return worst
            for bucket, amount, _ in checks:
                bucket.take(amount)
            return _Admission(admitted=True)

    def _rate_headers(self) -> dict[str, str]:
        """Return OpenAI's ``x-ratelimit-*`` headers for the buckets' current state."""
        headers: dict[str, str] = {}
        with self._lock:
            for bucket, kind in ((self._requests, "requests"), (self._tokens, "tokens")):
                if bucket is None:
                    continue
                headers[f"x-ratelimit-limit-{kind}"] = str(bucket.capacity)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.level())))
                headers[f"x-ratelimit-reset-{kind}"] = format_go_duration(bucket.time_to_full())
        return headers

    def _record_status(self, status: int) -> None:
        with self._lock:
            self._ledger.status_counts[status] += 1

    def _bill(self, texts: Sequence[str], token_counts: Sequence[int], model: str | None = None, *,
              batch: bool = False) -> None:
        with self._lock:
            for text, count in zip(texts, token_counts, strict=True):
                self._ledger.times_billed[text] += 1
                self._ledger.tokens_billed[text] += count
                self._ledger.billed_tokens += count
            total = sum(token_counts)
            price = self._config.prices.get(model or "", 0.0) * (self._config.batch_discount if batch else 1.0)
            self._ledger.billed_usd += total * price / 1_000_000
            if batch:
                self._ledger.batch_billed_tokens += total

    def _note(self, event: Literal["dropped", "abandoned", "stall"]) -> None:
        with self._lock:
            if event == "dropped":
                self._ledger.connections_dropped += 1
            elif event == "abandoned":
                self._ledger.requests_abandoned += 1
            else:
                self._ledger.stalls += 1



# --------------------------------------------------------------------------
# Files and batches (the Batch API)
# --------------------------------------------------------------------------

# OpenAI's Batch API limits (https://platform.openai.com/docs/guides/batch, as of 2026-12-02).
BATCH_MAX_REQUESTS: Final = 50_000
"""Most lines in one batch input file."""
BATCH_MAX_BYTES: Final = 200 * 1024 * 1024
"""Largest batch input file."""
BATCH_MAX_EMBEDDING_INPUTS: Final = 50_000
"""Most embedding inputs over all the lines of one batch."""
BATCH_FINAL: Final = frozenset({"completed", "expired", "cancelled", "failed"})
"""Statuses a batch never leaves."""
_BATCH_ENDPOINTS: Final = ("/v1/embeddings", "/embeddings")


@dataclasses.dataclass
class _StoredFile:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None}


@dataclasses.dataclass
class _Batch:
    """One batch and where its lifecycle stands; advanced lazily by :meth:`ServerControl._advance`."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    created_at: int
    started: float
    lines: list[dict[str, Any]]
    fate: str = "completed"
    stop_fraction: float = 1.0
    invalid: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: str = "validating"
    done: int = 0
    completed: int = 0
    failed: int = 0
    output: list[str] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    stamps: dict[str, int] = dataclasses.field(default_factory=dict)
    cancel_requested: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        stamp = self.stamps.get
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.invalid} if self.invalid else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": stamp("in_progress"),
            "expires_at": self.created_at + 24 * 3600, "finalizing_at": stamp("finalizing"),
            "completed_at": stamp("completed"), "failed_at": stamp("failed"), "expired_at": stamp("expired"),
            "cancelling_at": stamp("cancelling"), "cancelled_at": stamp("cancelled"),
            "request_counts": {"total": len(self.lines), "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


def _parse_fate(fate: str) -> tuple[str, float]:
    """``"completed"``, ``"failed"``, ``"expired@0.5"`` or ``"cancelled@0.5"`` (the share of lines done first)."""
    name, _, share = fate.partition("@")
    if name not in ("completed", "failed", "expired", "cancelled"):
        raise ValueError(f"unknown batch fate {fate!r}: completed, failed, expired@SHARE or cancelled@SHARE")
    fraction = float(share) if share else (1.0 if name == "completed" else 0.0)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"batch fate {fate!r}: the share must be in [0, 1]")
    return name, fraction


def _validate_batch_file(data: bytes, endpoint: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The lines of a batch input file, and the validation errors OpenAI would report for it."""
    errors: list[dict[str, Any]] = []

    def bad(code: str, message: str, line: int | None = None) -> None:
        errors.append({"code": code, "message": message, "param": None, "line": line})

    if len(data) > BATCH_MAX_BYTES:
        bad("file_too_large", f"The input file is {len(data)} bytes; the limit is {BATCH_MAX_BYTES}.")
    lines: list[dict[str, Any]] = []
    seen: set[str] = set()
    models: set[str] = set()
    inputs = 0
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError:
            bad("invalid_json_line", "This line is not parseable as valid JSON.", number)
            continue
        custom_id = line.get("custom_id") if isinstance(line, dict) else None
        body = line.get("body") if isinstance(line, dict) else None
        if not isinstance(custom_id, str) or not isinstance(body, dict):
            bad("missing_required_parameter", "Each line needs a custom_id and a body.", number)
            continue
        if custom_id in seen:
            bad("duplicate_custom_id", f"The custom_id {custom_id!r} is not unique in the file.", number)
        seen.add(custom_id)
        if line.get("method") != "POST" or line.get("url") != endpoint:
            bad("invalid_url", f"The line's url must be {endpoint!r} with method POST.", number)
        models.add(str(body.get("model")))
        raw_input = body.get("input")
        inputs += len(raw_input) if isinstance(raw_input, list) and not all(
            isinstance(v, int) for v in raw_input) else 1
        lines.append(line)
    if len(lines) > BATCH_MAX_REQUESTS:
        bad("too_many_requests", f"The file holds {len(lines)} requests; the limit is {BATCH_MAX_REQUESTS}.")
    if len(models) > 1:
        bad("mismatched_model", f"All lines of a batch must use one model; found {sorted(models)}.")
    if inputs > BATCH_MAX_EMBEDDING_INPUTS:
        bad("too_many_inputs", f"The batch holds {inputs} embedding inputs; the limit is "
            f"{BATCH_MAX_EMBEDDING_INPUTS}.")
    if not lines and not errors:
        bad("empty_file", "The input file holds no requests.")
    return lines, errors


def _batch_line(custom_id: str, *, status: int | None = None, body: bytes | None = None,
                error: Mapping[str, str] | None = None) -> str:
    """One line of an output or error file (the body is spliced in as sent, NaN tokens included)."""
    head = {"id": f"batch_req_{uuid.uuid4().hex[:24]}", "custom_id": custom_id}
    prefix = json.dumps(head)[:-1]
    if status is None:
        return f'{prefix}, "response": null, "error": {json.dumps(dict(error or {}))}}}'
    payload = (body or b"{}").decode()
    response = f'{{"status_code": {status}, "request_id": "req_{uuid.uuid4().hex}", "body": {payload}}}'
    return f'{prefix}, "response": {response}, "error": null}}'


# --------------------------------------------------------------------------
# The ASGI application
# --------------------------------------------------------------------------


class _APIError(Exception):
    """An error answered in OpenAI's ``{"error": {...}}`` shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # OpenAI's field name
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = dict(headers or {})


@dataclasses.dataclass(frozen=True)
class _EmbeddingRequest:
    """A validated embeddings request."""

    model: str
    texts: list[str]
    token_counts: list[int]
    dims: int
    encoding_format: Literal["float", "base64"]

    @property
    def total_tokens(self) -> int:
        return sum(self.token_counts)


def _parse_inputs(raw: object) -> tuple[list[str], list[int]]:
    """Turn ``input`` (string, strings, token array, token arrays) into texts and their token counts."""
    encoding = cl100k_encoding()

    def is_token(value: object) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if isinstance(raw, str):
        items: list[object] = [raw]
    elif isinstance(raw, list) and raw and all(is_token(value) for value in raw):
        items = [raw]  # a single token array
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise _APIError(400, _INVALID_INPUT)
    texts: list[str] = []
    counts: list[int] = []
    for item in items:
        if isinstance(item, str) and item:
            texts.append(item)
            counts.append(len(encoding.encode_ordinary(item)))
        elif isinstance(item, list) and item and all(is_token(value) for value in item):
            tokens = cast(list[int], item)
            try:
                texts.append(encoding.decode(tokens))
            except (KeyError, ValueError, OverflowError) as error:
                raise _APIError(400, f"Invalid token in 'input': {error}", param="input") from error
            # OpenAI bills token arrays as sent, not as their text would re-encode.
            counts.append(len(tokens))
        else:
            raise _APIError(400, _INVALID_INPUT)
    return texts, counts


def _parse_request(body: object, config: ServerConfig) -> _EmbeddingRequest:
    """Validate an embeddings request body the way OpenAI does, raising :class:`_APIError`."""
    if not isinstance(body, dict):
        raise _APIError(400, "We could not parse the JSON body of your request.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _APIError(400, "you must provide a model parameter", param="model")
    if "input" not in body:
        raise _APIError(400, "'input' is a required property", param="input")
    encoding_format = body.get("encoding_format") or "float"
    if encoding_format not in ("float", "base64"):
        raise _APIError(
            400,
            f"Invalid value: '{encoding_format}'. Supported values are: 'float' and 'base64'.",
            param="encoding_format",
            code="invalid_value",
        )

    texts, counts = _parse_inputs(body["input"])
    if len(texts) > config.max_batch_size:
        raise _APIError(
            400,
            f"Invalid 'input': maximum input array size is {config.max_batch_size}, got {len(texts)}.",
            param="input",
        )
    for count in counts:
        if count > config.max_input_tokens:
            raise _APIError(
                400,
                f"This model's maximum context length is {config.max_input_tokens + 1} tokens, however you "
                f"requested {count} tokens ({count} in your prompt; 0 for the completion). "
                "Please reduce your prompt; or completion length.",
            )
    if sum(counts) > config.max_request_tokens:
        raise _APIError(
            400,
            f"Requested {sum(counts)} tokens, max {config.max_request_tokens} tokens per request",
            param="input",
        )
    for index, text in enumerate(texts):
        for marker in config.poison:
            if marker in text:
                raise _APIError(
                    400,
                    f"Invalid 'input[{index}]': the input contains content this server rejects ({marker!r}).",
                    param=f"input[{index}]",
                    code="invalid_input",
                )

    native = config.native_dims(model)
    dims = native
    requested = body.get("dimensions")
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool):
            raise _APIError(400, "Invalid type for 'dimensions': expected an integer.", param="dimensions")
        supports = model.startswith("text-embedding-3") or config.dimensions_mode == "honour"
        if not supports and config.dimensions_mode == "reject":
            raise _APIError(400, "This model does not support specifying dimensions.", param="dimensions")
        if supports:
            if requested < 1:
                raise _APIError(
                    400,
                    f"Invalid 'dimensions': integer below minimum value. Expected a value >= 1, "
                    f"but got {requested} instead.",
                    param="dimensions",
                    code="integer_below_min_value",
                )
            if requested > native:
                raise _APIError(
                    400,
                    f"Invalid 'dimensions': integer above maximum value. Expected a value <= {native}, "
                    f"but got {requested} instead.",
                    param="dimensions",
                    code="integer_above_max_value",
                )
            dims = requested
    return _EmbeddingRequest(model, texts, counts, dims, cast(Literal["float", "base64"], encoding_format))


def _encode_vector(vector: npt.NDArray[np.float32], encoding_format: Literal["float", "base64"]) -> object:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4", copy=False).tobytes()).decode("ascii")
    return vector.tolist()


def _wrong_width(vector: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Return ``vector`` one element short (or two elements long, when it has only one)."""
    return vector[:-1] if vector.shape[0] > 1 else np.zeros(2, np.float32)


def _with_nan(vector: npt.NDArray[np.float32], position: int) -> npt.NDArray[np.float32]:
    corrupted = vector.copy()
    corrupted[position] = np.nan
    return corrupted


def _build_payload(request: _EmbeddingRequest, fault: FaultKind | None, control: ServerControl) -> bytes:
    """Render the 200 body, corrupted as ``fault`` and the per-row settings say."""
    vectors = [_cached_vector(text, request.dims, request.model) for text in request.texts]
    for row in control._corrupt_rows(request.texts):
        vectors[row] = _with_nan(vectors[row], row % request.dims)
    order = list(range(len(vectors)))
    if fault == "nan":
        victim = control._random_index(len(vectors))
        vectors[victim] = _with_nan(vectors[victim], control._random_index(request.dims))
    elif fault == "wrong_dims":
        victim = control._random_index(len(vectors))
        vectors[victim] = _wrong_width(vectors[victim])
    elif fault == "wrong_dims_all":
        vectors = [_wrong_width(vector) for vector in vectors]
    elif fault == "shuffle":
        order = control._permutation(len(vectors))
    elif fault == "wrong_count":
        order = order[:-1]
    items: list[dict[str, object]] = [
        {"object": "embedding", "index": i, "embedding": _encode_vector(vectors[i], request.encoding_format)}
        for i in order
    ]
    if fault == "missing_embedding":
        items = [{"object": "embedding", "index": i} for i in order]
    payload = {
        "object": "list",
        "data": items,
        "model": request.model,
        "usage": {"prompt_tokens": request.total_tokens, "total_tokens": request.total_tokens},
    }
    # allow_nan: NaN rows must reach the client as the NaN token Python's json reads.
    body = json.dumps(payload, allow_nan=True, separators=(",", ":")).encode()
    if fault == "truncated":
        # Cut inside the data list, as a connection reset mid-body leaves it.
        return body[: len(body) // 2]
    return body


# What a reverse proxy or captive portal answers with status 200 instead of the provider's JSON.
_HTML_PAGE: Final = (
    b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head>"
    b"<body><h1>Sign in to continue</h1><form method=\"post\" action=\"/login\"></form></body></html>\n"
)
# Envoy's plain-text answer when its upstream resets, sent here under a JSON content type.
_NOT_JSON_BODY: Final = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


async def _until_disconnect(receive: Receive) -> None:
    """Return once the client has gone (the request body must already have been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class _DropConnection(Response):
    """A "response" that closes the TCP connection without sending a byte, like a crashed upstream."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_send = scope.get(_RAW_SEND_KEY)
        # uvicorn's `send` is a bound method of the request cycle, which holds the transport.
        transport = getattr(getattr(raw_send, "__self__", None), "transport", None)
        if not isinstance(transport, asyncio.BaseTransport):
            raise ConnectionAbortedError("cannot reach the transport to drop the connection")
        transport.close()
        # Wait for uvicorn to notice the closed socket, or it would answer its own 500 on it.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(_until_disconnect(receive), timeout=5)


def _json_response(
    status: int, body: bytes, headers: Mapping[str, str], media_type: str = "application/json"
) -> Response:
    return Response(body, status_code=status, headers=dict(headers), media_type=media_type)


class _EmbeddingsApp:
    """The ASGI application: OpenAI's embeddings and models endpoints plus ``/_ledger`` and ``/_control``."""

    def __init__(self, control: ServerControl) -> None:
        self.control = control
        self._shutdown: asyncio.Event | None = None
        routes = [
            Route("/v1/embeddings", self._embeddings, methods=["POST"]),
            Route("/embeddings", self._embeddings, methods=["POST"]),
            Route("/openai/deployments/{deployment}/embeddings", self._embeddings, methods=["POST"]),
            Route("/v1/audio/transcriptions", self._transcriptions, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/models", self._models, methods=["GET"]),
            *[
                route
                for prefix in ("/v1", "/openai", "")
                for route in (
                    Route(f"{prefix}/files", self._files_create, methods=["POST"]),
                    Route(f"{prefix}/files", self._files_list, methods=["GET"]),
                    Route(f"{prefix}/files/{{file_id}}", self._files_get, methods=["GET", "DELETE"]),
                    Route(f"{prefix}/files/{{file_id}}/content", self._files_content, methods=["GET"]),
                    Route(f"{prefix}/batches", self._batches_create, methods=["POST"]),
                    Route(f"{prefix}/batches", self._batches_list, methods=["GET"]),
                    Route(f"{prefix}/batches/{{batch_id}}", self._batches_get, methods=["GET"]),
                    Route(f"{prefix}/batches/{{batch_id}}/cancel", self._batches_cancel, methods=["POST"]),
                )
            ],
            Route("/_ledger", self._ledger, methods=["GET"]),
            Route("/_control", self._control, methods=["GET", "POST"]),
        ]
        self._router = Starlette(routes=routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope[_RAW_SEND_KEY] = send
        await self._router(scope, receive, send)

    def begin_shutdown(self) -> None:
        """Wake every request waiting on a stall or latency so the server can stop promptly."""
        self._shutdown_event().set()

    def _shutdown_event(self) -> asyncio.Event:
        if self._shutdown is None:
            self._shutdown = asyncio.Event()
        return self._shutdown

    async def _wait(self, seconds: float, receive: Receive) -> Literal["elapsed", "disconnected", "shutdown"]:
        """Sleep ``seconds`` unless the client disconnects or the server shuts down first."""
        if seconds <= 0:
            return "elapsed"

        waiters = {
            asyncio.ensure_future(self._shutdown_event().wait()): "shutdown",
            asyncio.ensure_future(_until_disconnect(receive)): "disconnected",
        }
        try:
            done, _ = await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if not done:
            return "elapsed"
        return cast(Literal["disconnected", "shutdown"], waiters[done.pop()])

    def _respond(
        self, status: int, body: bytes, request_id: str, started: float, media_type: str = "application/json"
    ) -> Response:
        """Build an embeddings response with OpenAI's bookkeeping headers and count its status."""
        config = self.control.config
        headers = {
            "x-request-id": request_id,
            "openai-processing-ms": str(int((time.perf_counter() - started) * 1000)),
            "openai-organization": _ORGANIZATION,
            **self.control._rate_headers(),
        }
        if status != 200 and config.should_retry is not None:
            headers["x-should-retry"] = "true" if config.should_retry else "false"
        self.control._record_status(status)
        return _json_response(status, body, headers, media_type)

    def _error(self, error: _APIError, request_id: str, started: float) -> Response:
        response = self._respond(error.status, json.dumps(error.body).encode(), request_id, started)
        response.headers.update(error.headers)
        return response

    def _abandon(self, outcome: Literal["disconnected", "shutdown"]) -> Response:
        """Give up on a request whose client left (nothing to send) or that shutdown interrupted."""
        self.control._note("abandoned" if outcome == "disconnected" else "dropped")
        return _DropConnection()

    async def _embeddings(self, request: Request) -> Response:
        started = time.perf_counter()
        request_id = f"req_{uuid.uuid4().hex}"
        control = self.control
        fault = control._begin_request()
        config = control.config
        try:
            if config.quota_exhausted or fault == "insufficient_quota":
                raise _APIError(
                    429,
                    "You exceeded your current quota, please check your plan and billing details. For more "
                    "information on this error, read the docs: "
                    "https://platform.openai.com/docs/guides/error-codes/api-errors.",
                    type="insufficient_quota",
                    code="insufficient_quota",
                )
            if fault == "rate_limit":
                wait_ms = config.retry_after_ms
                raise _APIError(
                    429,
                    f"Rate limit reached for requests in organization {_ORGANIZATION}. "
                    f"Please try again in {format_go_duration(wait_ms / 1000)}. {_RATE_LIMIT_DOCS}",
                    type="requests",
                    code="rate_limit_exceeded",
                    headers={"retry-after-ms": str(wait_ms), "retry-after": str(math.ceil(wait_ms / 1000))},
                )
            if fault == "server_error":
                raise _APIError(
                    500, "The server had an error while processing your request. Sorry about that!", type="server_error"
                )
            if fault == "unavailable":
                raise _APIError(503, "The server is overloaded or not ready yet.", type="server_error")
            if fault == "drop":
                control._note("dropped")
                return _DropConnection()
            if fault == "echo_auth":
                raise _APIError(
                    config.echo_auth_status,
                    f"Incorrect API key provided: {request.headers.get('authorization', '')}. You can find "
                    "your API key at https://platform.openai.com/account/api-keys.",
                    code="invalid_api_key",
                )
            if fault == "html":
                return self._respond(200, _HTML_PAGE, request_id, started, "text/html")
            if fault == "not_json":
                return self._respond(200, _NOT_JSON_BODY, request_id, started)

            raw_body = await request.body()
            try:
                body = json.loads(raw_body)
            except ValueError as error:
                raise _APIError(400, "We could not parse the JSON body of your request.") from error

            if fault == "stall":
                control._note("stall")
                outcome = await self._wait(config.stall_seconds, request.receive)
                if outcome != "elapsed":
                    return self._abandon(outcome)

            deployment = request.path_params.get("deployment")
            if deployment and isinstance(body, dict) and not body.get("model"):
                body["model"] = deployment  # Azure: the deployment names the model

            # Tokenizing big batches is CPU work: keep it off the loop so other requests proceed.
            parsed = await asyncio.to_thread(_parse_request, body, config)

            admission = control._admit(parsed.total_tokens)
            if not admission.admitted:
                raise self._rate_limited(parsed.model, admission)

            delay = config.latency + config.latency_per_token * parsed.total_tokens
            outcome = await self._wait(delay, request.receive)
            if outcome != "elapsed":
                if config.bill_abandoned:
                    control._bill(parsed.texts, parsed.token_counts, parsed.model)
                return self._abandon(outcome)

            payload = await asyncio.to_thread(_build_payload, parsed, fault, control)
            control._bill(parsed.texts, parsed.token_counts, parsed.model)
            if fault == "drop_after":
                control._note("dropped")
                return _DropConnection()
            return self._respond(200, payload, request_id, started)
        except _APIError as error:
            return self._error(error, request_id, started)

    @staticmethod
    def _rate_limited(model: str, admission: _Admission) -> _APIError:
        """Build the 429 OpenAI sends when a request does not fit a bucket."""
        label = "requests per min (RPM)" if admission.limit_type == "requests" else "tokens per min (TPM)"
        if math.isinf(admission.retry_after):
            # Larger than the bucket: waiting cannot help, and OpenAI sends no retry-after.
            return _APIError(
                429,
                f"Request too large for {model} in organization {_ORGANIZATION} on {label}: Limit "
                f"{admission.limit}, Requested {admission.requested}. The input or output tokens must be "
                f"reduced in order to run successfully. {_RATE_LIMIT_DOCS}",
                type=admission.limit_type,
                code="rate_limit_exceeded",
            )
        wait_ms = max(1, math.ceil(admission.retry_after * 1000))
        return _APIError(
            429,
            f"Rate limit reached for {model} in organization {_ORGANIZATION} on {label}: Limit "
            f"{admission.limit}, Used {admission.used}, Requested {admission.requested}. Please try again in "
            f"{format_go_duration(admission.retry_after)}. {_RATE_LIMIT_DOCS}",
            type=admission.limit_type,
            code="rate_limit_exceeded",
            headers={"retry-after-ms": str(wait_ms), "retry-after": str(math.ceil(wait_ms / 1000))},
        )

    async def _transcriptions(self, request: Request) -> Response:
        """OpenAI's transcription endpoint: a multipart upload of a WAV file, answered in ``json`` or
        ``verbose_json`` with ``usage`` by duration (seconds, rounded up, as OpenAI bills audio)."""
        import wave

        config = self.control.config
        headers = self.control._rate_headers()
        try:
            async with request.form() as form:  # closes the upload's spooled file
                upload, model = form.get("file"), form.get("model")
                response_format = str(form.get("response_format") or "json")
                if upload is None or isinstance(upload, str) or not model:
                    raise _APIError(400, "a multipart 'file' and a 'model' are required", param="file")
                if response_format not in ("json", "verbose_json"):
                    raise _APIError(400, f"response_format {response_format!r} is not supported",
                                    param="response_format")
                data, filename = await upload.read(), upload.filename
            try:
                with wave.open(io.BytesIO(data)) as w:
                    duration = w.getnframes() / float(w.getframerate())
            except (wave.Error, EOFError) as exc:
                raise _APIError(400, f"Invalid file format: could not decode {filename} ({exc})",
                                param="file") from None
        except _APIError as exc:
            return _json_response(exc.status, json.dumps(exc.body).encode(), headers)
        sentences = [t.strip() for t in config.transcript.split(".") if t.strip()]
        step = duration / max(1, len(sentences))
        body: dict[str, Any] = {"text": ". ".join(sentences),
                                "usage": {"type": "duration", "seconds": math.ceil(duration)}}
        if response_format == "verbose_json":
            body.update(task="transcribe", language="english", duration=round(duration, 3), segments=[
                {"id": k, "start": round(k * step, 3), "end": round((k + 1) * step, 3), "text": " " + t}
                for k, t in enumerate(sentences)])
        return _json_response(200, json.dumps(body).encode(), headers)

    async def _models(self, request: Request) -> Response:
        config = self.control.config
        names = dict.fromkeys([*NATIVE_DIMS, *config.model_dims])
        body = {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "openai"} for name in names],
        }
        return _json_response(200, json.dumps(body).encode(), self.control._rate_headers())

    # -- files and batches ----------------------------------------------------

    @staticmethod
    def _api(handler: Callable[..., Any]) -> Callable[[Any, Request], Any]:
        """Answer an :class:`_APIError` raised by a files/batches handler in OpenAI's error shape."""

        @functools.wraps(handler)
        async def wrapper(self: _EmbeddingsApp, request: Request) -> Response:
            try:
                body = await handler(self, request)
            except _APIError as error:
                return _json_response(error.status, json.dumps(error.body).encode(), error.headers)
            return _json_response(200, json.dumps(body).encode(), {"x-request-id": f"req_{uuid.uuid4().hex}"})

        return wrapper

    @_api
    async def _files_create(self, request: Request) -> Any:
        async with request.form() as form:  # closes the upload's spooled file
            upload, purpose = form.get("file"), form.get("purpose")
            if upload is None or isinstance(upload, str) or not isinstance(purpose, str) or not purpose:
                raise _APIError(400, "a multipart 'file' and a 'purpose' are required", param="file")
            data, filename = await upload.read(), upload.filename or "upload.jsonl"
        return self.control._add_file(filename, purpose, data).to_json()

    @_api
    async def _files_list(self, request: Request) -> Any:
        purpose = request.query_params.get("purpose")
        with self.control._batch_lock:
            files = [f.to_json() for f in self.control._files.values() if purpose in (None, f.purpose)]
        return {"object": "list", "data": files, "has_more": False}

    @_api
    async def _files_get(self, request: Request) -> Any:
        stored = self.control._file(request.path_params["file_id"])
        if request.method == "DELETE":
            with self.control._batch_lock:
                self.control._files.pop(stored.id, None)
            return {"id": stored.id, "object": "file", "deleted": True}
        return stored.to_json()

    async def _files_content(self, request: Request) -> Response:
        try:
            stored = self.control._file(request.path_params["file_id"])
        except _APIError as error:
            return _json_response(error.status, json.dumps(error.body).encode(), {})
        return Response(stored.data, media_type="application/octet-stream")

    @_api
    async def _batches_create(self, request: Request) -> Any:
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            raise _APIError(400, "We could not parse the JSON body of your request.") from error
        if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
            raise _APIError(400, "'input_file_id' is a required property", param="input_file_id")
        metadata = body.get("metadata")
        batch = await asyncio.to_thread(self.control._create_batch, body["input_file_id"], str(body.get("endpoint")),
                                        str(body.get("completion_window")),
                                        metadata if isinstance(metadata, dict) else None)
        return batch.to_json()

    @_api
    async def _batches_get(self, request: Request) -> Any:
        # Advancing a batch embeds its due lines: CPU work, kept off the loop.
        batch = await asyncio.to_thread(self.control._batch, request.path_params["batch_id"])
        return batch.to_json()

    @_api
    async def _batches_cancel(self, request: Request) -> Any:
        batch = await asyncio.to_thread(self.control._cancel_batch, request.path_params["batch_id"])
        return batch.to_json()

    @_api
    async def _batches_list(self, request: Request) -> Any:
        """Newest first, paginated with ``after`` and ``limit`` as OpenAI's list is."""
        control = self.control
        with control._batch_lock:
            ids = list(reversed(control._batches))
        after = request.query_params.get("after")
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
        limit = int(request.query_params.get("limit") or 20)
        page = [(await asyncio.to_thread(control._batch, b)).to_json() for b in ids[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}

    async def _ledger(self, request: Request) -> Response:
        return _json_response(200, json.dumps(self.control.ledger.to_json()).encode(), {})

    async def _control(self, request: Request) -> Response:
        """Apply ``{"reset", "reset_ledger", "clear_faults", "configure", "script", "script_batches"}`` in that
        order."""
        control = self.control
        if request.method == "POST":
            try:
                ops = json.loads(await request.body() or b"{}")
                if ops.get("reset"):
                    control.reset()
                if ops.get("reset_ledger"):
                    control.reset_ledger()
                if ops.get("clear_faults"):
                    control.clear_faults()
                if ops.get("configure"):
                    control.configure(**ops["configure"])
                if ops.get("script"):
                    control.script(*ops["script"])
                if ops.get("script_batches"):
                    control.script_batches(*ops["script_batches"])
            except (ValueError, TypeError, AttributeError) as error:
                body = {"error": {"message": str(error), "type": "invalid_request_error", "param": None, "code": None}}
                return _json_response(400, json.dumps(body).encode(), {})
        return _json_response(200, json.dumps(control.state()).encode(), {})


def create_app(control: ServerControl | None = None) -> Callable[[Scope, Receive, Send], Any]:
    """Return the server's ASGI application bound to ``control`` (a fresh one if omitted).

    ``drop`` faults need uvicorn's h11 protocol to reach the socket; under other
    servers (or httpx's ASGITransport) they raise instead.
    """
    return _EmbeddingsApp(control or ServerControl())


# --------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, telling the app when shutdown starts and the caller when it is ready."""

    def __init__(self, config: uvicorn.Config, app: _EmbeddingsApp, on_ready: Callable[[], None]) -> None:
        super().__init__(config)
        self._app = app
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stalled requests would otherwise hold graceful shutdown for stall_seconds.
        self._app.begin_shutdown()
        await super().shutdown(sockets)


def _bind(host: str, port: int) -> socket.socket:
    """Bind a listening-ready socket; port 0 lets the OS pick a free port, read back from the socket."""
    # proto must be IPPROTO_TCP (not 0) for asyncio to set TCP_NODELAY on accepted connections;
    # without it Nagle holds each response body until the client's delayed ACK, 40 ms per request.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def _uvicorn_server(app: _EmbeddingsApp, on_ready: Callable[[], None]) -> _Server:
    config = uvicorn.Config(
        app,
        http="h11",  # _DropConnection reaches the socket through h11's request cycle
        lifespan="off",
        log_config=None,  # leave the host's (pytest's) logging configuration alone
        log_level="warning",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=2,
    )
    return _Server(config, app, on_ready)


class OpenAITestServer:
    """The fault-injecting embeddings server, run by uvicorn in a background thread.

    Keyword arguments are :class:`ServerConfig` fields.  Use as a context
    manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        """Configure the server; ``port=0`` picks a free port at :meth:`start`."""
        self.host = host
        self.control = ServerControl(ServerConfig(**config))
        self._requested_port = port
        self._port: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        """Return the bound port (only while running)."""
        if self._port is None:
            raise RuntimeError("the server is not running")
        return self._port

    @property
    def url(self) -> str:
        """Return the root URL, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """Return the OpenAI ``base_url``, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"{self.url}/v1"

    @property
    def ledger(self) -> LedgerSnapshot:
        """Return a snapshot of what has been billed and answered so far."""
        return self.control.ledger

    def reset(self) -> None:
        """Return configuration, faults, buckets and ledger to their construction-time state."""
        self.control.reset()

    def start(self) -> OpenAITestServer:
        """Start serving and return once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("the server is already running")
        cl100k_encoding()  # load before serving, so the first request's latency is not skewed
        sock = _bind(self.host, self._requested_port)
        ready = threading.Event()
        app = _EmbeddingsApp(self.control)
        server = _uvicorn_server(app, ready.set)
        self._failure = None

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException as error:  # reported to the starting thread by start()
                self._failure = error
            finally:
                sock.close()
                ready.set()

        thread = threading.Thread(target=serve, name=f"openai-test-server-{id(self):x}", daemon=True)
        thread.start()
        ready.wait(timeout=10)
        if not server.started:
            server.should_exit = True
            thread.join(timeout=5)
            raise RuntimeError("the test server failed to start") from self._failure
        self._server, self._thread = server, thread
        self._port = sock.getsockname()[1]
        return self

    def stop(self) -> None:
        """Stop serving: pending waits are cut short, then the thread is joined."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout=10)
        if thread.is_alive():
            raise RuntimeError("the test server did not stop within 10 s")
        self._server = self._thread = None
        self._port = None

    def __enter__(self) -> OpenAITestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


@contextlib.contextmanager
def running_server(**config: Any) -> Iterator[OpenAITestServer]:
    """Run an :class:`OpenAITestServer` (same arguments) for the duration of a ``with`` block."""
    with OpenAITestServer(**config) as server:
        yield server


class RemoteControl(_FaultShortcuts):
    """:class:`ServerControl`'s API for a server in another process, over ``/_control`` and ``/_ledger``."""

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        """Talk to the server at ``url`` (its root or its ``/v1`` base URL)."""
        root = url.rstrip("/")
        self.url = root.removesuffix("/v1")
        self._client = httpx.Client(base_url=self.url, timeout=timeout)

    def _post(self, **ops: Any) -> dict[str, Any]:
        response = self._client.post("/_control", json=ops)
        if response.status_code != 200:
            raise ValueError(response.json()["error"]["message"])
        return cast(dict[str, Any], response.json())

    @property
    def config(self) -> ServerConfig:
        """Return the configuration in force."""
        return ServerConfig(**self._client.get("/_control").json()["config"])

    @property
    def ledger(self) -> LedgerSnapshot:
        """Return a snapshot of the server's ledger."""
        return LedgerSnapshot.from_json(self._client.get("/_ledger").json())

    @property
    def pending_faults(self) -> tuple[str | None, ...]:
        """Return the scripted faults not yet consumed."""
        return tuple(self._client.get("/_control").json()["pending_faults"])

    def configure(self, **changes: Any) -> ServerConfig:
        """Change configuration fields (JSON-compatible values only)."""
        return ServerConfig(**self._post(configure=changes)["config"])

    def script(self, *faults: FaultKind | str | None) -> None:
        """Queue faults for the next requests, one each."""
        self._post(script=list(faults))

    def clear_faults(self) -> None:
        """Drop scripted faults and fault rates, and leave quota exhaustion."""
        self._post(clear_faults=True)

    def script_batches(self, *fates: str) -> None:
        """Decide the fate of the next batches created (see :meth:`ServerControl.script_batches`)."""
        self._post(script_batches=list(fates))

    def reset_ledger(self) -> None:
        """Zero the ledger."""
        self._post(reset_ledger=True)

    def reset(self) -> None:
        """Return the server to its start-up state."""
        self._post(reset=True)

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()


class ServerProcess:
    """The server in a child process (``python -m tests.openai_server``), for tests that need one to kill.

    Keyword arguments are :class:`ServerConfig` fields, passed as ``--config``.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **config: Any) -> None:
        """Prepare (not start) a server process."""
        ServerConfig(**config)  # fail here, not in the child, on a bad configuration
        self._argv = [
            sys.executable,
            "-m",
            "tests.openai_server",
            "--host",
            host,
            "--port",
            str(port),
            "--config",
            json.dumps(config),
        ]
        self._process: subprocess.Popen[str] | None = None
        self._base_url: str | None = None
        self._control: RemoteControl | None = None

    @property
    def base_url(self) -> str:
        """Return the OpenAI ``base_url`` of the running server."""
        if self._base_url is None:
            raise RuntimeError("the server process is not running")
        return self._base_url

    @property
    def pid(self) -> int:
        """Return the child's process id."""
        if self._process is None:
            raise RuntimeError("the server process is not running")
        return self._process.pid

    @property
    def control(self) -> RemoteControl:
        """Return a :class:`RemoteControl` for the running server."""
        if self._control is None:
            self._control = RemoteControl(self.base_url)
        return self._control

    @property
    def ledger(self) -> LedgerSnapshot:
        """Return a snapshot of the server's ledger."""
        return self.control.ledger

    def start(self, timeout: float = 20.0) -> ServerProcess:
        """Spawn the process and return once it accepts connections."""
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        process = subprocess.Popen(self._argv, cwd=_REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        self._process = process
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            readable, _, _ = select.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            line = process.stdout.readline()
            if not line:
                break  # the child exited
            if line.startswith(READY_PREFIX):
                self._base_url = line[len(READY_PREFIX) :].strip()
                return self
        self.kill()
        raise RuntimeError(f"the server process did not become ready (exit code {process.poll()})")

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the process to shut down (SIGTERM) and wait for it, killing it if it lingers."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._cleanup()

    def kill(self) -> None:
        """Kill the process (SIGKILL) without letting it shut down."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._process is not None and self._process.stdout is not None:
            self._process.stdout.close()
        if self._control is not None:
            self._control.close()
        self._process = None
        self._control = None
        self._base_url = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def _optional_int(value: str) -> int | None:
    return None if value.lower() in ("none", "off", "unlimited") else int(value)


def _fault_rate(value: str) -> tuple[str, float]:
    fault, _, probability = value.partition("=")
    if not probability:
        raise argparse.ArgumentTypeError(f"expected KIND=PROBABILITY, got {value!r}")
    return fault, float(probability)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.openai_server",
        description="OpenAI-compatible embeddings server with fault injection. Prints "
        f"'{READY_PREFIX.strip()} <base_url>' once it accepts connections.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--config", type=json.loads, default={}, help="JSON object of ServerConfig fields")
    # Config flags stay absent unless given (SUPPRESS), so '--tpm none' can override --config.
    config = parser.add_argument_group("configuration (override --config)", argument_default=argparse.SUPPRESS)
    config.add_argument("--rpm", type=_optional_int, help="requests per window, or 'none'")
    config.add_argument("--tpm", type=_optional_int, help="tokens per window, or 'none'")
    config.add_argument("--window", type=float, help="seconds for a bucket to refill completely")
    config.add_argument("--default-dims", type=int, help="width of models OpenAI does not have")
    config.add_argument("--dimensions-mode", choices=_DIMENSIONS_MODES, help="dimensions on other models")
    config.add_argument("--latency", type=float, help="seconds added to each success")
    config.add_argument("--latency-per-token", type=float, help="seconds added per input token")
    config.add_argument("--stall-seconds", type=float, help="how long a stall fault holds a request")
    config.add_argument("--retry-after-ms", type=int, help="retry-after-ms of injected 429s")
    config.add_argument("--poison", action="append", help="substring that fails a request (repeatable)")
    config.add_argument("--corrupt", action="append", help="substring whose inputs come back NaN (repeatable)")
    config.add_argument("--nan-rows", type=float, help="probability per row of a 200 that it carries a NaN")
    config.add_argument("--echo-auth-status", type=int, help="HTTP status of echo_auth faults")
    config.add_argument(
        "--fault", dest="fault_rates", action="append", type=_fault_rate, help="KIND=PROBABILITY (repeatable)"
    )
    config.add_argument("--seed", type=int, help="seed of the fault generator")
    config.add_argument("--quota-exhausted", action="store_true", help="answer 429 insufficient_quota")
    config.add_argument("--should-retry", choices=("true", "false"), help="send x-should-retry on errors")
    return parser


def _config_from_args(args: argparse.Namespace) -> ServerConfig:
    values: dict[str, Any] = {**args.config}
    flags = {name: value for name, value in vars(args).items() if name not in ("host", "port", "config")}
    if "fault_rates" in flags:
        flags["fault_rates"] = dict(flags["fault_rates"])
    if "should_retry" in flags:
        flags["should_retry"] = flags["should_retry"] == "true"
    return ServerConfig(**{**values, **flags})


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server in the foreground until SIGINT or SIGTERM."""
    args = _parser().parse_args(argv)
    control = ServerControl(_config_from_args(args))
    cl100k_encoding()
    sock = _bind(args.host, args.port)
    app = _EmbeddingsApp(control)
    port = sock.getsockname()[1]
    server = _uvicorn_server(app, lambda: print(f"{READY_PREFIX}http://{args.host}:{port}/v1", flush=True))
    # In the main thread uvicorn installs its own SIGINT/SIGTERM handlers for a graceful stop.
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__":
    main()
