"""The BentoML service: ``bentoml serve nasxserve.serve.service:Nasx`` with ``NASX_BUNDLE=PATH``
(``nasx serve BUNDLE`` does this).

BentoML provides the server, workers, /livez, /readyz, /metrics and the OpenAPI document; the image
endpoints are a FastAPI app mounted on the service (full control over inputs and errors, their
shapes in the OpenAPI document). Each request is decoded and validated in its handler and the
(1, C, H, W) array goes to a :class:`MicroBatcher`, which merges concurrent requests into one ONNX
Runtime call; ``nasx_batch_size`` in /metrics counts the images per call.

Environment: NASX_BUNDLE (required), NASX_WORKERS (1), NASX_BATCHING (1; 0 runs every request on
its own), NASX_MAX_BATCH (32), NASX_MAX_PIXELS (64000000), NASX_MAX_BODY_BYTES (33554432),
NASX_PROVIDER (auto), NASX_THREADS (ONNX Runtime intra-op threads per worker, 1: request
handling needs the other cores; 0 = ONNX Runtime's default), NASX_ACCESS_LOG (0).
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import bentoml
import numpy as np
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from nasxserve.imaging import MAX_PIXELS
from nasxserve.runtime import load_bundle
from nasxserve.serve.app import MAX_BODY_BYTES, Infer, ServingState, create_app
from nasxserve.serve.batcher import MicroBatcher
from nasxserve.serve.local import BATCH_METRIC
from nasxserve.serve.metrics import install as label_metrics_by_route

label_metrics_by_route()        # before BentoML builds the app around the service

BUNDLE_ENV = "NASX_BUNDLE"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def bundle_path() -> Path:
    path = os.environ.get(BUNDLE_ENV)
    if path:
        return Path(path)
    bundled = Path.cwd() / "bundle"            # a built bento carries its bundle in its source folder
    if (bundled / "manifest.json").is_file():
        return bundled
    raise RuntimeError(f"set {BUNDLE_ENV} to the bundle folder (nasx serve BUNDLE does this)")


def _state() -> ServingState:
    return bentoml.get_current_service().state


app = create_app(_state)


@app.get("/docs", include_in_schema=False)
async def api_docs() -> HTMLResponse:
    """Swagger UI over BentoML's OpenAPI document, from the assets BentoML serves itself (the viewer
    took BentoML's index page at /)."""
    return get_swagger_ui_html(openapi_url="/docs.json", title="nasx API",
                               swagger_js_url="/static_content/swagger-ui-bundle.js",
                               swagger_css_url="/static_content/swagger-ui.css",
                               swagger_favicon_url="/static_content/favicon-light-32x32.png")

batch_size_metric = bentoml.metrics.Histogram(
    name=BATCH_METRIC, documentation="Images per ONNX Runtime call (requests merged by the batcher)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128))


@bentoml.service(name="nasx", workers=_env_int("NASX_WORKERS", 1), traffic={"timeout": 60},
                 logging={"access": {"enabled": os.environ.get("NASX_ACCESS_LOG", "0") == "1"}})
@bentoml.asgi_app(app, path="/")
class Nasx:
    def __init__(self) -> None:
        self.bundle = load_bundle(bundle_path(), os.environ.get("NASX_PROVIDER", "auto"),
                                  threads=_env_int("NASX_THREADS", 1) or None)
        infer: Infer
        if os.environ.get("NASX_BATCHING", "1") != "0":
            infer = MicroBatcher(self.bundle.run, _env_int("NASX_MAX_BATCH", 32), batch_size_metric.observe)
        else:
            infer = self._direct
        self.state = ServingState(self.bundle, infer, max_pixels=_env_int("NASX_MAX_PIXELS", MAX_PIXELS),
                                  max_body_bytes=_env_int("NASX_MAX_BODY_BYTES", MAX_BODY_BYTES))

    async def _direct(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = await asyncio.to_thread(self.bundle.run, x)
        batch_size_metric.observe(len(x))
        return out
