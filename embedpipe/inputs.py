"""Inputs beyond strings: an :class:`Item` is anything with a ``kind`` and a content key.

``Input = str | Item``. Strings stay the fast path (no per-item overhead for text). An item's
``content_key()`` feeds the cache key, so two equal items (the same photo under two names)
share one vector and are embedded once. A provider declares the kinds it embeds in
``ProviderInfo.modalities``; an input of another kind is an
:class:`~embedpipe.errors.InvalidInputError` before anything is sent.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class Sound:
...     kind = "audio"
...     data: bytes
...     def content_key(self) -> bytes:
...         return self.data
>>> isinstance(Sound(b"..."), Item)
True
"""

from __future__ import annotations

from typing import Protocol, Union, runtime_checkable

#: the kind of a plain string input
TEXT = "text"


@runtime_checkable
class Item(Protocol):
    """A non-text input: ``kind`` names its modality (``"image"``, ``"audio"``, …) and
    ``content_key()`` returns bytes that identify its content (a hash of decoded pixels,
    the audio bytes…): equal keys mean equal vectors."""

    kind: str

    def content_key(self) -> bytes:
        """Bytes that identify this input's content; they enter the cache key."""
        ...


Input = Union[str, Item]  # noqa: UP007 - a runtime alias: `str | Item` needs 3.10's types.UnionType at import


def kind_of(value: object) -> str | None:
    """``"text"`` for a str, the item's ``kind`` for an :class:`Item`, else ``None``."""
    if isinstance(value, str):
        return TEXT
    if isinstance(value, Item):
        kind = value.kind
        return kind if isinstance(kind, str) and kind else None
    return None


__all__ = ["TEXT", "Input", "Item", "kind_of"]
