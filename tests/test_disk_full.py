"""A full disk (a real, small tmpfs): a clear error, and nothing paid for is paid again after space is freed.

Needs root to mount the tmpfs; skipped otherwise (it says so).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from embedpipe.cli import main
from tests.openai_server import OpenAITestServer
from tests.test_jobs import DIMS, MODEL, assert_mirrors, make_records, write_jsonl


@contextlib.contextmanager
def small_disk(where: Path, size: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_stops_the_run_clearly_and_a_resume_bills_nothing_again(openai_server: OpenAITestServer,
                                                                            tmp_path: Path) -> None:
    records = make_records(400)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    with small_disk(tmp_path / "disk", "384k") as disk:
        args = ["run", str(src), "--model", MODEL, "--dimensions", str(DIMS), "--base-url", openai_server.base_url,
                "--cache", f"sqlite:///{disk}/cache.db", "--chunk-size", "40", "--out", str(disk / "out"),
                "--no-progress", "--no-estimate"]
        first = CliRunner().invoke(main, args, env={"OPENAI_API_KEY": "sk-test"})
        assert first.exit_code == 1, first.output
        assert "no space left on device" in first.output.lower() or "disk is full" in first.output
        assert "Traceback" not in first.output
        billed_before = dict(openai_server.ledger.times_billed)
        assert billed_before, "the run paid for something before the disk filled"

        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)  # space is freed
        again = CliRunner().invoke(main, args, env={"OPENAI_API_KEY": "sk-test"})
        assert again.exit_code == 0, again.output
        assert_mirrors(disk / "out", records)
        billed = openai_server.ledger.times_billed
        assert len(billed) == 400
        twice = [t for t, n in billed.items() if n > 1]
        assert not twice, f"{len(twice)} text(s) were billed twice after the disk filled"
