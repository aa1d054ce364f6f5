"""Audio inputs: transcribe (cached by content and model), cut into timed windows, embed the windows as text.

A pipeline with ``audio_to_text`` hands each call's :class:`~embedpipe.inputs.Audio` inputs to
this stage before the engine sees them: every recording becomes the texts of its windows, the
engine embeds those with the pipeline's text model (cache, dedupe, batching as for any text),
and each recording's vector is the token-weighted mean of its windows', as for a long text.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedpipe.cache import CacheBackend
from embedpipe.engine.planning import combine
from embedpipe.errors import CacheError, CacheUnavailableError, Failure, InvalidInputError
from embedpipe.inputs import AUDIO, Audio
from embedpipe.stats import Stats
from embedpipe.transcribers import Transcriber, Transcript

log = logging.getLogger("embedpipe")

#: the longest window of speech that becomes one chunk, in seconds
WINDOW_SECONDS = 30.0


@dataclass(frozen=True)
class Window:
    """Consecutive segments of one recording, embedded as one text; a search hit points at ``start_s``-``end_s``."""

    start_s: float
    end_s: float
    text: str

    @property
    def metadata(self) -> dict[str, float]:
        return {"start_s": self.start_s, "end_s": self.end_s}


def windows_of(transcript: Transcript, seconds: float = WINDOW_SECONDS) -> list[Window]:
    """The transcript's segments grouped into windows of at most ``seconds`` (a longer segment stays whole)."""
    out: list[Window] = []
    group: list[Any] = []
    for seg in transcript.segments:
        if group and seg.end_s - group[0].start_s > seconds:
            out.append(Window(group[0].start_s, group[-1].end_s, " ".join(s.text for s in group)))
            group = []
        group.append(seg)
    if group:
        out.append(Window(group[0].start_s, group[-1].end_s, " ".join(s.text for s in group)))
    return out


def duration_of(audio: Audio) -> float | None:
    """A recording's length in seconds from its container's header (PyAV, which faster-whisper decodes with),
    or ``None`` when it cannot be read."""
    try:
        import av
    except ImportError:
        return None
    try:
        source: Any = str(audio.path) if audio.path is not None else io.BytesIO(audio.read())
        with av.open(source) as container:
            if container.duration is not None:
                return float(container.duration) / 1_000_000  # av.time_base: microseconds
            stream = container.streams.audio[0]
            return float(stream.duration * stream.time_base) if stream.duration else None
    except Exception:  # PyAV's errors share no base class besides Exception: unreadable
        return None


def is_audio(value: object) -> bool:
    return not isinstance(value, str) and getattr(value, "kind", None) == AUDIO


@dataclass
class Expanded:
    """A call's inputs with each recording replaced by its windows' texts."""

    inputs: list[Any]                         # what the engine embeds
    rows: list[list[int]]                     # original index -> rows of ``inputs``
    failures: dict[int, Failure] = field(default_factory=dict)


class AudioStage:
    """Transcripts through the pipeline's cache, and the expand/collapse around an engine call."""

    def __init__(self, transcriber: Transcriber, cache: CacheBackend | None, *,
                 window_seconds: float = WINDOW_SECONDS) -> None:
        self.transcriber = transcriber
        self.cache = cache
        self.window_seconds = window_seconds
        ident = json.dumps({"spec": transcriber.spec, "identity": transcriber.identity()}, sort_keys=True,
                           default=str)
        self._material = hashlib.sha256(b"embedpipe-transcript\x00" + ident.encode("utf-8")).digest()

    def key(self, audio: Audio) -> str:
        """The cache key of ``audio``'s transcript: its content hash and the transcriber's identity."""
        return hashlib.sha256(self._material + audio.content_key()).hexdigest()

    # ------------------------------------------------------------------ transcripts
    def transcripts(self, audios: Sequence[Audio], stats: Stats) -> list[Transcript | str]:
        """Each recording's transcript (from the cache, else transcribed and cached), or why it has none."""
        out: list[Transcript | str | None] = [None] * len(audios)
        keys: list[str | None] = []
        cache = self.cache
        for k, audio in enumerate(audios):
            try:
                keys.append(self.key(audio))
            except InvalidInputError as exc:
                keys.append(None)
                out[k] = str(exc)
        wanted = [k for k, key in enumerate(keys) if key is not None]
        cached: Sequence[bytes | None] = [None] * len(wanted)
        if cache is not None and wanted:
            want = [key for key in keys if key is not None]
            cached = self._guard(lambda: cache.get_many(want), stats, cached)
        fresh: list[tuple[str, bytes]] = []
        done: dict[str, Transcript] = {}
        for k, value in zip(wanted, cached, strict=True):
            key = keys[k]
            assert key is not None
            if value is not None:
                try:
                    out[k] = Transcript.from_bytes(value)
                    continue
                except (ValueError, KeyError, TypeError):
                    stats.add(corrupt=1)
            if key in done:  # the same recording twice in one call: transcribed once
                out[k] = done[key]
                continue
            try:
                heard = self.transcriber.transcribe(audios[k])
            except InvalidInputError as exc:
                out[k] = str(exc)
                continue
            done[key] = out[k] = heard
            price = self.transcriber.price_per_minute
            stats.add(transcribed=1, audio_seconds=heard.billed_s,
                      cost_usd=None if price is None else heard.billed_s / 60 * price)
            fresh.append((key, heard.to_bytes()))
        if cache is not None and fresh:
            self._guard(lambda: cache.set_many(fresh), stats, None)
        return [t if t is not None else "not transcribed" for t in out]

    @staticmethod
    def _guard(action: Any, stats: Stats, default: Any) -> Any:
        try:
            return action()
        except CacheUnavailableError:
            raise
        except CacheError as exc:  # a failing cache costs the cache, never the transcript
            stats.add(cache_errors=1)
            log.warning("embedpipe: transcript cache failed (%s); continuing uncached", exc)
            return default

    def transcribe(self, audio: Audio, stats: Stats) -> Transcript:
        """One recording's transcript; :class:`InvalidInputError` if it cannot be read."""
        got = self.transcripts([audio], stats)[0]
        if isinstance(got, str):
            raise InvalidInputError(got, [0])
        return got

    # ------------------------------------------------------------------ around an engine call
    def expand(self, inputs: Sequence[Any], stats: Stats) -> Expanded:
        """Replace each recording by its windows' texts; recordings with no speech or unreadable become failures."""
        at = [i for i, t in enumerate(inputs) if is_audio(t)]
        heard = dict(zip(at, self.transcripts([inputs[i] for i in at], stats), strict=True))
        expanded = Expanded([], [])
        for i, value in enumerate(inputs):
            got = heard.get(i)
            if got is None:
                expanded.rows.append([len(expanded.inputs)])
                expanded.inputs.append(value)
                continue
            if isinstance(got, str):
                expanded.failures[i] = Failure("invalid_input", message=got)
                expanded.rows.append([])
                continue
            texts = [w.text for w in windows_of(got, self.window_seconds)]
            if not texts:
                expanded.failures[i] = Failure("invalid_input", message=f"audio {value.name}: no speech was heard")
            expanded.rows.append(list(range(len(expanded.inputs), len(expanded.inputs) + len(texts))))
            expanded.inputs.extend(texts)
        return expanded

    def plan(self, inputs: Sequence[Any]) -> tuple[list[Any], float, int]:
        """For an estimate, reading nothing but the transcript cache and the files' headers: the inputs with each
        recording whose transcript is cached replaced by its windows, the seconds of the others, and how many
        of them cannot be read."""
        out: list[Any] = []
        seconds, unreadable = 0.0, 0
        at = [i for i, t in enumerate(inputs) if is_audio(t)]
        keys: dict[int, str] = {}
        for i in at:
            try:
                keys[i] = self.key(inputs[i])
            except InvalidInputError:
                unreadable += 1
        values = dict(zip(keys, self.cache.get_many(list(keys.values())), strict=True)) if self.cache and keys \
            else {}
        for i, value in enumerate(inputs):
            if not is_audio(value):
                out.append(value)
            elif i in keys and (cached := values.get(i)) is not None:
                out.extend(w.text for w in windows_of(Transcript.from_bytes(cached), self.window_seconds))
            elif i in keys:
                length = duration_of(value)
                if length is None:
                    unreadable += 1
                else:
                    seconds += length
        return out, seconds, unreadable

    @staticmethod
    def collapse(expanded: Expanded, out: np.ndarray, failures: dict[int, Failure], tokenizer: Any,
                 dims: int | None) -> tuple[np.ndarray, dict[int, Failure]]:
        """One row per original input: a recording's is its windows' token-weighted mean."""
        n = len(expanded.rows)
        width = out.shape[1] if out.ndim == 2 and out.shape[1] else (dims or 0)
        block = np.full((n, width), np.nan, dtype=np.float32)
        result = dict(expanded.failures)
        for i, rows in enumerate(expanded.rows):
            if i in result:
                continue
            bad = [failures[r] for r in rows if r in failures]
            if bad:
                result[i] = bad[0]
                continue
            if len(rows) == 1:
                block[i] = out[rows[0]]
                continue
            weights = tokenizer.count([expanded.inputs[r] for r in rows])
            vec = combine([(max(1, int(w)), out[r]) for w, r in zip(weights, rows, strict=True)])
            assert vec is not None
            block[i] = vec
        return block, result


__all__ = ["WINDOW_SECONDS", "AudioStage", "Expanded", "Window", "is_audio", "windows_of"]
