"""Time embedpipe's text path with whatever ``embedpipe`` is importable: run by ``--baseline``.

Standalone on purpose: ``python -m benchmarks --baseline DIR`` runs this file once with
``PYTHONPATH=DIR`` (the old checkout) and once with this repository, in alternating
rounds, so both sides time the same calls with the same public API
(``EmbeddingPipeline.embed``, ``embed_array``, ``embed_query``). It prints one JSON object:
metric name -> best seconds of the round.

    python benchmarks/baseline_probe.py --scenarios cached,overhead [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _best(fn: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _redis_url() -> str | None:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        import redis

        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception:
        return None
    return url


def cached(quick: bool, scratch: Path) -> dict[str, float]:
    """A fully cached embed of n texts at 1536 dims: lists and array, per store."""
    from embedpipe import EmbeddingPipeline

    n = 2000 if quick else 10_000
    texts = [f"paragraph {i}: the quick brown fox jumps over the lazy dog" for i in range(n)]
    stores = {"memory": "memory://", "sqlite": f"sqlite:///{scratch}/probe.db"}
    redis = _redis_url()
    if redis:
        stores["redis"] = f"{redis}?namespace=baseline-probe-{os.getpid()}"
    out: dict[str, float] = {}
    for name, url in stores.items():
        with EmbeddingPipeline("fake:1536", cache=url) as pipe:
            pipe.embed(texts)
            out[f"cached {name}: embed (lists)"] = _best(lambda pipe=pipe: pipe.embed(texts), 3 if quick else 7)
            out[f"cached {name}: embed_array"] = _best(lambda pipe=pipe: pipe.embed_array(texts), 3 if quick else 7)
            if name == "redis" and pipe.cache is not None:
                pipe.cache.clear()
    return out


def overhead(quick: bool, scratch: Path) -> dict[str, float]:
    """p50 of one cached ``embed_query`` per store, and of an uncached one on the fake model."""
    from embedpipe import EmbeddingPipeline

    calls = 300 if quick else 3000
    out: dict[str, float] = {}
    for name, url in (("memory", "memory://"), ("sqlite", f"sqlite:///{scratch}/probe-q.db")):
        with EmbeddingPipeline("fake:1536", cache=url) as pipe:
            pipe.embed_query("how do I open a file?")
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                pipe.embed_query("how do I open a file?")
                times.append(time.perf_counter() - t0)
            out[f"overhead {name}: cached embed_query p50"] = statistics.median(times)
    with EmbeddingPipeline("fake:1536", cache="memory://") as pipe:
        times = []
        for i in range(calls // 3):
            t0 = time.perf_counter()
            pipe.embed_query(f"a new query number {i}")
            times.append(time.perf_counter() - t0)
        out["overhead memory: uncached embed_query p50"] = statistics.median(times)
    return out


PROBES = {"cached": cached, "overhead": overhead}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenarios", default="cached,overhead")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import embedpipe

    result: dict[str, Any] = {"_embedpipe": str(Path(embedpipe.__file__).resolve().parent)}
    with tempfile.TemporaryDirectory(prefix="embedpipe-probe-") as tmp:
        for name in args.scenarios.split(","):
            if name in PROBES:
                result.update(PROBES[name](args.quick, Path(tmp)))
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
