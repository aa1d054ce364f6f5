"""The ``embedpipe`` command line against the OpenAI test server: kill and resume, incremental runs,
dead letters, budgets, estimates and the cache commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner, Result

from embedpipe import jobs
from embedpipe.cli import main
from embedpipe.tokens import TiktokenTokenizer
from tests.openai_server import OpenAITestServer
from tests.test_jobs import DIMS, MODEL, PRICE, assert_mirrors, make_records, read_output, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: Any) -> Result:
    """Run the command line in-process, the way the console script does."""
    return CliRunner().invoke(main, [str(a) for a in args], env={"OPENAI_API_KEY": "sk-test"},
                              catch_exceptions=False)


def run_args(src: Path, out: Path, server: OpenAITestServer, tmp_path: Path, *extra: Any) -> list[Any]:
    return ["run", src, "--model", MODEL, "--dimensions", DIMS, "--out", out, "--base-url", server.base_url,
            "--cache", f"sqlite:///{tmp_path}/cache.db", *extra]


def test_sigkill_mid_run_then_the_same_command_finishes_exactly_once_billing_only_in_flight_requests(
        tmp_path: Path, redis_url: str, redis_namespace: str) -> None:
    records = make_records(400)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    concurrency, batch = 2, 20
    # Latency keeps requests in flight long enough for the kill to land mid-run; the cache is
    # real Redis, outside the killed process.
    with OpenAITestServer(latency=0.25) as server:
        cmd = [sys.executable, "-m", "embedpipe.cli", "run", str(src), "--model", MODEL, "--dimensions", str(DIMS),
               "--out", str(out), "--base-url", server.base_url, "--cache", f"{redis_url}?namespace={redis_namespace}",
               "--chunk-size", "100", "--batch-size", str(batch), "--max-concurrency", str(concurrency)]
        env = {**os.environ, "OPENAI_API_KEY": "sk-test", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 90
        while not list(out.glob("_parts/part-*.parquet")):  # the first chunk is written: mid-run
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no part appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        at_kill = server.ledger
        assert at_kill.requests_ok < len(records) // batch, "the kill landed after the run had finished"
        assert pq.read_table(out).num_rows == 0  # a first run publishes nothing before it finishes

        again = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        ledger = server.ledger

    assert_mirrors(out, records)
    texts = [r["text"] for r in records]
    assert set(ledger.times_billed) == set(texts)
    rebilled = [t for t, n in ledger.times_billed.items() if n > 1]
    assert max(ledger.times_billed.values()) <= 2
    assert len(rebilled) <= concurrency * batch, "re-billing beyond the requests in flight at the kill"
    # Texts whose response arrived before the kill were never billed again.
    assert all(ledger.times_billed[t] == 1 for t in at_kill.times_billed if t not in rebilled)
    assert "finished" in again.stdout


@pytest.mark.parametrize("out_name", ["out", "vectors.jsonl"])
def test_edit_10_delete_5_add_5_bills_exactly_those_15_texts_and_the_output_mirrors_the_source(
        tmp_path: Path, openai_server: OpenAITestServer, out_name: str) -> None:
    records = make_records(150)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / out_name
    first = cli(*run_args(src, out, openai_server, tmp_path, "--chunk-size", 40))
    assert first.exit_code == 0, first.output
    assert_mirrors(out, records)

    edited = records[10:20]
    for r in edited:
        r["text"] += " (edited)"
    deleted = {r["id"] for r in records[50:55]}
    added = make_records(5, prefix="new")
    records = [r for r in records if r["id"] not in deleted] + added
    records[100]["topic"] = "metadata only"
    write_jsonl(src, records)
    openai_server.control.reset_ledger()

    second = cli(*run_args(src, out, openai_server, tmp_path, "--chunk-size", 40))
    assert second.exit_code == 0, second.output
    billed = openai_server.ledger.times_billed
    assert billed == {r["text"]: 1 for r in edited + added}
    assert_mirrors(out, records)
    assert "5 deleted" in second.output and "1 metadata updates" in second.output


def test_empty_and_rejected_records_go_to_the_dead_letter_queue_and_can_be_retried_or_purged(
        tmp_path: Path, openai_server: OpenAITestServer) -> None:
    openai_server.control.configure(poison=("POISON",))
    good = make_records(40)
    bad = [{"id": "empty", "text": "", "topic": "a"}, {"id": "blank", "text": "   \n", "topic": "b"},
           {"id": "missing", "topic": "c"}, {"id": "poison", "text": "a POISON record", "topic": "d"}]
    src = write_jsonl(tmp_path / "src.jsonl", good[:20] + bad + good[20:])
    out = tmp_path / "out"
    result = cli(*run_args(src, out, openai_server, tmp_path))
    assert result.exit_code == 3, result.output
    assert "4 dead letter(s)" in result.output
    assert_mirrors(out, good)

    listing = cli("dlq", "list", "--out", out)
    assert listing.exit_code == 0
    lines = {line.split()[0]: line for line in listing.output.splitlines()[1:-1]}
    assert set(lines) == {"empty", "blank", "missing", "poison"}
    assert "input is empty or whitespace only" in lines["empty"] and "HTTP 400" in lines["poison"]
    as_json = cli("dlq", "list", "--state", out / "_state.sqlite", "--json")
    letters = {d.id: d for d in jobs.dead_letters(state=out / "_state.sqlite")}
    assert len(as_json.output.splitlines()) == 4
    assert (letters["poison"].text, dict(letters["poison"].metadata), letters["poison"].attempts) == \
        ("a POISON record", {"topic": "d"}, 1)

    # The same command again leaves unchanged dead letters alone: no new letter, exit 0; the summary names the old.
    openai_server.control.reset_ledger()
    again_run = cli(*run_args(src, out, openai_server, tmp_path))
    assert again_run.exit_code == 0 and "4 dead letter(s) (0 new)" in again_run.output, again_run.output
    assert openai_server.ledger.requests_total == 0

    # Retry needs no source: the letters keep text and metadata; model and URL come from the state.
    openai_server.control.configure(poison=())
    retried = cli("dlq", "retry", "--out", out, "--id", "poison", "--cache", f"sqlite:///{tmp_path}/cache.db")
    assert retried.exit_code == 3, retried.output
    assert "1 recovered, 0 failed again, 3 left" in retried.output
    assert_mirrors(out, [*good, bad[3]])
    again = cli("dlq", "retry", "--out", out)
    assert again.exit_code == 3 and "3 failed again" in again.output
    assert {d.attempts for d in jobs.dead_letters(out)} == {2}

    purged = cli("dlq", "purge", "--out", out)
    assert purged.exit_code == 0 and "3 dead letter(s) dropped" in purged.output
    assert "no dead letters" in cli("dlq", "list", "--out", out).output


def test_budget_refusal_stop_mid_run_and_a_rerun_with_a_bigger_budget(
        tmp_path: Path, openai_server: OpenAITestServer) -> None:
    records = make_records(200)
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    tokens = sum(TiktokenTokenizer.for_encoding("cl100k_base").count([r["text"] for r in records]))
    cost = tokens * PRICE / 1e6

    refused = cli(*run_args(src, out, openai_server, tmp_path, "--budget-usd", cost / 2))
    assert refused.exit_code == 4
    assert f"{tokens:,} tokens" in refused.output and "refused" in refused.output
    assert openai_server.ledger.requests_total == 0 and not list(out.glob("**/part-*"))

    # Without the estimate up front, the run itself stops before crossing the budget, checkpointed.
    budget = cost * 0.4
    stopped = cli(*run_args(src, out, openai_server, tmp_path, "--budget-usd", budget, "--no-estimate",
                            "--chunk-size", 25, "--batch-size", 5))
    assert stopped.exit_code == 4, stopped.output
    assert "stopped at the budget" in stopped.output
    spent = openai_server.ledger.billed_tokens * PRICE / 1e6
    assert 0 < spent <= budget
    done = {r["id"] for r in read_output(out)}
    assert 0 < len(done) < len(records)
    paid = set(openai_server.ledger.times_billed)

    openai_server.control.reset_ledger()
    finished = cli(*run_args(src, out, openai_server, tmp_path, "--budget-usd", cost * 2, "--chunk-size", 25))
    assert finished.exit_code == 0, finished.output
    assert_mirrors(out, records)
    assert not paid & set(openai_server.ledger.times_billed), "work paid for before the stop was billed again"


def test_estimate_makes_no_api_call_and_sees_what_is_cached(tmp_path: Path, openai_server: OpenAITestServer) -> None:
    records = [*make_records(60), {"id": "empty", "text": ""}]
    src = write_jsonl(tmp_path / "src.jsonl", records)
    out = tmp_path / "out"
    tokens = sum(TiktokenTokenizer.for_encoding("cl100k_base").count([r["text"] for r in records]))
    est = cli("estimate", src, "--model", MODEL, "--dimensions", DIMS, "--base-url", openai_server.base_url,
              "--cache", f"sqlite:///{tmp_path}/cache.db", "--rpm", 60, "--tpm", 1_000_000, "--out", out)
    assert est.exit_code == 0, est.output
    assert f"{tokens:,} tokens in 1 requests" in est.output
    assert f"${tokens * PRICE / 1e6:,.6f}" in est.output and "ETA" in est.output and "1s" in est.output
    assert openai_server.ledger.requests_total == 0 and not out.exists()

    assert cli(*run_args(src, out, openai_server, tmp_path)).exit_code == 3
    records[0]["text"] = "changed"
    write_jsonl(src, records[:-1])
    after = jobs.estimate(src, out=out, model=MODEL, dimensions=DIMS, base_url=openai_server.base_url,
                          cache=f"sqlite:///{tmp_path}/cache.db")
    assert (after.unchanged, after.to_embed, after.to_send, after.deletions) == (59, 1, 1, 1)
    assert after.cached_share == pytest.approx(59 / 60)


def test_another_dimensions_on_an_existing_output_is_a_usage_error_unless_rebuild(
        tmp_path: Path, openai_server: OpenAITestServer) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", make_records(20))
    out = tmp_path / "out"
    assert cli(*run_args(src, out, openai_server, tmp_path)).exit_code == 0
    args = ["run", src, "--model", MODEL, "--dimensions", 16, "--out", out, "--base-url", openai_server.base_url,
            "--cache", f"sqlite:///{tmp_path}/cache.db"]
    refused = cli(*args)
    assert refused.exit_code == 2
    assert "at 32 dimensions" in refused.output and "--rebuild" in refused.output
    over_budget = cli(*args, "--rebuild", "--budget-usd", 1e-9)  # a refused rebuild wipes nothing
    assert over_budget.exit_code == 4
    assert {r["dimensions"] for r in read_output(out)} == {32}
    assert cli(*args, "--rebuild").exit_code == 0
    assert {r["dimensions"] for r in read_output(out)} == {16}


def test_cache_commands_stats_prune_export_import(tmp_path: Path, openai_server: OpenAITestServer) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", make_records(30))
    out = tmp_path / "out"
    url = f"sqlite:///{tmp_path}/cache.db"
    assert cli(*run_args(src, out, openai_server, tmp_path)).exit_code == 0
    assert cli(*run_args(src, out, openai_server, tmp_path, "--rebuild")).exit_code == 0

    stats = cli("cache", "stats", "--cache", url, "--out", out)
    assert stats.exit_code == 0, stats.output
    assert "entries   30" in stats.output
    assert "100.0% in the last run that needed vectors (30 of 30 texts), 50.0% over all 2 run(s)" in stats.output
    assert cli(*run_args(src, out, openai_server, tmp_path)).exit_code == 0  # all unchanged: still a run
    stats = cli("cache", "stats", "--cache", url, "--out", out)
    assert "over all 3 run(s) (1 found everything unchanged)" in stats.output, stats.output

    exported = cli("cache", "export", tmp_path / "v.parquet", "--cache", url)
    assert "30 vectors exported" in exported.output
    imported = cli("cache", "import", tmp_path / "v.parquet", "--cache", f"sqlite:///{tmp_path}/other.db")
    assert "30 vectors imported" in imported.output
    before = (tmp_path / "other.db").stat().st_size
    pruned = cli("cache", "prune", "--cache", f"sqlite:///{tmp_path}/other.db", "--max-bytes", "1KB")
    assert pruned.exit_code == 0 and "entries removed" in pruned.output, pruned.output
    assert (tmp_path / "other.db").stat().st_size < before  # the file shrank: pruning vacuums
    assert "left" in pruned.output


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli("run", tmp_path / "missing.jsonl", "--model", "fake:8").exit_code == 2  # no --out
    assert cli("run", tmp_path / "x.jsonl", "--model", "nope", "--out", tmp_path / "o").exit_code == 2
    missing = cli("run", tmp_path / "missing.jsonl", "--model", "fake:8", "--out", tmp_path / "o",
                  "--cache", "memory://")
    assert missing.exit_code == 1 and "does not exist" in missing.output


def test_a_budget_refusal_prints_the_estimate_once(tmp_path: Path, openai_server: OpenAITestServer) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", make_records(50))
    refused = cli(*run_args(src, tmp_path / "out", openai_server, tmp_path, "--budget-usd", 1e-9))
    assert refused.exit_code == 4
    table = f"estimate for {MODEL}:"
    assert refused.output.count(table) == 1 and refused.output.count("  to send ") == 1, refused.output
    assert refused.output.count("refused") == 1


def test_a_misspelt_text_field_stops_before_any_request_naming_the_fields(
        tmp_path: Path, openai_server: OpenAITestServer) -> None:
    src = write_jsonl(tmp_path / "src.jsonl", make_records(30))
    out = tmp_path / "out"
    result = cli(*run_args(src, out, openai_server, tmp_path, "--text-field", "txt"))
    assert result.exit_code == 1, result.output
    assert "30 of the first 30 records have no 'txt' field" in result.output
    assert "fields seen: id, text, topic" in result.output and "--text-field text" in result.output
    assert openai_server.ledger.requests_total == 0
    assert not list(out.glob("**/part-*"))
    assert "no dead letters" in cli("dlq", "list", "--out", out).output
