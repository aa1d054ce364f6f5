"""Batch isolation: when a request fails for an input's sake, bisect it to find the inputs at fault.

Only an error an input can cause (400/413/422, or a provider error without a status, such as
a local model's exception) is worth isolating. Retryable errors that outlast the retries,
and request-level errors (auth, bad ``dimensions``), fail the whole batch at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import numpy as np

from embedpipe.engine.planning import Call, Piece
from embedpipe.errors import BudgetExceededError, Failure, FailureKind, InvalidResponseError, ProviderError

if TYPE_CHECKING:
    from embedpipe.engine.core import Engine

Deliver = Callable[[list[Piece], "np.ndarray | None", "Failure | None"], Awaitable[None]]

#: a batch isolating a 400 gives up splitting after this many single-input failures with
#: no success at all: every request fails alike, so the request itself is at fault.
REQUEST_LEVEL_PROBES = 3
_INPUT_STATUSES = (400, 413, 422)


class Isolation:
    """Shared state of one batch's isolation."""

    def __init__(self, batch: list[Piece]) -> None:
        self.succeeded = False
        self.single_failures = 0
        self.abort: ProviderError | None = None
        #: the batch's last input: probed alone before giving up, since bisection visits the
        #: shortest inputs first and a few bad short ones could look like a request-level error
        self.far: Piece | None = batch[-1] if len(batch) > 1 else None
        self.presolved: dict[int, np.ndarray] = {}


def failure_of(exc: ProviderError, max_retries: int) -> Failure:
    """The :class:`Failure` of inputs that ``exc`` stopped."""
    if exc.retryable:
        kind: FailureKind = "invalid_response" if isinstance(exc, InvalidResponseError) else "retries_exhausted"
        return Failure(kind, exc.status, True, f"failed after {max_retries} retries: {exc}")
    input_caused = exc.status in _INPUT_STATUSES and not exc.request_level
    return Failure("rejected" if input_caused else "provider", exc.status, False, str(exc))


def _input_caused(exc: ProviderError) -> bool:
    return (exc.status is None or exc.status in _INPUT_STATUSES) and not exc.request_level


async def isolate(eng: Engine, call: Call, batch: list[Piece], iso: Isolation, deliver: Deliver) -> None:
    """Send ``batch``; deliver what came back; on an input-level error, bisect to find the inputs at fault."""
    if iso.presolved:
        done = [p for p in batch if id(p) in iso.presolved]
        if done:
            await deliver(done, np.stack([iso.presolved.pop(id(p)) for p in done]), None)
            batch = [p for p in batch if id(p) not in {id(d) for d in done}]
            if not batch:
                return
    if iso.abort is not None:
        await deliver(batch, None, Failure("provider", iso.abort.status, False, str(iso.abort)))
        return
    if call.budget_exceeded:
        await deliver(batch, None, Failure("budget", message="budget exceeded: not sent"))
        return
    try:
        got, exc = await eng.send(call, batch)
    except BudgetExceededError as e:
        call.budget_exceeded = True
        await deliver(batch, None, Failure("budget", message=f"budget exceeded: {e}"))
        return
    if got:
        iso.succeeded = True
        order = sorted(got)
        await deliver([batch[k] for k in order], np.stack([got[k] for k in order]), None)
        batch = [p for k, p in enumerate(batch) if k not in got]
    if exc is None or not batch:
        return
    if exc.retryable or not _input_caused(exc) or len(batch) == 1:
        if len(batch) == 1 and not exc.retryable and _input_caused(exc):
            iso.single_failures += 1
            if not iso.succeeded and iso.single_failures >= REQUEST_LEVEL_PROBES:
                await _probe_far(eng, call, iso, batch[0], exc)
        if not exc.retryable and not _input_caused(exc):
            iso.abort = exc
        await deliver(batch, None, failure_of(exc, eng.max_retries))
        return
    mid = len(batch) // 2
    for half in (batch[:mid], batch[mid:]):
        await isolate(eng, call, half, iso, deliver)


async def _probe_far(eng: Engine, call: Call, iso: Isolation, current: Piece, exc: ProviderError) -> None:
    """Every single input so far failed alike: try the batch's far end before calling the request
    itself bad; one success there means the inputs were at fault after all."""
    far, iso.far = iso.far, None
    if far is None or far is current:
        iso.abort = exc
        return
    try:
        got, err = await eng.send(call, [far])
    except BudgetExceededError:
        iso.abort = exc
        return
    if err is None and 0 in got:
        iso.presolved[id(far)] = got[0]
        iso.succeeded = True
    else:
        iso.abort = exc


__all__ = ["REQUEST_LEVEL_PROBES", "Isolation", "failure_of", "isolate"]
