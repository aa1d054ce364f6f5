"""Cache keys: SHA-256 over an unambiguous encoding of everything that shapes a vector."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

#: bump when the key derivation changes, so old keys can never be misread
KEY_VERSION = 1


def key_material(*, provider: str, model: str, dimensions: int | None, identity: Mapping[str, Any],
                 role: str | None) -> bytes:
    """A 32-byte digest naming one vector space: provider, model, dims, options, role.

    JSON with sorted keys is unambiguous (strings are quoted and escaped), so no two
    different configurations can encode alike.
    """
    doc = {
        "v": KEY_VERSION,
        "provider": provider,
        "model": model,
        "dimensions": dimensions,
        "identity": dict(identity),
        "role": role,
    }
    encoded = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(encoded.encode("utf-8")).digest()


def text_keys(material: bytes, texts: Iterable[str]) -> list[str]:
    """One hex key per text. ``material`` has a fixed length, so prefixing it is unambiguous."""
    sha = hashlib.sha256
    out = []
    for text in texts:
        h = sha(material)
        h.update(text.encode("utf-8", "surrogatepass"))
        out.append(h.hexdigest())
    return out


def item_keys(material: bytes, items: Iterable[Any]) -> list[str]:
    """One hex key per :class:`~embedpipe.inputs.Item`, from its kind and ``content_key()``.

    The 0xFF byte after the material never occurs in UTF-8 (nor in ``surrogatepass`` output),
    so no item key can equal a text key.
    """
    sha = hashlib.sha256
    out = []
    for item in items:
        h = sha(material)
        h.update(b"\xff")
        h.update(str(item.kind).encode("utf-8"))
        h.update(b"\x00")
        h.update(item.content_key())
        out.append(h.hexdigest())
    return out
