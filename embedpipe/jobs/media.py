"""Media sources: a folder of images, or a folder of recordings cut into timed windows of transcript.

``images:///photos/`` yields one record per image file: the id is its relative path, the
input an :class:`~embedpipe.inputs.Image` read lazily (decoded in worker threads when its
chunk is embedded, so memory holds one chunk's pixels, never the folder's), and the metadata
its location and size, never its pixels. ``audio:///talks/`` transcribes each recording
(through the transcript cache) and yields one record per window, ``PATH#START-END``, with
``audio_path``, ``start_s`` and ``end_s`` in its metadata, so a search hit points into it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from embedpipe._urls import URL
from embedpipe.cache import default_cache_url, resolve_cache
from embedpipe.engine.audio import WINDOW_SECONDS, AudioStage, windows_of
from embedpipe.engine.items import content_keys
from embedpipe.errors import InvalidInputError
from embedpipe.inputs import AUDIO_SUFFIXES, IMAGE_SUFFIXES, Audio, Image
from embedpipe.jobs.errors import SourceError
from embedpipe.jobs.records import Record
from embedpipe.jobs.sources import JSONLSource, Source
from embedpipe.stats import Stats
from embedpipe.transcribers import Transcriber, transcriber_from

#: images keyed together while a folder is read
_KEY_GROUP = 64


def chunked_files(files: Iterator[Path], size: int) -> Iterator[list[Path]]:
    """Lists of at most ``size`` files, in order."""
    group: list[Path] = []
    for file in files:
        group.append(file)
        if len(group) >= size:
            yield group
            group = []
    if group:
        yield group


def _suffixes(url: URL, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = url.options.get("suffixes")
    return tuple(s.strip().lower() for s in raw.split(",") if s.strip()) if raw else default


class _MediaFolder(Source):
    def __init__(self, path: str | os.PathLike[str], suffixes: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.suffixes = suffixes

    def files(self) -> Iterator[Path]:
        """The folder's media files, in a stable order (hidden files and folders left out)."""
        if not self.path.is_dir():
            raise SourceError(f"source {self.path} is not a folder")
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.lower().endswith(self.suffixes) and not name.startswith("."):
                    yield Path(root) / name

    def count(self) -> int | None:
        return sum(1 for _ in self.files())


class ImageFolderSource(_MediaFolder):
    """Every image under a folder (``.jpg``, ``.png``, ``.webp``...), one record each, id = relative path."""

    def __init__(self, path: str | os.PathLike[str], *, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> None:
        super().__init__(path, suffixes)

    @classmethod
    def from_url(cls, url: URL, *, id_field: str = "id", **_fields: str) -> Source:
        """The folder ``images:///path`` names (``?suffixes=.jpg,.png`` picks the files read), or, when the
        path is a ``.jsonl`` file, its rows' ``image_path`` fields (:class:`ImageJSONLSource`)."""
        url.check_options(("suffixes", "id_field", "image_field"), "source")
        path = url.file_path("source")
        if Path(path).is_file():
            return ImageJSONLSource(path, id_field=url.options.get("id_field") or id_field,
                                    image_field=url.options.get("image_field") or "image_path")
        return cls(path, suffixes=_suffixes(url, IMAGE_SUFFIXES))

    def __iter__(self) -> Iterator[Record]:
        # The job hashes each record's content as it reads it: key a group of images at once in the
        # decode pool (the keys are kept, the pixels are not), so the folder is not decoded one by one.
        for group in chunked_files(self.files(), _KEY_GROUP):
            images = [Image.from_path(file) for file in group]
            content_keys(images)
            for file, image in zip(group, images, strict=True):
                rel = file.relative_to(self.path).as_posix()
                meta: dict[str, Any] = {"image_path": rel, "bytes": file.stat().st_size}
                yield Record(rel, image, meta)


class ImageJSONLSource(JSONLSource):
    """JSONL rows naming an image in ``image_field`` (``image_path``; relative paths from the file's folder).

    Each row is one record: its id from ``id_field``, its input the image, every other field metadata
    (the path stays in it, the pixels never do). A row without the field is a record with no input,
    which the job dead-letters.
    """

    def __init__(self, path: str | os.PathLike[str], *, id_field: str = "id", image_field: str = "image_path") -> None:
        super().__init__(path, id_field=id_field, text_field=image_field)

    def record(self, row: Mapping[str, Any], where: str) -> Record:
        rec = super().record(row, where)
        name = row.get(self.text_field)
        if isinstance(name, str) and name:
            rec.text = Image.from_path(self.path.parent / name)
            rec.metadata[self.text_field] = name
        return rec

    def __iter__(self) -> Iterator[Record]:
        pending: list[Record] = []
        for rec in super().__iter__():
            pending.append(rec)
            if len(pending) >= _KEY_GROUP:
                content_keys([r.text for r in pending])  # keyed in the decode pool, a group at a time
                yield from pending
                pending = []
        content_keys([r.text for r in pending])
        yield from pending


class AudioFolderSource(_MediaFolder):
    """Every recording under a folder (or named by the ``audio_path`` of a JSONL file's rows, relative to the
    file's folder), transcribed and cut into windows: one record per window, ``ID#START-END``.

    ``audio_to_text``: the transcriber (``"local-whisper:tiny.en"`` by default). ``cache``: where
    transcripts are kept (a URL or backend; by default the pipeline's default cache), so a re-run
    transcribes nothing. A recording that cannot be read is one record with no text, which the
    job dead-letters, its reason in ``metadata["error"]``.
    """

    def __init__(self, path: str | os.PathLike[str], *, audio_to_text: str | Transcriber = "local-whisper:tiny.en",
                 cache: Any = None, window_s: float = WINDOW_SECONDS,
                 suffixes: tuple[str, ...] = AUDIO_SUFFIXES, id_field: str = "id") -> None:
        super().__init__(path, suffixes)
        #: for a JSONL file of rows with ``audio_path``: the field holding each row's id
        self.id_field = id_field
        self.audio_to_text = audio_to_text
        self.cache = cache
        self.window_s = window_s
        #: what transcribing cost: recordings transcribed and seconds heard
        self.stats = Stats()
        self._stage: AudioStage | None = None

    @classmethod
    def from_url(cls, url: URL, **_fields: str) -> AudioFolderSource:
        """The folder ``audio:///path`` names; ``?audio_to_text=``, ``?cache=``, ``?window_s=``, ``?suffixes=``."""
        url.check_options(("suffixes", "audio_to_text", "cache", "window_s", "id_field"), "source")
        opts = url.options
        return cls(url.file_path("source"), audio_to_text=opts.get("audio_to_text") or "local-whisper:tiny.en",
                   cache=opts.get("cache"), window_s=float(opts.get("window_s") or WINDOW_SECONDS),
                   suffixes=_suffixes(url, AUDIO_SUFFIXES), id_field=opts.get("id_field") or "id")

    def count(self) -> int | None:
        return None  # windows: known only once heard

    def stage(self) -> AudioStage:
        """The transcriber and the transcript cache, built on first use."""
        if self._stage is None:
            cache = resolve_cache(self.cache if self.cache is not None else default_cache_url())
            self._stage = AudioStage(transcriber_from(self.audio_to_text), cache, window_seconds=self.window_s)
        return self._stage

    def __iter__(self) -> Iterator[Record]:
        if self.path.is_file():  # a JSONL file of rows naming recordings
            for row in JSONLSource(self.path, id_field=self.id_field, text_field="audio_path"):
                name = row.text
                yield from self.windows(row.id, self.path.parent / name if name else None, name, row.metadata)
            return
        for file in self.files():
            rel = file.relative_to(self.path).as_posix()
            yield from self.windows(rel, file, rel, {})

    def windows(self, rid: str, file: Path | None, name: str, meta: dict[str, Any]) -> Iterator[Record]:
        """The records of one recording: one per window (``RID#START-END``), or one without text if unreadable."""
        meta = {**meta, "audio_path": name}
        if file is None:
            yield Record(rid, "", {**meta, "error": "no audio_path"})
            return
        try:
            transcript = self.stage().transcribe(Audio.from_path(file), self.stats)
        except InvalidInputError as exc:
            yield Record(rid, "", {**meta, "error": str(exc)})
            return
        for w in windows_of(transcript, self.window_s):
            yield Record(f"{rid}#{w.start_s:.2f}-{w.end_s:.2f}", w.text, {**meta, **w.metadata})


__all__ = ["AudioFolderSource", "ImageFolderSource", "ImageJSONLSource"]
