"""Request and response shapes of the HTTP API (docs/design.md, "Serving"); the OpenAPI document is built
from these. Explanations follow the spirit of KServe / Alibi explain responses."""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, Field, StrictFloat, StrictInt


class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="nasx version that exported the bundle")
    sha256: str = Field(description="sha256 of model.onnx")


class ClassScore(BaseModel):
    class_id: int
    label: str
    score: float = Field(description="softmax probability")
    logit: float


class PredictResponse(BaseModel):
    model: ModelInfo
    image: dict[str, int] = Field(description="width and height of the image as received")
    predictions: list[ClassScore]
    warnings: list[str] = Field(default_factory=list,
                                description="why the image looks unlike the training images, e.g. inverted "
                                            "polarity (then the prediction means little); usually empty")


class PrototypeSource(BaseModel):
    sample: int = Field(description="index of the source image in the training split")
    box_xyxy: list[int] = Field(description="box of the prototype in its source image, x1/y1 exclusive")
    patch_url: str
    context_url: str


class Evidence(BaseModel):
    prototype_id: int
    duplicates: list[int] = Field(default_factory=list,
                                  description="other prototypes projected onto the same training patch (the same "
                                              "vector); weight and contribution are the group's sums")
    class_id: int = Field(description="the prototype's own class")
    label: str
    similarity: float
    weight: float = Field(description="last-layer weight from this prototype to the target class")
    contribution: float = Field(description="weight x similarity")
    box_xyxy: list[int] = Field(description="the best match in the caller's image pixels, x1/y1 exclusive")
    heatmap: Optional[str] = Field(None, description="PNG of the similarity map, base64 (heatmap=true)")
    source: PrototypeSource


class ExplanationMeta(BaseModel):
    method: str = "prototype"
    similarity: str = "log"
    box_rule: str


class ExplanationData(BaseModel):
    target_class_id: int
    label: str
    logit: float
    evidence_sum: float = Field(description="sum of all prototypes' contributions; equals the logit (no bias)")
    own_class_share: Optional[float] = Field(
        None, description="share of the absolute contributions carried by the target class's own prototypes")
    top_prototypes: list[Evidence]


class Explanation(BaseModel):
    meta: ExplanationMeta
    data: ExplanationData


class ExplainResponse(PredictResponse):
    explanations: list[Explanation]


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
