"""The shared half of a distributed job's state, in Redis: chunk states, leases, attempts, spend and results.

Workers on any host process chunks against a :class:`RedisJobLedger`; the submitting
process keeps the job's :class:`~embedpipe.jobs.SQLiteJobStore` (the source snapshot, where
every row is, the dead-letter queue) and applies each chunk's committed result to it.
Every step that must happen once is one Lua script, so it is atomic on the Redis server:

- **lease** (:meth:`acquire_lease`): a chunk already committed is refused; one whose lease
  another owner holds is refused (a redelivered copy backs off without calling the
  provider); otherwise the lease is set with ``PX`` and one attempt is counted;
- **commit** (:meth:`commit`): the chunk's result (rows written, dead letters, counts, the
  read-back sample) is stored and the chunk marked done, only if it was not done already,
  and its spend reservation turns into spend;
- **spend** (:meth:`reserve_spend`): a reservation is granted only if what was spent plus
  every live reservation plus this one stays within the job's budget. A reservation lasts
  as long as the lease, so a killed worker's reservation expires with it.

Keys are ``embedpipe:job:{JOB_ID}:…``; the braces keep one job's keys in one Redis Cluster slot.
Redis being unreachable raises :class:`LedgerUnavailableError`: distributed runs fail
closed, and a worker retries later rather than spend on its own.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from embedpipe._urls import redact, redact_url
from embedpipe.errors import EmbedPipeError
from embedpipe.jobs.records import Entry, Record
from embedpipe.jobs.state import Failed, Sample, StoredRecord, Written
from embedpipe.owners import dead_here

#: every job the ledger has seen: job_id -> spec JSON
JOBS_KEY = "embedpipe:jobs"


class LedgerUnavailableError(EmbedPipeError):
    """The Redis that holds a distributed job's shared state cannot be reached; nothing was spent."""


_ACQUIRE = """
local st = redis.call('HGET', KEYS[1], ARGV[1])
if st == 'done' or st == 'split' then return -1 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], 'running')
return redis.call('HINCRBY', KEYS[3], ARGV[1], 1)
"""

# KEYS: lease, reservations. ARGV: owner, ttl ms, chunk id. A reservation lives as long as the lease.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local r = redis.call('HGET', KEYS[2], ARGV[3])
if r then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local sep = string.find(r, ':', 1, true)
  redis.call('HSET', KEYS[2], ARGV[3], string.sub(r, 1, sep - 1) .. ':' .. (now + tonumber(ARGV[2])))
end
return 1
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('HDEL', KEYS[2], ARGV[2])
return 1
"""

# KEYS: chunks, lease, result, done list, meta, reservations.
# ARGV: chunk id, result JSON, spend, new status ('done' or 'split'), dimensions ('' if none)
_COMMIT = """
local st = redis.call('HGET', KEYS[1], ARGV[1])
if st == 'done' or st == 'split' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('RPUSH', KEYS[4], ARGV[1])
redis.call('HINCRBYFLOAT', KEYS[5], 'spent', ARGV[3])
if ARGV[5] ~= '' then redis.call('HSETNX', KEYS[5], 'dimensions', ARGV[5]) end
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

# KEYS: meta, reservations. ARGV: chunk id, amount, ttl ms.
_RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local budget = redis.call('HGET', KEYS[1], 'budget')
if not budget or budget == '' then return 1 end
budget = tonumber(budget)
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local reserved = 0
local all = redis.call('HGETALL', KEYS[2])
for i = 1, #all, 2 do
  local cid, v = all[i], all[i + 1]
  local sep = string.find(v, ':', 1, true)
  local amount, expiry = tonumber(string.sub(v, 1, sep - 1)), tonumber(string.sub(v, sep + 1))
  if expiry <= now then
    redis.call('HDEL', KEYS[2], cid)
  elseif cid ~= ARGV[1] then
    reserved = reserved + amount
  end
end
if spent + reserved + tonumber(ARGV[2]) > budget + 1e-12 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ':' .. (now + tonumber(ARGV[3])))
return 1
"""


def jobs_in(url: str) -> list[tuple[str, dict[str, Any], dict[str, int]]]:
    """``(job_id, spec as a dict, chunks per state)`` of every job the Redis at ``url`` holds."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    try:
        try:
            specs = client.hgetall(JOBS_KEY)
        except (redis.RedisError, OSError) as exc:
            raise LedgerUnavailableError(f"the job ledger at {redact_url(url)} is unreachable ({exc})") from exc
        out = []
        for raw_id, raw_spec in sorted(specs.items()):
            job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            states: dict[str, int] = {}
            for state in RedisJobLedger(url, job_id, client=client).states().values():
                states[state] = states.get(state, 0) + 1
            out.append((job_id, json.loads(raw_spec), states))
        return out
    finally:
        client.close()


def entry_of(data: dict[str, Any]) -> Entry:
    """An :class:`Entry` from a result's JSON row (the hashes as sent, the text and metadata where given)."""
    record = Record(str(data["id"]), str(data.get("text", "")), json.loads(data.get("metadata", "{}")))
    return Entry(record, bytes.fromhex(data["content_hash"]), str(data.get("metadata", "{}")),
                 bytes.fromhex(data["meta_hash"]))


def _row(e: Entry, *, text: bool = False) -> dict[str, Any]:
    row: dict[str, Any] = {"id": e.record.id, "content_hash": e.content_hash.hex(), "meta_hash": e.meta_hash.hex(),
                           "metadata": e.metadata_json}
    if text:
        row["text"] = e.record.text
    return row


class RedisJobLedger:
    """Chunk states, leases, attempts, spend and committed results of one job, shared through Redis.

    It offers what :func:`~embedpipe.jobs.process_chunk` needs of a store, so a worker runs
    the same job unit as the CLI. It holds no source snapshot (:meth:`lookup` knows no
    record): that stays in the submitter's store, which applies each result.
    """

    #: process_chunk asks this store for a spend reservation before it sends anything
    reserves_spend = True

    def __init__(self, url: str, job_id: str, *, client: Any = None) -> None:
        import redis

        self.url = url
        self.job_id = job_id
        self.path = f"{redact_url(url)}#{job_id}"
        self._client = client if client is not None else redis.Redis.from_url(url, socket_timeout=10,
                                                                              socket_connect_timeout=5)
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        prefix = f"embedpipe:job:{{{job_id}}}:"
        self.keys = {name: prefix + name for name in ("chunks", "attempts", "done", "meta", "reservations")}
        self._prefix = prefix
        self._scripts = {name: self._client.register_script(src) for name, src in
                         (("acquire", _ACQUIRE), ("renew", _RENEW), ("release", _RELEASE), ("commit", _COMMIT),
                          ("reserve", _RESERVE))}
        self.write_lock = threading.RLock()

    def __repr__(self) -> str:
        return f"RedisJobLedger({redact_url(self.url)!r}, job_id={self.job_id!r})"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._errors as exc:
            raise LedgerUnavailableError(f"the job ledger at {redact_url(self.url)} is unreachable "
                                         f"({type(exc).__name__}: {exc}); nothing was spent") from exc

    def _lease_key(self, chunk_id: str) -> str:
        return f"{self._prefix}lease:{chunk_id}"

    def _result_key(self, chunk_id: str) -> str:
        return f"{self._prefix}result:{chunk_id}"

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

    # ------------------------------------------------------------------ the job
    def register(self, spec_json: str | None, budget_usd: float | None, *, dimensions: str | None = None) -> None:
        """Record the job, its budget and the output's dimensions (the submitter does, before it publishes)."""
        mapping = {"budget": "" if budget_usd is None else repr(float(budget_usd)), "updated": repr(time.time())}
        if dimensions:
            mapping["dimensions"] = str(dimensions)
        self._call(self._client.hset, self.keys["meta"], mapping=mapping)
        self._call(self._client.hsetnx, self.keys["meta"], "spent", "0")
        if spec_json is not None:
            self._call(self._client.hset, self.keys["meta"], "spec", spec_json)
            self._call(self._client.hset, JOBS_KEY, self.job_id, spec_json)

    def cancel(self) -> None:
        """Ask every worker to leave this job's remaining chunks alone."""
        self._call(self._client.hset, self.keys["meta"], "cancelled", "1")

    def resume(self) -> None:
        """Clear a cancel (a resubmitted job goes on)."""
        self._call(self._client.hdel, self.keys["meta"], "cancelled")

    def cancelled(self) -> bool:
        return bool(self._call(self._client.hget, self.keys["meta"], "cancelled"))

    def meta(self) -> dict[str, str]:
        raw = self._call(self._client.hgetall, self.keys["meta"])
        return {k.decode(): v.decode() for k, v in raw.items()}

    def get(self, name: str) -> str | None:
        """A value of the job's meta (``dimensions``, ``spent``, ``budget``…)."""
        value = self._call(self._client.hget, self.keys["meta"], name)
        return None if value is None or value == b"" else value.decode()

    def spent(self) -> float:
        return float(self.get("spent") or 0.0)

    def mark_pending(self, chunk_ids: Sequence[str]) -> None:
        """Note chunks as published (``pending``) unless they already have a state."""
        if not chunk_ids:
            return
        pipe = self._client.pipeline(transaction=False)
        for cid in chunk_ids:
            pipe.hsetnx(self.keys["chunks"], cid, "pending")
        self._call(pipe.execute)

    def note_error(self, chunk_id: str, message: str) -> None:
        """Keep the last error a chunk failed with (for the dead letter a bisection may end in)."""
        self._call(self._client.hset, self._prefix + "errors", chunk_id, redact(message)[:500])

    def last_error(self, chunk_id: str) -> str | None:
        """The last error :meth:`note_error` kept for ``chunk_id``."""
        value = self._call(self._client.hget, self._prefix + "errors", chunk_id)
        return None if value is None else value.decode()

    def stop_at_budget(self, chunk_id: str) -> None:
        """Mark a chunk that could not get a spend reservation (the job stops, checkpointed)."""
        self._call(self._client.eval, "local s = redis.call('HGET', KEYS[1], ARGV[1]) "
                   "if s ~= 'done' and s ~= 'split' then redis.call('HSET', KEYS[1], ARGV[1], 'budget') end return 1",
                   1, self.keys["chunks"], chunk_id)

    def states(self) -> dict[str, str]:
        """Chunk id -> ``pending``, ``running``, ``done`` or ``split``."""
        raw = self._call(self._client.hgetall, self.keys["chunks"])
        return {k.decode(): v.decode() for k, v in raw.items()}

    def attempts(self, chunk_id: str) -> int:
        return int(self._call(self._client.hget, self.keys["attempts"], chunk_id) or 0)

    def results(self, start: int = 0) -> list[tuple[str, dict[str, Any]]]:
        """Committed chunks from position ``start`` of the done list, with their results."""
        ids = [c.decode() for c in self._call(self._client.lrange, self.keys["done"], start, -1)]
        if not ids:
            return []
        raw = self._call(self._client.mget, [self._result_key(c) for c in ids])
        return [(cid, json.loads(r)) for cid, r in zip(ids, raw, strict=True) if r is not None]

    def live_leases(self) -> int:
        """Chunks some worker is processing right now."""
        states = self.states()
        running = [c for c, s in states.items() if s == "running"]
        if not running:
            return 0
        return sum(1 for v in self._call(self._client.mget, [self._lease_key(c) for c in running]) if v)

    def delete(self) -> None:
        """Drop everything this job keeps in Redis (after it finished and was applied)."""
        keys = [*self.keys.values(), *(k for k in self._call(self._client.scan_iter, f"{self._prefix}*"))]
        if keys:
            self._call(self._client.delete, *keys)
        self._call(self._client.hdel, JOBS_KEY, self.job_id)

    # ------------------------------------------------------------------ what process_chunk needs
    def chunk_status(self, chunk_id: str) -> str | None:
        value = self._call(self._client.hget, self.keys["chunks"], chunk_id)
        if value is None:
            return None
        status = value.decode()
        return "done" if status in ("done", "split") else status

    def acquire_lease(self, chunk_id: str, gen: int, owner: str, ttl: float) -> int | None:
        keys = [self.keys["chunks"], self._lease_key(chunk_id), self.keys["attempts"]]
        args = [chunk_id, owner, max(1, int(ttl * 1000))]
        result = int(self._call(self._scripts["acquire"], keys=keys, args=args))
        if result == 0:
            # A holder on this host whose process is gone (a pool child killed mid-chunk) holds nothing:
            # no need to wait for its lease to run out.
            holder = self.lease_owner(chunk_id)
            if holder is not None and dead_here(holder) and self.break_lease(chunk_id, holder):
                result = int(self._call(self._scripts["acquire"], keys=keys, args=args))
        return result if result > 0 else None

    def renew_lease(self, chunk_id: str, owner: str, ttl: float) -> bool:
        return bool(self._call(self._scripts["renew"], keys=[self._lease_key(chunk_id), self.keys["reservations"]],
                               args=[owner, max(1, int(ttl * 1000)), chunk_id]))

    def release_lease(self, chunk_id: str, owner: str) -> None:
        self._call(self._scripts["release"], keys=[self._lease_key(chunk_id), self.keys["reservations"]],
                   args=[owner, chunk_id])

    def lease_owner(self, chunk_id: str) -> str | None:
        """Who holds the chunk's lease now, if anyone."""
        value = self._call(self._client.get, self._lease_key(chunk_id))
        return None if value is None else value.decode()

    def break_lease(self, chunk_id: str, owner: str) -> bool:
        """Drop the lease ``owner`` holds (it is known dead); ``False`` if someone else holds it now."""
        return bool(self._call(self._client.eval, "if redis.call('GET', KEYS[1]) == ARGV[1] then "
                               "return redis.call('DEL', KEYS[1]) end return 0", 1, self._lease_key(chunk_id), owner))

    def reserve_spend(self, chunk_id: str, usd: float, ttl: float) -> bool:
        """Reserve ``usd`` of the job's budget for this chunk, for ``ttl`` seconds; ``False`` if it does not fit."""
        return bool(self._call(self._scripts["reserve"], keys=[self.keys["meta"], self.keys["reservations"]],
                               args=[chunk_id, repr(float(usd)), max(1, int(ttl * 1000))]))

    def lookup(self, ids: Sequence[str]) -> dict[str, StoredRecord]:
        return {}  # the snapshot is the submitter's: a worker embeds what it was given

    def commit(self, gen: int, written: Sequence[Written], failed: Sequence[Failed],
               meta: dict[str, Any] | None = None, *, chunk_id: str | None = None, seq: int | None = None,
               counts: dict[str, Any] | None = None, samples: Sequence[Sample] = (), sample_size: int = 0,
               status: str = "done", children: Sequence[dict[str, Any]] = ()) -> bool:
        """Store a chunk's result and mark it done, once (``False``: it was committed before)."""
        if chunk_id is None:
            # A partial outcome (budget, outage) is not a commit: what it wrote is redone later from the cache.
            return False
        result = {"gen": gen, "seq": seq, "meta": meta or {}, "counts": counts or {},
                  "written": [{**_row(w.entry), "loc": w.loc} for w in written],
                  "failed": [{**_row(f.entry, text=True), "reason": f.reason} for f in failed],
                  "samples": [{**_row(e, text=True), "priority": p, "vector": [float(x) for x in v]}
                              for p, e, v in list(samples)[:sample_size]] if sample_size else [],
                  "children": list(children)}
        dims = str((meta or {}).get("dimensions") or "")
        spend = float((counts or {}).get("cost_usd") or 0.0)
        keys = [self.keys["chunks"], self._lease_key(chunk_id), self._result_key(chunk_id), self.keys["done"],
                self.keys["meta"], self.keys["reservations"]]
        return bool(self._call(self._scripts["commit"], keys=keys,
                               args=[chunk_id, json.dumps(result), repr(spend), status, dims]))


__all__ = ["JOBS_KEY", "LedgerUnavailableError", "RedisJobLedger", "entry_of", "jobs_in"]
