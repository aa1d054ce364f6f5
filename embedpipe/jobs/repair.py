"""Repair a damaged job output: set damaged files aside, rebuild the state from what is readable.

``embedpipe repair --out DIR`` (``jobs.repair(out)``) is what the error of a run over a
damaged output names. It:

1. checks the state file (``PRAGMA quick_check``); a damaged one moves to ``DIR/_quarantine/``
   and a new state is rebuilt from the readable parts (ids, content hashes, metadata, model and
   dimensions are all in the rows);
2. checks every part in ``DIR/_parts/`` (footer, pages and their checksums); a damaged one
   moves to ``_quarantine/``, and the state forgets the records whose rows were there;
3. compacts and publishes what is readable, so readers of ``DIR`` no longer meet the damaged
   part (they lack its rows until the next run);
4. leaves the rest to the next run of the same command, which re-embeds the forgotten
   records, from the cache where it holds them (nothing billed again), else from the source.

Dead letters live in the state: a rebuilt state has none (their records are retried by the
next run).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedpipe.errors import ConfigurationError
from embedpipe.jobs.errors import DamagedOutputError
from embedpipe.jobs.records import metadata_hash
from embedpipe.jobs.sinks import STATE_NAME, ParquetSink, part_damage, sink_from
from embedpipe.jobs.state import SQLiteJobStore


@dataclass(frozen=True)
class RepairResult:
    """What a repair did."""

    quarantined: tuple[str, ...]  #: files moved to ``_quarantine/`` (names relative to the output)
    state_rebuilt: bool           #: the state was damaged and rebuilt from the parts
    records: int                  #: records the state holds now
    forgotten: int                #: records whose rows were in damaged parts: the next run re-embeds them

    @property
    def exit_code(self) -> int:
        return 0


def _quarantine(path: Path, root: Path) -> str:
    target = root / "_quarantine"
    target.mkdir(exist_ok=True)
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{path.name}"
    os.replace(path, target / name)
    return f"_quarantine/{name}"


def _rebuild(store: SQLiteJobStore, parts: list[Path], sink: ParquetSink) -> int:
    """Fill an empty state from readable parts, later parts winning (names start with their write time)."""
    import pyarrow.parquet as pq

    now = time.time()
    meta: dict[str, Any] = {}
    for part in parts:
        table = pq.read_table(part, columns=["id", "content_hash", "metadata", "model", "dimensions"])
        rows = table.to_pylist()
        if not rows:
            continue
        meta = {"model": rows[-1]["model"], "dimensions": rows[-1]["dimensions"]}
        with store.transaction() as db:
            db.executemany(
                "INSERT INTO records(id, content_hash, meta_hash, status, attempts, loc, seen, updated) "
                "VALUES (?, ?, ?, 'done', 0, ?, 0, ?) ON CONFLICT(id) DO UPDATE SET "
                "content_hash=excluded.content_hash, meta_hash=excluded.meta_hash, status='done', loc=excluded.loc, "
                "updated=excluded.updated",
                [(r["id"], bytes.fromhex(r["content_hash"]), metadata_hash(r["metadata"] or "{}"), part.name, now)
                 for r in rows])
    with store.transaction() as db:
        store.set_meta(db, sink=sink.describe(), **meta)
    return store.count()


def repair(out: Any, *, state: str | os.PathLike[str] | None = None) -> RepairResult:
    """Set aside the damaged state or parts of the output ``out`` (a Parquet folder) and rebuild what is needed."""
    sink = sink_from(out)
    if not isinstance(sink, ParquetSink):
        raise ConfigurationError(f"embedpipe repair works on Parquet outputs (a folder), not {sink!r}")
    root = sink.path
    if not root.is_dir():
        raise ConfigurationError(f"there is no output folder at {root}")
    path = Path(state) if state is not None else root / STATE_NAME
    quarantined: list[str] = []
    rebuilt = False
    try:
        store = SQLiteJobStore(path)
    except DamagedOutputError:
        for suffix in ("", "-wal", "-shm"):
            f = Path(f"{path}{suffix}")
            if f.exists():
                if suffix:
                    f.unlink()
                else:
                    quarantined.append(_quarantine(f, root))
        store = SQLiteJobStore(path)
        rebuilt = True
    with store:
        store.lock()
        sink.recover()  # temporary files, stray generations; the parts of the flat layout into _parts/
        good: list[Path] = []
        damaged: list[str] = []
        for part in sink.parts():
            if part_damage(part, None if rebuilt else store.ids_at(part.name)):
                damaged.append(part.name)
                quarantined.append(_quarantine(part, root))
            else:
                good.append(part)
        forgotten = 0
        if rebuilt:
            _rebuild(store, good, sink)
        elif damaged:
            forgotten = store.forget_locs(damaged)
        if rebuilt or damaged:
            # Readers get what is readable now (the published generation may link the damaged part),
            # and a rebuilt state's older copies of an id are dropped before they could be published.
            sink.compact(store)
        return RepairResult(tuple(quarantined), rebuilt, store.count(), forgotten)


def clear_quarantine(out: Any) -> int:
    """Delete what earlier repairs set aside; return how many files went."""
    sink = sink_from(out)
    folder = getattr(sink, "path", Path(str(out))) / "_quarantine"
    if not folder.is_dir():
        return 0
    n = sum(1 for _ in folder.iterdir())
    shutil.rmtree(folder)
    return n


__all__ = ["RepairResult", "clear_quarantine", "repair"]
