"""Amazon Bedrock's ``InvokeModel`` for Titan and Cohere embedding models, through ``boto3``."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

from embedpipe.cost import price_of
from embedpipe.errors import ConfigurationError, EmbedPipeError, InvalidResponseError, ProviderError
from embedpipe.providers.base import BUG_EXCEPTIONS, BatchResult, Provider, ProviderInfo, Role
from embedpipe.providers.cohere import ROLE_INPUT_TYPES, TRUNCATE_MODES, CohereInputType
from embedpipe.providers.http_status import error_from_status, lower_headers
from embedpipe.providers.openai import normalize_base_url
from embedpipe.providers.quantized import QuantizedBatchResult
from embedpipe.quantize import OutputDtype, check_output_dtype, from_native, quantize

Family = Literal["titan", "cohere"]
#: the header Bedrock reports billed input tokens in
TOKEN_HEADER = "x-amzn-bedrock-input-token-count"


@dataclass(frozen=True)
class BedrockModel:
    """What embedpipe knows of one Bedrock embedding model."""

    family: Family
    dimensions: int
    max_input_tokens: int
    output_dimensions: tuple[int, ...] = ()


# Limits from the Bedrock model parameter pages
# (https://docs.aws.amazon.com/bedrock/latest/userguide/model-parameters-titan-embed-text.html and
# .../model-parameters-embed.html, as of 2026-12-02): Titan v2 takes one text of up to 8,192 tokens and
# returns 1024, 512 or 256 dims; Cohere Embed v3 takes up to 96 texts of 512 tokens each.
BEDROCK_MODELS: dict[str, BedrockModel] = {
    "amazon.titan-embed-text-v2:0": BedrockModel("titan", 1024, 8192, (256, 512, 1024)),
    "cohere.embed-english-v3": BedrockModel("cohere", 1024, 512),
    "cohere.embed-multilingual-v3": BedrockModel("cohere", 1024, 512),
}
#: Titan answers one text per call; Cohere up to 96
_BATCH = {"titan": 1, "cohere": 96}
#: Bedrock error codes and what they mean for a retry (status, retryable)
_CODES = {"ThrottlingException": (429, True), "ModelNotReadyException": (429, True),
          "ModelTimeoutException": (408, True), "ServiceUnavailableException": (503, True),
          "InternalServerException": (500, True), "ModelErrorException": (424, False),
          "AccessDeniedException": (403, False), "ResourceNotFoundException": (404, False),
          "ServiceQuotaExceededException": (400, False), "ValidationException": (400, False)}


def family_of(model_id: str) -> Family:
    """Which request body ``model_id`` takes, from its id (a cross-region prefix such as ``us.`` allowed)."""
    base = model_id.split(".", 1)[1] if model_id.split(".", 1)[0] in ("us", "eu", "apac", "global") else model_id
    if base.startswith("amazon.titan-embed-text"):
        return "titan"
    if base.startswith("cohere.embed"):
        return "cohere"
    raise ConfigurationError(f"bedrock:{model_id}: embedpipe speaks the Titan text (amazon.titan-embed-text-*) "
                             "and Cohere (cohere.embed-*) embedding bodies")


def map_bedrock_error(exc: BaseException) -> EmbedPipeError:
    """Classify a botocore exception: the one place where Bedrock's errors become embedpipe's."""
    from botocore import exceptions as bx

    if isinstance(exc, EmbedPipeError):
        return exc
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code = str(err.get("Code", ""))
        message = f"{code}: {err.get('Message', exc)}"
        status, retryable = _CODES.get(code, (int(meta.get("HTTPStatusCode") or 0), None))
        headers = lower_headers(meta.get("HTTPHeaders"))
        low = message.lower()
        # A wrong parameter fails every input alike; a quota needs a human.
        whole = code in ("ServiceQuotaExceededException", "AccessDeniedException", "ResourceNotFoundException") \
            or (code == "ValidationException" and any(w in low for w in ("dimensions", "embeddingtypes",
                                                                          "model identifier", "malformed")))
        if status:
            return error_from_status(status, message, headers, retryable=retryable, request_level=whole or None)
        return ProviderError(message, retryable=bool(retryable), request_level=whole, headers=headers)
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.NoRegionError)):
        return ProviderError(f"AWS credentials or region missing: {exc}", retryable=False, request_level=True)
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return ProviderError(f"request timed out: {exc}", retryable=True)
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError, bx.HTTPClientError)):
        return ProviderError(f"connection failed: {exc}", retryable=True)
    return ProviderError(f"{type(exc).__name__}: {exc}", retryable=False)


class BedrockProvider(Provider):
    """``bedrock:<model id>``: Titan text or Cohere embeddings through Bedrock's ``InvokeModel``.

    Region and credentials come from boto3's chain (``region=``/``$AWS_REGION``, ``profile=``, keys,
    SSO, instance roles, ``$AWS_BEARER_TOKEN_BEDROCK``); ``api_key=`` is a Bedrock API key sent as a
    bearer token. ``base_url`` (alias ``endpoint_url``) points at a VPC endpoint or a test server.
    Titan: one text per call, so requests go out concurrently rather than batched; ``dimensions``
    (256/512/1024) and ``normalize`` (default True) enter the body; ``output_dtype`` binary/ubinary is
    asked of Titan natively (``embeddingTypes``), int8/uint8 are not (Titan answers floats, for the
    engine to quantize: see :attr:`native_output_dtypes`). Cohere: ``input_type`` from the role, ``truncate``,
    and every ``output_dtype`` natively (``embedding_types``).
    """

    name = "bedrock"
    info = ProviderInfo(batch_size=1, default_concurrency=8)

    def __init__(self, model: str, *, dimensions: int | None = None, api_key: str | None = None,
                 base_url: str | None = None, endpoint_url: str | None = None, region: str | None = None,
                 profile: str | None = None, timeout: float | None = 60.0, normalize: bool = True,
                 input_type: CohereInputType | None = None, truncate: str = "END",
                 output_dtype: OutputDtype = "float32", aws_access_key_id: str | None = None,
                 aws_secret_access_key: str | None = None, aws_session_token: str | None = None,
                 max_input_tokens: int | None = None) -> None:
        try:
            import boto3
        except ImportError:
            raise ConfigurationError("the Bedrock provider needs boto3: pip install 'embedpipe[bedrock]'") from None
        self.family: Family = family_of(model)
        known = BEDROCK_MODELS.get(model)
        self.output_dtype = check_output_dtype(output_dtype)
        if self.family == "titan":
            if input_type is not None:
                raise ConfigurationError("input_type= is a Cohere option; Titan embeds queries and documents alike")
            if dimensions is not None and known is not None and dimensions not in known.output_dimensions:
                raise ConfigurationError(f"dimensions={dimensions} for {model}: use one of {known.output_dimensions}")
        elif dimensions is not None:
            raise ConfigurationError(f"{model} does not take dimensions=")
        if truncate not in TRUNCATE_MODES:
            raise ConfigurationError(f"truncate={truncate!r}: use one of {TRUNCATE_MODES}")
        url = endpoint_url or base_url
        self.endpoint_url = normalize_base_url(url) if url else None
        session = boto3.Session(profile_name=profile, region_name=region, aws_access_key_id=aws_access_key_id,
                                aws_secret_access_key=aws_secret_access_key, aws_session_token=aws_session_token)
        self.region = session.region_name or ("us-east-1" if self.endpoint_url else None)
        if self.region is None:
            raise ConfigurationError("no AWS region for Bedrock: pass region= or set AWS_REGION "
                                     "(or a profile's region)")
        self._session = session
        self._api_key = api_key
        self.normalize = bool(normalize)
        self.input_type = input_type
        self.truncate = truncate
        self.requested_dimensions = dimensions
        self.timeout = timeout
        super().__init__(model, info=replace(
            self.info, batch_size=_BATCH[self.family], role_sensitive=self.family == "cohere" and input_type is None,
            handles_dimensions=self.family == "titan",
            dimensions=dimensions or (known.dimensions if known else None),
            max_input_tokens=max_input_tokens or (known.max_input_tokens if known else None),
            price_per_1m_units=price_of("bedrock", model)))
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def native_output_dtypes(self) -> frozenset[str]:
        """Output types this model returns itself."""
        if self.family == "titan":
            return frozenset({"binary", "ubinary"})
        return frozenset({"int8", "uint8", "binary", "ubinary"})

    def identity(self) -> dict[str, Any]:
        # The region is not part of it: one model id serves the same vectors in every region.
        ident: dict[str, Any] = {"endpoint_url": self.endpoint_url}
        if self.family == "titan":
            ident["normalize"] = self.normalize
        else:
            ident["truncate"] = self.truncate
            if self.input_type is not None:
                ident["input_type"] = self.input_type
        if self.output_dtype in self.native_output_dtypes:
            ident["embedding_type"] = self.output_dtype
        return ident

    def _get_client(self) -> Any:
        with self._lock:  # the engine calls from several worker threads; a boto3 Session is not thread-safe
            if self._client is None:
                from botocore import UNSIGNED
                from botocore.config import Config

                # total_max_attempts=1: embedpipe retries (tenacity); two layers would multiply the waits.
                config = Config(read_timeout=self.timeout or 60, connect_timeout=min(self.timeout or 10, 10),
                                retries={"total_max_attempts": 1}, max_pool_connections=32,
                                signature_version=UNSIGNED if self._api_key else None)
                client = self._session.client("bedrock-runtime", region_name=self.region,
                                              endpoint_url=self.endpoint_url, config=config)
                if self._api_key:
                    key = self._api_key

                    def bearer(request: Any, **_: Any) -> None:
                        request.headers["Authorization"] = f"Bearer {key}"

                    client.meta.events.register("before-send.bedrock-runtime.InvokeModel", bearer)
                self._client = client
            return self._client

    def map_error(self, exc: Exception) -> EmbedPipeError:
        return map_bedrock_error(exc)

    def body_for(self, texts: list[str], role: Role) -> dict[str, Any]:
        """The InvokeModel JSON body for ``texts`` (one text for Titan)."""
        if self.family == "titan":
            body: dict[str, Any] = {"inputText": texts[0], "normalize": self.normalize}
            if self.requested_dimensions is not None:
                body["dimensions"] = self.requested_dimensions
            if self.output_dtype in ("binary", "ubinary"):
                body["embeddingTypes"] = ["binary"]
            return body
        kind = "float" if self.output_dtype == "float32" else self.output_dtype
        return {"texts": texts, "input_type": self.input_type or ROLE_INPUT_TYPES[role],
                "truncate": self.truncate, "embedding_types": [kind]}

    def embed_batch(self, texts: list[str], role: Role) -> BatchResult:
        if len(texts) > self.info.batch_size:
            raise ConfigurationError(f"{self.model} embeds at most {self.info.batch_size} text(s) per call, "
                                     f"got {len(texts)}")
        try:
            response = self._get_client().invoke_model(
                modelId=self.model, body=json.dumps(self.body_for(texts, role)),
                contentType="application/json", accept="application/json")
            payload = json.loads(response["body"].read())
        except BUG_EXCEPTIONS:
            raise
        except json.JSONDecodeError as exc:
            raise InvalidResponseError(f"Bedrock answered with a body that is not JSON: {exc}") from None
        except Exception as exc:
            raise map_bedrock_error(exc) from exc
        headers = lower_headers(response.get("ResponseMetadata", {}).get("HTTPHeaders"))
        tokens = _tokens(payload, headers)
        if self.family == "titan":
            return self._titan(payload, tokens, headers)
        return self._cohere(payload, len(texts), tokens, headers)

    def _titan(self, payload: Any, tokens: int | None, headers: dict[str, str]) -> BatchResult:
        if self.output_dtype in ("binary", "ubinary"):
            bits = (payload.get("embeddingsByType") or {}).get("binary")
            if not isinstance(bits, list) or any(b not in (0, 1) for b in bits):
                raise InvalidResponseError("Titan's embeddingsByType.binary is missing or not 0/1 values")
            # Titan sends one 0/1 value per dimension; packing them is our sign quantization of its bits.
            q = quantize(np.asarray([bits], dtype=np.float32), self.output_dtype)
            return QuantizedBatchResult.of(q, tokens, headers)
        vec = payload.get("embedding") if isinstance(payload, dict) else None
        if not isinstance(vec, list) or not vec:
            raise InvalidResponseError("Titan's answer holds no 'embedding'")
        return BatchResult(np.asarray([vec], dtype=np.float32), tokens=tokens, headers=headers)

    def _cohere(self, payload: Any, n: int, tokens: int | None, headers: dict[str, str]) -> BatchResult:
        kind = "float" if self.output_dtype == "float32" else self.output_dtype
        emb = payload.get("embeddings") if isinstance(payload, dict) else None
        rows = emb.get(kind) if isinstance(emb, dict) else (emb if kind == "float" else None)
        if not isinstance(rows, list) or len(rows) != n:
            raise InvalidResponseError(f"Cohere on Bedrock returned {len(rows) if isinstance(rows, list) else 0} "
                                       f"{kind} embeddings for {n} texts")
        if kind == "float":
            try:
                return BatchResult(np.asarray(rows, dtype=np.float32), tokens=tokens, headers=headers)
            except ValueError as exc:
                raise InvalidResponseError(f"ragged embeddings: {exc}") from None
        return QuantizedBatchResult.of(from_native(self.output_dtype, rows, dimensions=self.info.dimensions),
                                       tokens, headers)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None
        state.pop("_lock", None)
        state.pop("_session", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import boto3

        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._session = boto3.Session(region_name=self.region)


def _tokens(payload: Any, headers: dict[str, str]) -> int | None:
    """Billed input tokens: the ``x-amzn-bedrock-input-token-count`` header, else Titan's ``inputTextTokenCount``."""
    value = headers.get(TOKEN_HEADER)
    if value is None and isinstance(payload, dict):
        value = payload.get("inputTextTokenCount")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
