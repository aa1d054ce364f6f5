"""Sinks: where a job's vectors go. A Parquet dataset folder (the default) or a JSONL file.

Both write idempotently by id: every write is a new, complete file (or lines past the
last committed byte), and the job's state says where each id's live row is. Rows the
state does not point to (an older version, a deleted record, a write whose commit a
crash cut off) are dropped when the sink compacts at the end of a run. Readers of either
never see such rows: a Parquet folder publishes a whole new generation with one atomic
rename at the end of compaction, and a JSONL file is replaced by one.

Columns: ``id`` (string), ``vector`` (fixed-size list of float32), ``content_hash``
(SHA-256 of the text, hex), ``model`` (the spec), ``dimensions`` (int32) and ``metadata``
(JSON; an object in JSONL).

A sink is a path (``.jsonl``/``.ndjson``: JSONL, anything else: a Parquet folder) or a URL
whose scheme is the format (:data:`embedpipe.registry.sinks`): ``parquet:///vectors/``,
``parquet:////abs/vectors/?part_rows=20000``, ``jsonl:///vectors.jsonl``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe import registry
from embedpipe._urls import URL, file_url, parse_url
from embedpipe.codec import FLOAT32, ValueFormat
from embedpipe.errors import ConfigurationError
from embedpipe.jobs.errors import DamagedOutputError
from embedpipe.jobs.records import Entry
from embedpipe.quantize import packed_width

if TYPE_CHECKING:
    import pyarrow as pa

    from embedpipe.cache import CacheBackend
    from embedpipe.jobs.state import JobState
    from embedpipe.pipeline import EmbeddingPipeline

log = logging.getLogger("embedpipe.jobs")

STATE_NAME = "_state.sqlite"
#: the folders and link of a Parquet output (:class:`ParquetSink`): all parts, generations, the published one
PARTS_DIR = "_parts"
GENS_DIR = "_gens"
DATA_NAME = "data"
#: not Parquet, on purpose: DuckDB's ``read_parquet('DIR')`` would read ``_parts/`` and ``_gens/`` (it skips no
#: ``_`` names and follows no link) and count rows two or three times; this file makes it fail, naming itself
SIGN_NAME = "_not-parquet-read-data-folder.parquet"
_SIGN_TEXT = ("This folder is an embedpipe Parquet output. Its table is DIR/data/ (a link to the current "
              "generation): pyarrow.parquet.read_table(DIR) and pandas.read_parquet(DIR) read it; with DuckDB, "
              "read_parquet('DIR/data/*.parquet'). DIR/_parts/ and DIR/_gens/ hold the same rows more than once.\n")
_READ_TRIES = 5


@dataclass
class Receipt:
    """What a write did: the loc of each row, and values the state must commit with them."""

    locs: Sequence[Any]
    meta: dict[str, Any] = field(default_factory=dict)


class Sink:
    """Base class of sinks. Override ``write``; ``open``, ``delete``, ``compact`` and ``reset`` where needed.

    ``write`` must be durable when it returns: the job commits its state right after.
    """

    #: True when metadata-only changes are applied by :meth:`compact` (no vectors needed);
    #: False sends such records through :meth:`write` again (their vectors come from the cache)
    updates_metadata: bool = True
    #: how many ids :meth:`verify` reads back after a run (0: the sink needs no check)
    verify_sample: int = 0
    #: the ``output_dtype``\ s this sink can store (a pipeline asking for another is refused before the run)
    output_dtypes: frozenset[str] = frozenset({"float32"})

    def default_state_path(self) -> Path | None:
        """Where this sink's state lives when none is given (``None``: the caller must say)."""
        return None

    def describe(self) -> str:
        """A string that names this output, kept in the state so ``dlq retry`` can find it."""
        return repr(self)

    def preferred_cache(self) -> CacheBackend | None:
        """The cache the job should use when none is given (a store whose embeddings have their own)."""
        return None

    def bind(self, pipeline: EmbeddingPipeline) -> None:
        """Check that this sink can take the job's vectors, before anything is written."""

    def open(self, state: JobState) -> None:
        """Prepare to write; recover from a crash of an earlier run."""

    def write(self, entries: Sequence[Entry], vectors: np.ndarray, model: str) -> Receipt:
        """Write one row per entry (``vectors[i]`` for ``entries[i]``); upsert by id."""
        raise NotImplementedError

    def delete(self, ids: Sequence[str]) -> None:
        """Remove ``ids`` now (sinks that compact drop them there instead)."""

    def compact(self, state: JobState) -> None:
        """Drop rows the state no longer points to and apply queued metadata."""

    def reset(self) -> None:
        """Remove everything written (``--rebuild``)."""

    def verify(self, sample: Sequence[tuple[Entry, np.ndarray]]) -> None:
        """Read back a sample of what was written and raise if it differs."""

    def close(self) -> None:
        """Release what the sink holds."""


# ------------------------------------------------------------------ Parquet
def part_damage(path: Path, ids: set[str] | None = None) -> str | None:
    """What is wrong with the part at ``path`` (``None``: nothing): an unreadable footer or page, a page whose
    checksum does not match (parts are written with page checksums), or ``ids`` it should hold but does not."""
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path, page_checksum_verification=True).read()
        if "id" not in table.column_names or "vector" not in table.column_names:
            return "it has no id or vector column"
        if ids:
            held = set(table.column("id").to_pylist())
            lost = ids - held
            if lost:
                return f"{len(lost)} of the ids the state puts there are not in it"
    except (OSError, ValueError) as exc:  # pyarrow raises ArrowInvalid (a ValueError) or OSError
        return f"{type(exc).__name__}: {exc}"
    return None


def _fsync_dir(path: Path) -> None:
    # A rename is durable only once its folder is: without this a power cut could lose a part
    # that the state already points to. Windows cannot open a folder, and needs no such step.
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _part_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet")


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a hard link of ``src`` (parts never change, so a link is a copy that costs nothing)."""
    try:
        os.link(src, dst)
    except OSError:
        if dst.exists() or not src.exists():
            raise
        # A filesystem without hard links (some network mounts): a real copy, made durable.
        shutil.copyfile(src, dst)
        _fsync_file(dst)


def _vector_type(dims: int, dtype: str = "float32") -> pa.DataType:
    import pyarrow as pa

    if dtype in ("binary", "ubinary"):
        return pa.binary(packed_width(dims))  # fixed_size_binary(d/8): the bits, packed
    if dtype == "int8":
        return pa.list_(pa.int8(), dims)
    if dtype == "uint8":
        return pa.list_(pa.uint8(), dims)
    return pa.list_(pa.float32(), dims)


def _schema(dims: int, dtype: str = "float32") -> pa.Schema:
    import pyarrow as pa

    fields = [("id", pa.string()), ("vector", _vector_type(dims, dtype))]
    if dtype in ("int8", "uint8"):
        # vector * scale approximates the float vector; for uint8, (vector - 128) * scale
        fields.append(("scale", pa.float32()))
    return pa.schema([*fields, ("content_hash", pa.string()), ("model", pa.string()), ("dimensions", pa.int32()),
                      ("metadata", pa.string())])


def vectors_table(entries: Sequence[Entry], vectors: np.ndarray, model: str,
                  fmt: ValueFormat = FLOAT32) -> pa.Table:
    """The output rows of ``entries`` as an Arrow table, the vectors in ``fmt``'s type."""
    import pyarrow as pa

    n, dims = vectors.shape
    columns: list[Any] = [pa.array([e.record.id for e in entries], pa.string())]
    if not fmt.compact:
        flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
        columns.append(pa.FixedSizeListArray.from_arrays(flat, dims))
    else:
        q = fmt.quantized(vectors)
        if fmt.dtype in ("binary", "ubinary"):
            columns.append(pa.array([row.tobytes() for row in q.values], _vector_type(dims, fmt.dtype)))
        else:
            flat = pa.array(np.ascontiguousarray(q.values).reshape(-1))
            columns.append(pa.FixedSizeListArray.from_arrays(flat, dims))
            columns.append(pa.array(q.scales, pa.float32()))
    columns += [
        pa.array([e.content_hash.hex() for e in entries], pa.string()),
        pa.array([model] * n, pa.string()),
        pa.array(np.full(n, dims, dtype=np.int32), pa.int32()),
        pa.array([e.metadata_json for e in entries], pa.string()),
    ]
    return pa.Table.from_arrays(columns, schema=_schema(dims, fmt.dtype))


class ParquetSink(Sink):
    """A folder that ``pyarrow.parquet.read_table(path)`` and pandas read as one table, published atomically.

    Layout of the folder ``DIR``::

        DIR/_state.sqlite       the job's state (and its lock, journal and spill file, all ``_``-named)
        DIR/_parts/part-*.parquet   every part written, the live and the not yet dropped
        DIR/_gens/<N>/part-*.parquet  generation N: hard links of exactly the parts that hold live rows
        DIR/data -> _gens/<N>   the published generation, the one readers see

    Readers skip names that start with ``_`` or ``.``, so ``read_table(DIR)`` reads ``DIR/data/`` only
    (DuckDB does not skip them, nor follow the link: it reads ``DIR/data/*.parquet``; a file named
    :data:`SIGN_NAME` makes ``read_parquet('DIR')`` fail loudly rather than count rows twice).

    Writes and compaction happen in ``_parts/``, where a part is written under a temporary
    ``_tmp-`` name, fsynced and renamed, and never changed after: a rewrite or a merge is a
    new part with a new name, the state moves to it, and then the old part goes. Compaction
    rewrites only the parts that hold dropped rows or queued metadata, and merges parts of
    fewer than ``small_rows`` rows into parts of up to ``part_rows``, so daily updates do not
    pile up tiny files. It ends by publishing: a new generation folder is linked and fsynced,
    then ``data`` is swapped to it with one ``rename``. Readers therefore see the output of the
    last completed run (or compaction), whole, at every instant, a SIGKILL at any point
    included; a run's own writes become visible when it finishes. The generation before stays
    for readers still reading it; older ones go at the next publish or open.

    A part's name holds the same rows in every generation it is in, so a reader that listed one
    generation and opens its files after a swap reads that generation or, for a part that
    compaction dropped, gets ``FileNotFoundError``: never a mix. :meth:`read_table`
    (:func:`read_output`) resolves the generation once and reads only it, so one swap does not
    disturb it (and it reads again if two went by while it read).

    An output of the earlier flat layout (parts directly in ``DIR``) is adopted by :meth:`open`
    (and by any compaction): its parts are linked into ``_parts/``, and readers go on seeing it as
    it was. It leaves the flat layout at its first publish, which deletes those part files just
    before ``data`` appears: for that moment, once, a reader may see some of its rows missing.
    """

    output_dtypes = frozenset({"float32", "int8", "uint8", "binary", "ubinary"})

    def __init__(self, path: str | os.PathLike[str], *, part_rows: int = 5000, small_rows: int = 500) -> None:
        self.path = Path(path)
        self.format = FLOAT32
        self.part_rows = part_rows
        self.small_rows = small_rows
        self._prefix = ""
        self._seq = 0

    @classmethod
    def from_url(cls, url: URL) -> ParquetSink:
        """The folder ``parquet:///relative`` or ``parquet:////absolute`` names (options: part_rows, small_rows)."""
        url.check_options(("part_rows", "small_rows"), "sink")
        rows: dict[str, int] = {}
        for name, value in url.options.items():
            if not value.isdigit() or int(value) < 1:
                raise ConfigurationError(f"{name}={value!r} in the sink URL {url} must be a positive integer")
            rows[name] = int(value)
        return cls(url.file_path("sink"), **rows)

    def default_state_path(self) -> Path:
        return self.path / STATE_NAME

    def describe(self) -> str:
        return f"parquet:{self.path.resolve()}"

    @property
    def parts_dir(self) -> Path:
        """The folder that holds every part written (``DIR/_parts``); readers see them through :meth:`published`."""
        return self.path / PARTS_DIR

    def parts(self) -> list[Path]:
        """The complete part files in ``_parts/``, in name order (live ones, and ones compaction will drop)."""
        return _part_files(self.parts_dir)

    def published(self) -> Path | None:
        """The generation folder readers see now (``DIR/_gens/<N>``), or ``None`` before the first publish."""
        gen = self._current_gen()
        return None if gen is None else self.path / GENS_DIR / str(gen)

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The published output as one table: one generation, resolved once, so never a mix of two.

        An output not published yet reads as ``pyarrow.parquet.read_table`` reads the folder (empty, or the
        parts of the flat layout an earlier version wrote).
        """
        import pyarrow.parquet as pq

        cols = list(columns) if columns is not None else None
        for attempt in range(_READ_TRIES):
            gen = self.published()
            if gen is None:
                return pq.read_table(self.path, columns=cols)
            try:
                return pq.read_table(gen, columns=cols)
            except FileNotFoundError:
                # Two publishes went by while this read ran, and the generation it read was deleted.
                if attempt == _READ_TRIES - 1:
                    raise
        raise AssertionError("unreachable")

    def _current_gen(self) -> int | None:
        try:
            target = os.readlink(self.path / DATA_NAME)
        except OSError:  # not there yet (or not a link: open() says so)
            return None
        name = Path(target).name
        return int(name) if name.isdigit() else None

    def _new_name(self) -> str:
        if not self._prefix:
            # Time first, so parts list in the order they were written; a random tail so two
            # runs (or a resumed one) can never pick the same name. A name is never reused:
            # readers may open a generation's files by their names after a swap.
            self._prefix = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self._seq += 1
        return f"part-{self._prefix}-{self._seq:05d}.parquet"

    def recover(self) -> None:
        """Finish or undo what a crash cut short, and adopt an output of the flat layout.

        Deletes temporary files and generations other than the published one and the one
        before it (readers may still read that), and links the part files of the flat layout
        (written directly in ``DIR`` by earlier versions) into ``_parts/``.
        """
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"--out {self.path} is a file; a Parquet output is a folder "
                                     "(name it *.jsonl for a JSONL file)")
        data = self.path / DATA_NAME
        if data.exists() and not data.is_symlink():
            raise ConfigurationError(f"{data} is not the link embedpipe publishes its output through; move it away")
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for folder in (self.path, self.parts_dir):
            for tmp in folder.glob("_tmp-*"):
                tmp.unlink(missing_ok=True)  # a write a crash cut short
        self._adopt_flat()
        current = self._current_gen()
        older = [g for g in self._gens() if current is not None and g < current]
        self._prune_gens({current, max(older, default=None)})

    def _adopt_flat(self) -> None:
        """Link the parts of the flat layout into ``_parts/``; the next publish deletes them from ``DIR``."""
        flat = _part_files(self.path)
        if not flat:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        for part in flat:
            if not (self.parts_dir / part.name).exists():
                _link(part, self.parts_dir / part.name)
        _fsync_dir(self.parts_dir)

    def open(self, state: JobState) -> None:
        self.recover()
        present = {p.name for p in self.parts()}
        locs = state.locs()
        missing = [loc for loc in locs if loc not in present]
        if missing:
            n = state.forget_locs(missing)
            log.warning("embedpipe: %d part file(s) of %s are gone; their %d record(s) will be embedded again",
                        len(missing), self.parts_dir, n)
        # Never build on (or report success over) a damaged part: check every part the state relies on.
        for loc in locs:
            if loc in present:
                damage = part_damage(self.parts_dir / loc, state.ids_at(loc))
                if damage:
                    raise DamagedOutputError(f"output part {self.parts_dir / loc} is damaged ({damage}); run "
                                             f"`embedpipe repair --out {self.path}` to set it aside and re-embed its "
                                             "records (from the cache where it holds them)", self.parts_dir / loc)

    @contextlib.contextmanager
    def _atomic(self, name: str) -> Iterator[Path]:
        """A temporary path in ``_parts/`` to write; on success it is fsynced and renamed to ``name``."""
        self.parts_dir.mkdir(exist_ok=True)  # not DIR itself: a worker that does not see the folder fails
        tmp = self.parts_dir / f"_tmp-{uuid.uuid4().hex}.part"
        try:
            yield tmp
            _fsync_file(tmp)
            os.replace(tmp, self.parts_dir / name)
            _fsync_dir(self.parts_dir)
        finally:
            tmp.unlink(missing_ok=True)

    def _write_atomic(self, table: pa.Table, name: str) -> None:
        import pyarrow.parquet as pq

        with self._atomic(name) as tmp:
            pq.write_table(table, tmp, write_page_checksum=True)

    def bind(self, pipeline: EmbeddingPipeline) -> None:
        self.format = pipeline.value_format

    def write(self, entries: Sequence[Entry], vectors: np.ndarray, model: str) -> Receipt:
        name = self._new_name()
        self._write_atomic(vectors_table(entries, vectors, model, self.format), name)
        return Receipt([name] * len(entries))

    def compact(self, state: JobState) -> None:
        """Drop rows the state no longer points to, apply queued metadata, merge small parts; then publish."""
        import pyarrow.parquet as pq

        # Whatever calls this (a run's end, dlq retry, repair, a delete through the service), an output
        # of the flat layout is adopted first, so the publish that deletes its flat parts loses nothing.
        self._adopt_flat()
        counts = state.loc_counts()
        relabel = state.pending_metadata_locs()
        small: list[tuple[Path, int]] = []
        for part in self.parts():
            live = counts.get(part.name, 0)
            if live == 0:
                part.unlink()
                continue
            rows = pq.read_metadata(part).num_rows
            if live != rows or part.name in relabel:
                part = self._rewrite(part, state)
            if live < self.small_rows:
                small.append((part, live))
        self._merge(small, state)
        state.clear_pending_metadata()
        self._publish(state)

    def _rewrite(self, part: Path, state: JobState) -> Path:
        """Copy the rows of ``part`` the state points to, with their queued metadata, to a new part; move the state."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(part)
        live = state.ids_at(part.name)
        ids = table.column("id").to_pylist()
        table = table.filter(pa.array([i in live for i in ids]))
        kept = table.column("id").to_pylist()
        updates = state.pending_metadata(kept)
        if updates:
            old = table.column("metadata").to_pylist()
            new = [updates.get(i, m) for i, m in zip(kept, old, strict=True)]
            table = table.set_column(table.schema.get_field_index("metadata"), "metadata", pa.array(new, pa.string()))
        name = self._new_name()
        self._write_atomic(table, name)
        # As in _merge: the state moves first, so a crash leaves only a part it no longer points to.
        with state.transaction() as db:
            state.move(db, [(name, i) for i in kept])
        part.unlink()
        return self.parts_dir / name

    def _merge(self, small: list[tuple[Path, int]], state: JobState) -> None:
        """Merge small parts into parts of up to ``part_rows`` rows, one source part in memory at a time."""
        import pyarrow.parquet as pq

        groups: list[list[Path]] = [[]]
        total = 0
        for part, rows in small:
            if total + rows > self.part_rows and groups[-1]:
                groups.append([])
                total = 0
            groups[-1].append(part)
            total += rows
        for group in groups:
            if len(group) < 2:
                continue
            name = self._new_name()
            moves: list[tuple[Any, str]] = []
            with self._atomic(name) as tmp:
                writer: pq.ParquetWriter | None = None
                try:
                    for p in group:
                        table = pq.read_table(p)
                        writer = writer or pq.ParquetWriter(tmp, table.schema, write_page_checksum=True)
                        writer.write_table(table)
                        moves += [(name, i) for i in table.column("id").to_pylist()]
                finally:
                    if writer is not None:
                        writer.close()
            # The state moves to the merged part before the small ones go: a crash in between
            # leaves rows the state no longer points to, which the next compaction drops. Readers
            # see none of this: they read the published generation until the next publish.
            with state.transaction() as db:
                state.move(db, moves)
            for p in group:
                p.unlink()

    def _publish(self, state: JobState) -> None:
        """Make a new generation of exactly the parts that hold live rows, and swap ``data`` to it."""
        import pyarrow.parquet as pq

        counts = state.loc_counts()
        names = [p.name for p in self.parts() if counts.get(p.name)]
        for name in names:
            rows = pq.read_metadata(self.parts_dir / name).num_rows
            if rows != counts[name]:
                # Publishing it would show rows twice (or lose some): refuse, and leave the last generation up.
                raise DamagedOutputError(f"output part {self.parts_dir / name} holds {rows} rows where the state "
                                         f"puts {counts[name]}; nothing was published. Run `embedpipe repair "
                                         f"--out {self.path}`", self.parts_dir / name)
        dims = state.get("dimensions")
        if not names and dims:
            # An empty output still has its columns, so readers get the schema, not an empty frame.
            name = self._new_name()
            self._write_atomic(_schema(int(dims), self.format.dtype).empty_table(), name)
            names = [name]
        gens = self.path / GENS_DIR
        gens.mkdir(exist_ok=True)
        current = self._current_gen()
        number = max([*self._gens(), current or 0]) + 1
        folder = gens / str(number)
        folder.mkdir()
        for name in names:
            _link(self.parts_dir / name, folder / name)
        _fsync_dir(folder)
        _fsync_dir(gens)
        # The last step of leaving the flat layout: its parts (linked into _parts/ when this compaction
        # began) go just before data appears, so readers never see them and the generation together.
        for part in _part_files(self.path):
            part.unlink()
        sign = self.path / SIGN_NAME
        if not sign.exists():
            sign.write_text(_SIGN_TEXT, encoding="utf-8")
        # Made inside _gens/, where its relative target does not resolve: a reader that lists the
        # folder meanwhile finds a dangling link, not a folder that vanishes under it.
        link = gens / f"_next.tmp-{uuid.uuid4().hex}"
        os.symlink(f"{GENS_DIR}/{number}", link)
        os.replace(link, self.path / DATA_NAME)
        _fsync_dir(self.path)
        _fsync_dir(gens)
        self._prune_gens({number, current})

    def _gens(self) -> list[int]:
        gens = self.path / GENS_DIR
        if not gens.is_dir():
            return []
        return sorted(int(p.name) for p in gens.iterdir() if p.name.isdigit())

    def _prune_gens(self, keep: set[int | None]) -> None:
        """Delete generations not in ``keep`` and links a publish left half made."""
        gens = self.path / GENS_DIR
        if not gens.is_dir():
            return
        for entry in gens.iterdir():
            if entry.name.startswith("_next.tmp-"):
                entry.unlink(missing_ok=True)
            elif entry.name.isdigit() and int(entry.name) not in keep:
                shutil.rmtree(entry, ignore_errors=True)

    def reset(self) -> None:
        # Readers keep the last published generation until the rebuild publishes its own.
        for part in self.parts():
            part.unlink()

    def __repr__(self) -> str:
        return f"ParquetSink({str(self.path)!r})"


def read_output(out: str | os.PathLike[str] | ParquetSink, columns: Sequence[str] | None = None) -> pa.Table:
    """The table a Parquet job output holds now: its published generation, read whole (:meth:`ParquetSink.read_table`).

    ``out`` is what ``--out`` took (a folder or a ``parquet://`` URL) or the sink. A JSONL output
    is one file that compaction replaces atomically: read it directly.
    """
    sink = out if isinstance(out, ParquetSink) else sink_from(out)
    if not isinstance(sink, ParquetSink):
        raise ConfigurationError(f"read_output reads Parquet outputs (a folder), not {sink!r}")
    return sink.read_table(columns)


# ------------------------------------------------------------------ JSONL
class JSONLSink(Sink):
    """One JSON object per line in one file; its state is ``<file>.state.sqlite`` beside it.

    Lines are appended and fsynced before the state commits their byte count; on open,
    anything past the committed size (a line a crash cut in half) is cut off. Compaction
    streams the file into a new one and swaps it in, recording the swap in the state so
    a crash at any point either finishes it or leaves the old file whole.
    """

    output_dtypes = frozenset({"float32", "int8", "uint8", "binary", "ubinary"})

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._bytes = 0
        self._lines = 0

    @classmethod
    def from_url(cls, url: URL) -> JSONLSink:
        """The file ``jsonl:///relative.jsonl`` or ``jsonl:////absolute.jsonl`` names (it takes no options)."""
        url.check_options((), "sink")
        return cls(url.file_path("sink"))

    def default_state_path(self) -> Path:
        return self.path.with_name(self.path.name + ".state.sqlite")

    def describe(self) -> str:
        return f"jsonl:{self.path.resolve()}"

    def _tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.compact.tmp")

    def open(self, state: JobState) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        swap = state.get("jsonl_swap")
        if swap is not None:
            if Path(swap).exists():
                os.replace(swap, self.path)
            with state.transaction() as db:
                state.set_meta(db, jsonl_swap=None)
        self._tmp().unlink(missing_ok=True)
        self._bytes = int(state.get("jsonl_bytes") or 0)
        self._lines = int(state.get("jsonl_lines") or 0)
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < self._bytes:
            n = state.forget_written()
            log.warning("embedpipe: %s is shorter than its state says (%d < %d bytes); its %d record(s) will be "
                        "written again", self.path, size, self._bytes, n)
            self._bytes = self._lines = 0
            with state.transaction() as db:
                state.set_meta(db, jsonl_bytes=0, jsonl_lines=0)
        with open(self.path, "ab") as f:
            f.truncate(self._bytes)

    def bind(self, pipeline: EmbeddingPipeline) -> None:
        self.format = pipeline.value_format

    def write(self, entries: Sequence[Entry], vectors: np.ndarray, model: str) -> Receipt:
        dims = int(vectors.shape[1])
        fmt = getattr(self, "format", FLOAT32)
        # Compact types are written as the provider's integers (packed bytes for bits), as their APIs answer.
        rows = fmt.quantized(vectors).tolist() if fmt.compact else vectors.tolist()
        data = "".join(
            json.dumps({"id": e.record.id, "vector": v, "content_hash": e.content_hash.hex(), "model": model,
                        "dimensions": dims, "metadata": e.record.metadata},
                       ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
            for e, v in zip(entries, rows, strict=True)).encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        first = self._lines
        self._lines += len(entries)
        self._bytes += len(data)
        return Receipt(range(first, self._lines), {"jsonl_bytes": self._bytes, "jsonl_lines": self._lines})

    def compact(self, state: JobState) -> None:
        if not self.path.exists():
            return
        live = state.count("done")
        if live == self._lines and not state.pending_metadata_locs():
            return
        tmp = self._tmp()
        kept = 0
        size = 0
        with state.transaction() as db:
            with open(self.path, "rb") as src, open(tmp, "wb") as dst:
                line_no = 0
                while True:
                    block = [line for _, line in zip(range(5000), src, strict=False)]
                    if not block:
                        break
                    at = state.ids_in_range(line_no, line_no + len(block))
                    moves: list[tuple[Any, str]] = []
                    rows: list[tuple[int, dict[str, Any]]] = []
                    for k, line in enumerate(block, line_no):
                        obj = json.loads(line)
                        if at.get(k) == obj["id"]:
                            rows.append((k, obj))
                    updates = state.pending_metadata([obj["id"] for _, obj in rows])
                    for k, obj in rows:
                        line = block[k - line_no]
                        if obj["id"] in updates:
                            obj["metadata"] = json.loads(updates[obj["id"]])
                            line = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
                        dst.write(line)
                        size += len(line)
                        moves.append((kept, obj["id"]))
                        kept += 1
                    state.move(db, moves)
                    line_no += len(block)
                dst.flush()
                os.fsync(dst.fileno())
            db.execute("DELETE FROM pending_metadata")
            state.set_meta(db, jsonl_swap=str(tmp), jsonl_bytes=size, jsonl_lines=kept)
        os.replace(tmp, self.path)
        with contextlib.suppress(OSError):
            _fsync_dir(self.path.parent)
        with state.transaction() as db:
            state.set_meta(db, jsonl_swap=None)
        self._bytes, self._lines = size, kept

    def reset(self) -> None:
        self.path.unlink(missing_ok=True)
        self._bytes = self._lines = 0

    def __repr__(self) -> str:
        return f"JSONLSink({str(self.path)!r})"


def sink_from(out: str | os.PathLike[str] | Sink | Any) -> Sink:
    """The sink ``out`` names: a path ending in ``.jsonl`` (JSONL), any other path (a Parquet folder),
    a sink URL (a scheme of :data:`embedpipe.registry.sinks`), a :class:`Sink`, or a LlamaIndex or
    LangChain vector store."""
    if isinstance(out, Sink):
        return out
    if isinstance(out, (str, os.PathLike)):
        if isinstance(out, str) and "://" in out:
            url = parse_url(out, "sink")
        else:
            kind = "jsonl" if Path(out).suffix.lower() in (".jsonl", ".ndjson") else "parquet"
            url = file_url(kind, out)
        sink = registry.sinks.from_url(url)
        if not isinstance(sink, Sink):
            raise ConfigurationError(f"the sink factory for {url} returned {type(sink).__name__}, not a Sink")
        return sink
    from embedpipe.jobs.stores import store_sink

    return store_sink(out)


def sink_from_description(text: str) -> Sink | None:
    """The file sink a state's ``sink`` meta names (``parquet:/path`` or ``jsonl:/path``), else ``None``."""
    kind, _, path = text.partition(":")
    if kind == "parquet":
        return ParquetSink(path)
    if kind == "jsonl":
        return JSONLSink(path)
    return None


__all__ = ["JSONLSink", "ParquetSink", "Receipt", "Sink", "part_damage", "read_output", "sink_from", "vectors_table"]
