"""OpenAI's embeddings schema, as the service accepts and answers it (and documents it in ``/openapi.json``)."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

__all__ = ["EmbeddingItem", "EmbeddingRequest", "EmbeddingResponse", "ErrorBody", "ErrorResponse", "Usage"]

# Token arrays are what LangChain's OpenAIEmbeddings sends when it checks context lengths.
# Validation beyond the types is the service's own (its 400s name the offending input); the schema
# states the same limits for clients and schema-driven tests.
_TEXT = {"type": "string", "minLength": 1}
_TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100255}, "minItems": 1,
           "maxItems": 8192}
INPUT_SCHEMA = {"anyOf": [
    _TEXT,
    {"type": "array", "items": _TEXT, "minItems": 1, "maxItems": 2048},
    _TOKENS,
    {"type": "array", "items": _TOKENS, "minItems": 1, "maxItems": 2048},
], "description": "A string, a list of strings, a token array or a list of token arrays (cl100k ids)."}
InputValue = Annotated[
    Union[str, list[str], list[int], list[list[int]]],  # noqa: UP007 - pydantic reads it at runtime on 3.10
    WithJsonSchema(INPUT_SCHEMA),
]


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings``: OpenAI's request body."""

    model_config = ConfigDict(extra="ignore")

    input: InputValue
    model: str = Field(description="A model name the service is configured with.")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, description="Matryoshka output dimensions.")
    user: str | None = None


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: Union[list[float], str]  # noqa: UP007 - a str is base64 of little-endian float32


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens billed upstream for this request (0 when all were cached).")
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope."""

    error: ErrorBody
