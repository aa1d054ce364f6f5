"""Retrieval evaluation: :func:`compare` models on your own data; tie-aware metrics with bootstrap intervals."""

from __future__ import annotations

from embedpipe.eval.compare import CHUNKINGS, EvalReport, compare, parse_candidate
from embedpipe.eval.metrics import (
    Ties,
    bootstrap_ci,
    bootstrap_diff_ci,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
    success_at_k,
)

__all__ = ["CHUNKINGS", "EvalReport", "Ties", "bootstrap_ci", "bootstrap_diff_ci", "compare", "ndcg_at_k",
           "parse_candidate", "recall_at_k", "reciprocal_rank", "success_at_k"]
