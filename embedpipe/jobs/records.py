"""One record of a job (id, text, metadata) and the hashes that tell a changed record from an unchanged one."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from embedpipe.errors import InvalidInputError
from embedpipe.inputs import Item


@dataclass(slots=True)
class Record:
    """What a source yields: a stable ``id``, the ``text`` to embed and any other fields as ``metadata``.

    ``text`` is a str, or an :class:`~embedpipe.inputs.Item` (an image) from a media source.
    """

    id: str
    text: Any
    metadata: dict[str, Any] = field(default_factory=dict)


def content_hash(text: Any) -> bytes:
    """SHA-256 digest of ``text``; of an item's kind and content key (an image's pixels) for an item."""
    if not isinstance(text, str) and isinstance(text, Item):
        try:
            key = text.content_key()
        except InvalidInputError:
            key = b"\xffunreadable"  # embedding it fails and dead-letters it; a readable version hashes anew
        return hashlib.sha256(b"\xff" + str(text.kind).encode("utf-8") + b"\x00" + key).digest()
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def text_of(record: Record) -> str:
    """What a dead letter keeps of a record's input: its text; nothing for an item (an image).

    Nothing, because a letter's text is what ``dlq retry`` embeds: an image's path would come back
    embedded as a text. The reason names the file, the metadata keeps its path, and re-running the
    job re-embeds the file once it is readable (its content hash changes).
    """
    return record.text if isinstance(record.text, str) else ""


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
