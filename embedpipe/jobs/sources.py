"""Sources: stream records from JSONL, CSV, Parquet, a folder of text files, or Python objects.

Every source yields :class:`~embedpipe.jobs.records.Record` objects one at a time and
holds at most one batch of rows in memory, so a job's memory does not grow with the corpus.

A source is a path (its format told by its suffix, or ``format=``) or a URL whose scheme
is the format (:data:`embedpipe.registry.sources`): ``jsonl:///rel/corpus.txt``,
``csv:////abs/rows.csv?id_field=doc_id&text_field=body``, ``parquet:///data/``, ``dir:///notes/``.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import io
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from embedpipe import registry
from embedpipe._urls import URL, file_url, parse_url, redact_url
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.errors import SourceError
from embedpipe.jobs.records import Record

#: suffixes of the text files a folder source reads
TEXT_SUFFIXES = (".txt", ".md")
_ROWS_PER_BATCH = 2048  # Parquet rows decoded at once
# Rows read before any is handed on, to catch a misspelt text field before every record is
# dead-lettered as empty: when most of them lack it, the source stops.
_FIELD_CHECK_ROWS = 100


class Source:
    """Base class of sources. Override :meth:`__iter__`; :meth:`count` if the size is cheap to learn."""

    #: what the source reads, for messages
    name: str = "records"

    def __iter__(self) -> Iterator[Record]:
        raise NotImplementedError

    def count(self) -> int | None:
        """How many records the source holds, when that is cheap to learn; else ``None``."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class _FieldSource(Source):
    """A source of rows with named fields: ``id_field``, ``text_field``, every other field is metadata."""

    def __init__(self, path: str | os.PathLike[str], *, id_field: str = "id", text_field: str = "text") -> None:
        self.path = Path(path)
        self.name = str(path)
        self.id_field = id_field
        self.text_field = text_field

    @classmethod
    def from_url(cls, url: URL, *, id_field: str = "id", text_field: str = "text") -> _FieldSource:
        """The source a ``format:///path`` URL names; ``?id_field=`` and ``?text_field=`` override the keywords."""
        url.check_options(("id_field", "text_field"), "source")
        return cls(url.file_path("source"), id_field=url.options.get("id_field") or id_field,
                   text_field=url.options.get("text_field") or text_field)

    def record(self, row: Mapping[str, Any], where: str) -> Record:
        """The record a row holds. A missing id is an error (resume needs stable ids); a missing text is ``""``."""
        rid = row.get(self.id_field)
        if rid is None or rid == "":
            fields = ", ".join(sorted(map(str, row))[:10])
            raise SourceError(f"{where}: no {self.id_field!r} field (fields: {fields}); choose one with --id-field")
        text = row.get(self.text_field)
        metadata = {k: v for k, v in row.items() if k != self.id_field and k != self.text_field}
        return Record(str(rid), "" if text is None else text if isinstance(text, str) else str(text), metadata)

    def missing_text_field(self, fields: Sequence[str], *, lacking: int | None = None, of: int | None = None) -> None:
        """Raise :class:`SourceError`: the text field is not among ``fields`` (in ``lacking`` of ``of`` rows)."""
        how = f"{lacking} of the first {of} records have" if lacking is not None else "the source has"
        close = difflib.get_close_matches(self.text_field, fields, n=1)
        hint = f"; did you mean --text-field {close[0]}?" if close else "; choose the text field with --text-field"
        raise SourceError(f"{self.name}: {how} no {self.text_field!r} field (fields seen: "
                          f"{', '.join(list(fields)[:20])}){hint}")

    def records(self, rows: Iterable[tuple[Mapping[str, Any] | Record, str]]) -> Iterator[Record]:
        """The records of ``(row, where)`` pairs, once the first rows show the text field is there.

        A few records without text are dead letters ("empty"); most of the first
        :data:`_FIELD_CHECK_ROWS` without it is a misspelt ``text_field``, and stops the source.
        """
        rows = iter(rows)
        head = list(itertools.islice(rows, _FIELD_CHECK_ROWS))
        mappings = [row for row, _ in head if not isinstance(row, Record)]
        lacking = sum(1 for row in mappings if self.text_field not in row)
        if mappings and lacking * 2 > len(mappings):
            seen = list(dict.fromkeys(str(k) for row in mappings for k in row))
            self.missing_text_field(seen, lacking=lacking, of=len(mappings))
        for row, where in itertools.chain(head, rows):
            yield row if isinstance(row, Record) else self.record(row, where)

    def _open_text(self) -> IO[str]:
        if not self.path.exists():
            raise SourceError(f"source {self.path} does not exist")
        if self.path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(self.path, "rb"), encoding="utf-8", newline="")
        return open(self.path, encoding="utf-8", newline="")


class JSONLSource(_FieldSource):
    """One JSON object per line (``.jsonl``, ``.ndjson``, optionally ``.gz``)."""

    def __iter__(self) -> Iterator[Record]:
        with self._open_text() as f:
            yield from self.records(self._rows(f))

    def _rows(self, f: IO[str]) -> Iterator[tuple[Mapping[str, Any], str]]:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise SourceError(f"{self.path}:{n}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{self.path}:{n}: expected a JSON object, got {type(row).__name__}")
            yield row, f"{self.path}:{n}"

    def count(self) -> int | None:
        if self.path.suffix == ".gz" or not self.path.exists():
            return None
        with open(self.path, "rb") as f:
            return sum(1 for line in f if line.strip())


class CSVSource(_FieldSource):
    """A CSV file with a header row (optionally ``.gz``); every column other than id and text is metadata."""

    def __iter__(self) -> Iterator[Record]:
        # Documents are long: lift the csv module's 128 KiB field limit.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with self._open_text() as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if columns and self.text_field not in columns:
                self.missing_text_field(columns)
            for row in reader:
                yield self.record(row, f"{self.path}:{reader.line_num}")


class ParquetSource(_FieldSource):
    """A Parquet file or dataset folder, read a batch of rows at a time."""

    def _dataset(self) -> Any:
        import pyarrow.dataset as ds

        if not self.path.exists():
            raise SourceError(f"source {self.path} does not exist")
        return ds.dataset(self.path, format="parquet")

    def __iter__(self) -> Iterator[Record]:
        dataset = self._dataset()
        names = set(dataset.schema.names)
        if self.id_field not in names:
            raise SourceError(f"{self.path}: no {self.id_field!r} column (columns: {sorted(names)}); "
                              "choose one with --id-field")
        if self.text_field not in names:
            self.missing_text_field(dataset.schema.names)
        n = 0
        for batch in dataset.to_batches(batch_size=_ROWS_PER_BATCH):
            for row in batch.to_pylist():
                n += 1
                yield self.record(row, f"{self.path} row {n}")

    def count(self) -> int | None:
        return int(self._dataset().count_rows())


class DirectorySource(Source):
    """Every ``.txt`` and ``.md`` file under a folder, in a stable order; the id is the relative path."""

    def __init__(self, path: str | os.PathLike[str], *, suffixes: tuple[str, ...] = TEXT_SUFFIXES) -> None:
        self.path = Path(path)
        self.name = str(path)
        self.suffixes = suffixes

    @classmethod
    def from_url(cls, url: URL, **_fields: str) -> DirectorySource:
        """The folder ``dir:///path`` names; ``?suffixes=.txt,.md,.rst`` picks the files read (id and text fields
        do not apply: the id is the relative path)."""
        url.check_options(("suffixes",), "source")
        raw = url.options.get("suffixes")
        suffixes = tuple(s.strip() for s in raw.split(",") if s.strip()) if raw else TEXT_SUFFIXES
        return cls(url.file_path("source"), suffixes=suffixes)

    def _files(self) -> Iterator[Path]:
        if not self.path.is_dir():
            raise SourceError(f"source {self.path} is not a folder")
        for root, dirs, files in os.walk(self.path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if name.endswith(self.suffixes) and not name.startswith("."):
                    yield Path(root) / name

    def __iter__(self) -> Iterator[Record]:
        for file in self._files():
            text = file.read_text(encoding="utf-8", errors="replace")
            yield Record(file.relative_to(self.path).as_posix(), text, {})

    def count(self) -> int | None:
        return sum(1 for _ in self._files())


class IterableSource(Source):
    """Records from Python: :class:`Record` objects or mappings with id and text fields."""

    name = "<iterable>"

    def __init__(self, items: Iterable[Record | Mapping[str, Any]], *, id_field: str = "id",
                 text_field: str = "text") -> None:
        self.items = items
        self._fields = _FieldSource(".", id_field=id_field, text_field=text_field)
        self._fields.name = self.name

    def __iter__(self) -> Iterator[Record]:
        yield from self._fields.records((item, f"item {n}") for n, item in enumerate(self.items, 1))

    def count(self) -> int | None:
        return len(self.items) if isinstance(self.items, (list, tuple)) else None


def source_from(source: str | os.PathLike[str] | Source | Iterable[Record | Mapping[str, Any]], *,
                id_field: str = "id", text_field: str = "text", format: str | None = None) -> Source:
    """The source a path names, by ``format`` or else by suffix: ``.jsonl``/``.ndjson``, ``.csv``,
    ``.parquet`` (each may end in ``.gz``, except Parquet), or a folder of text files; or the
    source a ``format:///path`` URL names (any scheme of :data:`embedpipe.registry.sources`)."""
    if isinstance(source, Source):
        return source
    if not isinstance(source, (str, os.PathLike)):
        return IterableSource(source, id_field=id_field, text_field=text_field)
    if isinstance(source, str) and "://" in source:
        url = parse_url(source, "source")
        if format is not None and format.lower() != url.scheme:
            raise ConfigurationError(f"format={format!r} contradicts the source URL {redact_url(source)!r}")
    else:
        url = file_url(_format_of(Path(source), format), source)
    built = registry.sources.from_url(url, id_field=id_field, text_field=text_field)
    if not isinstance(built, Source):
        raise ConfigurationError(f"the source factory for {url} returned {type(built).__name__}, not a Source")
    return built


def _format_of(path: Path, format: str | None) -> str:
    """The format (a scheme of the source registry) of the file at ``path``: ``format``, else its suffix."""
    kind = format
    if kind is None:
        suffixes = [s.lower() for s in path.suffixes]
        if suffixes and suffixes[-1] == ".gz":
            suffixes.pop()
        last = suffixes[-1] if suffixes else ""
        kind = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv",
                ".parquet": "parquet", ".pq": "parquet"}.get(last)
        if kind is None:
            if path.is_dir():
                kind = "dir"
            elif not path.exists():
                raise SourceError(f"source {path} does not exist")
            else:
                raise SourceError(f"cannot tell the format of {path}; name it .jsonl, .csv or .parquet, "
                                  "or pass --format")
    kind = kind.lower()
    if kind not in registry.sources:
        raise SourceError(f"unknown source format {kind!r}; use one of {', '.join(registry.sources.schemes())}")
    return kind


__all__ = ["CSVSource", "DirectorySource", "IterableSource", "JSONLSource", "ParquetSource", "Source",
           "source_from"]
