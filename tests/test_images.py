"""Images through the engine with a real (tiny, random) CLIP: one space with texts, pixel-keyed cache, batching
by pixels, corrupt files as input errors. Random weights: mechanics are asserted, never retrieval quality."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.errors import InvalidInputError
from embedpipe.events import RequestSent
from embedpipe.inputs import Image

PIL = pytest.importorskip("PIL.Image")


def _photo(path: Path, seed: int, size: tuple[int, int] = (96, 64), **save: Any) -> Path:
    """A noisy picture (distinct per seed), saved in the format the suffix names."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    PIL.fromarray(pixels).save(path, **save)
    return path


def test_texts_and_images_share_one_normalised_space(clip_provider: Any, tmp_path: Path) -> None:
    pipe = EmbeddingPipeline(clip_provider, cache=None)
    images = [Image.from_path(_photo(tmp_path / f"{i}.png", i)) for i in range(3)]
    out = pipe.embed_array(["a photo of a cat", images[0], "two dogs", images[1], images[2]])
    assert out.shape == (5, clip_provider.dimensions) == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert len({row.tobytes() for row in out}) == 5
    # The pipeline's vectors are CLIP's own: the towers called directly give the same numbers.
    direct_img = clip_provider.embed_pixels([im.load() for im in images])
    direct_txt = clip_provider.embed_texts(["a photo of a cat", "two dogs"])
    np.testing.assert_allclose(out[[1, 3, 4]], direct_img, atol=1e-5)
    np.testing.assert_allclose(out[[0, 2]], direct_txt, atol=1e-5)
    # A query in text ranks the images (random weights: only that it can, not how well).
    scores = out[[1, 3, 4]] @ pipe.embed_query("a photo of a cat")
    assert scores.shape == (3,) and np.all(np.abs(scores) <= 1.0 + 1e-5)


def test_the_same_photo_under_another_name_is_embedded_once(clip_provider: Any, tmp_path: Path) -> None:
    first = _photo(tmp_path / "holiday.jpg", 7)
    copy = tmp_path / "copy-of-holiday.jpg"
    shutil.copy(first, copy)
    # The same pixels re-saved losslessly: a different file, the same content key.
    as_png = tmp_path / "holiday.png"
    Image.from_path(first).load().save(as_png)
    pipe = EmbeddingPipeline(clip_provider, cache=f"sqlite:///{tmp_path / 'c.db'}")
    pipe.embed([Image.from_path(first), Image.from_path(copy)])
    assert (pipe.stats.embedded, pipe.stats.deduped) == (1, 1)
    again = pipe.embed([Image.from_path(as_png), Image.from_bytes(copy.read_bytes(), name="upload")])
    assert (pipe.stats.hits, pipe.stats.embedded) == (1, 1)
    assert again.stats.deduped == 1
    other = pipe.embed([Image.from_path(_photo(tmp_path / "other.jpg", 8))])
    assert other.stats.misses == 1


def test_exif_orientation_is_applied_before_the_key(clip_provider: Any, tmp_path: Path) -> None:
    upright = _photo(tmp_path / "upright.png", 3, size=(40, 24))
    turned = PIL.open(upright).transpose(PIL.Transpose.ROTATE_90)  # what a camera stores, lying on its side
    exif = PIL.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    turned.save(tmp_path / "camera.png", exif=exif)
    a, b = Image.from_path(upright), Image.from_path(tmp_path / "camera.png")
    assert a.content_key() == b.content_key()
    assert b.size == (40, 24)
    assert Image.from_pil(PIL.open(upright)).content_key() == a.content_key()


def test_a_corrupt_file_is_an_input_error_naming_it(clip_provider: Any, tmp_path: Path) -> None:
    good = Image.from_path(_photo(tmp_path / "good.jpg", 1))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    whole = _photo(tmp_path / "whole.jpg", 2).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])
    pipe = EmbeddingPipeline(clip_provider, cache=None)
    with pytest.raises(InvalidInputError, match=r"broken\.jpg") as info:
        pipe.embed([good, Image.from_path(broken)])
    assert info.value.indices == [1]
    assert pipe.stats.requests == 0  # refused before anything ran
    result = pipe.embed([good, Image.from_path(broken), Image.from_path(truncated),
                         Image.from_path(tmp_path / "missing.png")], errors="collect")
    assert sorted(result.failures) == [1, 2, 3]
    assert all(f.kind == "invalid_input" for f in result.failures.values())
    assert "truncated.jpg" in result.failures[2].message and "no such file" in result.failures[3].message
    assert result[0] is not None and len(result[0]) == 16


def test_requests_are_planned_by_pixels(clip_provider: Any, tmp_path: Path) -> None:
    patches = clip_provider.item_tokens(Image.from_bytes(b""))
    assert patches == (32 // 8) ** 2 + 1
    sent: list[RequestSent] = []
    pipe = EmbeddingPipeline(clip_provider, cache=None, max_batch_tokens=2 * patches,
                             hooks=[lambda e: sent.append(e) if isinstance(e, RequestSent) else None])
    images = [Image.from_path(_photo(tmp_path / f"{i}.webp", i, format="WEBP", lossless=True)) for i in range(5)]
    result = pipe.embed(images)
    assert [e.inputs for e in sent] == [2, 2, 1]
    assert result.stats.tokens == 5 * patches
    assert pipe.estimate(images).requests == 3


async def test_async_calls_decode_off_the_loop(clip_provider: Any, tmp_path: Path) -> None:
    threads: list[str] = []

    class Watched(Image):
        __slots__ = ()

        def content_key(self) -> bytes:
            threads.append(threading.current_thread().name)
            return super().content_key()

    images = [Watched(path=_photo(tmp_path / f"{i}.png", i)) for i in range(4)]
    pipe = EmbeddingPipeline(clip_provider, cache=None)
    loop_thread = threading.current_thread().name
    out = await pipe.aembed(images)
    assert len(out) == 4 and all(v is not None for v in out)
    assert threads and all(name.startswith("embedpipe-decode") for name in threads[:4])
    assert loop_thread not in threads


def test_a_text_model_refuses_images(tmp_path: Path) -> None:
    pipe = EmbeddingPipeline("fake:8", cache=None)
    with pytest.raises(InvalidInputError, match="image"):
        pipe.embed([Image.from_path(_photo(tmp_path / "a.png", 0))])


def test_an_image_gone_between_its_key_and_its_batch_fails_alone(clip_provider: Any, tmp_path: Path) -> None:
    images = [Image.from_path(_photo(tmp_path / f"{i}.png", i)) for i in range(4)]
    for im in images:
        im.content_key()  # keyed (as a job's source does as it reads), then the file goes
    (tmp_path / "2.png").unlink()
    pipe = EmbeddingPipeline(clip_provider, cache=None)
    result = pipe.embed(images, errors="collect")
    assert sorted(result.failures) == [2] and "2.png" in result.failures[2].message
    assert all(result[i] is not None for i in (0, 1, 3))
