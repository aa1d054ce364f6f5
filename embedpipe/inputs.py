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

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any, Protocol, Union, runtime_checkable

from embedpipe.errors import ConfigurationError, InvalidInputError

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


#: the kind of an :class:`Image`
IMAGE = "image"
#: the kind of an :class:`Audio`
AUDIO = "audio"

#: file suffixes read as images and as audio by folder sources and ``embed_image``-style helpers
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".opus", ".webm", ".aac")

_READ_CHUNK = 1 << 20


def _pil() -> Any:
    try:
        import PIL.Image
        import PIL.ImageOps
    except ImportError:
        raise ConfigurationError("images need Pillow: pip install 'embedpipe[multimodal]'") from None
    return PIL


class Image:
    """An image to embed, read lazily: build it with :meth:`from_path`, :meth:`from_bytes` or :meth:`from_pil`.

    Nothing is decoded when it is built. Its :meth:`content_key` is a SHA-256 of the decoded
    pixels after EXIF orientation (mode, size and bytes), so the same photo under two names, or
    re-saved losslessly, is one cache entry; the engine computes it in worker threads and keeps
    only the digest. :meth:`load` decodes again for the model, at most once per batch, so memory
    holds one batch of pixels, never a folder's. A file that is missing, corrupt or not an image
    is an :class:`~embedpipe.errors.InvalidInputError` that names it.
    """

    kind = IMAGE
    __slots__ = ("_data", "_key", "_lock", "_pil", "_size", "name", "path")

    def __init__(self, *, path: str | os.PathLike[str] | None = None, data: bytes | None = None,
                 pil: Any = None, name: str | None = None) -> None:
        if (path is None) + (data is None) + (pil is None) != 2:
            raise ConfigurationError("an Image needs exactly one of path=, data= or pil=; "
                                     "use Image.from_path, Image.from_bytes or Image.from_pil")
        #: the file the image is read from (``None`` for bytes and PIL images)
        self.path: Path | None = Path(path) if path is not None else None
        self._data = data
        self._pil = pil
        #: what messages call this image: its path, or the name given, or "<image bytes>"
        self.name: str = name or (str(path) if path is not None else
                                  "<image bytes>" if data is not None else "<PIL image>")
        self._key: bytes | None = None
        self._size: tuple[int, int] | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Image:
        """The image in the file at ``path`` (read when needed, not now)."""
        return cls(path=path)

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str | None = None) -> Image:
        """The image encoded in ``data`` (JPEG, PNG, WebP... anything Pillow reads); ``name`` is for messages."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInputError(f"Image.from_bytes takes bytes, not {type(data).__name__}")
        return cls(data=bytes(data), name=name)

    @classmethod
    def from_pil(cls, image: Any, *, name: str | None = None) -> Image:
        """An image already decoded by Pillow (kept as given; EXIF orientation is still applied)."""
        pil = _pil()
        if not isinstance(image, pil.Image.Image):
            raise InvalidInputError(f"Image.from_pil takes a PIL.Image.Image, not {type(image).__name__}")
        return cls(pil=image, name=name)

    def __repr__(self) -> str:
        return f"Image({self.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "data": self._data, "pil": self._pil, "name": self.name, "key": self._key,
                "size": self._size}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._data, self._pil, self.name = state["path"], state["data"], state["pil"], state["name"]
        self._key, self._size = state["key"], state["size"]
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ decoding
    def _open(self) -> Any:
        """A Pillow image, not yet decoded (a lazy file), or the PIL image given."""
        pil = _pil()
        if self._pil is not None:
            return self._pil
        try:
            if self.path is not None:
                return pil.Image.open(self.path)
            assert self._data is not None
            return pil.Image.open(io.BytesIO(self._data))
        except FileNotFoundError:
            raise InvalidInputError(f"image {self.name}: no such file") from None
        except (OSError, ValueError, pil.Image.DecompressionBombError) as exc:
            raise InvalidInputError(f"image {self.name} cannot be read as an image ({exc})") from None

    def load(self, min_side: int | None = None) -> Any:
        """The image decoded, EXIF-oriented and in RGB, as a ``PIL.Image.Image`` (blocking: call it in a thread).

        ``min_side``: the model will shrink the image until its short side is this long, so
        a JPEG may be decoded at a reduced scale (libjpeg's DCT scaling), which is several
        times faster than decoding every pixel; the result is never smaller than that.
        """
        pil = _pil()
        img = self._open()
        try:
            if min_side and img is not self._pil and getattr(img, "format", None) == "JPEG":
                w, h = img.size
                scale = min_side / max(1, min(w, h))
                if scale < 1:
                    # draft() keeps both sides >= the size asked for; ask for what keeps the short side >= min_side.
                    img.draft("RGB", (max(1, int(w * scale) + 1), max(1, int(h * scale) + 1)))
            out = pil.ImageOps.exif_transpose(img)  # a new image: the file can be closed
            out = out.convert("RGB") if out.mode != "RGB" else out
            out.load()
            return out
        except (OSError, ValueError, SyntaxError, pil.Image.DecompressionBombError) as exc:
            raise InvalidInputError(f"image {self.name} cannot be decoded ({exc})") from None
        finally:
            if img is not self._pil:
                img.close()

    def content_key(self) -> bytes:
        """SHA-256 of the pixels after EXIF orientation (computed once; decodes the whole image the first time)."""
        key = self._key
        if key is not None:
            return key
        with self._lock:
            if self._key is None:
                pil = _pil()
                img = self._open()
                try:
                    oriented = pil.ImageOps.exif_transpose(img)
                    oriented.load()
                    h = hashlib.sha256()
                    h.update(f"{oriented.mode}:{oriented.size[0]}x{oriented.size[1]}:".encode())
                    h.update(oriented.tobytes())
                except (OSError, ValueError, SyntaxError, pil.Image.DecompressionBombError) as exc:
                    raise InvalidInputError(f"image {self.name} cannot be decoded ({exc})") from None
                finally:
                    if img is not self._pil:
                        img.close()
                self._size = oriented.size
                self._key = h.digest()
            return self._key

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) after EXIF orientation (decodes the image once if its key is not known yet)."""
        if self._size is None:
            self.content_key()
        assert self._size is not None
        return self._size

    def metadata(self) -> dict[str, Any]:
        """What an index keeps of the image instead of its pixels: its location and size."""
        width, height = self.size
        meta: dict[str, Any] = {"kind": IMAGE, "width": width, "height": height}
        if self.path is not None:
            meta["image_path"] = str(self.path)
        elif self.name:
            meta["image_name"] = self.name
        return meta


def as_image(value: Any) -> Image:
    """``value`` as an :class:`Image`: an Image, a file path, encoded bytes, a binary file object
    (``BytesIO``: LlamaIndex's ``ImageType``) or a ``PIL.Image.Image``. Framework adapters use this."""
    if isinstance(value, Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        return Image.from_path(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return Image.from_bytes(bytes(value))
    getvalue = getattr(value, "getvalue", None)
    if callable(getvalue):
        return Image.from_bytes(getvalue(), name=getattr(value, "name", None))
    read = getattr(value, "read", None)
    if callable(read):
        return Image.from_bytes(read(), name=getattr(value, "name", None))
    pil = _pil()
    if isinstance(value, pil.Image.Image):
        return Image.from_pil(value)
    raise InvalidInputError(f"cannot read {type(value).__name__} as an image: pass a path, bytes, a binary file "
                            "or a PIL image")


class Audio:
    """A recording to transcribe and embed: :meth:`from_path` or :meth:`from_bytes` (``format=`` its container).

    Its :meth:`content_key` is a SHA-256 of the bytes (read in chunks, once), so a re-run with the
    same file finds its transcript in the cache. A pipeline embeds audio when it has an
    ``audio_to_text`` model (see :class:`~embedpipe.EmbeddingPipeline`).
    """

    kind = AUDIO
    __slots__ = ("_data", "_key", "format", "name", "path")

    def __init__(self, *, path: str | os.PathLike[str] | None = None, data: bytes | None = None,
                 format: str | None = None, name: str | None = None) -> None:
        if (path is None) == (data is None):
            raise ConfigurationError("an Audio needs exactly one of path= or data=; use Audio.from_path or "
                                     "Audio.from_bytes")
        #: the file the audio is read from (``None`` for bytes)
        self.path: Path | None = Path(path) if path is not None else None
        self._data = data
        #: the container ("wav", "mp3", ...): from ``format=`` or the file's suffix
        self.format: str = (format or (self.path.suffix.lstrip(".") if self.path is not None else "")).lower()
        #: what messages call this recording
        self.name: str = name or (str(path) if path is not None else f"<{self.format or 'audio'} bytes>")
        self._key: bytes | None = None

    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Audio:
        """The recording in the file at ``path`` (read when needed, not now)."""
        return cls(path=path)

    @classmethod
    def from_bytes(cls, data: bytes, *, format: str, name: str | None = None) -> Audio:
        """The recording encoded in ``data``; ``format`` names its container (``"wav"``, ``"mp3"``, ...)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInputError(f"Audio.from_bytes takes bytes, not {type(data).__name__}")
        if not format:
            raise ConfigurationError("Audio.from_bytes needs format= (e.g. 'wav', 'mp3')")
        return cls(data=bytes(data), format=format, name=name)

    def __repr__(self) -> str:
        return f"Audio({self.name!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "data": self._data, "format": self.format, "name": self.name, "key": self._key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self._data, self.format = state["path"], state["data"], state["format"]
        self.name, self._key = state["name"], state["key"]

    def read(self) -> bytes:
        """The encoded bytes (blocking)."""
        if self._data is not None:
            return self._data
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            raise InvalidInputError(f"audio {self.name}: no such file") from None
        except OSError as exc:
            raise InvalidInputError(f"audio {self.name} cannot be read ({exc})") from None

    def content_key(self) -> bytes:
        """SHA-256 of the encoded bytes (computed once)."""
        if self._key is None:
            if self._data is not None:
                self._key = hashlib.sha256(self._data).digest()
            else:
                assert self.path is not None
                h = hashlib.sha256()
                try:
                    with open(self.path, "rb") as f:
                        while chunk := f.read(_READ_CHUNK):
                            h.update(chunk)
                except FileNotFoundError:
                    raise InvalidInputError(f"audio {self.name}: no such file") from None
                except OSError as exc:
                    raise InvalidInputError(f"audio {self.name} cannot be read ({exc})") from None
                self._key = h.digest()
        return self._key


__all__ = ["AUDIO", "AUDIO_SUFFIXES", "IMAGE", "IMAGE_SUFFIXES", "TEXT", "Audio", "Image", "Input", "Item",
           "as_image", "kind_of"]
