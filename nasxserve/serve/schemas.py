"""Request, error and Open Inference Protocol shapes of the HTTP API (docs/design.md, "Serving"); the OpenAPI
document is built from these and from the answers of /predict and /explain, which are contracts of their own
(:mod:`nasxserve.contracts`, with a published JSON Schema)."""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, Field, StrictFloat, StrictInt


class ErrorResponse(BaseModel):
    error: str
    detail: str


class Base64Image(BaseModel):
    """For clients that can send neither multipart nor a raw body."""

    image: str = Field(description="the encoded image file as base64, or a data: URI")


class InferTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list


class InferInputTensor(BaseModel):
    name: str = Field(max_length=256)
    shape: list[StrictInt] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    data: list[Union[StrictFloat, StrictInt]] = Field(
        description="the values, flattened in row-major order: numbers only (no strings, booleans or nulls)")


class InferRequestOutput(BaseModel):
    name: str = Field(max_length=256)


class InferRequest(BaseModel):
    """Open Inference Protocol (KServe v2) tensor request."""

    id: Optional[str] = Field(None, max_length=256)
    inputs: list[InferInputTensor] = Field(max_length=4)
    outputs: Optional[list[InferRequestOutput]] = Field(None, max_length=16)


class InferResponse(BaseModel):
    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = None
    outputs: list[InferTensor]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
