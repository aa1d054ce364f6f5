"""One record of a job (id, text, metadata) and the hashes that tell a changed record from an unchanged one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Record:
    """What a source yields: a stable ``id``, the ``text`` to embed and any other fields as ``metadata``."""

    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def content_hash(text: str) -> bytes:
    """SHA-256 digest of ``text``."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def metadata_json(metadata: Mapping[str, Any]) -> str:
    """Canonical JSON of ``metadata``: equal metadata always encodes alike; dates and the like become strings."""
    return json.dumps(dict(metadata), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def metadata_hash(metadata_json: str) -> bytes:
    """A short digest of canonical metadata JSON: enough to notice that a record's metadata changed."""
    return hashlib.sha256(metadata_json.encode("utf-8", "surrogatepass")).digest()[:16]


def chunked(items: Iterable[Record], size: int) -> Iterator[list[Record]]:
    """Lists of at most ``size`` records, in order."""
    chunk: list[Record] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass(slots=True)
class Entry:
    """A record with the hashes a job compares and the metadata JSON a sink writes, computed once."""

    record: Record
    content_hash: bytes
    metadata_json: str
    meta_hash: bytes

    @classmethod
    def of(cls, record: Record) -> Entry:
        """Hash ``record``."""
        js = metadata_json(record.metadata)
        return cls(record, content_hash(record.text), js, metadata_hash(js))
