"""The GPU scenario's CPU-runnable logic (benchmarks/gpu_local.py), on a handful of texts.

No GPU here: this checks the random-model build, equality with sentence-transformers on the
same random weights, the interleaved cases and the result files; the GPU figures themselves
are measured only where a GPU is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import CORPUS, ROOT


def test_gpu_scenario_runs_on_cpu(minilm_path: str, tmp_path: Path) -> None:
    if not CORPUS.is_file():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    from benchmarks import gpu_local

    assets = gpu_local.prepare(tmp_path / "assets", ROOT, wheels=False)
    assert not (assets / "model" / "model.safetensors").exists(), "weights never travel"
    results = gpu_local.run(assets, tmp_path / "out", device="cpu", sections=6, repeat=1, rounds=1)
    assert results["texts"] == 6 and len(results["cases"]) == 4
    assert results["equality_on_random_weights"]["fp32_min_cosine"] >= 0.99999
    written = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert written["cases"][0]["case"].startswith("SentenceTransformer.encode (default")
    assert "texts/s" in (tmp_path / "out" / "results.md").read_text(encoding="utf-8")
