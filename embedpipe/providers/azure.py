"""Azure OpenAI deployments through openai's ``AsyncAzureOpenAI``; requests and answers are OpenAI's."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from embedpipe.cost import OPENAI_MODELS
from embedpipe.errors import ConfigurationError
from embedpipe.providers.base import Provider, ProviderInfo
from embedpipe.providers.openai import OpenAIProvider, normalize_base_url


class AzureOpenAIProvider(OpenAIProvider):
    """``azure:<deployment>``: an Azure OpenAI embeddings deployment.

    ``azure_endpoint`` (or its alias ``base_url``, or ``$AZURE_OPENAI_ENDPOINT``) is the resource URL
    (``https://NAME.openai.azure.com``) that ``/openai/deployments/<deployment>/embeddings`` hangs from.
    ``api_version`` falls back to ``$OPENAI_API_VERSION``. Authentication is the ``api-key`` header (``api_key`` or
    ``$AZURE_OPENAI_API_KEY``) or an Entra ID ``azure_ad_token_provider``. ``model`` names the
    OpenAI model the deployment serves, for its limits and price; by default the deployment's
    own name when it is one (``azure:text-embedding-3-small``), else unknown (price ``None``).
    Errors, retry hints, usage and decoding are the OpenAI provider's.
    """

    name = "azure"
    # Azure's documented input limit: 2048 inputs per request for text-embedding-3 and ada-002 v2
    # (https://learn.microsoft.com/azure/ai-foundry/openai/reference, as of 2026-12-02); the same
    # 300,000 tokens per request as OpenAI's API.
    info = ProviderInfo(batch_size=2048, max_batch_size=2048,
                        max_batch_tokens=300_000, default_concurrency=8, handles_dimensions=True)

    def __init__(self, deployment: str, *, model: str | None = None, dimensions: int | None = None,
                 api_key: str | None = None, base_url: str | None = None, azure_endpoint: str | None = None,
                 api_version: str | None = None, azure_ad_token_provider: Callable[[], str] | None = None,
                 timeout: float | None = 60.0, max_input_tokens: int | None = None,
                 default_headers: Mapping[str, str] | None = None) -> None:
        try:
            import openai  # noqa: F401
        except ImportError:
            raise ConfigurationError("the Azure provider needs the openai SDK: pip install 'embedpipe[azure]'") \
                from None
        self.api_version = api_version or os.environ.get("OPENAI_API_VERSION")
        if not self.api_version:
            raise ConfigurationError("Azure OpenAI needs an API version: pass api_version= (e.g. '2024-10-21') "
                                     "or set OPENAI_API_VERSION")
        if azure_endpoint and base_url and normalize_base_url(azure_endpoint) != normalize_base_url(base_url):
            raise ConfigurationError("pass azure_endpoint= or base_url= (the same resource URL), not both")
        endpoint = azure_endpoint or base_url or os.environ.get("AZURE_OPENAI_ENDPOINT")
        if not endpoint:
            raise ConfigurationError("Azure OpenAI needs the resource URL: pass azure_endpoint= "
                                     "(https://NAME.openai.azure.com) or set AZURE_OPENAI_ENDPOINT")
        key = api_key or (None if azure_ad_token_provider else os.environ.get("AZURE_OPENAI_API_KEY"))
        if not key and azure_ad_token_provider is None:
            raise ConfigurationError("no Azure OpenAI credentials: pass api_key= (or set AZURE_OPENAI_API_KEY) "
                                     "or azure_ad_token_provider=")
        self.azure_endpoint = normalize_base_url(endpoint)
        self.base_url = self.azure_endpoint
        self.official = False
        self._api_key = key or ""  # the SDK takes the token provider when the key is empty
        self.azure_ad_token_provider = azure_ad_token_provider
        self.deployment = deployment
        self.model_name = model or (deployment if deployment in OPENAI_MODELS else None)
        info = OPENAI_MODELS.get(self.model_name or "")
        self.model_info = info
        if dimensions is not None and info is not None:
            if not info.matryoshka:
                raise ConfigurationError(f"{self.model_name} does not support dimensions=; only text-embedding-3 "
                                         "models do")
            if dimensions > info.dimensions:
                raise ConfigurationError(f"dimensions={dimensions} exceeds {self.model_name}'s {info.dimensions}")
        # The spec's model is the deployment: the SDK puts it in the URL path.
        Provider.__init__(self, deployment, info=replace(
            self.info, dimensions=dimensions if dimensions is not None else (info.dimensions if info else None),
            max_input_tokens=max_input_tokens or (info.max_input_tokens if info else None),
            price_per_1m_units=info.price_per_1m_tokens if info else None))
        self.requested_dimensions = dimensions
        self.encoding = info.encoding if info else "cl100k_base"
        self.timeout = timeout
        self.organization = None
        self.default_headers = dict(default_headers or {})
        self._client = None

    def identity(self) -> dict[str, Any]:
        # The deployment (in the spec) and resource URL name the vector space; the API version does not.
        return {"base_url": self.base_url, "model": self.model_name}

    def batch_client(self) -> Any:
        """A sync ``AzureOpenAI`` client for the Batch API (``/openai/files``, ``/openai/batches``)."""
        import openai

        return openai.AzureOpenAI(
            api_key=self._api_key or None, azure_ad_token_provider=self.azure_ad_token_provider,
            api_version=self.api_version, max_retries=3, timeout=self.timeout,
            default_headers=self.default_headers or None, azure_endpoint=self.azure_endpoint)

    def _get_client(self) -> Any:
        if self._client is None:
            import openai

            # max_retries=0: embedpipe retries (tenacity); two layers would multiply the waits.
            self._client = openai.AsyncAzureOpenAI(
                api_key=self._api_key or None, azure_ad_token_provider=self.azure_ad_token_provider,
                api_version=self.api_version, max_retries=0, timeout=self.timeout,
                default_headers=self.default_headers or None, azure_endpoint=self.azure_endpoint)
        return self._client
