"""The typed contracts between nasx's parts: what one part writes and another reads (docs/design.md, "Formats").

* :class:`Manifest`: a bundle's ``manifest.json``, written by ``nasx export`` (:class:`ManifestBody`, then sealed
  with its digest) and read by the runtime, the server and ``nasx evaluate``. Nothing in a bundle is trusted, so
  its models are strict (an integer field takes an integer, not ``"1"`` or ``1.0``) and agree with the JSON
  Schema published from them (``docs/schemas/manifest.schema.json``), with which an app that embeds the ONNX
  model can check a bundle without nasx.
* :class:`RunReport`: a finished run's ``report.json`` as export and evaluation read it, and :class:`RunSettings`
  the few settings of its ``config.yaml`` they read; both are written by the training code.
* :class:`PredictResponse` and :class:`ExplainResponse`: the answers of ``POST /predict`` and ``POST /explain``
  (``docs/schemas/explain.schema.json``).

A low layer: it imports pydantic only (never torch, never another part of nasx), so every part can use it.
Every model keeps the fields it does not know (``extra="allow"``): a dump with ``exclude_unset=True``
(:meth:`Contract.as_json`) gives back the JSON it was read from, which the bundle's digest covers.
"""
from __future__ import annotations

from typing import Any, Final, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError

FORMAT: Final = "nasx-bundle"
FORMAT_VERSION: Final = 1

# the server's routes of a prototype's PNG files, which the answers of /explain and /metadata link to
PROTOTYPE_URL = "/prototypes/{id}"
PROTOTYPE_CONTEXT_URL = "/prototypes/{id}/context"


def prototype_urls(prototype_id: int, regions: str | None = None) -> tuple[str, str]:
    """The URLs of a prototype's patch and its source image with the box, as the region rule ``regions`` draws
    them (None: the route's default, the activation box)."""
    query = "" if regions is None else f"?regions={regions}"
    return PROTOTYPE_URL.format(id=prototype_id) + query, PROTOTYPE_CONTEXT_URL.format(id=prototype_id) + query

Method = Literal["nasxnet", "protopnet"]
Head = Literal["prototype", "linear"]
ModelFormat = Literal["onnx", "torchscript", "pt2"]
BATCH: Final = "batch"          # the batch dimension of a shape


class Contract(BaseModel):
    """Base of the file contracts: unknown fields are kept, field names may be given by their alias."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def as_json(self, include: Optional[set[str]] = None) -> dict[str, Any]:
        """The JSON object this model stands for: the fields it was given (read or set), by their names on disk;
        with ``include``, only those of them."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True, include=include)


class Strict(Contract):
    """A contract read from an untrusted file: strict types, as the published JSON Schema has them."""

    model_config = ConfigDict(strict=True)


def describe(error: ValidationError, limit: int = 3) -> str:
    """A validation error as one short line: where and what, for the first ``limit`` problems."""
    problems = error.errors(include_url=False, include_input=False, include_context=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'the top level'}: {e['msg']}" for e in problems[:limit]]
    more = f" (and {len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(part[:200] for part in parts) + more


# ============================================================================================ the bundle manifest

class Brightness(Strict):
    """The spread of the training images' mean brightness (pixel / 255): an input outside it gets a warning."""

    p1: float
    median: float
    p99: float
    measured_on: str = Field(description="the split it was measured on (train)")


class InputSpec(Strict):
    """The model's input and how an image becomes it."""

    name: str = Field(description="the ONNX graph's input name (image)")
    dtype: str
    layout: str = Field(description="NCHW")
    shape: list[Union[Literal["batch"], PositiveInt]] = Field(description="[batch, channels, height, width]")
    channels: PositiveInt
    height: PositiveInt
    width: PositiveInt
    color_mode: Literal["L", "RGB"] = Field(description="the Pillow mode an image is converted to")
    resize: str
    alpha: str
    scale: str
    mean: list[float] = Field(description="per channel, of pixel / 255")
    std: list[float] = Field(description="per channel, of pixel / 255")
    normalize: str = Field(description="(pixel / 255 - mean[c]) / std[c]")
    brightness: Optional[Brightness] = Field(None, description="absent in bundles exported before nasx recorded it")


class OutputSpec(Strict):
    name: Literal["logits", "similarities", "min_distances", "best_patch", "similarity_maps"]
    dtype: Literal["float32", "int64"]
    shape: list[Union[Literal["batch"], PositiveInt]]
    meaning: Optional[str] = None


class LatentGrid(Strict):
    height: PositiveInt
    width: PositiveInt


class Similarity(Strict):
    function: str
    eps: float


class LastLayer(Strict):
    shape: list[NonNegativeInt] = Field(description="[K classes, m prototypes]")
    weight: list[list[float]] = Field(description="K rows of m: logits[k] = sum_j weight[k][j] x similarities[j]")


class ProjectionSource(Strict):
    """The training patch a prototype was projected onto."""

    split: str
    index: NonNegativeInt = Field(description="the image's index in the training images the run trained on")
    latent_position: list[NonNegativeInt] = Field(description="[row, column] in the latent grid")
    box: list[int] = Field(description="x0, y0, x1, y1 in the source image, x1 and y1 exclusive: ProtoPNet's "
                                       "activation box (box_rule)")
    evidence_box: Optional[list[int]] = Field(None, description="the same by the evidence region rule (where hiding "
                                                                "the source image's pixels lowers the similarity); "
                                                                "absent from bundles exported before it existed")
    evidence_rule_version: Optional[int] = Field(None, description="the version of the evidence rule that drew "
                                                                   "evidence_box; a reader shows the box only when it "
                                                                   "is its own version")
    distance_at_projection: float
    class_before_projection: NonNegativeInt


class PrototypeEntry(Strict):
    """One prototype of the bundle's table."""

    id: NonNegativeInt
    class_index: NonNegativeInt
    class_: str = Field(alias="class", description="the prototype's class label")
    weight: float = Field(description="its last-layer weight to its own class")
    source: ProjectionSource
    box_offset: list[int] = Field(description="(dx, dy) every activation-rule box of this prototype is moved by; "
                                              "(0, 0) unless the run calibrated its boxes")
    patch: str = Field(description="the bundle file of its source patch (PNG), activation box")
    context: str = Field(description="the bundle file of its source image with the activation box (PNG)")
    evidence_patch: Optional[str] = Field(None, description="the same by the evidence box (with evidence_box)")
    evidence_context: Optional[str] = Field(None, description="the same by the evidence box (with evidence_box)")


class TestMetrics(Strict):
    """A run's ``test`` block: accuracy of its prediction on the test split, as training measured it."""

    __test__ = False        # not a pytest test class

    acc: Optional[float] = None
    prototype_acc: Optional[float] = None
    prototype_acc_before_projection: Optional[float] = None
    prototype_acc_after_projection: Optional[float] = None
    prototype_acc_after_last_layer: Optional[float] = None
    aux_acc: Optional[float] = None
    n: Optional[int] = None


class BundleMetrics(Strict):
    test: Optional[TestMetrics]
    prototype_class_counts: dict[str, int] = Field(description="prototypes supporting each class")


class Provenance(Strict):
    """Where the bundle's model came from."""

    run_dir: str
    data: dict[str, Any] = Field(description="the dataset's name, source, split sizes and how the validation split "
                                             "was made")
    method: Method
    genotype_source: Optional[str]
    backbone_weights: Optional[str]
    wall_time_s: Optional[float]
    device: Optional[str]
    config: dict[str, Any] = Field(description="the run's config.yaml")

    @property
    def settings(self) -> RunSettings:
        """The settings of the run's configuration that nasx reads back (:class:`RunSettings`)."""
        return RunSettings.read(self.config)


class ParityAgreement(Strict):
    """How far one format's outputs were from eager PyTorch's at export (``runtime.parity.Agreement``)."""

    ok: bool
    images: NonNegativeInt
    max_abs: dict[str, float]
    worst_vs_tolerance: dict[str, float]
    top1_mismatches: NonNegativeInt
    best_patch_mismatches: NonNegativeInt
    best_patch_ties: NonNegativeInt


class ParityRuleSpec(Strict):
    """The tolerance of the parity check (``runtime.parity.ParityRule``)."""

    atol: dict[str, float]
    rtol: float
    scale: Optional[str] = None


class ExportRecord(Strict):
    formats: list[ModelFormat]
    onnx_opset: int
    torch_version: str
    parity: dict[str, ParityAgreement] = Field(description="per format, what the check against PyTorch measured")
    parity_rule: ParityRuleSpec


class FileEntry(Strict):
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    bytes: NonNegativeInt


class Digest(Strict):
    sha256: str = Field(pattern="^[0-9a-f]{64}$")
    of: str


class ManifestBody(Strict):
    """``manifest.json`` before it is sealed: everything but its digest, in the order it is written."""

    format: Literal["nasx-bundle"]
    format_version: Literal[1] = Field(description="the bundle format's version; a reader refuses others")
    name: str = Field(description="what nasx serve serves the bundle as")
    created: str = Field(description="UTC time of export, ISO 8601")
    nasx_version: str
    classes: list[str] = Field(description="the class labels, in logit order")
    input: InputSpec
    outputs: list[OutputSpec]
    latent_grid: LatentGrid
    similarity: Similarity
    box_rule: str
    evidence: str
    last_layer: LastLayer
    prototypes: list[PrototypeEntry]
    genotype: Optional[dict[str, Any]] = Field(description="the searched cells; null for ProtoPNet")
    genotype_darts: Optional[str]
    model: dict[str, Any] = Field(description="the architecture (nasxserve.protos.model.ModelSpec); rebuilds the "
                                              "network with weights.safetensors")
    metrics: BundleMetrics
    training: Provenance
    export: ExportRecord
    files: dict[str, FileEntry] = Field(description="every other file of the bundle, by its path inside it")

    @property
    def method(self) -> Method:
        """``protopnet`` for a model on a torchvision backbone, else ``nasxnet`` (a searched genotype)."""
        return "protopnet" if self.model.get("backbone") else "nasxnet"

    @property
    def head(self) -> Head:
        """A bundle always explains with prototypes (the black box cannot be exported)."""
        return "prototype"


class Manifest(ManifestBody):
    """A bundle's ``manifest.json`` (docs/design.md, "The bundle"), with the sha256 that covers it."""

    bundle_digest: Digest = Field(description="sha256 of the manifest without this field, as JSON with sorted keys, "
                                              "no spaces, UTF-8")


# ================================================================================================ a run's files

class RunContract(Contract):
    """Read from a run's files, which nasx train wrote: lenient types (a YAML 0 for 0.0)."""


class DataSummary(RunContract):
    """The ``data`` block of report.json: the dataset as the run trained on it."""

    name: str
    source: Optional[str] = None
    classes: list[str]
    image_size: list[int] = Field(description="[height, width]")
    channels: int
    mean: list[float]
    std: list[float]
    sizes: Optional[dict[str, int]] = None
    val_split: Optional[str] = None


class RunReport(RunContract):
    """A finished run's ``report.json``, the fields nasx reads back; the rest are kept as they are.

    ``method`` and ``head`` default to what runs written before they were recorded were."""

    nasx_version: Optional[str] = None
    method: Method = "nasxnet"
    head: Head = "prototype"
    data: Optional[DataSummary] = None
    model: dict[str, Any] = Field(description="the architecture (nasxserve.protos.model.ModelSpec)")
    genotype: Optional[dict[str, Any]] = None
    genotype_darts: Optional[str] = None
    genotype_source: Optional[str] = None
    backbone: Optional[str] = None
    backbone_weights: Optional[str] = None
    test: Optional[TestMetrics] = None
    wall_time_s: Optional[float] = None
    device: Optional[str] = None

    def facts(self, *names: str) -> dict[str, Any]:
        """The named fields the report has, in the order named (a missing one is left out, a null one kept)."""
        found = self.as_json(set(names))
        return {name: found[name] for name in names if name in found}


class DataSettings(RunContract):
    """The dataset settings of a run's configuration; the defaults are what a configuration written before a
    setting existed meant."""

    spec: Optional[str] = None
    image_size: Optional[int] = None
    crop: str = "none"
    val_share: float = 0.0


# configuration keys that moved to the extensions section: (section, key) -> the extension a value named
MOVED_TO_EXTENSIONS = {("retrain", "deletion_cost"): "deletion-cost",
                       ("projection", "box_calibration"): "box-calibration"}


def with_extensions_section(values: dict[str, Any]) -> dict[str, Any]:
    """The configuration mapping ``values`` with the keys of configurations written before the extensions section
    (``retrain.deletion_cost: L``, ``projection.box_calibration: true``) moved into it, so that older runs and
    bundles read as they trained: a weight above 0 or ``true`` names the extension; 0 or ``false`` was the
    papers' method, which is now the default. ``values`` itself is left as it is."""
    if not any(isinstance(values.get(s), dict) and k in values[s] for s, k in MOVED_TO_EXTENSIONS):
        return values
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    ext = dict(values.get("extensions") or {})
    enabled = list(ext.get("enabled") or [])
    for (section, key), name in MOVED_TO_EXTENSIONS.items():
        if not isinstance(values.get(section), dict) or key not in values[section]:
            continue
        value = values[section].pop(key)
        if value and name not in enabled:
            enabled.append(name)
            if key == "deletion_cost":
                ext["deletion_cost"] = value
    values["extensions"] = {**ext, "enabled": enabled}
    return values


class ExtensionSettings(RunContract):
    enabled: list[str] = Field(default_factory=list)
    deletion_cost: Optional[float] = None

    def record(self) -> dict[str, Any]:
        """What a run's report, its bundle's manifest and ``nasx evaluate`` record of the extensions that are on:
        ``{"deletion_cost": lambda}`` for deletion-cost, and ``{"box_calibration": True}`` and the like (the name
        with underscores) for each other one; nothing for those that are off."""
        return {name.replace("-", "_"): (float(self.deletion_cost or 0.0) if name == "deletion-cost" else True)
                for name in self.enabled}


class RunSettings(RunContract):
    """The settings of a run's ``config.yaml`` that nasx reads back after training (the whole file is
    ``nasxserve.training.config.TrainConfig``)."""

    data: DataSettings = Field(default_factory=DataSettings)
    extensions: ExtensionSettings = Field(default_factory=ExtensionSettings)

    @classmethod
    def read(cls, config: dict[str, Any]) -> RunSettings:
        """The view of a configuration mapping (one written before the extensions section as
        :func:`with_extensions_section` reads it); a section that is null counts as absent."""
        present = {k: v for k, v in config.items() if v is not None}
        return cls.model_validate(with_extensions_section(present))

    def extensions_on(self) -> dict[str, Any]:
        """The additions to the papers' method that the run trained with (:meth:`ExtensionSettings.record`)."""
        return self.extensions.record()


# ======================================================================================================= answers

class ModelInfo(BaseModel):
    name: str
    version: str = Field(description="nasx version that exported the bundle")
    sha256: str = Field(description="sha256 of model.onnx")


class ImageSize(BaseModel):
    width: int
    height: int


class ClassScore(BaseModel):
    class_id: int
    label: str
    score: float = Field(description="softmax probability")
    logit: float


class PredictResponse(BaseModel):
    """The answer of ``POST /predict``."""

    model: ModelInfo
    image: ImageSize = Field(description="width and height of the image as received")
    predictions: list[ClassScore]
    warnings: list[str] = Field(default_factory=list,
                                description="why the image looks unlike the training images, e.g. inverted "
                                            "polarity (then the prediction means little); usually empty")


class PrototypeSource(BaseModel):
    sample: int = Field(description="index of the source image in the training split")
    box_xyxy: list[int] = Field(description="box of the prototype in its source image, x1/y1 exclusive")
    regions: str = Field(description="the region rule that drew box_xyxy and the two images: the explanation's "
                                     "own (meta.regions), or activation for a bundle whose run was trained before "
                                     "this version of the evidence rule")
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
    box_rule: str = Field(description="what the boxes show, in words")
    regions: str = Field("activation", description="the region rule of the boxes: evidence or activation")


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
    """The answer of ``POST /explain``: the prediction, and the prototype evidence for one class."""

    explanations: list[Explanation]
