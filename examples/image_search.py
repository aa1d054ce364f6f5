"""Index a folder of images with CLIP and search it by text and by image.

    python examples/image_search.py [--model PATH] [--folder PHOTOS] [--query "a red car"] [--like photo.jpg]

``--model`` is a CLIP folder (transformers' ``save_pretrained`` layout, or a sentence-transformers
``clip-ViT-B-32``). Without it the example builds a tiny CLIP with random weights, which runs the
whole path but whose rankings mean nothing. Without ``--folder`` it draws a few pictures to search.
Vectors are cached by pixels (SQLite next to the folder): a second run embeds nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: the model is a local folder

import numpy as np

from embedpipe import EmbeddingPipeline, Image
from embedpipe.inputs import IMAGE_SUFFIXES


def _draw(folder: Path) -> None:
    """A few flat-coloured pictures, named for their colour."""
    import PIL.Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)
                      }.items():
        PIL.Image.new("RGB", (160, 120), rgb).save(folder / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local CLIP folder (default: a tiny random CLIP, for the mechanics only)")
    parser.add_argument("--folder", type=Path, help="the images to index (default: a few drawn ones)")
    parser.add_argument("--query", default="a red picture", help="a text query")
    parser.add_argument("--like", type=Path, help="an image query (default: the first image)")
    parser.add_argument("--top", type=int, default=3)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="embedpipe-images-"))
    model = args.model
    if model is None:
        from embedpipe.providers.local_clip import save_random_clip

        model = str(save_random_clip(scratch / "tiny-clip"))
        print("No --model: using a tiny CLIP with RANDOM weights. Its rankings mean nothing; pass --model PATH "
              "to a real CLIP for real results.")
    folder = args.folder or scratch / "pictures"
    if args.folder is None:
        _draw(folder)
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SystemExit(f"no images under {folder}")

    with EmbeddingPipeline(f"local-clip:{model}", cache=f"sqlite:///{folder.parent / 'image-vectors.db'}",
                           errors="collect") as pipe:
        result = pipe.embed_array([Image.from_path(p) for p in paths])
        for i, failure in sorted(result.failures.items()):
            print(f"skipped {paths[i]}: {failure.message}")
        ok = ~np.isnan(result).any(axis=1)
        index, names = result[ok], [p for p, good in zip(paths, ok, strict=True) if good]
        print(f"indexed {len(names)} images ({result.stats.embedded} embedded, {result.stats.hits} from the cache, "
              f"{result.stats.deduped} duplicates)")

        def show(title: str, query: np.ndarray) -> None:
            scores = index @ query
            print(title)
            for k in np.argsort(-scores)[: args.top]:
                print(f"  {scores[k]:+.3f}  {names[k]}")

        show(f"text query {args.query!r}:", np.asarray(pipe.embed_query(args.query)))
        like = args.like or names[0]
        show(f"image query {like}:", np.asarray(pipe.embed_query(Image.from_path(like))))


if __name__ == "__main__":
    main()
