"""The engine: the pure planning steps, the budget, response validation, batch isolation and the
async driver behind :class:`~embedpipe.EmbeddingPipeline`. Not a public API: import from
:mod:`embedpipe` instead."""

from embedpipe.engine.core import Engine
from embedpipe.engine.results import EmbeddingArray, EmbeddingResult

__all__ = ["EmbeddingArray", "EmbeddingResult", "Engine"]
