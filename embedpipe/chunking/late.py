"""Late chunking: chunk vectors pooled from token outputs of the whole document (Jina, arXiv 2409.04701).

Embedding each chunk alone loses what the rest of the document says ("it", "this
function", a section's subject named only in its title). Late chunking runs the
transformer once over the whole document and mean-pools each chunk's span of the
contextualised token outputs, following Günther et al., "Late Chunking: Contextual Chunk
Embeddings Using Long-Context Embedding Models" (2024) and jina-ai/late-chunking:

1. tokenize the whole document once, with character offsets;
2. map each chunk's character span to the tokens that start inside it;
3. run the model over the tokens in windows of the model's position limit
   (``max_position_embeddings``: 512 for all-MiniLM-L6-v2, not sentence-transformers'
   256-token cut), each window overlapping the one before by ``overlap`` tokens whose
   outputs are dropped, so every kept output saw at least ``overlap`` tokens of context
   before it (the first window's excepted);
4. mean-pool each chunk's tokens, then L2-normalise.

Each window is given the model's own special tokens ([CLS] ... [SEP]) as in training;
their outputs are never pooled. This module needs no torch: the model is a callable
from token-id windows to token outputs (:func:`transformer_runner` builds one over a
Hugging Face module).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from embedpipe.errors import ConfigurationError

__all__ = ["LateChunker", "WindowRunner", "contextual_token_outputs", "pool_spans", "token_spans",
           "transformer_runner"]

#: token-id windows (each with its special tokens) -> one (len(window), d) output array per window
WindowRunner = Callable[[list[list[int]]], list[np.ndarray]]


def token_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The ``[first, last)`` token range of each character span: the tokens whose text starts inside it.

    ``offsets`` are the tokenizer's ``(start, end)`` character offsets of the document's
    tokens, in order. Raises ``ValueError`` naming a span that holds no token.
    """
    starts = [s for s, _ in offsets]
    out = []
    for k, (s, e) in enumerate(spans):
        first = bisect.bisect_left(starts, s)
        last = bisect.bisect_left(starts, e)
        if last <= first:
            raise ValueError(f"chunk {k} (characters {s}:{e}) holds no token of the document")
        out.append((first, last))
    return out


def contextual_token_outputs(ids: Sequence[int], run: WindowRunner, *, max_length: int, overlap: int,
                             prefix: Sequence[int] = (), suffix: Sequence[int] = ()) -> np.ndarray:
    """Outputs for every token of ``ids``: ``(len(ids), d)``, from overlapping windows of ``max_length`` positions.

    ``prefix``/``suffix`` (the model's [CLS]/[SEP]) wrap each window and count against
    ``max_length``. Window ``w`` covers ``ids[w * step : w * step + body]`` with
    ``body = max_length - len(prefix) - len(suffix)`` and ``step = body - overlap``; of each
    window after the first, the outputs of its first ``overlap`` tokens are dropped, since the
    window before already gave those tokens more left context.
    """
    body = max_length - len(prefix) - len(suffix)
    if body < 1:
        raise ConfigurationError(f"max_length={max_length} leaves no room for tokens besides the special ones")
    if not 0 <= overlap < body:
        raise ConfigurationError(f"overlap must be at least 0 and below {body} tokens, got {overlap}")
    n = len(ids)
    if n == 0:
        raise ValueError("the document has no tokens")
    step = body - overlap
    starts = [0]
    while starts[-1] + body < n:
        starts.append(starts[-1] + step)
    windows = [[*prefix, *ids[s:s + body], *suffix] for s in starts]
    outputs = run(windows)
    if len(outputs) != len(windows):
        raise ValueError(f"the model returned {len(outputs)} outputs for {len(windows)} windows")
    kept = []
    for w, (s, out) in enumerate(zip(starts, outputs, strict=True)):
        arr = np.asarray(out)
        width = min(body, n - s)
        if arr.ndim != 2 or arr.shape[0] != width + len(prefix) + len(suffix):
            raise ValueError(f"window {w}: expected {width + len(prefix) + len(suffix)} token outputs, "
                             f"got shape {arr.shape}")
        drop = 0 if w == 0 else overlap
        kept.append(arr[len(prefix) + drop:len(prefix) + width])
    result = np.concatenate(kept, axis=0)
    assert result.shape[0] == n  # each token kept exactly once
    return result


def pool_spans(tokens: np.ndarray, spans: Sequence[tuple[int, int]], normalize: bool = True) -> np.ndarray:
    """Mean of ``tokens[first:last]`` for each token span, L2-normalised: ``(len(spans), d)`` float32."""
    out = np.stack([tokens[a:b].astype(np.float64).mean(axis=0) for a, b in spans])
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        out = out / np.where(norms == 0, 1, norms)
    return out.astype(np.float32)


@dataclass
class LateChunker:
    """Late chunking over one tokenizer and one transformer.

    ``tokenizer`` is a Hugging Face *fast* tokenizer (it must return offsets);
    ``run`` maps token-id windows to token outputs; ``max_length`` is the model's position
    limit; ``overlap`` defaults to a quarter of a window.
    """

    tokenizer: Any
    run: WindowRunner
    max_length: int
    overlap: int | None = None

    @classmethod
    def from_sentence_transformer(cls, model: Any, *, overlap: int | None = None,
                                  max_length: int | None = None) -> LateChunker:
        """The late chunker of a loaded ``SentenceTransformer`` whose first module is a transformer.

        Uses ``model[0].auto_model`` and ``model.tokenizer``, and the transformer's own
        ``max_position_embeddings`` (not the sentence-transformers ``max_seq_length`` cut)
        unless ``max_length`` is given.
        """
        try:
            module = model[0].auto_model
        except (TypeError, IndexError, AttributeError, KeyError):
            raise ConfigurationError(
                f"late chunking needs a transformer model; {type(model).__name__} has no model[0].auto_model") from None
        limit = getattr(module.config, "max_position_embeddings", None)
        if max_length is None:
            if not isinstance(limit, int):
                raise ConfigurationError("the model's config has no max_position_embeddings; pass max_length=")
            max_length = limit
        return cls(model.tokenizer, transformer_runner(module), max_length, overlap)

    def _overlap(self, body: int) -> int:
        return body // 4 if self.overlap is None else self.overlap

    def embed_spans(self, text: str, spans: Sequence[tuple[int, int]]) -> np.ndarray:
        """One normalised vector per ``(start, end)`` character span of ``text``: ``(len(spans), d)``."""
        if not spans:
            raise ValueError("no chunks to embed")
        for k, (s, e) in enumerate(spans):
            if not 0 <= s < e <= len(text):
                raise ValueError(f"chunk {k} span ({s}, {e}) is not a non-empty range of the {len(text)}-character "
                                 "document")
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        prefix = [self.tokenizer.cls_token_id] if self.tokenizer.cls_token_id is not None else []
        suffix = [self.tokenizer.sep_token_id] if self.tokenizer.sep_token_id is not None else []
        body = self.max_length - len(prefix) - len(suffix)
        outputs = contextual_token_outputs(ids, self.run, max_length=self.max_length,
                                           overlap=self._overlap(body), prefix=prefix, suffix=suffix)
        return pool_spans(outputs, token_spans(offsets, spans))


def transformer_runner(module: Any, batch_size: int = 8) -> WindowRunner:
    """A :data:`WindowRunner` over a Hugging Face transformer module: its ``last_hidden_state``, no gradients.

    Windows are padded per batch and masked, so padding never enters a token's context.
    """
    import torch  # only here: the rest of the chunking package runs without torch

    def run(windows: list[list[int]]) -> list[np.ndarray]:
        device = next(module.parameters()).device
        out: list[np.ndarray] = []
        for i in range(0, len(windows), batch_size):
            batch = windows[i:i + batch_size]
            width = max(len(w) for w in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, w in enumerate(batch):
                ids[row, :len(w)] = torch.tensor(w, dtype=torch.long)
                mask[row, :len(w)] = 1
            with torch.inference_mode():
                hidden = module(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            hidden = hidden.float().cpu().numpy()
            out.extend(hidden[row, :len(w)] for row, w in enumerate(batch))
        return out

    return run
