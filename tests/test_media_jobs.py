"""Jobs over media folders: images (tiny random CLIP) and audio (Whisper tiny.en on espeak-ng speech, MiniLM)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpipe import jobs
from embedpipe.jobs.media import AudioFolderSource, ImageFolderSource

PIL = pytest.importorskip("PIL.Image")


def _photo(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(path)
    return path


def _rows(out: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


def test_an_image_folder_is_a_job_with_paths_in_metadata_and_dead_letters(tiny_clip_path: str,
                                                                          tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    _photo(photos / "a.png", 1)
    _photo(photos / "trip" / "b.png", 2)
    shutil.copy(photos / "a.png", photos / "trip" / "a-copy.png")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (photos / "notes.txt").write_text("not an image", encoding="utf-8")
    out = tmp_path / "vectors.jsonl"
    args: dict[str, Any] = {"model": f"local-clip:{tiny_clip_path}", "out": out, "format": "images",
                            "cache": f"sqlite:///{tmp_path / 'c.db'}", "chunk_size": 2}
    first = jobs.run(photos, **args)
    rows = _rows(out)
    assert sorted(rows) == ["a.png", "trip/a-copy.png", "trip/b.png"]
    assert rows["trip/b.png"]["metadata"] == {"image_path": "trip/b.png",
                                              "bytes": (photos / "trip" / "b.png").stat().st_size}
    assert rows["a.png"]["vector"] == rows["trip/a-copy.png"]["vector"] and len(rows["a.png"]["vector"]) == 16
    assert first.embedded == 2 and first.exit_code == 3  # the copy came from the cache; one dead letter
    letters = jobs.dead_letters(out)
    assert [d.id for d in letters] == ["broken.jpg"] and "broken.jpg" in letters[0].reason

    again = jobs.run(photos, **args)
    assert (again.unchanged, again.written, again.embedded) == (3, 0, 0)
    _photo(photos / "trip" / "b.png", 3)  # the same name, other pixels: re-embedded
    third = jobs.run(photos, **args)
    assert (third.written, third.embedded) == (1, 1)
    assert _rows(out)["trip/b.png"]["vector"] != rows["trip/b.png"]["vector"]
    assert [r.id for r in ImageFolderSource(photos)] == ["a.png", "broken.jpg", "trip/a-copy.png", "trip/b.png"]
    # The broken file, repaired: the next run embeds it and its letter leaves the queue.
    _photo(photos / "broken.jpg", 4)
    fixed = jobs.run(photos, **args)
    assert (fixed.written, fixed.exit_code) == (1, 0) and jobs.dead_letters(out) == []
    assert "broken.jpg" in _rows(out)


def test_an_audio_folder_becomes_one_record_per_timed_window(local_provider: Any, tmp_path: Path) -> None:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.skip("espeak-ng is not installed")
    pytest.importorskip("faster_whisper")
    talks = tmp_path / "talks"
    talks.mkdir()
    subprocess.run([espeak, "-s", "140", "-w", str(talks / "talk.wav"),
                    "the embedding pipeline caches vectors. [[_:_:_:_:]] Paris is the capital of France. "
                    "[[_:_:_:_:]] whales are large mammals that live in the ocean."],
                   check=True, timeout=30, capture_output=True)
    (talks / "broken.mp3").write_bytes(b"ID3 not really audio")
    cache = f"sqlite:///{tmp_path / 'c.db'}"
    source = AudioFolderSource(talks, cache=cache, window_s=3.0)
    out = tmp_path / "vectors.jsonl"
    result = jobs.run(source, model=f"local:{local_provider.path}", out=out, cache=cache)
    rows = _rows(out)
    assert len(rows) >= 2 and all(i.startswith("talk.wav#") for i in rows)
    for rid, row in rows.items():
        start, end = (float(x) for x in rid.split("#")[1].split("-"))
        assert row["metadata"]["audio_path"] == "talk.wav"
        assert (row["metadata"]["start_s"], row["metadata"]["end_s"]) == pytest.approx((start, end), abs=0.01)
    assert source.stats.transcribed == 1
    assert [d.id for d in jobs.dead_letters(out)] == ["broken.mp3"]
    rerun = AudioFolderSource(talks, cache=cache, window_s=3.0)
    assert jobs.run(rerun, model=f"local:{local_provider.path}", out=out, cache=cache).written == 0
    assert rerun.stats.transcribed == 0
    assert result.exit_code == 3  # finished, with dead letters

    # The same recording named by a JSONL row: windows under the row's id, its fields kept, nothing transcribed.
    listing = tmp_path / "talks.jsonl"
    listing.write_text(json.dumps({"id": "standup", "audio_path": "talks/talk.wav", "team": "core"}) + "\n",
                       encoding="utf-8")
    from_rows = AudioFolderSource(listing, cache=cache, window_s=3.0)
    out2 = tmp_path / "rows.jsonl"
    jobs.run(from_rows, model=f"local:{local_provider.path}", out=out2, cache=cache)
    rows2 = _rows(out2)
    assert [i.split("#")[1] for i in sorted(rows2)] == [i.split("#")[1] for i in sorted(rows)]
    assert all(i.startswith("standup#") and r["metadata"]["team"] == "core" for i, r in rows2.items())
    assert from_rows.stats.transcribed == 0


def test_jsonl_rows_with_image_paths(tiny_clip_path: str, tmp_path: Path) -> None:
    _photo(tmp_path / "pics" / "cat.png", 5)
    _photo(tmp_path / "pics" / "dog.png", 6)
    rows = [{"id": "c", "image_path": "pics/cat.png", "caption": "a cat"},
            {"id": "d", "image_path": "pics/dog.png", "caption": "a dog"},
            {"id": "gone", "image_path": "pics/missing.png"}]
    src = tmp_path / "photos.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "vectors.jsonl"
    result = jobs.run(src, model=f"local-clip:{tiny_clip_path}", out=out, format="images", cache="memory://")
    got = _rows(out)
    assert sorted(got) == ["c", "d"]
    assert got["c"]["metadata"] == {"image_path": "pics/cat.png", "caption": "a cat"}
    assert (result.embedded, result.exit_code) == (2, 3)
    [letter] = jobs.dead_letters(out)
    assert letter.id == "gone" and "no such file" in letter.reason
