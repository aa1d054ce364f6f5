"""``openai:whisper-1``: OpenAI's ``/v1/audio/transcriptions``, or any server that speaks it (``base_url``)."""

from __future__ import annotations

import os
from typing import Any

from embedpipe.errors import ConfigurationError, InvalidInputError, ProviderError, RateLimitedError
from embedpipe.inputs import Audio
from embedpipe.transcribers import Segment, Transcriber, Transcript

OPENAI_BASE_URL = "https://api.openai.com/v1"

#: USD per minute of audio, from https://openai.com/api/pricing (checked 2025-06)
PRICE_PER_MINUTE = {"whisper-1": 0.006, "gpt-4o-transcribe": 0.006, "gpt-4o-mini-transcribe": 0.003}

#: the MIME type a container is uploaded as
_MIME = {"wav": "audio/wav", "mp3": "audio/mpeg", "flac": "audio/flac", "ogg": "audio/ogg", "m4a": "audio/mp4",
         "webm": "audio/webm", "opus": "audio/ogg", "mp4": "audio/mp4", "mpeg": "audio/mpeg"}


class OpenAITranscriber(Transcriber):
    """``openai:<model>``: a multipart upload of each recording.

    ``response_format``: ``"verbose_json"`` (the default: timed segments, whisper-1) or ``"json"``
    (the text alone, one segment over the whole recording: the gpt-4o transcribe models answer
    only that). Billed seconds come from the answer's ``usage`` (``{"type": "duration"}``), else
    its ``duration``.
    """

    name = "openai"

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None,
                 timeout: float | None = 300.0, response_format: str = "verbose_json",
                 price_per_minute: float | None = None) -> None:
        super().__init__(model)
        if response_format not in ("verbose_json", "json"):
            raise ConfigurationError(f"response_format={response_format!r}: use 'verbose_json' or 'json'")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL).rstrip("/")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key and self.base_url == OPENAI_BASE_URL:
            raise ConfigurationError("no OpenAI API key for audio_to_text: pass api_key= or set OPENAI_API_KEY")
        self._api_key = key or "none"
        self.timeout = timeout
        self.response_format = response_format
        self.price_per_minute = price_per_minute if price_per_minute is not None else PRICE_PER_MINUTE.get(model)
        try:
            import httpx
        except ImportError:
            raise ConfigurationError("openai transcription needs httpx: pip install 'embedpipe[openai]'") from None
        self._client: Any = httpx.Client(base_url=self.base_url, timeout=timeout)

    def identity(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "response_format": self.response_format}

    def transcribe(self, audio: Audio) -> Transcript:
        data = audio.read()
        fmt = audio.format or "wav"
        filename = audio.path.name if audio.path is not None else f"audio.{fmt}"
        import httpx

        try:
            response = self._client.post(
                "/audio/transcriptions", headers={"Authorization": f"Bearer {self._api_key}"},
                files={"file": (filename, data, _MIME.get(fmt, "application/octet-stream"))},
                data={"model": self.model, "response_format": self.response_format})
        except httpx.HTTPError as exc:
            raise ProviderError(f"{self.spec} transcription request failed: {type(exc).__name__}: {exc}",
                                retryable=True) from None
        if response.status_code >= 400:
            message = _error_message(response)
            if response.status_code == 400:
                raise InvalidInputError(f"audio {audio.name}: {self.spec} refused it ({message})")
            if response.status_code == 429:
                raise RateLimitedError(f"{self.spec} transcription: {message}", status=429)
            raise ProviderError(f"{self.spec} transcription answered {response.status_code}: {message}",
                                status=response.status_code, retryable=response.status_code >= 500)
        return parse_transcription(response.json())

    def close(self) -> None:
        self._client.close()


def _error_message(response: Any) -> str:
    try:
        return str(response.json()["error"]["message"])
    except Exception:  # not OpenAI's error shape: the start of the body says enough
        return str(response.text[:200])


def parse_transcription(body: dict[str, Any]) -> Transcript:
    """A :class:`Transcript` from a ``json`` or ``verbose_json`` answer."""
    usage = body.get("usage") or {}
    duration = float(body.get("duration") or usage.get("seconds") or 0.0)
    billed = float(usage["seconds"]) if usage.get("type") == "duration" and "seconds" in usage else duration
    raw = body.get("segments")
    if raw:
        segments = tuple(Segment(float(s["start"]), float(s["end"]), str(s["text"]).strip()) for s in raw)
    else:
        text = str(body.get("text") or "").strip()
        segments = (Segment(0.0, duration, text),) if text else ()
    return Transcript(tuple(s for s in segments if s.text), duration or billed, body.get("language"), billed_s=billed)


__all__ = ["PRICE_PER_MINUTE", "OpenAITranscriber", "parse_transcription"]
