"""``local-clip:``: a CLIP model on this machine, embedding texts and images into one space, offline.

It loads through transformers' ``CLIPModel`` with its tokenizer and the Pillow image processor
(``CLIPImageProcessorPil`` in transformers 5), so neither open_clip nor torchvision is needed.
A batch may mix strings and :class:`~embedpipe.inputs.Image`: texts go through the text tower,
images through the vision tower, and every vector is L2-normalised, so a text query ranks
images by cosine.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.errors import ConfigurationError, InvalidInputError, ModelNotFoundError, ProviderError
from embedpipe.inputs import IMAGE, TEXT, Image
from embedpipe.providers.base import BatchResult, Provider, ProviderInfo, Role
from embedpipe.providers.local import HFTokenizer, resolve_model_path

#: precisions the provider takes: "auto" is fp16 on CUDA, fp32 on the CPU
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def clip_folder(path: str) -> str:
    """The transformers CLIP folder in ``path``: the folder itself, or a sentence-transformers CLIP's module folder."""
    root = Path(path)
    if (root / "config.json").is_file():
        return str(root)
    modules = root / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text(encoding="utf-8")):
            sub = root / str(module.get("path", ""))
            if "CLIPModel" in str(module.get("type", "")) and (sub / "config.json").is_file():
                return str(sub)
    raise ModelNotFoundError(f"{path} holds no CLIP model (no config.json, nor a sentence-transformers CLIPModel)")


def _transformers() -> Any:
    # Typed as Any: transformers' stubs type model configs loosely and its decorators oddly.
    return importlib.import_module("transformers")


def image_processor_class() -> Any:
    """The Pillow CLIP image processor (transformers 5: the default one needs torchvision, which falls back to
    this with a warning), else the one transformers 4 has, which is Pillow-based."""
    transformers = _transformers()
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


class LocalCLIPProvider(Provider):
    """``local-clip:<folder or name in the local HF cache>``: CLIP texts and images in one space.

    ``device``: ``"cuda"`` when present, else ``"cpu"``. ``precision``: ``"auto"`` (fp16 on
    CUDA, fp32 on the CPU), ``"fp32"``, ``"fp16"`` or ``"bf16"`` (the last two on CUDA only).
    ``decode_threads``: images of one batch decoded at once. An image weighs its patches plus
    the class token in batch planning (:meth:`item_tokens`), so ``max_batch_tokens`` bounds
    pixels per request as it bounds tokens.
    """

    name = "local-clip"
    info = ProviderInfo(batch_size=64, default_concurrency=1, price_per_1m_units=0.0,
                        modalities=frozenset({TEXT, IMAGE}))

    def __init__(self, model: str, *, device: str | None = None, precision: str = "auto",
                 decode_threads: int | None = None) -> None:
        super().__init__(model)
        if precision not in PRECISIONS:
            raise ConfigurationError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
        self.path = clip_folder(resolve_model_path(model))
        self.device = device
        self.precision = precision
        self.decode_threads = decode_threads or min(8, os.cpu_count() or 1)
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._model: Any = None
        self._load()

    def _load(self) -> None:
        with self._lock:
            if self._model is not None:
                return
            try:
                import torch

                transformers = _transformers()
            except ImportError:
                raise ConfigurationError("local-clip needs torch and transformers: install torch first (see README), "
                                         "then pip install 'embedpipe[multimodal]'") from None
            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            precision = self.precision
            if precision == "auto":
                precision = "fp16" if device.startswith("cuda") else "fp32"
            if precision in ("fp16", "bf16") and not device.startswith("cuda"):
                raise ConfigurationError(f"precision={precision!r} needs a CUDA device (this one is {device!r})")
            try:
                model = transformers.CLIPModel.from_pretrained(self.path, local_files_only=True)
                tokenizer = transformers.AutoTokenizer.from_pretrained(self.path, local_files_only=True)
                processor = image_processor_class().from_pretrained(self.path, local_files_only=True)
            except OSError as exc:
                raise ModelNotFoundError(f"local-clip:{self.model}: cannot load a CLIP model from {self.path} "
                                         f"({exc})") from None
            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
            model = model.to(device=device, dtype=dtype).eval()
            config = model.config
            self._torch = torch
            self._dtype = dtype
            self._device = device
            self._tok = tokenizer
            self._processor = processor
            self.max_seq = int(config.text_config.max_position_embeddings)
            vision = config.vision_config
            self.patches = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1
            size = getattr(processor, "size", None) or {}
            self.min_side = int(size.get("shortest_edge") or size.get("height") or vision.image_size)
            self.dimensions = int(config.projection_dim)
            # Bigger batches on a GPU; the CPU gains nothing past a few dozen images.
            self.default_batch_size = 256 if device.startswith("cuda") else 64
            self.max_input_tokens = self.max_seq - 2  # <|startoftext|> and <|endoftext|>
            self._tokenizer = HFTokenizer(tokenizer.backend_tokenizer.to_str(), self.max_input_tokens)
            self._model = model

    # ------------------------------------------------------------------ what the engine reads
    @property
    def tokenizer(self) -> HFTokenizer:
        self._load()
        return self._tokenizer

    @property
    def model_object(self) -> Any:
        """The ``transformers.CLIPModel`` itself (to call it directly, as the benchmarks do)."""
        self._load()
        return self._model

    @property
    def image_processor(self) -> Any:
        """The Pillow CLIP image processor the model's folder configures."""
        self._load()
        return self._processor

    def item_tokens(self, item: Any) -> int:
        """An image weighs the tokens the vision tower sees: its patches and the class token."""
        return self.patches if getattr(item, "kind", None) == IMAGE else 0

    def identity(self) -> dict[str, Any]:
        return {"max_seq_length": self.max_input_tokens, "image_tokens": self.patches, "image_side": self.min_side}

    # ------------------------------------------------------------------ the batch method
    def _decode(self, images: list[Image]) -> list[Any]:
        try:
            if len(images) == 1:
                return [images[0].load(self.min_side)]
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.decode_threads, thread_name_prefix="embedpipe-clip")
            return list(self._pool.map(lambda im: im.load(self.min_side), images))
        except InvalidInputError as exc:
            # Readable when keyed, unreadable now (the file changed or went): a failure of this request,
            # which the engine narrows down to the one image by splitting the batch.
            raise ProviderError(str(exc), retryable=False) from None

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """Normalised text vectors (blocking)."""
        torch = self._torch
        enc = self._tok(texts, padding=True, truncation=True, max_length=self.max_seq, return_tensors="pt")
        with torch.inference_mode():
            out = self._model.get_text_features(input_ids=enc["input_ids"].to(self._device),
                                                attention_mask=enc["attention_mask"].to(self._device))
        return self._normalised(out)

    def embed_pixels(self, pictures: list[Any]) -> np.ndarray:
        """Normalised image vectors of decoded RGB ``PIL`` images (blocking)."""
        torch = self._torch
        pixels = self._processor(images=pictures, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            out = self._model.get_image_features(pixel_values=pixels.to(self._device, dtype=self._dtype))
        return self._normalised(out)

    def _normalised(self, out: Any) -> np.ndarray:
        # transformers 5 returns the model output with the projection as pooler_output; 4 the tensor.
        feats = out if isinstance(out, self._torch.Tensor) else out.pooler_output
        feats = self._torch.nn.functional.normalize(feats.float(), dim=-1)
        return np.ascontiguousarray(feats.cpu().numpy(), dtype=np.float32)

    def embed_batch(self, texts: list[Any], role: Role) -> BatchResult:
        self._load()
        text_at = [k for k, t in enumerate(texts) if isinstance(t, str)]
        image_at = [k for k, t in enumerate(texts) if not isinstance(t, str)]
        for k in image_at:
            if not isinstance(texts[k], Image):
                raise InvalidInputError(f"local-clip embeds embedpipe.inputs.Image, not {type(texts[k]).__name__}")
        # Decode outside the lock: the next batch's pixels are read while this one runs the model.
        pictures = self._decode([texts[k] for k in image_at]) if image_at else []
        out: np.ndarray | None = None
        with self._lock:  # one forward at a time: the tokenizer's call is not thread-safe, the model is one
            parts = []
            if text_at:
                parts.append((text_at, self.embed_texts([texts[k] for k in text_at])))
            if image_at:
                parts.append((image_at, self.embed_pixels(pictures)))
        for where, vectors in parts:
            if out is None:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[where] = vectors
        assert out is not None
        return BatchResult(out, tokens=None)

    def close(self) -> None:
        self._model = None
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model, "path": self.path, "device": self.device, "precision": self.precision,
                "decode_threads": self.decode_threads, "info": self.info}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._model = None
        self._pool = None
        self._lock = threading.Lock()
        self._load()





# ---------------------------------------------------------------------- random CLIPs for tests and demos
#: sizes of random CLIPs: "tiny" for tests, "vit-b-32" with ViT-B/32's shapes (a realistic model cost)
RANDOM_CLIP_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "tiny": {"text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
             "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8),
             "projection": dict(projection_dim=16)},
    "vit-b-32": {"text": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
                 "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                image_size=224, patch_size=32),
                 "projection": dict(projection_dim=512)},
}


def _char_vocabulary(folder: Path) -> tuple[Path, Path]:
    """A CLIP byte-level BPE vocabulary with no merges (every character one token).

    No package at hand ships CLIP's real 49k-merge vocabulary; this one tokenises any text the
    same way CLIP's tokenizer pipeline does (lower-case, byte-level, ``</w>`` word ends), only
    in more, shorter tokens.
    """
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())  # the 256 characters byte-level BPE writes bytes as
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_file, merges_file


def save_random_clip(folder: str | os.PathLike[str], *, size: str = "tiny", seed: int = 0) -> Path:
    """Save a CLIP with random weights to ``folder`` as ``save_pretrained`` does, for tests and demos.

    Its vectors have the right shapes and behave as CLIP's do mechanically (normalised, one space
    for texts and images), but rank nothing meaningfully. ``size``: a key of :data:`RANDOM_CLIP_SIZES`.
    """
    import torch

    transformers = _transformers()
    shapes = RANDOM_CLIP_SIZES.get(size)
    if shapes is None:
        raise ConfigurationError(f"size={size!r}: use one of {sorted(RANDOM_CLIP_SIZES)}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = _char_vocabulary(out)
    tokenizer = transformers.CLIPTokenizer(str(vocab_file), str(merges_file))
    text = dict(shapes["text"], vocab_size=len(tokenizer), max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = transformers.CLIPConfig(text_config=text, vision_config=shapes["vision"], **shapes["projection"])
    torch.manual_seed(seed)
    transformers.CLIPModel(config).eval().save_pretrained(out)
    side = int(shapes["vision"]["image_size"])
    image_processor = image_processor_class()(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


__all__ = ["RANDOM_CLIP_SIZES", "LocalCLIPProvider", "clip_folder", "save_random_clip"]
