"""``precision="int8"``: a raw ONNX export of the pooled model, quantized by onnxruntime, behind a gate.

The export (``torch.onnx.export``; torch 2.13's TorchScript exporter traces transformers 5's
attention masks wrongly, so the dynamo exporter with onnxscript is used) is quantized with
``onnxruntime.quantization.quantize_dynamic`` (QInt8 weights, per channel) and kept in the user
cache directory, keyed by the model's hash and the onnxruntime version.

The gate: before the quantized model is used the first time, a fixed sample of texts (the
bundled 256 Python-documentation texts, or the caller's own) is embedded both ways; if the
lowest cosine between the fp32 and int8 vectors is under the threshold (0.98), loading raises
:class:`~embedpipe.errors.ConfigurationError` rather than serve vectors of unknown quality. The
verdict is stored beside the model, keyed by the quantized file's and the sample's hashes, so a
changed or damaged file is gated again.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.errors import ConfigurationError

if TYPE_CHECKING:
    from embedpipe.providers.local_encoder import LocalEncoder

log = logging.getLogger("embedpipe.local")

#: bump when the export or the quantization changes, so old cached models are not reused
EXPORT_VERSION = 1
GATE_SAMPLE = "int8_gate_sample.json.gz"
_BUILD_LOCK = threading.Lock()


def bundled_sample() -> list[str]:
    """The gate's default sample: 256 Python-documentation texts of 300 to 1,500 characters."""
    raw = resources.files("embedpipe").joinpath("data").joinpath(GATE_SAMPLE).read_bytes()
    return list(json.loads(gzip.decompress(raw).decode("utf-8"))["texts"])


def model_hash(encoder: LocalEncoder) -> str:
    """SHA-256 of what the exported graph depends on: weights, model config, modules and pooling."""
    h = hashlib.sha256()
    tdir = encoder.layout.transformer_dir
    files = sorted(p for p in tdir.iterdir() if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    for p in files:
        h.update(p.name.encode())
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(json.dumps([encoder.layout.pooling, encoder.layout.normalize]).encode())
    return h.hexdigest()[:24]


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_root(cache_dir: str | Path | None) -> Path:
    """Where quantized models live: ``cache_dir`` or the user cache directory's ``embedpipe/onnx``."""
    if cache_dir is not None:
        return Path(cache_dir)
    import platformdirs

    return Path(platformdirs.user_cache_dir("embedpipe")) / "onnx"


def session_options(ort: Any) -> Any:
    """One intra-op thread per usable core, no inter-op parallelism (a BERT graph is a chain)."""
    opts = ort.SessionOptions()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    opts.intra_op_num_threads = cores
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return opts


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's and quantizer's advice (warnings, print-outs, a root-logger hint)."""
    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()
    drop = _Drop()
    root.addFilter(drop)
    exporter = logging.getLogger("torch.onnx")  # "torchvision is not installed. Skipping ..."
    level = exporter.level
    exporter.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as null, \
                contextlib.redirect_stdout(null):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(drop)
        exporter.setLevel(level)


def export_int8(encoder: LocalEncoder, target: Path) -> None:
    """Export the encoder's fp32 pooled model to ONNX and quantize it into ``target`` (atomically)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        int8 = Path(tmp) / "model-int8.onnx"
        from embedpipe.providers.local_encoder import pad

        # Example inputs with padding, so nothing traced assumes an all-ones mask.
        ex_ids, ex_mask = pad(encoder.tokenizer.encode(["an example input", "short"]), encoder.tokenizer.pad_id)
        ids, mask = torch.from_numpy(ex_ids), torch.from_numpy(ex_mask)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        with _quiet(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(encoder.pooled, (ids, mask), str(fp32), input_names=["input_ids", "attention_mask"],
                              output_names=["sentence_embedding"], dynamo=True, external_data=False,
                              dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}), verbose=False)
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        os.replace(int8, target)


@dataclass(frozen=True)
class GateResult:
    """How far the int8 model's vectors are from fp32's on the gate sample."""

    min_cosine: float
    mean_cosine: float
    texts: int
    sample_sha256: str
    model_sha256: str


class Int8Model:
    """An onnxruntime session over the quantized pooled model, and its gate verdict."""

    def __init__(self, session: Any, path: Path, gate: GateResult | None = None) -> None:
        self.session = session
        self.path = path
        self.gate = gate

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Pooled (normalised where the model says so) float32 embeddings of one padded batch."""
        out = self.session.run(["sentence_embedding"], {"input_ids": ids, "attention_mask": mask})[0]
        return np.asarray(out, dtype=np.float32)

    @classmethod
    def load(cls, encoder: LocalEncoder, *, sample: Sequence[str] | None = None, min_cosine: float = 0.98,
             cache_dir: str | Path | None = None) -> Int8Model:
        """The cached int8 model of ``encoder``'s model, built and gated first when needed."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise ConfigurationError("precision='int8' needs onnx, onnxruntime and onnxscript: "
                                     "pip install 'embedpipe[local-int8]'") from None
        folder = cache_root(cache_dir) / f"{model_hash(encoder)}-ort{ort.__version__}-v{EXPORT_VERSION}"
        path = folder / "model-int8.onnx"
        with _BUILD_LOCK:
            if not path.is_file():
                log.info("embedpipe: exporting and quantizing %s to %s (once)", encoder.folder, path)
                export_int8(encoder, path)
        session = ort.InferenceSession(str(path), session_options(ort), providers=["CPUExecutionProvider"])
        model = cls(session, path)
        texts = list(sample) if sample is not None else bundled_sample()
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ConfigurationError("int8_sample must be a non-empty list of non-empty strings")
        model.gate = model._verdict(encoder, texts, folder / "gate.json")
        if model.gate.min_cosine < min_cosine:
            raise ConfigurationError(
                f"precision='int8' refused for {encoder.folder.name}: on {model.gate.texts} gate texts the "
                f"quantized model's lowest cosine to fp32 is {model.gate.min_cosine:.4f} (mean "
                f"{model.gate.mean_cosine:.4f}), under the {min_cosine} the gate requires. Use precision='fp32' "
                f"(or lower int8_min_cosine if you accept it); the quantized file is {path}")
        return model

    def _verdict(self, encoder: LocalEncoder, texts: list[str], store: Path) -> GateResult:
        sample_sha = hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()
        model_sha = _file_hash(self.path)
        key = f"{model_sha}:{sample_sha}"
        verdicts: dict[str, Any] = {}
        if store.is_file():
            with contextlib.suppress(ValueError, OSError):
                verdicts = json.loads(store.read_text(encoding="utf-8"))
        if key in verdicts:
            return GateResult(**verdicts[key])
        log.info("embedpipe: gating the int8 model on %d texts against fp32", len(texts))
        fp32 = encoder.run(texts, encoder.forward_torch)
        int8 = encoder.run(texts, self.forward)
        cos = np.sum(_unit(fp32) * _unit(int8), axis=1)
        result = GateResult(float(cos.min()), float(cos.mean()), len(texts), sample_sha, model_sha)
        verdicts[key] = asdict(result)
        tmp = store.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(verdicts, indent=1), encoding="utf-8")
        os.replace(tmp, store)
        return result


def _unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return out
