"""Fast local inference: tokenize with the ``tokenizers`` library, batch by token budget, pool on the device.

:class:`LocalEncoder` reproduces ``SentenceTransformer.encode`` for models whose
``modules.json`` is a Transformer, a Pooling and an optional Normalize module, without
going through sentence-transformers:

- each tokenizer is a private ``tokenizers.Tokenizer`` whose settings never change after
  construction, so counting and encoding in other threads cannot race (a Hugging Face
  tokenizer's call rewrites its truncation and padding every time);
- texts far longer than the model's input are cut at a character prefix first (what
  truncation drops is never tokenized), with a verify step;
- texts are sorted by token length and packed into token-budget batches, and the results
  are put back in input order;
- a producer thread tokenizes the next batches while the model runs the current one;
- on CUDA: pinned host memory, ``non_blocking`` copies, fp16/bf16 with SDPA attention,
  pooling and normalisation on the device and one copy to the host at the end.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe.errors import ConfigurationError

log = logging.getLogger("embedpipe.local")

#: pooling modes reproduced exactly (sentence-transformers' names)
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len_tokens", "lasttoken")
_LEGACY_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                        "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_lasttoken": "lasttoken", "pooling_mode_weightedmean_tokens": "weightedmean"}
#: characters kept per token of max_seq before a text is cut; pydocs' 254th token ends by
#: character 1,455 at most, so 8 per token leaves room, and the verify step covers the rest
CUT_CHARS_PER_TOKEN = 8
#: padded tokens per forward pass (batch rows x longest row)
CPU_BATCH_TOKENS = 16_384
CUDA_BATCH_TOKENS = 131_072
#: on a CPU, a batch's rows are at most this much shorter than its longest (padding share)
CPU_PADDING_WASTE = 0.15
_PRECISIONS = ("fp32", "fp16", "bf16", "int8")


@dataclass(frozen=True)
class ModelLayout:
    """What ``modules.json`` says the sentence-transformers pipeline is, when it is one we reproduce."""

    transformer_dir: Path
    max_seq_length: int | None
    pooling: str
    normalize: bool


def read_layout(folder: str | Path) -> ModelLayout | str:
    """The model's layout from ``modules.json`` and its pooling config, or why it cannot be reproduced."""
    root = Path(folder)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return "no modules.json"
    modules = sorted(json.loads(modules_file.read_text(encoding="utf-8")), key=lambda m: int(m.get("idx", 0)))
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return f"modules {kinds} (only Transformer, Pooling[, Normalize] are reproduced)"
    tdir = root / str(modules[0].get("path", ""))
    sbert: dict[str, Any] = {}
    for name in ("sentence_bert_config.json", "sentence_transformers_config.json"):
        if (tdir / name).is_file():
            sbert = json.loads((tdir / name).read_text(encoding="utf-8"))
            break
    if sbert.get("do_lower_case"):
        return "do_lower_case is set"
    if sbert.get("transformer_task", "feature-extraction") != "feature-extraction":
        return f"transformer_task {sbert.get('transformer_task')!r}"
    st_config = root / "config_sentence_transformers.json"
    if st_config.is_file() and json.loads(st_config.read_text(encoding="utf-8")).get("default_prompt_name"):
        return "a default prompt is configured"
    pool_file = root / str(modules[1].get("path", "")) / "config.json"
    pool_cfg = json.loads(pool_file.read_text(encoding="utf-8")) if pool_file.is_file() else {}
    mode = pool_cfg.get("pooling_mode")
    if mode is None:
        modes = [v for k, v in _LEGACY_POOLING_KEYS.items() if pool_cfg.get(k)]
        mode = modes if len(modes) != 1 else modes[0]
        if not modes:
            mode = "mean"
    if isinstance(mode, list):
        mode = mode[0] if len(mode) == 1 else mode
    if not isinstance(mode, str) or mode not in POOLING_MODES:
        return f"pooling mode {mode!r}"
    max_seq = sbert.get("max_seq_length")
    return ModelLayout(tdir, int(max_seq) if max_seq else None, mode, len(modules) == 3)


# --------------------------------------------------------------------------------- tokenizing
def private_tokenizer(serialized: str, *, max_length: int | None) -> Any:
    """A new ``tokenizers.Tokenizer`` with fixed settings: no padding, truncation at ``max_length`` or none."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(serialized)
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length, strategy="longest_first")
    return tok


def _batch(tok: Any, texts: list[str], *, special: bool, offsets: bool = False) -> list[Any]:
    """Encode many texts in parallel with the GIL released (``encode_batch_fast`` skips offsets)."""
    if not texts:
        return []
    fast = getattr(tok, "encode_batch_fast", None)
    if fast is not None and not offsets:
        return list(fast(texts, add_special_tokens=special))
    return list(tok.encode_batch(texts, add_special_tokens=special))


def cut_point(text: str, limit: int) -> int | None:
    """Where to cut ``text`` to at most ``limit`` characters without splitting a word, or None.

    The cut lands at the start of a whitespace run in the second half of the prefix, so every
    word kept is tokenized exactly as in the whole text. None: no such place (keep the text whole).
    """
    if len(text) <= limit:
        return None
    k = max(text.rfind(" ", 0, limit), text.rfind("\n", 0, limit), text.rfind("\t", 0, limit))
    while k > 0 and text[k - 1].isspace():
        k -= 1
    return k if k >= limit // 2 else None


class PrefixCut:
    """Encodes texts through a character-prefix cut, verified, for tokenizers where it is exact.

    ``enabled`` is decided once per tokenizer by an equality test on probe texts: the cut's ids
    must equal the whole text's ids on every probe, or the cut is never used.
    """

    def __init__(self, chars: int, enabled: bool = True) -> None:
        self.chars = chars
        self.enabled = enabled
        #: texts re-encoded in full because their cut fell short (for tests and stats)
        self.reencoded = 0
        self._lock = threading.Lock()

    def cuts(self, texts: Sequence[str]) -> list[int | None]:
        if not self.enabled:
            return [None] * len(texts)
        return [cut_point(t, self.chars) for t in texts]

    def encode_truncated(self, tok: Any, texts: list[str], max_seq: int) -> list[Any]:
        """The encodings ``tok`` (truncating at ``max_seq``, specials added) gives the whole texts."""
        cuts = self.cuts(texts)
        todo = [t if c is None else t[:c] for t, c in zip(texts, cuts, strict=True)]
        encs = _batch(tok, todo, special=True)
        # A cut encoding that does not reach max_seq may be missing tokens the whole text has.
        short = [i for i, c in enumerate(cuts) if c is not None and len(encs[i].ids) < max_seq]
        if short:
            with self._lock:
                self.reencoded += len(short)
            for i, e in zip(short, _batch(tok, [texts[i] for i in short], special=True), strict=True):
                encs[i] = e
        return encs

    def count(self, tok: Any, texts: list[str], cap: int | None) -> list[int]:
        """Token counts (no special tokens); with ``cap``, a count over ``cap`` may be a lower bound."""
        if cap is None or not self.enabled:
            return [len(e.ids) for e in _batch(tok, texts, special=False)]
        cuts = self.cuts(texts)
        todo = [t if c is None else t[:c] for t, c in zip(texts, cuts, strict=True)]
        counts = [len(e.ids) for e in _batch(tok, todo, special=False)]
        short = [i for i, c in enumerate(cuts) if c is not None and counts[i] <= cap]
        if short:
            for i, e in zip(short, _batch(tok, [texts[i] for i in short], special=False), strict=True):
                counts[i] = len(e.ids)
        return counts


def _probe_texts() -> list[str]:
    """Long texts of many kinds for the per-tokenizer equality test of the prefix cut."""
    text = ("The quick brown fox jumps over the lazy dog; naïve café déjà-vu, 東京 と 大阪, "
            "Straße ÆØÅ emoji 🙂🚀 x=f(a[1], b={'k': 2}) -> None  \t tabs\n\nnew   paragraph "
            "HTTPS://example.org/path?q=1&r=%20 supercalifragilisticexpialidocious ")
    words = text.split(" ")  # empty words too: they make runs of spaces
    rng = np.random.default_rng(20261202)
    probes = []
    for n in (400, 700, 1200, 3000):
        probes.append(" ".join(str(words[i]) for i in rng.integers(0, len(words), n)))
    code = "def f(x):\n" + "".join(f"    y_{i} = x.attr_{i}({i}, 'str{i}')  # comment {i}\n" for i in range(300))
    probes.append(code)
    probes.append(("word " * 50) + " " * 3000 + ("tail words here " * 400))
    return probes


def cut_is_exact(tok_truncating: Any, max_seq: int, chars: int) -> bool:
    """The per-tokenizer guard: the verified cut gives the same ids as the whole text on every probe."""
    pre = json.loads(tok_truncating.to_str()).get("pre_tokenizer") or {}
    kinds = {p.get("type") for p in pre.get("pretokenizers", [pre])} if pre else set()
    # The cut keeps whole words; that is only the whole text's tokens where words are tokenized apart.
    if not kinds & {"BertPreTokenizer", "Whitespace", "WhitespaceSplit", "Metaspace", "ByteLevel"}:
        return False
    probes = _probe_texts()
    trial = PrefixCut(chars)
    cut = trial.encode_truncated(tok_truncating, probes, max_seq)
    whole = _batch(tok_truncating, probes, special=True)
    return all(a.ids == b.ids for a, b in zip(cut, whole, strict=True))


class EncoderTokenizer:
    """The encoder's two private tokenizers: one truncating at max_seq for the model, one counting."""

    def __init__(self, serialized: str, max_seq: int, pad_id: int) -> None:
        self.max_seq = max_seq
        self.pad_id = pad_id
        self.model_tok = private_tokenizer(serialized, max_length=max_seq)
        self.count_tok = private_tokenizer(serialized, max_length=None)
        self.cut = PrefixCut(CUT_CHARS_PER_TOKEN * max_seq)
        self.cut.enabled = cut_is_exact(self.model_tok, max_seq, self.cut.chars)
        if not self.cut.enabled:
            log.info("embedpipe: the prefix cut is off for this tokenizer (its equality test failed)")
        probe = self.model_tok.encode("a b")
        self.specials = len(probe.ids) - len(self.count_tok.encode("a b", add_special_tokens=False).ids)

    def encode(self, texts: list[str]) -> list[Any]:
        return self.cut.encode_truncated(self.model_tok, texts, self.max_seq)


# --------------------------------------------------------------------------------- batching
def plan_batches(lengths: Sequence[int], batch_tokens: int, max_rows: int | None = None,
                 waste: float | None = None) -> list[np.ndarray]:
    """Indices of token-budget batches, longest first: rows x longest row stays within ``batch_tokens``.

    ``waste``: also start a new batch when a row is that fraction shorter than its batch's
    longest, so padding stays under that share (on a CPU small batches cost little more per
    token, and padding costs its full price).
    """
    arr = np.asarray(lengths, dtype=np.int64)
    order = np.argsort(-arr, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    n = len(order)
    while start < n:
        longest = max(1, int(arr[order[start]]))
        rows = max(1, batch_tokens // longest)
        if max_rows:
            rows = min(rows, max_rows)
        end = min(n, start + rows)
        if waste is not None:
            # Sorted longest first: the first row under the floor ends the batch.
            floor = longest * (1.0 - waste)
            short = np.nonzero(arr[order[start:end]] < floor)[0]
            if short.size:
                end = start + max(1, int(short[0]))
        batches.append(order[start:end])
        start = end
    return batches


def pad(encodings: Sequence[Any], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64), right-padded to the longest row."""
    longest = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(encodings), longest), dtype=np.int64)
    for i, e in enumerate(encodings):
        n = len(e.ids)
        ids[i, :n] = e.ids
        mask[i, :n] = 1
    return ids, mask


# --------------------------------------------------------------------------------- pooling
def pool(hidden: Any, mask: Any, mode: str, normalize: bool) -> Any:
    """sentence-transformers' Pooling (+ Normalize) on the device, accumulating in float32."""
    import torch

    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        first = mask.to(torch.int).argmax(dim=1)
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), first].float()
    elif mode == "max":
        out = hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values.float()
    elif mode == "lasttoken":
        seq = hidden.shape[1]
        values, idx = mask.flip(1).max(1)
        idx = torch.where(values == 0, seq - 1, idx)
        out = (hidden * m)[torch.arange(hidden.shape[0], device=hidden.device), seq - idx - 1].float()
    else:
        total = (hidden * m).sum(dim=1, dtype=torch.float32)
        count = torch.clamp(m.sum(dim=1, dtype=torch.float32), min=1e-9)
        out = total / (count if mode == "mean" else torch.sqrt(count))
    if normalize:
        out = torch.nn.functional.normalize(out, p=2, dim=-1)
    return out


def pooled_module(model: Any, mode: str, normalize: bool, type_ids: bool) -> Any:
    """The transformer plus pooling (+ normalisation) as one module: what runs, and what the ONNX export traces."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            # Single sequences have all-zero token types; passing them keeps the export free of buffers.
            kwargs = {"token_type_ids": torch.zeros_like(input_ids)} if type_ids else {}
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
            return pool(hidden, attention_mask, mode, normalize)

    return Pooled().eval()


# --------------------------------------------------------------------------------- the encoder
class LocalEncoder:
    """Embeds texts with a local transformer exactly as sentence-transformers would, faster.

    ``precision``: ``"fp32"`` (default), ``"fp16"``/``"bf16"`` (CUDA only) or ``"int8"`` (CPU
    only: a dynamically quantized ONNX model behind an agreement gate, see
    :mod:`embedpipe.providers.local_onnx`). Thread-safe: calls may come from many threads.
    """

    def __init__(self, folder: str | Path, layout: ModelLayout, *, device: str | None = None,
                 precision: str = "fp32", batch_tokens: int | None = None, max_rows: int | None = None,
                 int8_sample: Sequence[str] | None = None, int8_min_cosine: float = 0.98,
                 cache_dir: str | Path | None = None) -> None:
        import torch

        if precision not in _PRECISIONS:
            raise ConfigurationError(f"precision={precision!r}: use one of {', '.join(_PRECISIONS)}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self.cuda = device.startswith("cuda")
        if precision == "int8" and self.cuda:
            raise ConfigurationError("precision='int8' runs on the CPU only (ONNX Runtime); on CUDA use "
                                     "precision='fp16' or 'bf16'")
        if precision in ("fp16", "bf16") and not self.cuda:
            raise ConfigurationError(f"precision={precision!r} needs a CUDA device (this one is {device!r}); "
                                     "on the CPU use 'fp32', or 'int8' for speed")
        self.folder = Path(folder)
        self.layout = layout
        self.precision = precision
        self.batch_tokens = batch_tokens or (CUDA_BATCH_TOKENS if self.cuda else CPU_BATCH_TOKENS)
        self.max_rows = max_rows
        self._device_lock = threading.Lock()

        from transformers import AutoModel, AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(str(layout.transformer_dir), local_files_only=True)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        model = AutoModel.from_pretrained(str(layout.transformer_dir), local_files_only=True, dtype=dtype,
                                          attn_implementation="sdpa")
        model.eval()
        positions = getattr(model.config, "max_position_embeddings", None)
        max_seq = layout.max_seq_length or int(getattr(hf_tok, "model_max_length", 512))
        if positions and positions > 0:
            max_seq = min(max_seq, int(positions))
        self.max_seq_length = max_seq
        self.tokenizer = EncoderTokenizer(hf_tok.backend_tokenizer.to_str(), max_seq,
                                          int(hf_tok.pad_token_id or 0))
        self._type_ids = "token_type_ids" in getattr(hf_tok, "model_input_names", ())
        self.torch_model = model.to(device)
        self.pooled = pooled_module(self.torch_model, layout.pooling, layout.normalize, self._type_ids)
        self.dimensions = int(getattr(model.config, "hidden_size"))  # noqa: B009 - a config attribute
        self.onnx: Any = None
        if precision == "int8":
            from embedpipe.providers.local_onnx import Int8Model

            self.onnx = Int8Model.load(self, sample=int8_sample, min_cosine=int8_min_cosine,
                                                  cache_dir=cache_dir)

    # -- public ------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) float32 embeddings of ``texts``, in input order."""
        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        if self.onnx is not None:
            return self.run(texts, self.onnx.forward)
        return self.run(texts, self.forward_torch)

    def forward_torch(self, ids: Any, mask: Any) -> Any:
        """Pooled embeddings of one padded batch (a torch tensor on the device)."""
        import torch

        t_ids = ids if isinstance(ids, torch.Tensor) else torch.from_numpy(ids)
        t_mask = mask if isinstance(mask, torch.Tensor) else torch.from_numpy(mask)
        if self.cuda:
            # Pinned (by the producer thread, see batches()) so the copies overlap the GPU's work.
            t_ids = t_ids.to(self.device, non_blocking=True)
            t_mask = t_mask.to(self.device, non_blocking=True)
        with torch.inference_mode():
            return self.pooled(t_ids, t_mask)

    # -- the pipeline: a producer thread tokenizes while the model runs ----------------
    def batches(self, texts: list[str], wave: int = 2048) -> Iterator[tuple[np.ndarray, Any, Any]]:
        """(input indices, ids, mask) per token-budget batch, tokenizing ``wave`` texts at a time.

        On CUDA, ids and mask come as pinned torch tensors (pinned here, off the consumer's path).

        Texts go in waves of similar character length (longest first), so a wave's tokens are
        ready while the previous wave runs; within a wave, batches are sorted by token length.
        """
        by_chars = np.argsort(-np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts)),
                              kind="stable")
        for start in range(0, len(texts), wave):
            part = by_chars[start:start + wave]
            encs = self.tokenizer.encode([texts[i] for i in part])
            for rows in plan_batches([len(e.ids) for e in encs], self.batch_tokens, self.max_rows,
                                     None if self.cuda else CPU_PADDING_WASTE):
                ids, mask = pad([encs[r] for r in rows], self.tokenizer.pad_id)
                if self.cuda:
                    import torch

                    yield part[rows], torch.from_numpy(ids).pin_memory(), torch.from_numpy(mask).pin_memory()
                else:
                    yield part[rows], ids, mask

    def run(self, texts: list[str], forward: Callable[[Any, Any], Any]) -> np.ndarray:
        q: queue.Queue[Any] = queue.Queue(maxsize=4)
        stop = threading.Event()
        done = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in self.batches(texts):
                    if not put(item):
                        return
                put(done)
            except BaseException as exc:  # handed to the consumer, which raises it
                put(exc)

        producer = threading.Thread(target=produce, name="embedpipe-tokenize", daemon=True)
        producer.start()
        index_parts: list[np.ndarray] = []
        out_parts: list[Any] = []
        try:
            while True:
                item = q.get()
                if item is done:
                    break
                if isinstance(item, BaseException):
                    raise item
                where, ids, mask = item
                with self._device_lock:
                    out_parts.append(forward(ids, mask))
                index_parts.append(where)
        finally:
            stop.set()
            producer.join()
        return self._gather(np.concatenate(index_parts), out_parts, len(texts))

    def _gather(self, where: np.ndarray, parts: list[Any], n: int) -> np.ndarray:
        if isinstance(parts[0], np.ndarray):
            flat = np.concatenate(parts)
            result = np.empty_like(flat, dtype=np.float32)
            result[where] = flat
            return result
        import torch

        flat_t = torch.cat(parts)
        inverse = torch.empty(n, dtype=torch.long)
        inverse[torch.from_numpy(where)] = torch.arange(n)
        # Put rows back in input order on the device, then one copy to the host.
        return flat_t[inverse.to(flat_t.device)].float().cpu().numpy()
