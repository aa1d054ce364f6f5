"""Readers of a Parquet output never see a row twice or miss one: not while a run or its compaction
goes on, not after a SIGKILL at any point of them, not while an old flat output is migrated.

Everything is real: the CLI in a child process against the OpenAI-compatible test server, real
files, a real SIGKILL, and readers that are ``pyarrow.parquet.read_table(DIR)``, pandas and
:func:`embedpipe.jobs.read_output`. The only thing patched (in the child alone) is where the
child kills itself.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest

from embedpipe import jobs
from embedpipe.jobs.sinks import ParquetSink
from embedpipe.providers.fake import fake_vector
from tests.openai_server import OpenAITestServer
from tests.test_jobs import DIMS, MODEL, assert_mirrors, make_records, openai_args, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
PARTS, GENS, DATA = "_parts", "_gens", "data"  # the layout README.md documents (ParquetSink)

# Runs `embedpipe` and SIGKILLs itself at one point of a compaction. The patches only place the
# kill: each calls the real function (or is about to) and everything else the child does is real.
KILLER = '''
import os, pathlib, signal, sys

from embedpipe.jobs import state

point = os.environ["EMBEDPIPE_TEST_KILL_AT"]


def die_if_called_from(name):
    if sys._getframe(2).f_code.co_name == name:
        os.kill(os.getpid(), signal.SIGKILL)


if point == "merge-renamed":  # the merged part renamed in, the state not yet moved to it
    real_move = state.SQLiteJobStore.move

    def move(self, db, moves):
        real_move(self, db, moves)
        die_if_called_from("_merge")

    state.SQLiteJobStore.move = move
elif point == "merge-moved":  # the state moved to the merged part, the merged ones not deleted yet
    real_unlink = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        die_if_called_from("_merge")
        real_unlink(self, missing_ok)

    pathlib.Path.unlink = unlink
elif point == "publish":  # the new generation linked, the link to it made, not yet swapped in
    real_replace = os.replace

    def replace(src, dst, **kw):
        if os.path.basename(os.fspath(src)).startswith("_next.tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst, **kw)

    os.replace = replace

from embedpipe.cli import main

main()
'''


def _cli(server: OpenAITestServer, src: Path, url: str, tmp_path: Path, *,
         kill_at: str | None = None) -> subprocess.CompletedProcess[str]:
    args = ["run", str(src), "--model", MODEL, "--dimensions", str(DIMS), "--base-url", server.base_url,
            "--cache", f"sqlite:///{tmp_path}/cache.db", "--chunk-size", "100", "--out", url, "--no-progress"]
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    if kill_at is None:
        cmd = [sys.executable, "-m", "embedpipe.cli", *args]
    else:
        killer = tmp_path / "killer.py"
        killer.write_text(KILLER, encoding="utf-8")
        cmd = [sys.executable, str(killer), *args]
        env["EMBEDPIPE_TEST_KILL_AT"] = kill_at
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)


def _snapshot(table: Any) -> list[tuple[str, str]]:
    return sorted(zip(table.column("id").to_pylist(), table.column("content_hash").to_pylist(), strict=True))


def _pandas_snapshot(out: Path) -> list[tuple[str, str]]:
    frame = pd.read_parquet(out, columns=["id", "content_hash"])
    return sorted(zip(frame["id"], frame["content_hash"], strict=True))


def _assert_exact(out: Path, expected: list[tuple[str, str]]) -> None:
    """Every reader sees each id once, with the content of the same run: ``expected``."""
    readers = {"pyarrow": lambda: _snapshot(pq.read_table(out)), "pandas": lambda: _pandas_snapshot(out),
               "read_output": lambda: _snapshot(jobs.read_output(out))}
    for reader, read in readers.items():
        got = read()
        ids = [i for i, _ in got]
        dupes = len(ids) - len(set(ids))
        assert dupes == 0, f"{reader} sees {dupes} duplicate rows"
        assert got == expected, f"{reader} sees {len(got)} rows, not the {len(expected)} of the last run"


@pytest.mark.parametrize("kill_at", ["merge-renamed", "merge-moved", "publish"])
def test_a_sigkill_inside_compaction_leaves_readers_the_last_run_whole_and_a_resume_finishes_it(
        openai_server: OpenAITestServer, tmp_path: Path, kill_at: str) -> None:
    records = make_records(3000)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    # 30 parts of 100 rows, left as written (small_rows=1: nothing is small enough to merge).
    first = jobs.run(src, out=f"parquet:///{out}?small_rows=1", chunk_size=100, **openai_args(openai_server, tmp_path))
    assert first.exit_code == 0 and first.written == 3000
    before = _snapshot(pq.read_table(out))
    assert len(before) == 3000

    # One record of each part changes: every part is rewritten, and all 31 are then small
    # enough to be merged into one part of 3,000 rows, where the child dies.
    for r in records[::100]:
        r["text"] = f"an edited text for {r['id']}"
    write_jsonl(src, records)
    url = f"parquet:///{out}?small_rows=1000&part_rows=5000"
    killed = _cli(openai_server, src, url, tmp_path, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr

    _assert_exact(out, before)  # before any further run: the last completed run, whole

    resumed = _cli(openai_server, src, url, tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_mirrors(out, records)
    _assert_exact(out, _snapshot(pq.read_table(out)))
    sink = ParquetSink(out)
    published = sink.published()
    assert published is not None
    assert sorted(p.name for p in sink.parts()) == sorted(p.name for p in published.iterdir()), \
        "parts the state no longer points to were dropped"
    assert not list((out / GENS).glob("_next.tmp-*")) and len(list((out / GENS).iterdir())) == 2


def test_a_reader_polling_during_update_runs_sees_each_id_once_from_one_run_only(tmp_path: Path) -> None:
    records = make_records(600)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    args: dict[str, Any] = {"model": "fake:8", "cache": f"sqlite:///{tmp_path}/c.db", "chunk_size": 20}
    assert jobs.run(src, out=f"parquet:///{out}?small_rows=1", **args).exit_code == 0
    snapshots = [_snapshot(pq.read_table(out))]
    ids = sorted(r["id"] for r in records)

    seen: dict[str, list[list[tuple[str, str]]]] = {"pyarrow": [], "read_output": []}
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                seen["pyarrow"].append(_snapshot(pq.read_table(out, columns=["id", "content_hash"])))
            except FileNotFoundError as exc:  # a read overlapping the swap (see ParquetSink); never wrong rows
                errors.append(exc)
            seen["read_output"].append(_snapshot(jobs.read_output(out, columns=["id", "content_hash"])))

    reader = threading.Thread(target=poll, daemon=True)
    reader.start()
    try:
        # Each run rewrites a third of the rows (new texts) into new parts, then its compaction
        # rewrites the old parts and merges the small ones, and publishes.
        for n in range(3):
            for r in records[n::3]:
                r["text"] = f"edit {n} of {r['id']}"
            write_jsonl(src, records)
            result = jobs.run(src, out=f"parquet:///{out}?small_rows=100&part_rows=300", **args)
            assert result.exit_code == 0 and result.written == 200
            snapshots.append(_snapshot(pq.read_table(out)))
    finally:
        stop.set()
        reader.join(timeout=60)
    assert not reader.is_alive()

    assert [i for i, _ in snapshots[-1]] == ids
    for reader_name, reads in seen.items():
        assert len(reads) >= 10, f"{reader_name} read only {len(reads)} times"
        for got in reads:
            got_ids = [i for i, _ in got]
            assert len(got_ids) == len(set(got_ids)), f"{reader_name} saw an id twice"
            assert got_ids == ids, f"{reader_name} saw {len(got_ids)} rows, not {len(ids)}"
            assert got in snapshots, f"{reader_name} saw rows of two runs at once"
    # Only plain pyarrow reads (a listing, then opening files by name) can meet a swap, and rarely.
    assert len(errors) <= len(seen["pyarrow"]) // 4, f"{len(errors)} of {len(seen['pyarrow'])} reads failed"


def test_an_output_of_the_flat_layout_migrates_and_reads_back_exactly(tmp_path: Path) -> None:
    records = make_records(90)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    args: dict[str, Any] = {"model": "fake:8", "cache": f"sqlite:///{tmp_path}/c.db", "chunk_size": 30,
                            "out": f"parquet:///{out}?small_rows=1"}
    check: dict[str, Any] = {"dims": 8, "vector": lambda t: fake_vector(t, 8), "model": "fake:8"}
    assert jobs.run(src, **args).exit_code == 0

    # What earlier versions left: the parts directly in DIR beside the state, one of them a
    # leftover of an interrupted merge that the state no longer points to.
    for part in (out / PARTS).iterdir():
        os.replace(part, out / part.name)
    for name in (PARTS, GENS):
        shutil.rmtree(out / name)
    for extra in out.glob("_not-parquet-*"):
        extra.unlink()
    (out / DATA).unlink()
    flat = sorted(out.glob("part-*.parquet"))
    assert len(flat) == 3
    shutil.copyfile(flat[0], out / "part-00000000T000000-deadbeef-00001.parquet")
    assert pq.read_table(out).num_rows == 120  # the duplicates the flat layout could show

    sink = ParquetSink(out)
    sink.recover()  # what open() does first: the flat parts are adopted, readers see what they saw
    assert pq.read_table(out).num_rows == 120 and jobs.read_output(out).num_rows == 120
    assert len(sink.parts()) == 4

    records[0]["text"] = "a new text, written into _parts/"
    write_jsonl(src, records)
    result = jobs.run(src, **args)
    assert (result.exit_code, result.written, result.unchanged) == (0, 1, 89)
    assert not list(out.glob("part-*")), "the flat parts left the folder"
    assert (out / DATA).is_symlink()
    assert_mirrors(out, records, **check)
    assert _snapshot(jobs.read_output(out)) == _snapshot(pq.read_table(out))
    assert len(pd.read_parquet(out)) == 90
    assert jobs.run(src, **args).unchanged == 90
