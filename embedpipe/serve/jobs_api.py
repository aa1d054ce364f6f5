"""The routes of ingest jobs: ``POST /v1/ingest``, ``/v1/jobs…`` and ``DELETE /v1/sinks/{name}/records``.

See :mod:`embedpipe.serve.ingest` for what a job is and how it runs; these handlers only
check the request (before anything is stored), store the body and answer from the registry.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from embedpipe.jobs import JobSpec
from embedpipe.jobs.errors import JobLockedError
from embedpipe.jobs.sinks import sink_from
from embedpipe.jobs.state import SQLiteJobStore
from embedpipe.jobs.unit import open_store
from embedpipe.serve.ingest import (
    IngestError,
    encode_rows,
    ingest_spec,
    job_status,
    ndjson_items,
    parse_records,
    store_body,
)
from embedpipe.serve.jobstore import IdempotencyConflictError, IngestRegistry
from embedpipe.serve.settings import SINK_NAME

if TYPE_CHECKING:
    from embedpipe.serve.app import Service

__all__ = ["INGEST_ROUTE", "NDJSON_TYPES", "add_job_routes"]

INGEST_ROUTE = "/v1/ingest"
#: content types read as one record per line
NDJSON_TYPES = frozenset({"application/x-ndjson", "application/ndjson", "application/jsonl",
                          "application/x-jsonlines", "application/jsonlines"})
class DeleteRecords(BaseModel):
    """``DELETE /v1/sinks/{name}/records``: the ids to delete."""

    ids: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=100_000)


JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
#: the longest Idempotency-Key kept
MAX_IDEMPOTENCY_KEY = 255


def add_job_routes(app: FastAPI, service: Service, errors: dict[int | str, dict[str, Any]]) -> None:
    """Add the ingest and job routes to ``app`` (answering 404 while no ``[sinks.NAME]`` is configured)."""
    from embedpipe.serve.app import APIError

    settings = service.settings
    errors = {**errors, 404: {"model": errors[400]["model"], "description": "Unknown job, sink or model, or ingest "
                                                                           "not enabled"},
              403: {"model": errors[400]["model"], "description": "A key with a budget cannot ingest"},
              409: {"model": errors[400]["model"], "description": "A job is writing to the sink"},
              422: {"model": errors[400]["model"], "description": "Idempotency-Key reused for another body"}}

    def registry() -> IngestRegistry:
        if service.registry is None:
            raise APIError(404, "Ingest is not enabled on this service: configure a [sinks.NAME] table with "
                           "url = \"…\" in its --config.", code="ingest_disabled")
        return service.registry

    def sink_url(name: Any) -> str:
        if not isinstance(name, str) or not name:
            raise APIError(400, "Name the sink to write to: 'sink' (a name from the service's [sinks.NAME] "
                           "tables).", param="sink")
        url = settings.sinks.get(name)
        if url is None:
            if any(c in name for c in "/\\:") or name.startswith(".") or name.startswith("~"):
                raise APIError(400, f"'sink' is {name!r}: a request names one of the service's configured sinks "
                               f"({sorted(settings.sinks)}); it can never give a path or a URL.", param="sink",
                               code="sink_not_allowed")
            raise APIError(404, f"The sink {name!r} is not configured on this service; it has "
                           f"{sorted(settings.sinks)}.", param="sink", code="sink_not_found")
        return url

    def job_or_404(job_id: str) -> Any:
        job = registry().get(job_id)
        if job is None:
            raise APIError(404, f"No job {job_id!r} on this service.", code="job_not_found")
        return job

    async def ingest(request: Request) -> Response:
        record = await service.authenticate(request)
        request.state.key = record.label if record else ""
        reg = registry()
        if record is not None and record.budget_usd is not None:
            # A job's spend is not charged to a key yet: a key with a budget must not get round it here.
            raise APIError(403, f"Key {record.label} has a budget, and ingest jobs are not charged to keys' "
                           "budgets yet; use a key without a budget for ingest.", "permission_error",
                           "budget_key_cannot_ingest")
        ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        ndjson = ctype in NDJSON_TYPES
        body = await request.body()
        items: Any
        try:
            if ndjson:
                model_name, sink_name = request.query_params.get("model"), request.query_params.get("sink")
                items = await asyncio.to_thread(ndjson_items, body)
            else:
                try:
                    head = await asyncio.to_thread(json.loads, body) if body else None
                except ValueError as exc:
                    raise APIError(400, f"The body is not JSON ({exc}); send {{\"model\", \"sink\", \"records\"}}, "
                                   "or NDJSON with Content-Type: application/x-ndjson and ?model=&sink=") from None
                if not isinstance(head, dict):
                    raise APIError(400, "The body must be an object {\"model\", \"sink\", \"records\"}.")
                model_name, sink_name, items = head.get("model"), head.get("sink"), head.get("records")
        except IngestError as exc:
            raise APIError(400, f"Invalid records: {exc}", param="records") from None
        url = sink_url(sink_name)
        if not isinstance(model_name, str) or model_name not in service.models:
            raise APIError(404 if isinstance(model_name, str) else 400,
                           f"The model {model_name!r} does not exist on this service; it serves "
                           f"{sorted(service.models)}.", param="model", code="model_not_found")
        model = service.models[model_name]
        request.state.model = model.spec
        key = request.headers.get("idempotency-key")
        if key is not None and not 0 < len(key) <= MAX_IDEMPOTENCY_KEY:
            raise APIError(400, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters.")
        try:
            rows = await asyncio.to_thread(parse_records, items)
        except IngestError as exc:
            raise APIError(400, f"Invalid records: {exc}", param="records") from None
        request.state.inputs = len(rows)
        data, digest = await asyncio.to_thread(encode_rows, rows)
        if key is not None:
            known = await asyncio.to_thread(reg.idempotent, key)
            if known is not None and known[1] != digest:
                raise APIError(422, f"The Idempotency-Key {key!r} was used for another body (job {known[0]}).",
                               code="idempotency_key_reused")
        path = await asyncio.to_thread(store_body, Path(reg.path).parent / "ingest", data, digest)
        spec = ingest_spec(settings, model, url, path)
        try:
            job, queued = await asyncio.to_thread(reg.submit, spec.job_id, spec.to_json(), records=len(rows),
                                                  sink=str(sink_name), model=model_name, body_hash=digest,
                                                  idempotency_key=key)
        except IdempotencyConflictError as exc:
            raise APIError(422, str(exc), code="idempotency_key_reused") from None
        if queued:
            service.metrics.job_state("queued")
        location = f"/v1/jobs/{job.job_id}"
        return JSONResponse({"job_id": job.job_id, "state": job.state, "records": job.records},
                            status_code=202, headers={"Location": location})

    app.add_api_route(INGEST_ROUTE, ingest, methods=["POST"], status_code=202, summary="Ingest records into a sink",
                      responses={**errors, 202: {"description": "Stored; the job is queued (see Location)"}},
                      description="JSON {\"model\", \"sink\", \"records\": [{\"id\", \"text\", \"metadata\"}]}, or "
                                  "NDJSON (Content-Type: application/x-ndjson) with ?model=&sink=. An "
                                  "Idempotency-Key header returns the same job.")

    @app.get("/v1/jobs/{job_id}", summary="An ingest job's state, counts, tokens, cost and ETA",
             responses=errors)
    async def get_job(request: Request, job_id: str) -> dict[str, Any]:
        await service.authenticate(request)
        return await asyncio.to_thread(job_status, job_or_404(job_id))

    @app.get("/v1/jobs", summary="The newest ingest jobs",
             responses=errors)
    async def list_jobs(request: Request, state: JobState | None = None,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict[str, Any]:
        await service.authenticate(request)
        jobs = await asyncio.to_thread(registry().list, state, limit)
        return {"object": "list", "data": [{"job_id": j.job_id, "state": j.state, "sink": j.sink, "model": j.model,
                                            "records": j.records, "created": j.created, "finished": j.finished}
                                           for j in jobs]}

    @app.post("/v1/jobs/{job_id}/cancel", summary="Cancel a job (a running one stops after its chunks in flight)",
             responses=errors)
    async def cancel_job(request: Request, job_id: str) -> Response:
        await service.authenticate(request)
        before = job_or_404(job_id)
        job = await asyncio.to_thread(registry().cancel, job_id)
        assert job is not None
        if before.state == "queued" and job.state == "cancelled":
            service.metrics.job_state("cancelled")
        status = 202 if job.state == "running" else 200
        return JSONResponse({"job_id": job.job_id, "state": job.state, "cancel_requested": job.cancel},
                            status_code=status)

    @app.get("/v1/jobs/{job_id}/dead-letters", summary="The job's records that could not be embedded",
             responses=errors)
    async def dead_letters(request: Request, job_id: str) -> dict[str, Any]:
        await service.authenticate(request)
        job = job_or_404(job_id)
        return {"object": "list", "data": await asyncio.to_thread(_dead_letters, job.spec)}

    @app.delete("/v1/sinks/{name}/records", summary="Delete records (by id) from a configured sink",
             responses=errors)
    async def delete_records(request: Request, name: Annotated[str, PathParam(pattern=SINK_NAME)],
                             body: DeleteRecords) -> dict[str, Any]:
        await service.authenticate(request)
        url = sink_url(name)
        try:
            deleted = await asyncio.to_thread(_delete, url, list(dict.fromkeys(body.ids)))
        except JobLockedError:
            raise APIError(409, f"A job is writing to the sink {name!r} now; delete again when it ended.",
                           code="sink_busy", retry_after=5) from None
        return {"sink": name, "deleted": deleted}


def _dead_letters(spec_json: str) -> list[dict[str, Any]]:
    """The dead letters among the records of a job's stored body (its sink's store holds every job's)."""
    from embedpipe.jobs.sources import source_from

    spec = JobSpec.from_json(spec_json)
    ids = [r.id for r in source_from(spec.source, format="jsonl")]
    try:
        store = open_store(spec, readonly=True)
    except Exception:  # the job has not started: nothing is dead yet
        return []
    with store:
        letters = store.dead_letters(ids)
    return [{"id": d.id, "text": d.text, "reason": d.reason, "metadata": dict(d.metadata), "attempts": d.attempts,
             "time": d.time} for d in letters]


def _delete(url: str, ids: list[str]) -> int:
    """Delete ``ids`` from the sink at ``url`` and its store, under the store's job lock; how many it held."""
    sink = sink_from(url)
    path = sink.default_state_path()
    if path is None or not Path(path).exists():
        return 0
    with SQLiteJobStore(path) as store:
        store.lock()
        known = list(store.lookup(ids))
        if known:
            sink.delete(known)
            store.forget(known)
            sink.compact(store)
        return len(known)
