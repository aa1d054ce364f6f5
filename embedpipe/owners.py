"""Names of the processes that hold claims and leases (``host:pid:tail``), and telling a dead one on this host.

A claim on a cache key or a lease on a chunk expires, so a process that died never
blocks others for long. When the holder ran on this host, the wait can end at once: a
process whose pid is gone holds nothing any more (a pool child killed mid-chunk, say).
"""

from __future__ import annotations

import os
import socket
import uuid


def owner_name(tail: str | None = None) -> str:
    """A name unique to this process: ``host:pid:tail`` (a random tail unless one is given)."""
    return f"{socket.gethostname()}:{os.getpid()}:{tail or uuid.uuid4().hex[:12]}"


def dead_here(owner: str) -> bool:
    """Whether ``owner`` names a process of this host that no longer runs (never true for another host's)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # alive, as another user; or not a pid at all
        return False
    return False


__all__ = ["dead_here", "owner_name"]
