"""The batch result of a provider that returned a compact output type natively."""

from __future__ import annotations

from dataclasses import dataclass

from embedpipe.providers.base import BatchResult
from embedpipe.quantize import QuantizedArray


@dataclass
class QuantizedBatchResult(BatchResult):
    """A :class:`BatchResult` whose provider answered in int8, uint8 or bits (``quantized``).

    ``vectors`` holds the same embeddings dequantized to float32, so an engine that reads only
    ``vectors`` keeps working; one that honours ``output_dtype`` stores ``quantized`` as is
    instead of quantizing ``vectors`` again.
    """

    quantized: QuantizedArray | None = None

    @classmethod
    def of(cls, quantized: QuantizedArray, tokens: int | None, headers: dict[str, str]) -> QuantizedBatchResult:
        """Wrap native quantized values, with their float32 view for scoring."""
        return cls(quantized.dequantize(), tokens=tokens, headers=headers, quantized=quantized)
