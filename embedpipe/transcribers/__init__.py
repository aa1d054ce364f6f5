"""Speech to text, so that audio is searchable with a text embedding model.

A transcriber is the same small seam as a provider: one blocking method that turns one
:class:`~embedpipe.inputs.Audio` into a :class:`Transcript` of timed segments, plus its
name, model, identity (what enters the transcript's cache key) and price per minute.
Choose one by spec, as models are chosen: ``local-whisper:tiny.en`` (faster-whisper, offline),
``local-whisper:/path/to/ctranslate2-whisper``, ``openai:whisper-1`` (any OpenAI-compatible
``/v1/audio/transcriptions``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from embedpipe.errors import ConfigurationError
from embedpipe.inputs import Audio


@dataclass(frozen=True)
class Segment:
    """A stretch of speech: ``start_s`` and ``end_s`` in seconds from the start of the recording."""

    start_s: float
    end_s: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """What a transcriber heard: timed segments, the recording's duration in seconds, the language."""

    segments: tuple[Segment, ...]
    duration_s: float
    language: str | None = None
    #: seconds the service billed (OpenAI bills audio by duration); the duration when it did not say
    billed_s: float = field(default=0.0)

    @property
    def text(self) -> str:
        return " ".join(s.text for s in self.segments if s.text)

    def to_bytes(self) -> bytes:
        """JSON, as the transcript cache stores it."""
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Transcript:
        doc = json.loads(data)
        return cls(tuple(Segment(float(s["start_s"]), float(s["end_s"]), str(s["text"])) for s in doc["segments"]),
                   float(doc["duration_s"]), doc.get("language"), float(doc.get("billed_s") or 0.0))


class Transcriber:
    """Base class of transcribers. Override :meth:`transcribe` (blocking; the engine runs it in a thread)."""

    #: the spec prefix ("local-whisper", "openai")
    name: str = "transcriber"
    #: USD per minute of audio; 0.0 free, ``None`` unknown
    price_per_minute: float | None = None

    def __init__(self, model: str) -> None:
        self.model = model

    @property
    def spec(self) -> str:
        return f"{self.name}:{self.model}"

    def identity(self) -> dict[str, Any]:
        """What besides name and model changes the transcript (it enters the cache key)."""
        return {}

    def transcribe(self, audio: Audio) -> Transcript:
        """The timed segments of ``audio``; :class:`~embedpipe.errors.InvalidInputError` naming it if unreadable."""
        raise NotImplementedError(f"{type(self).__name__} must override transcribe")  # abstract

    def close(self) -> None:
        """Release models and clients. Idempotent."""


def _local_whisper(name: str, **opts: Any) -> Transcriber:
    from embedpipe.transcribers.local_whisper import LocalWhisperTranscriber

    return LocalWhisperTranscriber(name, **opts)


def _openai(name: str, **opts: Any) -> Transcriber:
    from embedpipe.transcribers.openai import OpenAITranscriber

    return OpenAITranscriber(name, **opts)


#: spec prefix -> factory(name, **options)
TRANSCRIBERS: dict[str, Callable[..., Transcriber]] = {"local-whisper": _local_whisper, "openai": _openai}


def transcriber_from(spec: str | Transcriber, **options: Any) -> Transcriber:
    """The transcriber a spec names (``"local-whisper:tiny.en"``, ``"openai:whisper-1"``), or the one given."""
    if isinstance(spec, Transcriber):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigurationError(f"audio_to_text={spec!r} is not a spec 'kind:model'; known kinds: "
                                 f"{sorted(TRANSCRIBERS)} (e.g. 'local-whisper:tiny.en', 'openai:whisper-1')")
    kind, name = spec.split(":", 1)
    factory = TRANSCRIBERS.get(kind.lower())
    if factory is None:
        raise ConfigurationError(f"unknown transcriber {kind!r} in audio_to_text={spec!r}; "
                                 f"known: {sorted(TRANSCRIBERS)}")
    return factory(name, **{k: v for k, v in options.items() if v is not None})


__all__ = ["TRANSCRIBERS", "Segment", "Transcriber", "Transcript", "transcriber_from"]
