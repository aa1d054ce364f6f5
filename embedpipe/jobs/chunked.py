"""Chunked jobs: each source record is a document, split into chunks that become the output's rows.

``embedpipe run docs.jsonl --out vectors/ --model local:all-MiniLM-L6-v2 --chunking late
--splitter stable --split-tokens 128`` (``jobs.run(..., chunking="late", splitter="stable",
split_tokens=128)``) writes one row per chunk:

* id ``DOCID#<16 hex digits>``, derived from the chunk's content (:func:`embedpipe.chunking.chunk_id`):
  from the chunk text and the document id in ``naive`` mode, so an edit elsewhere in the
  document leaves the chunk's id, text and vector alone and only the chunks next to the edit
  are re-embedded; from the chunk text and the *whole document's hash* in ``late`` mode,
  because a late vector depends on the whole document: an edit re-embeds (and renames)
  every chunk of that document, and the old rows leave the output with the rest of what the
  source no longer holds;
* the chunk's text, and metadata: the document's own fields plus ``parent_id``,
  ``chunk_index``, ``chunk_count`` and the chunk's character span ``chunk_start``/``chunk_end``
  in the document.

Design (how the job unit carries it, with small edits to :mod:`embedpipe.jobs.unit`):

1. :func:`job_source` wraps the spec's source in a :class:`ChunkedSource`, which splits each
   document with :class:`~embedpipe.chunking.StableSplitter` and yields chunk records. Every
   step of the unit (planning, comparing with the store, the sink, deletions, ``dlq``) sees
   ordinary records, so resume, incremental updates and Celery workers work unchanged.
2. :func:`record_batches` cuts the chunk records into job chunks without splitting a
   document (a job chunk may run past ``chunk_size`` to finish one), so a document's chunks
   are embedded, written and committed together.
3. :func:`embed_entries` is what :func:`~embedpipe.jobs.process_chunk` embeds with. Naive:
   ``pipeline.embed_array`` over the chunk texts (cached per text, as any record). Late: the
   entries are grouped back into documents by ``parent_id``; each document is rebuilt from
   its chunks placed at their spans (:func:`embedpipe.late_chunking.document_of_chunks`: the
   characters between chunks, whitespace that the splitter strips, become spaces; a
   WordPiece tokenizer such as MiniLM's sees the same tokens) and embedded with
   :func:`embedpipe.late_chunking.late_vectors`, cached per document. A job chunk therefore
   needs no access to the source, and its JSON (what a Celery task carries) holds only
   chunk records.

A document whose chunks do not all arrive together (possible only when some were
dead-lettered and are retried alone) cannot be embedded late: those chunks fail with a
message saying so, and re-running the job re-plans the whole document once it changes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedpipe.chunking import StableSplitter, chunk_id
from embedpipe.engine.results import EmbeddingArray, as_array
from embedpipe.errors import ConfigurationError, Failure
from embedpipe.jobs.errors import SourceError
from embedpipe.jobs.records import Entry, Record, chunked, content_hash
from embedpipe.jobs.sources import Source
from embedpipe.stats import Stats

if TYPE_CHECKING:
    from embedpipe.jobs.spec import JobSpec
    from embedpipe.pipeline import EmbeddingPipeline

__all__ = ["CHUNKINGS", "DEFAULT_SPLIT_TOKENS", "SPLITTERS", "ChunkedSource", "check_chunking", "embed_entries",
           "job_source", "record_batches"]

log = logging.getLogger("embedpipe.jobs")

#: how chunk vectors are made: each chunk alone, or pooled from the whole document's tokens
CHUNKINGS = ("naive", "late")
#: the splitters a job can cut documents with
SPLITTERS = ("stable",)
#: the target chunk size in tokens when ``split_tokens`` is not given
DEFAULT_SPLIT_TOKENS = 128
#: metadata keys a chunk record adds to its document's
CHUNK_FIELDS = ("parent_id", "chunk_index", "chunk_count", "chunk_start", "chunk_end")


def check_chunking(chunking: Any, splitter: Any, split_tokens: Any) -> None:
    """Raise :class:`ConfigurationError` naming the option when the chunking options are not valid."""
    if chunking is not None and chunking not in CHUNKINGS:
        raise ConfigurationError(f"chunking={chunking!r}: use one of {', '.join(CHUNKINGS)} (or leave it out: one "
                                 "row per record)")
    if splitter is not None and splitter not in SPLITTERS:
        raise ConfigurationError(f"splitter={splitter!r}: use one of {', '.join(SPLITTERS)}")
    if split_tokens is not None and (not isinstance(split_tokens, int) or isinstance(split_tokens, bool)
                                     or split_tokens < 2):
        raise ConfigurationError(f"split_tokens={split_tokens!r} must be an integer of at least 2 tokens")
    if chunking is None and (splitter is not None or split_tokens is not None):
        raise ConfigurationError("splitter and split_tokens need chunking='naive' or 'late' (--chunking)")


class ChunkedSource(Source):
    """The chunk records of ``source``'s documents (see the module's docstring for ids and metadata)."""

    def __init__(self, source: Source, *, mode: str = "naive", splitter: StableSplitter | None = None) -> None:
        check_chunking(mode, None, None)
        self.source = source
        self.mode = mode
        self.splitter = splitter or StableSplitter(chunk_size=DEFAULT_SPLIT_TOKENS)
        self.name = f"{source.name} (chunked)"

    def documents(self) -> Iterator[list[Record]]:
        """Each document's chunk records, one list per document (documents with no text give none)."""
        empty = 0
        for doc in self.source:
            if not isinstance(doc.text, str):
                raise SourceError(f"record {doc.id!r} of {self.source.name}: chunking splits text, not "
                                  f"{type(doc.text).__name__}")
            spans = self.splitter.split_spans(doc.text)
            if not spans:
                empty += 1
                continue
            yield self.chunk_records(doc, spans)
        if empty:
            log.warning("embedpipe: %d document(s) of %s hold no text and give no chunks", empty, self.source.name)

    def chunk_records(self, doc: Record, spans: Sequence[tuple[int, int]]) -> list[Record]:
        """The records of ``doc``'s chunks at ``spans``."""
        # Late vectors depend on the whole document, so its hash enters their ids.
        owner = doc.id if self.mode == "naive" else f"{doc.id}@{content_hash(doc.text).hex()}"
        seen: dict[str, int] = {}
        out = []
        for k, (start, end) in enumerate(spans):
            text = doc.text[start:end]
            n = seen.get(text, 0)
            seen[text] = n + 1
            meta = {**doc.metadata, "parent_id": doc.id, "chunk_index": k, "chunk_count": len(spans),
                    "chunk_start": start, "chunk_end": end}
            out.append(Record(f"{doc.id}#{chunk_id(text, owner, n)[:16]}", text, meta))
        return out

    def __iter__(self) -> Iterator[Record]:
        for records in self.documents():
            yield from records

    def batches(self, size: int) -> Iterator[list[Record]]:
        """Lists of about ``size`` chunk records, never splitting a document (a list runs past ``size`` to end one)."""
        batch: list[Record] = []
        for records in self.documents():
            batch.extend(records)
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch


def job_source(spec: JobSpec, pipeline: EmbeddingPipeline | None = None) -> Source:
    """The records a job embeds: the spec's source, split into chunk records when ``spec`` chunks.

    With ``chunking="late"`` and a ``pipeline`` whose model gives no token outputs (an API
    model), a :class:`ConfigurationError` is raised before anything is read or sent.
    """
    from embedpipe.jobs.sources import source_from

    src = source_from(spec.source, id_field=spec.option("id_field"), text_field=spec.option("text_field"),
                      format=spec.option("format"))
    mode = spec.options.get("chunking")
    if mode is None:
        return src
    if mode == "late" and pipeline is not None and not hasattr(type(pipeline.provider), "model_object"):
        raise ConfigurationError(f"chunking='late' needs a local transformer model (local:...); "
                                 f"{pipeline.provider.spec} gives only pooled vectors. Use chunking='naive'")
    tokens = spec.options.get("split_tokens") or DEFAULT_SPLIT_TOKENS
    return ChunkedSource(src, mode=mode, splitter=StableSplitter(chunk_size=tokens))


def record_batches(source: Source, size: int) -> Iterator[list[Record]]:
    """The job chunks' records: ``size`` at a time, keeping each document of a :class:`ChunkedSource` whole."""
    if isinstance(source, ChunkedSource):
        return source.batches(size)
    return chunked(source, size)


def embed_entries(spec: JobSpec, pipe: EmbeddingPipeline, entries: Sequence[Entry]) -> EmbeddingArray:
    """The vectors of a job chunk's ``entries``: ``pipe.embed_array`` of their texts, or late chunk vectors.

    Late: one ``(n, d)`` array with the rows of each document's chunks pooled from one pass
    over the document; a document that fails gives a :class:`~embedpipe.errors.Failure` for
    each of its chunks (NaN rows), as ``embed_array`` reports failed inputs.
    """
    texts = [e.record.text for e in entries]
    if spec.options.get("chunking") != "late":
        return pipe.embed_array(texts)
    from embedpipe.late_chunking import late_vectors

    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(str(e.record.metadata.get("parent_id", e.record.id)), []).append(i)
    dims = pipe.expected_dims
    rows: dict[int, np.ndarray] = {}
    failures: dict[int, Failure] = {}
    stats = Stats()
    for parent, idx in groups.items():
        try:
            document, spans = _document_of(parent, [entries[i].record for i in idx])
            vectors, ran = late_vectors(pipe, document, spans)
        except ValueError as exc:  # the chunks do not make up one document: this document's fault
            for i in idx:
                failures[i] = Failure("invalid_input", message=str(exc))
            continue
        except ConfigurationError:
            raise
        except Exception as exc:  # the local model failed on this document
            for i in idx:
                failures[i] = Failure("provider", message=f"late chunking of document {parent!r} failed: {exc}")
            continue
        stats.add(**({"embedded": len(idx), "misses": len(idx)} if ran else {"hits": len(idx)}))
        dims = int(vectors.shape[1])
        for i, v in zip(idx, vectors, strict=True):
            rows[i] = v
    stats.add(failed=len(failures))
    out = np.full((len(entries), dims or 1), np.nan, dtype=np.float32)
    for i, v in rows.items():
        out[i] = v
    return as_array(out, failures, False, stats)


def _document_of(parent: str, records: Sequence[Record]) -> tuple[str, list[tuple[int, int]]]:
    """Document ``parent`` rebuilt from all its chunk records (gaps as spaces), and the chunks' spans."""
    from embedpipe.late_chunking import document_of_chunks

    try:
        placed = [(r.text, int(r.metadata["chunk_start"]), int(r.metadata["chunk_end"])) for r in records]
        index = [int(r.metadata["chunk_index"]) for r in records]
        count = int(records[0].metadata["chunk_count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"chunk records of document {parent!r} lack their chunk fields ({exc}); late chunking "
                         f"needs {', '.join(CHUNK_FIELDS)}") from None
    if sorted(index) != list(range(count)):
        raise ValueError(f"late chunking needs all {count} chunks of document {parent!r} together, got "
                         f"{len(records)}; re-run the job after the document changes, or use chunking='naive'")
    try:
        return document_of_chunks(placed)
    except ValueError as exc:
        raise ValueError(f"document {parent!r}: {exc}") from None


def chunk_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The chunking options of a spec's ``options`` that define its output (for ``job_id``); empty without chunking."""
    if options.get("chunking") is None:
        return {}
    return {"chunking": options["chunking"], "splitter": options.get("splitter") or SPLITTERS[0],
            "split_tokens": options.get("split_tokens") or DEFAULT_SPLIT_TOKENS}
