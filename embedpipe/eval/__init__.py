"""Retrieval evaluation: tie-aware metrics with bootstrap confidence intervals."""

from __future__ import annotations

from embedpipe.eval.metrics import (
    Ties,
    bootstrap_ci,
    bootstrap_diff_ci,
    ndcg_at_k,
    recall_at_k,
    reciprocal_rank,
    success_at_k,
)

__all__ = ["Ties", "bootstrap_ci", "bootstrap_diff_ci", "ndcg_at_k", "recall_at_k", "reciprocal_rank",
           "success_at_k"]
