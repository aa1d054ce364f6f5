"""Room kept on disk for vectors that were paid for when the disk filled up.

A run reserves a small file beside its state (``_spill.bin``, sized for the chunks it has in
flight) before it sends anything. If the disk then fills, so that neither the cache nor the
output can take a chunk's vectors, those vectors (with their cache keys) are written into the
reserved room, which needs no new disk blocks, and the run stops with "no space left on
device". The next run puts them into the cache first: nothing paid for is paid again.

The reservation is made with ``posix_fallocate`` where the OS has it (else by writing zeros).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sqlite3
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedpipe import codec
from embedpipe.errors import EmbedPipeError

log = logging.getLogger("embedpipe.jobs")

MAGIC = b"EPSPILL1"
_HEADER = struct.Struct("<8sQ")  # magic, payload length (0: empty)
NAME = "_spill.bin"


class DiskFullError(EmbedPipeError, OSError):
    """No space left on the device that holds the output, the state or the cache; the run stopped, checkpointed."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the disk is full: ENOSPC/EDQUOT, or SQLite's SQLITE_FULL."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, sqlite3.Error) and "disk is full" in str(current).lower():
            return True
        if "the disk is full" in str(current) or "No space left on device" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


class Spill:
    """The reserved file at ``path``: :meth:`reserve` it, :meth:`save` vectors into it, :meth:`restore` them."""

    def __init__(self, path: Path, room: int) -> None:
        self.path = path
        self.room = max(room, _HEADER.size + 1024)

    @classmethod
    def beside(cls, state_path: Path, *, vectors: int, dimensions: int | None) -> Spill:
        """The spill file next to a job's state, with room for ``vectors`` vectors (keys included)."""
        per = (dimensions or 4096) * 4 + codec.HEADER_SIZE + 128
        return cls(state_path.with_name(NAME), _HEADER.size + 256 + vectors * per)

    def reserve(self) -> None:
        """Make sure the file holds :attr:`room` allocated bytes (before the disk can fill)."""
        have = self.path.stat().st_size if self.path.exists() else 0
        if have >= self.room:
            return
        with open(self.path, "r+b" if self.path.exists() else "w+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, self.room)
            except (AttributeError, OSError):  # no fallocate here (macOS, some filesystems): write the zeros
                f.seek(have)
                f.write(b"\0" * (self.room - have))
            if have == 0:
                f.seek(0)
                f.write(_HEADER.pack(MAGIC, 0))
            f.flush()
            os.fsync(f.fileno())

    def save(self, keys: Sequence[str], values: Sequence[bytes]) -> int:
        """Add ``(key, encoded vector)`` pairs to what the room holds; return how many of all fit."""
        if not self.path.exists():
            return 0
        # Another chunk in flight may have saved its vectors already: keep both.
        earlier = [(k, v) for k, v in self.load() if k not in set(keys)]
        keys = [k for k, _ in earlier] + list(keys)
        values = [v for _, v in earlier] + list(values)
        budget = self.path.stat().st_size - _HEADER.size
        blob = b""
        kept = 0
        for n in range(len(keys), 0, -1):  # as many as fit
            payload = json.dumps({"keys": list(keys[:n]), "sizes": [len(v) for v in values[:n]]}).encode()
            candidate = struct.pack("<I", len(payload)) + payload + b"".join(values[:n])
            if len(candidate) <= budget:
                blob, kept = candidate, n
                break
        with open(self.path, "r+b") as f:  # overwrites allocated bytes: needs no new block
            f.seek(_HEADER.size)
            f.write(blob)
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, len(blob)))
            f.flush()
            os.fsync(f.fileno())
        return kept

    def load(self) -> list[tuple[str, bytes]]:
        """The pairs a stopped run saved (empty when there are none)."""
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size:
                return []
            magic, length = _HEADER.unpack(head)
            if magic != MAGIC or not length:
                return []
            blob = f.read(length)
        (n,) = struct.unpack_from("<I", blob)
        meta = json.loads(blob[4:4 + n])
        out, pos = [], 4 + n
        for key, size in zip(meta["keys"], meta["sizes"], strict=True):
            out.append((key, blob[pos:pos + size]))
            pos += size
        return out

    def clear(self) -> None:
        """Mark the room empty (it stays reserved)."""
        if self.path.exists():
            with open(self.path, "r+b") as f:
                f.write(_HEADER.pack(MAGIC, 0))

    def restore(self, cache: Any) -> int:
        """Put what a stopped run saved into ``cache``; return how many vectors."""
        pairs = self.load()
        if not pairs or cache is None:
            return 0
        cache.set_many(pairs)
        self.clear()
        log.warning("embedpipe: %d vector(s) paid for before the disk filled were put into the cache", len(pairs))
        return len(pairs)

    def remove(self) -> None:
        """Delete the file (a finished run keeps no reservation)."""
        with contextlib.suppress(FileNotFoundError):
            if not self.load():
                self.path.unlink()


def encoded(vectors: np.ndarray, tokens: Sequence[int]) -> list[bytes]:
    """Cache values for ``vectors``."""
    return codec.encode_many(np.asarray(vectors, dtype=np.float32), tokens)


__all__ = ["MAGIC", "NAME", "DiskFullError", "Spill", "encoded", "is_disk_full"]
