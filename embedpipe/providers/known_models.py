"""What embedpipe knows of the framework embedding classes it wraps: OpenAI's, in LangChain and LlamaIndex.

A wrapped ``OpenAIEmbeddings`` (LangChain) or ``OpenAIEmbedding`` (LlamaIndex) gets what
``openai:<model>`` gets: the model's price (so ``cost_usd`` and ``budget_usd`` work), its
input limit and tokenizer (so long texts are split, not sent whole to fail with a 400), and
its native dimensions. The Azure classes subclass these in both frameworks and are
recognised with them.

Classes are matched by module and name along the MRO, so the core never imports a framework.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from embedpipe.cost import OPENAI_MODELS, ModelInfo

log = logging.getLogger("embedpipe")

OPENAI_API_HOST = "api.openai.com"


@dataclass(frozen=True)
class _Family:
    """One framework's OpenAI embedding class, and where its settings live."""

    package: str                #: top-level package the class is defined in
    name: str                   #: class name; subclasses (the Azure classes) match too
    model_attr: str             #: field holding the OpenAI model name
    url_attrs: tuple[str, ...]  #: fields that may hold the API's URL, first set wins
    #: LangChain's own length check (flag, limit, whether tiktoken does it, tiktoken model name)
    length_check: tuple[str, str, str, str] | None = None


_FAMILIES = (
    # Azure's prices for these models are OpenAI's list prices (Azure OpenAI pay-as-you-go,
    # https://embeddingcost.com/azure-openai, checked 2026-12-02), so one table serves both.
    _Family("langchain_openai", "OpenAIEmbeddings", "model", ("azure_endpoint", "openai_api_base"),
            ("check_embedding_ctx_length", "embedding_ctx_length", "tiktoken_enabled", "tiktoken_model_name")),
    _Family("llama_index", "OpenAIEmbedding", "model_name", ("azure_endpoint", "api_base")),
)


@dataclass(frozen=True)
class KnownModel:
    """The facts embedpipe uses for a wrapped model it recognises."""

    model: str
    #: OpenAI's published facts, when the model is one of theirs (``None``: a self-hosted name)
    info: ModelInfo | None
    #: longest input; texts over it are split (``on_long_input``)
    max_input_tokens: int | None
    #: the tiktoken encoding that counts and splits its inputs
    encoding: str
    #: host names the wrapped object sends its API requests to
    api_hosts: frozenset[str]
    #: an Azure class: its model name labels a deployment, which decides the output width
    azure: bool = False

    @property
    def price_per_1m_tokens(self) -> float | None:
        """USD per million tokens, ``None`` for a model OpenAI does not list."""
        return self.info.price_per_1m_tokens if self.info is not None else None

    @property
    def dimensions(self) -> int | None:
        """The model's native output length, if known (for Azure, learned from the first answer)."""
        return self.info.dimensions if self.info is not None and not self.azure else None


def _family(obj: Any) -> _Family | None:
    for cls in type(obj).__mro__:
        package = cls.__module__.split(".")[0]
        for family in _FAMILIES:
            if cls.__name__ == family.name and package == family.package:
                return family
    return None


def api_hosts_of(obj: Any, *url_attrs: str) -> frozenset[str]:
    """The hosts ``obj`` sends API requests to: its SDK client's base URL and its URL settings."""
    urls: list[object] = []
    # An openai SDK client already built (LangChain keeps ``client.embeddings`` resources whose
    # client is ``_client``) knows the final URL, Azure endpoints and environment included.
    for attr in ("client", "async_client", "_client", "_aclient"):
        target = getattr(obj, attr, None)
        owner = getattr(target, "_client", target)
        urls.append(getattr(owner, "base_url", None))
    urls.extend(getattr(obj, attr, None) for attr in url_attrs)
    hosts = set()
    for url in urls:
        if url is None or not str(url):
            continue
        try:
            host = urlsplit(str(url)).hostname
        except ValueError:  # not a URL after all
            continue
        if host:
            hosts.add(host)
    return frozenset(hosts)


def adopt(obj: Any) -> KnownModel | None:
    """Recognise ``obj`` and take over what embedpipe now does for it; ``None`` if it is not known.

    LangChain's ``OpenAIEmbeddings`` tokenises every text with tiktoken, which downloads its
    ranks on first use (and fails offline), to cut texts over ``embedding_ctx_length``.
    embedpipe splits those texts itself, with its bundled ranks and that same limit, so the
    wrapped object's check is switched off (``check_embedding_ctx_length = False``), as its
    retries are. With ``tiktoken_enabled=False`` it counts with a Hugging Face tokenizer
    embedpipe cannot match, and keeps its check.
    """
    family = _family(obj)
    if family is None:
        return None
    from embedpipe.tokens import encoding_name_for_model

    model: object = getattr(obj, family.model_attr, None)
    model = getattr(model, "value", model)  # LlamaIndex may hold an Enum member
    if not isinstance(model, str) or not model:
        return None
    info = OPENAI_MODELS.get(model)
    limit = info.max_input_tokens if info is not None else None
    encoding = info.encoding if info is not None else encoding_name_for_model(model)
    if family.length_check is not None:
        flag, ctx_attr, tiktoken_attr, tiktoken_model_attr = family.length_check
        ctx = getattr(obj, ctx_attr, None)
        # Its limit and tokenizer apply whether or not its check is on (or was switched off by
        # an earlier wrap of the same object).
        if isinstance(ctx, int) and ctx > 0:
            limit = min(limit, ctx) if limit is not None else ctx
        tokenizer_model = getattr(obj, tiktoken_model_attr, None)
        if isinstance(tokenizer_model, str) and tokenizer_model:
            encoding = encoding_name_for_model(tokenizer_model)
        if getattr(obj, flag, False) and getattr(obj, tiktoken_attr, False):
            try:
                setattr(obj, flag, False)
            except Exception:  # a frozen model keeps its check (and needs tiktoken's download)
                log.warning("embedpipe: could not set %s.%s = False; it will tokenise with tiktoken "
                            "itself, which downloads its ranks", type(obj).__name__, flag)
    hosts = api_hosts_of(obj, *family.url_attrs) or frozenset({OPENAI_API_HOST})
    azure = any(cls.__name__.startswith("Azure") for cls in type(obj).__mro__)
    return KnownModel(model=model, info=info, max_input_tokens=limit, encoding=encoding, api_hosts=hosts,
                      azure=azure)
