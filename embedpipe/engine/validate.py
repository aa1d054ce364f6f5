"""Response validation: count, dimensions, finite values, Matryoshka reduction.

A response is checked row by row: rows with NaN or inf are reported so that only they are
asked for again (the valid rows were paid for and are kept). A wrong count is the whole
request's fault. Wrong dimensions are retried as an invalid response: only dimensions that
stay wrong across retries become a :class:`~embedpipe.errors.DimensionMismatchError`
(the driver counts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from embedpipe.errors import InvalidResponseError


class WrongDimensionsError(InvalidResponseError):
    """Every row of a response has a length other than the one expected (retried; see the driver)."""

    def __init__(self, message: str, *, got: int, expected: int) -> None:
        super().__init__(message, request_level=True)
        self.got = got
        self.expected = expected


@dataclass
class Checked:
    """A validated response: ``vectors`` (n, d) float32 at the pipeline's dimensions, and the
    indices of rows that are not usable (their values are undefined)."""

    vectors: np.ndarray
    bad_rows: list[int]
    native: int


def check_response(vectors: np.ndarray, n: int, *, native: int | None, dimensions: int | None,
                   spec: str) -> Checked:
    """Check one response for ``n`` inputs against the ``native`` dims (``None``: learn them now)
    and the requested ``dimensions`` (Matryoshka: leading dims kept, renormalised)."""
    try:
        arr = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidResponseError(f"{spec} returned vectors that are not numbers: {exc}", request_level=True) \
            from None
    if arr.ndim != 2 or arr.shape[0] != n:
        got = arr.shape[0] if arr.ndim else 0
        raise InvalidResponseError(f"provider returned {got} vectors for {n} inputs", request_level=True)
    width = int(arr.shape[1])
    if native is None:
        native = width
    if width != native and not (dimensions and width == dimensions):
        hint = (" (the server seems to ignore the dimensions parameter)"
                if dimensions and dimensions == native else "")
        raise WrongDimensionsError(f"{spec} returned {width}-d vectors, expected {native}{hint}",
                                   got=width, expected=native)
    if dimensions and width > dimensions:
        arr = arr[:, :dimensions]
        norms = np.linalg.norm(arr, axis=1, keepdims=True)
        with np.errstate(invalid="ignore"):
            arr = (arr / np.where(norms == 0, 1, norms)).astype(np.float32)
    elif dimensions and width != dimensions:
        raise WrongDimensionsError(
            f"{spec} returned {width}-d vectors but dimensions={dimensions} was asked; the server may ignore "
            "the dimensions parameter", got=width, expected=dimensions)
    finite = np.isfinite(arr).all(axis=1)
    bad = [] if finite.all() else np.flatnonzero(~finite).tolist()
    return Checked(np.ascontiguousarray(arr, dtype=np.float32), bad, native)


__all__ = ["Checked", "WrongDimensionsError", "check_response"]
