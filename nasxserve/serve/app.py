"""The image endpoints: decode and validate in the request handler, infer through a (batched) callable,
answer with the shapes of :mod:`nasxserve.contracts` (the answers the runtime builds) and
:mod:`nasxserve.serve.schemas`. Every client mistake is a 4xx with ``{"error", "detail"}``; anything else is
a 500 logged with the request id. ``/`` is the explanation viewer (static files in ``static/``, which call only
the public endpoints)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from nasxserve.contracts import BATCH, ExplainResponse, ImageSize, PredictResponse, prototype_urls
from nasxserve.errors import ImageError, ImageTooLarge
from nasxserve.imaging import MAX_PIXELS, header_pixels, open_image
from nasxserve.runtime import Bundle
from nasxserve.runtime.bundle import PreparedImages, image_and_copies, source_view
from nasxserve.regions import DEFAULT_REGION_RULE
from nasxserve.runtime.format import INPUT_NAME, ONNX_FILE, OUTPUT_NAMES
from nasxserve.serve.schemas import (Base64Image, ErrorResponse, InferRequest, InferResponse, InferTensor,
                                     ModelMetadata, TensorMetadata)
from nasxserve.serve.settings import DEFAULTS

log = logging.getLogger("nasxserve.serve")

MAX_BODY_BYTES = DEFAULTS.max_body_bytes
VIEWER_DIR = Path(__file__).parent / "static"
MAX_TOP_PROTOTYPES = 50
MAX_RESPONSE_VALUES = 2_000_000      # numbers in one /v2 response (~40 MB of JSON)
MAX_INPUT_IMAGES = 256               # images in one /v2 request
MAX_INPUT_VALUES = 2_000_000         # numbers in one /v2 request (parsed, ~70 MB of Python floats)
# Commas a JSON body may hold, counted as it streams so that a body of a million tiny items is refused before a
# parser builds them (a 16 MB object of 1M keys took 150 MB and a second to parse, on the event loop). An image
# sent as JSON is one object around a base64 string, which holds no comma; a /v2 body's commas are its numbers,
# plus those its few bounded strings (names, id) may hold.
IMAGE_JSON_COMMAS = 64
V2_JSON_SLACK = 8192
DECODE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nasx-decode")
INLINE_PIXELS = 512 * 512            # images up to this size (from the header) are decoded on the event loop
INLINE_MODEL_PIXELS = 32 * 32        # models' inputs up to this size get their evidence batch built on it
MAX_DETAIL = 600                     # characters of an error's detail: never echo a huge input back
IMAGE_FIELD = "image"
Infer = Callable[[np.ndarray], Awaitable[dict[str, np.ndarray]]]


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail


@dataclass
class ServingState:
    """What the endpoints need: the bundle, how to run it (batched or not) and the limits."""

    bundle: Bundle
    infer: Infer
    max_pixels: int = MAX_PIXELS
    max_body_bytes: int = DEFAULTS.max_body_bytes

    @property
    def max_input_values(self) -> int:
        """Numbers one /v2 request may carry: MAX_INPUT_IMAGES images of the model's input, at most
        MAX_INPUT_VALUES."""
        return min(MAX_INPUT_VALUES, MAX_INPUT_IMAGES * self.bundle.channels * self.bundle.height * self.bundle.width)


@dataclass(frozen=True)
class BodyLimits:
    """What one request body may hold, checked by :class:`RequestIdMiddleware` while it streams."""

    bytes: int = MAX_BODY_BYTES
    v2_values: int = MAX_INPUT_VALUES

    def json_commas(self, path: str) -> int:
        return self.v2_values + V2_JSON_SLACK if path.startswith("/v2/") else IMAGE_JSON_COMMAS


IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "The image: a multipart upload in the field `image`, the raw file as the body with an "
                       "image/* content type, or JSON {\"image\": base64 or data URI}.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": [IMAGE_FIELD],
                                               "properties": {IMAGE_FIELD: {"type": "string", "format": "binary"}}}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": Base64Image.model_json_schema()},
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422)}


SourceRule = Literal["activation", "evidence"]
SOURCE_RULE = Query("activation", description="the region rule of the box on the training patch: activation "
                                               "(ProtoPNet's) or evidence; an explanation's own URLs name the rule "
                                               "that boxed it")


def create_app(state: Callable[[], ServingState]) -> FastAPI:
    """The FastAPI app; ``state()`` gives the loaded bundle and the inference callable (it is called per
    request, so the app can be built before the service that owns the bundle exists)."""
    app = FastAPI(title="nasx", description="Explainable image classification: every prediction with its "
                                            "prototype evidence.", docs_url=None, redoc_url=None)
    _install_error_handlers(app, lambda: _body_limits(state))

    @app.post("/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=IMAGE_BODY,
              summary="Top-k classes of an image")
    async def predict(request: Request, top_k: int = Query(5, ge=1, le=1000)) -> PredictResponse:
        s = state()
        prepared = await _prepared_image(s, request)
        out = _finite(await s.infer(prepared.x))
        size, warnings = prepared.sizes[0], s.bundle.warnings(prepared, 0)
        return PredictResponse(model=s.bundle.model_info(), image=ImageSize(width=size[0], height=size[1]),
                               predictions=s.bundle.scores(out["logits"][0], top_k), warnings=warnings)

    @app.post("/explain", response_model=ExplainResponse, responses=ERRORS, openapi_extra=IMAGE_BODY,
              summary="Prediction with the prototype evidence for one class")
    async def explain(request: Request, top_k: int = Query(5, ge=1, le=1000),
                      top_prototypes: int = Query(5, ge=1, le=MAX_TOP_PROTOTYPES),
                      target: Optional[str] = Query(None, alias="class",
                                                    description="class to explain (label or index); default: "
                                                                "the predicted one"),
                      heatmap: bool = Query(False, description="include each prototype's similarity map as PNG"),
                      regions: Literal["evidence", "activation"] = Query(
                          DEFAULT_REGION_RULE, description="the boxes' rule: evidence (where hiding the image lowers "
                                                           "the similarity; the model runs on the image and at "
                                                           "most 113 hidden copies) or activation (ProtoPNet's box of "
                                                           "the best match)")
                      ) -> ExplainResponse:
        s = state()
        k = _target_class(s.bundle, target)
        prepared = await _prepared_image(s, request)
        size, warnings = prepared.sizes[0], s.bundle.warnings(prepared, 0)
        occluded = None
        if regions == "evidence":
            batch = await _off_loop_if_large(s.bundle.evidence_batch, prepared.x[0])
            out, occluded = image_and_copies(_finite(await s.infer(batch)))
        else:
            out = _finite(await s.infer(prepared.x))
        k = int(out["logits"][0].argmax()) if k is None else k
        return ExplainResponse(model=s.bundle.model_info(), image=ImageSize(width=size[0], height=size[1]),
                               predictions=s.bundle.scores(out["logits"][0], top_k), warnings=warnings,
                               explanations=[s.bundle.explanation(out, 0, size, k, top_prototypes, heatmap,
                                                                  regions=regions, occluded=occluded)])

    @app.get("/metadata", summary="Classes, input spec, genotype and the prototype table")
    async def metadata() -> dict[str, Any]:
        return _public_manifest(state().bundle)

    @app.get("/prototypes/{prototype_id}",
             responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}},
             summary="The prototype's source patch (PNG)")
    async def prototype_patch(prototype_id: int, regions: SourceRule = SOURCE_RULE) -> Response:
        return _prototype_png(state().bundle, prototype_id, "patch", regions)

    @app.get("/prototypes/{prototype_id}/context", responses={200: {"content": {"image/png": {}}},
                                                             404: {"model": ErrorResponse}},
             summary="The prototype's source image with its box (PNG)")
    async def prototype_context(prototype_id: int, regions: SourceRule = SOURCE_RULE) -> Response:
        return _prototype_png(state().bundle, prototype_id, "context", regions)

    @app.get("/v2/models/{name}", response_model=ModelMetadata, responses=ERRORS,
             summary="Open Inference Protocol: model metadata")
    async def oip_metadata(name: str) -> ModelMetadata:
        return _oip_metadata(_oip_model(state(), name))

    @app.post("/v2/models/{name}/infer", response_model=InferResponse, responses=ERRORS,
              summary="Open Inference Protocol: tensor inference")
    async def oip_infer(name: str, body: InferRequest) -> InferResponse:
        s = _oip_model(state(), name)
        x = _oip_input(s, body)
        wanted = _oip_outputs(s.bundle, body, len(x))
        out = await s.infer(x)
        bad = [n for n in wanted if out[n].dtype.kind == "f" and not np.isfinite(out[n]).all()]
        if bad:
            raise ApiError(422, "non-finite output", f"the model's outputs {bad} hold NaN or infinity for this input "
                                                     f"(values far outside what it was trained on)")
        return InferResponse(model_name=name, model_version=s.bundle.manifest.nasx_version, id=body.id,
                             outputs=[_tensor(n, out[n]) for n in wanted])

    @app.get("/", include_in_schema=False)
    async def viewer() -> FileResponse:
        return FileResponse(VIEWER_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/viewer", StaticFiles(directory=VIEWER_DIR), name="viewer")
    app.router.routes.append(UnknownPath(app.router.routes))
    return app


# ---------------------------------------------------------------------------------------------- inputs

def _body_limits(state: Callable[[], ServingState]) -> BodyLimits:
    try:
        s = state()
    except Exception:  # noqa: BLE001 - before the service is up (e.g. the OpenAPI document), the defaults
        return BodyLimits()
    return BodyLimits(s.max_body_bytes, s.max_input_values)

def _decode(s: ServingState, data: bytes):
    return s.bundle.prepare([open_image(data, s.max_pixels)])


async def _prepared_image(s: ServingState, request: Request) -> PreparedImages:
    """The uploaded image decoded and prepared as the model takes it (:meth:`nasxserve.runtime.Bundle.prepare`)."""
    data = await _image_bytes(request, s.max_body_bytes)
    try:
        pixels = header_pixels(data)
        if pixels is not None and pixels <= INLINE_PIXELS:
            return _decode(s, data)    # microseconds: a thread hop would cost more than it saves
        # off the event loop, in a small pool: one heavy image must not stall /readyz or the other clients
        return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, _decode, s, data)
    except ImageTooLarge as e:
        raise ApiError(413, "image too large", _strip_name(str(e))) from None
    except ImageError as e:
        raise ApiError(400, "bad image", _clip(_strip_name(str(e)))) from None


async def _off_loop_if_large(build: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """``build(x)`` for the (C, H, W) image ``x``: on the event loop for a small model's input, in the decode pool
    for a large one (a 224 x 224 model's 113 hidden copies, 68 MB, take milliseconds to build)."""
    if x.shape[1] * x.shape[2] <= INLINE_MODEL_PIXELS:
        return build(x)
    return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, build, x)


def _finite(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    if not (np.isfinite(out["logits"]).all() and np.isfinite(out["similarities"]).all()):
        raise ApiError(422, "non-finite output", "the model's outputs hold NaN or infinity for this image")
    return out


def _strip_name(message: str) -> str:
    """Image errors start with the source's name; for uploads that is only a byte count."""
    return message.split(": ", 1)[1] if message.startswith("<") else message


async def _image_bytes(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body too large", f"the request body is {declared} bytes; the limit is {limit}")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        data = await _multipart_image(request)
    elif ctype == "application/json":
        data = _json_image(await _read_body(request, limit))
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        data = await _read_body(request, limit)
    else:
        raise ApiError(415, "unsupported content type",
                       f"send the image as multipart/form-data (field {IMAGE_FIELD!r}), as the raw body with an "
                       f"image/* content type, or as application/json {{\"image\": base64}}; got {ctype or 'none'!r}")
    if not data:
        raise ApiError(400, "empty image", "the request carries no image data")
    if len(data) > limit:
        raise ApiError(413, "body too large", f"the image is {len(data)} bytes; the limit is {limit}")
    return data


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body too large", f"the request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request) -> bytes:
    try:
        form = await request.form(max_files=4, max_fields=16)
    except StarletteHTTPException:
        raise                                   # the body limit, counted as the parser reads
    except Exception as e:  # noqa: BLE001 - starlette raises several kinds for malformed multipart
        raise ApiError(400, "bad multipart body", _clip(str(e) or type(e).__name__)) from None
    field = form.get(IMAGE_FIELD)
    if field is None:
        raise ApiError(400, "missing field", _clip(f"the multipart body has no field {IMAGE_FIELD!r} (it has "
                                                   f"{sorted(form.keys())}); upload the image as {IMAGE_FIELD}=@FILE"))
    if not isinstance(field, UploadFile):
        raise ApiError(400, "not a file", f"the field {IMAGE_FIELD!r} must be a file upload, not a text value")
    return await field.read()


def _json_image(body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError as e:     # also a number of more than 4,300 digits, which Python refuses to convert
        raise ApiError(400, "bad JSON", _clip(f"the body does not parse as JSON: {e}")) from None
    except RecursionError:
        raise ApiError(400, "bad JSON", "the body is nested too deeply") from None
    if not isinstance(payload, dict) or not isinstance(payload.get(IMAGE_FIELD), str):
        keys = (f"an object with {len(payload)} keys" if isinstance(payload, dict) else type(payload).__name__)
        raise ApiError(400, "missing field", f"JSON bodies are {{\"{IMAGE_FIELD}\": \"<base64 or data URI>\"}}; "
                                             f"got {keys}")
    text = payload[IMAGE_FIELD]
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "bad data URI", "only base64 data URIs are accepted (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, "bad base64", _clip(f"the image string is not valid base64: {e}")) from None


def _target_class(bundle: Bundle, target: Optional[str]) -> Optional[int]:
    if target is None:
        return None
    try:
        return bundle.class_index(target)
    except ValueError as e:
        raise ApiError(400, "unknown class", _clip(str(e))) from None


# ---------------------------------------------------------------------------------------------- answers

PUBLIC_FIELDS = ("name", "format_version", "nasx_version", "created", "classes", "input", "outputs", "latent_grid",
                 "similarity", "box_rule", "evidence", "last_layer", "genotype", "genotype_darts", "model", "metrics")


def _public_manifest(bundle: Bundle) -> dict[str, Any]:
    """The manifest less what names files and places (the file list, the run's provenance), with the URLs of the
    prototypes' PNGs instead of their paths in the bundle."""
    m = bundle.manifest
    fields = m.as_json(set(PUBLIC_FIELDS))
    out = {k: fields[k] for k in PUBLIC_FIELDS if k in fields}
    files = ("patch", "context", "evidence_patch", "evidence_context")
    out["prototypes"] = [{k: v for k, v in p.as_json().items() if k not in files}
                         | dict(zip(("patch_url", "context_url"), prototype_urls(p.id)))
                         | (dict(zip(("evidence_patch_url", "evidence_context_url"), prototype_urls(p.id, "evidence")))
                            if source_view(p, "evidence").regions == "evidence" else {})
                         for p in m.prototypes]
    out["model_sha256"] = m.files[ONNX_FILE].sha256
    return out


def _prototype_png(bundle: Bundle, prototype_id: int, kind: str, regions: str) -> Response:
    if not 0 <= prototype_id < len(bundle.prototypes):
        raise ApiError(404, "unknown prototype", f"prototype {prototype_id} does not exist; ids are 0.."
                                                 f"{len(bundle.prototypes) - 1}")
    view = source_view(bundle.prototypes[prototype_id], regions)
    if view.regions != regions:
        raise ApiError(404, "no evidence box", "this bundle's run was trained before this version of the evidence rule "
                                               "drew source boxes; ask for regions=activation, or retrain the run")
    data = bundle.file_bytes(view.patch if kind == "patch" else view.context)
    etag = hashlib.sha256(data).hexdigest()[:32]
    return Response(data, media_type="image/png", headers={"Cache-Control": "public, max-age=86400", "ETag": etag})


# ---------------------------------------------------------------------------------------------- Open Inference Protocol

def _oip_model(s: ServingState, name: str) -> ServingState:
    if name != s.bundle.manifest.name:
        raise ApiError(404, "unknown model", f"this server serves model {s.bundle.manifest.name!r}, not {name!r}")
    return s


def _oip_metadata(s: ServingState) -> ModelMetadata:
    b = s.bundle
    outputs = []
    for o in b.manifest.outputs:
        shape = [-1 if d == BATCH else int(d) for d in o.shape]
        datatype = "INT64" if o.dtype == "int64" else "FP32"
        outputs.append(TensorMetadata(name=o.name, datatype=datatype, shape=shape))
    return ModelMetadata(name=b.manifest.name, versions=[b.manifest.nasx_version], platform="onnxruntime_onnx",
                         inputs=[TensorMetadata(name=INPUT_NAME, datatype="FP32",
                                                shape=[-1, b.channels, b.height, b.width])],
                         outputs=outputs)


def _oip_input(s: ServingState, body: InferRequest) -> np.ndarray:
    b = s.bundle
    if len(body.inputs) != 1 or body.inputs[0].name != INPUT_NAME:
        raise ApiError(400, "bad inputs", _clip(f"send exactly one input named {INPUT_NAME!r}; got "
                                                f"{[t.name for t in body.inputs]}"))
    t = body.inputs[0]
    expected = [b.channels, b.height, b.width]
    if t.datatype != "FP32":
        raise ApiError(400, "bad datatype", _clip(f"input {INPUT_NAME!r} is FP32, not {t.datatype}"))
    most = s.max_input_values // int(np.prod(expected))
    if len(t.shape) != 4 or t.shape[1:] != expected or not 1 <= t.shape[0] <= most:
        raise ApiError(400, "bad shape", _clip(f"input shape must be [B, {', '.join(map(str, expected))}] with "
                                               f"1 <= B <= {most}; got {t.shape}"))
    x = np.asarray(t.data, dtype=np.float32)        # numbers only: the request schema refuses anything else
    if x.size != int(np.prod(t.shape)):
        raise ApiError(400, "bad data", f"shape {t.shape} needs {int(np.prod(t.shape))} values; got {x.size}")
    if not np.isfinite(x).all():
        raise ApiError(400, "bad data", "input data contains NaN or infinity")
    return x.reshape(t.shape)


def _oip_outputs(b: Bundle, body: InferRequest, batch: int) -> list[str]:
    """The outputs asked for: known, each once, and together small enough to answer."""
    wanted = [o.name for o in body.outputs] if body.outputs else list(OUTPUT_NAMES)
    unknown = [n for n in wanted if n not in OUTPUT_NAMES]
    if unknown:
        raise ApiError(400, "unknown output", _clip(f"outputs {unknown} do not exist; the model has "
                                                    f"{list(OUTPUT_NAMES)}"))
    if len(set(wanted)) != len(wanted):
        raise ApiError(400, "duplicate output", "ask for each output at most once")
    per_image: dict[str, int] = {o.name: int(np.prod([d for d in o.shape if d != BATCH])) for o in b.manifest.outputs}
    values = batch * sum(per_image.get(n, 0) for n in wanted)
    if values > MAX_RESPONSE_VALUES:
        raise ApiError(413, "response too large", f"{wanted} for {batch} images are {values} numbers; the limit is "
                                                  f"{MAX_RESPONSE_VALUES}: ask for fewer outputs or fewer images")
    return wanted


def _tensor(name: str, value: np.ndarray) -> InferTensor:
    datatype = "INT64" if value.dtype == np.int64 else "FP32"
    return InferTensor(name=name, shape=list(value.shape), datatype=datatype, data=value.ravel().tolist())


# ---------------------------------------------------------------------------------------------- errors

def _install_error_handlers(app: FastAPI, limits: Callable[[], BodyLimits] = BodyLimits) -> None:
    app.add_middleware(RequestIdMiddleware, limits=limits)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return _error(e.status, e.error, e.detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        problems = "; ".join(f"{'.'.join(str(p)[:40] for p in err.get('loc', ())[:6])}: {str(err.get('msg'))[:120]}"
                             for err in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        return _error(422, "invalid request", problems + more)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        names = {404: "not found", 413: "body too large"}
        error = e.error if isinstance(e, BodyRefused) else names.get(e.status_code, "http error")
        return _error(e.status_code, error, str(e.detail))


_CSP = ("default-src 'self'; script-src 'self'{}; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_COMMON_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                   (b"referrer-policy", b"no-referrer")]
SECURITY_HEADERS = _COMMON_HEADERS + [(b"content-security-policy", _CSP.format("").encode())]
# the Swagger UI page starts itself with an inline script
DOCS_HEADERS = _COMMON_HEADERS + [(b"content-security-policy", _CSP.format(" 'unsafe-inline'").encode())]


class BodyRefused(StarletteHTTPException):
    """Raised from the middleware's ``receive`` while a body streams; an HTTPException, so that FastAPI's body
    reading passes it on instead of answering its own 400."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(status, detail)
        self.error = error


def _too_many_items(path: str, limits: BodyLimits) -> BodyRefused:
    if path.startswith("/v2/"):
        return BodyRefused(413, "too many values", f"the JSON body holds more than {limits.v2_values} numbers, the "
                                                   f"most one request to this model may carry; send fewer images")
    return BodyRefused(400, "bad JSON", f"JSON bodies are {{\"{IMAGE_FIELD}\": \"<base64 or data URI>\"}}; this one "
                                        f"holds more than {IMAGE_JSON_COMMAS} items")


class RequestIdMiddleware:
    """Tags every response with ``x-request-id`` (the client's, or a new one) and turns an unexpected
    exception into a logged 500 that names the id. Plain ASGI: Starlette's BaseHTTPMiddleware costs
    about a millisecond per request.

    It also enforces the body limits on every endpoint, /v2 included: a declared Content-Length above the
    byte limit is refused before anything is read, and a chunked body is counted as it streams, so the 413
    comes once the limit is passed, before any JSON or multipart parser has the whole body. A JSON body's
    commas are counted the same way (:meth:`BodyLimits.json_commas`)."""

    def __init__(self, app: Any, limits: Callable[[], BodyLimits] = BodyLimits):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex
        started = False
        security = DOCS_HEADERS if scope.get("path") == "/docs" else SECURITY_HEADERS

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message, headers=list(message.get("headers", [])) + [(b"x-request-id", rid.encode())]
                              + security)
            await send(message)

        limits = self.limits()
        limit = limits.bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            too_large = declared.isdigit()
            response = _error(413 if too_large else 400, "body too large" if too_large else "bad request",
                              f"the request body is {int(declared)} bytes; the limit is {limit}" if too_large
                              else "Content-Length is not a number")
            response.headers["connection"] = "close"
            await response(scope, receive, send_with_id)
            return
        received = commas = 0
        path = scope.get("path", "")
        counted = path.startswith("/v2/") or _json_media(scope)     # /v2 parses any body as JSON
        most_commas = limits.json_commas(path)

        async def limited_receive() -> Message:
            nonlocal received, commas
            message = await receive()
            if message["type"] == "http.request":
                body = message.get("body", b"")
                received += len(body)
                if received > limit:
                    raise BodyRefused(413, "body too large", f"the request body exceeds the limit of {limit} bytes")
                commas += body.count(b",") if counted else 0
                if commas > most_commas:
                    raise _too_many_items(path, limits)
            return message

        try:
            await self.app(scope, limited_receive, send_with_id)
        except BodyRefused as e:
            if started:
                raise
            await _error(e.status_code, e.error, str(e.detail))(scope, receive, send_with_id)
        except Exception:  # noqa: BLE001 - a real server fault: log it with the id, answer 500
            log.exception("request %s failed", rid)
            if started:
                raise
            await _error(500, "internal error", f"the server failed on request {rid}; it has been logged")(
                scope, receive, send_with_id)


def _json_media(scope: Scope) -> bool:
    """Whether the request's first Content-Type (the one Starlette reads) is JSON: application/json or a
    +json type, which FastAPI also parses as JSON."""
    ctype = next((v for k, v in scope.get("headers") or [] if k == b"content-type"), b"")
    media = ctype.split(b";")[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


# BentoML's own pages, routed after the mounted app: the catch-all must leave them alone.
BENTOML_PATHS = frozenset({"/", "/docs.json", "/schema.json", "/livez", "/readyz", "/healthz", "/metrics"})
BENTOML_PREFIXES = ("/static_content/", "/assets/")


class UnknownPath(BaseRoute):
    """A JSON 404 for every path that nothing serves (BentoML would answer plain text).

    It matches only when no route of the app matches the path with any method, so a wrong method
    on a known path stays a 405.
    """

    def __init__(self, routes: list[BaseRoute]):
        self.routes = routes

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        path = scope.get("path", "")
        if (scope["type"] != "http" or path in BENTOML_PATHS or path.startswith(BENTOML_PREFIXES)
                or any(r.matches(scope)[0] != Match.NONE for r in self.routes if r is not self)):
            return Match.NONE, {}
        return Match.FULL, {}

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _error(404, "not found", f"nothing is served at {scope['path'][:200]}; the endpoints are listed in "
                                       f"/docs.json")(scope, receive, send)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."


def _error(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": _clip(detail)}, status_code=status)
