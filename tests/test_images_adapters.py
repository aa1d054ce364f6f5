"""Images through the framework adapters, with the real tiny CLIP: LangChain's embed_image, LlamaIndex's
MultiModalEmbedding, ImageNodes in EmbedPipeTransform and a MultiModalVectorStoreIndex."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedpipe import EmbeddingPipeline
from embedpipe.inputs import Image

PIL = pytest.importorskip("PIL.Image")


def _photos(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"photo{i}.png"
        PIL.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_langchain_embed_image_shares_the_cache_and_the_space(clip_provider: Any, tmp_path: Path) -> None:
    from langchain_embedpipe import EmbedPipeEmbeddings

    paths = _photos(tmp_path, 3)
    shutil.copy(paths[0], tmp_path / "again.png")
    emb = EmbedPipeEmbeddings(model=clip_provider, cache=f"sqlite:///{tmp_path / 'c.db'}")
    vectors = emb.embed_image([str(p) for p in paths] + [str(tmp_path / "again.png")])
    assert len(vectors) == 4 and all(len(v) == 16 for v in vectors)
    assert vectors[3] == vectors[0]
    assert (emb.stats.embedded, emb.stats.deduped) == (3, 1)
    direct = EmbeddingPipeline(clip_provider, cache=None).embed_array([Image.from_path(p) for p in paths])
    np.testing.assert_allclose(np.asarray(vectors[:3]), direct, atol=1e-6)
    query = np.asarray(emb.embed_query("a photo of the sea"))
    assert query.shape == (16,) and abs(np.linalg.norm(query) - 1) < 1e-5
    emb.embed_image([str(paths[1])])
    assert emb.stats.hits == 1


async def test_langchain_aembed_image(clip_provider: Any, tmp_path: Path) -> None:
    from langchain_embedpipe import EmbedPipeEmbeddings

    paths = _photos(tmp_path, 2)
    emb = EmbedPipeEmbeddings(model=clip_provider, cache=None)
    assert await emb.aembed_image([str(p) for p in paths]) == emb.embed_image([str(p) for p in paths])


def test_llamaindex_multimodal_embedding_takes_paths_and_bytes(clip_provider: Any, tmp_path: Path) -> None:
    from llama_index.core.embeddings.multi_modal_base import MultiModalEmbedding

    from llamaindex_embedpipe import EmbedPipeMultiModalEmbedding

    paths = _photos(tmp_path, 2)
    mm = EmbedPipeMultiModalEmbedding(model=clip_provider, cache="memory://")
    assert isinstance(mm, MultiModalEmbedding)
    batch = mm.get_image_embedding_batch([str(paths[0]), io.BytesIO(paths[1].read_bytes())])
    assert len(batch) == 2 and all(len(v) == 16 for v in batch)
    assert mm.get_image_embedding(str(paths[1])) == batch[1]  # the bytes and the path share one key
    assert mm.stats.hits == 1
    assert len(mm.get_text_embedding("a photo")) == 16


async def test_llamaindex_aget_image_embedding_batch(clip_provider: Any, tmp_path: Path) -> None:
    from llamaindex_embedpipe import EmbedPipeMultiModalEmbedding

    paths = _photos(tmp_path, 3)
    mm = EmbedPipeMultiModalEmbedding(model=clip_provider, cache=None)
    got = await mm.aget_image_embedding_batch([str(p) for p in paths])
    assert got == mm.get_image_embedding_batch([str(p) for p in paths])
    # One image alone runs in a batch of one: the same vector up to float rounding.
    np.testing.assert_allclose(await mm.aget_image_embedding(str(paths[0])), got[0], atol=1e-6)


def test_image_nodes_through_the_transform_and_a_multimodal_index(clip_provider: Any, tmp_path: Path) -> None:
    from llama_index.core.indices.multi_modal import MultiModalVectorStoreIndex
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.schema import ImageNode, TextNode

    from llamaindex_embedpipe import EmbedPipeMultiModalEmbedding, EmbedPipeTransform

    paths = _photos(tmp_path, 3)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not an image")
    mm = EmbedPipeMultiModalEmbedding(model=clip_provider, cache="memory://")
    transform = EmbedPipeTransform(mm)
    # As SimpleDirectoryReader makes them: the file's name in metadata (an index skips nodes with no content).
    nodes = [ImageNode(image_path=str(p), id_=p.name, metadata={"file_name": p.name}) for p in [*paths, broken]]
    nodes.append(TextNode(text="a caption about the sea", id_="caption"))
    out = IngestionPipeline(transformations=[transform]).run(nodes=nodes)
    assert sorted(n.node_id for n in out) == ["caption", "photo0.png", "photo1.png", "photo2.png"]
    assert [d.id for d in transform.dead_letters] == ["broken.jpg"]
    assert "broken.jpg" in transform.dead_letters[0].reason
    images = [n for n in out if isinstance(n, ImageNode)]
    direct = mm.get_image_embedding_batch([str(p) for p in paths])
    assert sorted(n.embedding for n in images) == sorted(direct)  # type: ignore[type-var]

    index = MultiModalVectorStoreIndex(out, embed_model=mm, image_embed_model=mm)
    hits = index.as_retriever(image_similarity_top_k=2).text_to_image_retrieve("the sea")
    assert len(hits) == 2 and all(isinstance(h.node, ImageNode) for h in hits)
    # The index keeps where the image is, never its pixels.
    for h in hits:
        node = h.node
        assert isinstance(node, ImageNode) and node.image is None and Path(node.image_path or "").exists()
