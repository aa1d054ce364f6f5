"""Damaged outputs: a run never reports success over them, names the file and `embedpipe repair`, which recovers.

Real files (a Parquet output and its SQLite state) damaged the ways disks and people damage
them, the real CLI, and the OpenAI-compatible test server, whose ledger shows that what the
repair made the next run redo came from the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedpipe import jobs
from embedpipe.cli import main
from tests.openai_server import OpenAITestServer
from tests.test_jobs import DIMS, MODEL, assert_mirrors, make_records, write_jsonl


def _url(out: Path) -> str:
    return f"parquet:///{out}?small_rows=1"  # parts stay as written (20 rows each): no merging at compaction


def _run(server: OpenAITestServer, src: Path, out: Path, tmp_path: Path) -> tuple[int, str]:
    res = CliRunner().invoke(main, ["run", str(src), "--model", MODEL, "--dimensions", str(DIMS), "--base-url",
                                    server.base_url, "--cache", f"sqlite:///{tmp_path}/cache.db", "--chunk-size", "20",
                                    "--out", _url(out), "--no-progress"], env={"OPENAI_API_KEY": "sk-test"})
    return res.exit_code, res.output


def _first_run(server: OpenAITestServer, tmp_path: Path) -> tuple[Path, Path, list[dict[str, object]]]:
    records = make_records(60)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    code, output = _run(server, src, out, tmp_path)
    assert code == 0, output
    return src, out, records


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_state_is_named_and_rebuilt_by_repair(openai_server: OpenAITestServer, tmp_path: Path,
                                                       damage: str) -> None:
    src, out, records = _first_run(openai_server, tmp_path)
    state = out / "_state.sqlite"
    data = state.read_bytes()
    state.write_bytes(os.urandom(4096) if damage == "garbage" else data[: len(data) // 3])
    for extra in ("-wal", "-shm"):
        Path(f"{state}{extra}").unlink(missing_ok=True)

    code, output = _run(openai_server, src, out, tmp_path)
    assert code == 1 and str(state) in output and "embedpipe repair --out" in output
    assert "Traceback" not in output

    res = CliRunner().invoke(main, ["repair", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "_quarantine/" in res.output and "rebuilt" in res.output and "60 records" in res.output
    openai_server.control.reset_ledger()
    code, output = _run(openai_server, src, out, tmp_path)
    assert code == 0, output
    assert "60 unchanged" in output and openai_server.ledger.requests_total == 0
    assert_mirrors(out, records)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "64 random bytes in the middle"])
def test_a_damaged_part_is_never_reported_as_success_and_repair_restores_it_from_the_cache(
        openai_server: OpenAITestServer, tmp_path: Path, damage: str) -> None:
    src, out, records = _first_run(openai_server, tmp_path)
    part = sorted(out.glob("_parts/part-*.parquet"))[1]
    data = bytearray(part.read_bytes())
    if damage == "truncated":
        part.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "garbage":
        part.write_bytes(os.urandom(len(data)))
    else:
        mid = len(data) // 2
        data[mid:mid + 64] = os.urandom(64)
        part.write_bytes(bytes(data))

    code, output = _run(openai_server, src, out, tmp_path)
    assert code == 1, output  # never "60 unchanged" over a damaged dataset
    assert part.name in output and "embedpipe repair --out" in output

    res = CliRunner().invoke(main, ["repair", "--out", _url(out)])
    assert res.exit_code == 0 and "20 to re-embed" in res.output, res.output
    assert (out / "_quarantine").is_dir() and not part.exists()
    assert jobs.read_output(out).num_rows == 40  # repair published what is readable, without the damaged part
    openai_server.control.reset_ledger()
    code, output = _run(openai_server, src, out, tmp_path)
    assert code == 0, output
    assert "20 from the cache" in output and openai_server.ledger.requests_total == 0
    assert_mirrors(out, records)  # readers skip _quarantine/

    res = CliRunner().invoke(main, ["repair", "--out", _url(out)])
    assert res.exit_code == 0 and "nothing is damaged" in res.output
