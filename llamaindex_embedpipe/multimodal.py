"""``EmbedPipeMultiModalEmbedding``: a LlamaIndex ``MultiModalEmbedding`` (texts and images) through embedpipe."""

from __future__ import annotations

from typing import Any, cast

from llama_index.core.base.embeddings.base import Embedding
from llama_index.core.embeddings.multi_modal_base import MultiModalEmbedding
from llama_index.core.schema import ImageNode, ImageType

from embedpipe import EmbeddingResult
from embedpipe.inputs import Image, as_image
from llamaindex_embedpipe.embedding import EmbedPipeEmbedding


def node_image(node: ImageNode) -> Image:
    """The image an ``ImageNode`` holds: read from its ``image_path`` when it has one (named by it), else resolved."""
    if node.image_path:
        return Image.from_path(node.image_path)
    return as_image(node.resolve_image())


class EmbedPipeMultiModalEmbedding(EmbedPipeEmbedding, MultiModalEmbedding):
    """A LlamaIndex ``MultiModalEmbedding`` whose texts and images go through one embedpipe pipeline.

    Use a model that embeds both into one space, ``EmbedPipeMultiModalEmbedding(model="local-clip:/path")``;
    it serves as ``embed_model`` and ``image_embed_model`` of a ``MultiModalVectorStoreIndex``. Images
    (paths, or the ``BytesIO`` LlamaIndex resolves) are keyed by their pixels, so the same picture
    under two names is embedded once, and a batch is one core call, planned by pixels.
    """

    @classmethod
    def class_name(cls) -> str:
        return "EmbedPipeMultiModalEmbedding"

    def _get_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return cast(Embedding, self._pipeline.embed([as_image(img_file_path)])[0])

    async def _aget_image_embedding(self, img_file_path: ImageType) -> Embedding:
        return cast(Embedding, (await self._pipeline.aembed([as_image(img_file_path)]))[0])

    def _get_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        return list(self._pipeline.embed([as_image(p) for p in img_file_paths]))

    async def _aget_image_embeddings(self, img_file_paths: list[ImageType]) -> list[Embedding]:
        return list(await self._pipeline.aembed([as_image(p) for p in img_file_paths]))

    # MultiModalEmbedding cuts the list into embed_batch_size pieces; the core gets it whole.
    def get_image_embedding_batch(self, img_file_paths: list[ImageType], show_progress: bool = False,
                                  **kwargs: Any) -> list[Embedding]:
        """Embed images in one core call: pixel-keyed cache, dedupe, batches planned by pixels."""
        return cast(list[Embedding], list(self._embed_images([as_image(p) for p in img_file_paths])))

    async def aget_image_embedding_batch(self, img_file_paths: list[ImageType], show_progress: bool = False,
                                         **kwargs: Any) -> list[Embedding]:
        """Async twin of :meth:`get_image_embedding_batch`."""
        images = [as_image(p) for p in img_file_paths]
        with self._events([im.name for im in images]) as call:
            call.result = await self._pipeline.aembed(images)
        return cast(list[Embedding], list(call.result))

    def _embed_images(self, images: list[Image]) -> EmbeddingResult:
        with self._events([im.name for im in images]) as call:
            call.result = self._pipeline.embed(images)
        return call.result


__all__ = ["EmbedPipeMultiModalEmbedding", "node_image"]
