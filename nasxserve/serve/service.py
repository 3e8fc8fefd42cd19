"""The BentoML service: ``bentoml serve nasxserve.serve.service:Nasx`` with ``NASX_BUNDLE=PATH``
(``nasx serve BUNDLE`` does this).

BentoML provides the server, workers, /livez, /readyz, /metrics and the OpenAPI document; the image
endpoints are a FastAPI app mounted on the service (full control over inputs and errors, their
shapes in the OpenAPI document). Each request is decoded and validated in its handler and the
(1, C, H, W) array goes to a :class:`MicroBatcher`, which merges concurrent requests into one ONNX
Runtime call; ``nasx_batch_size`` in /metrics counts the images per call.

Its settings (:class:`~nasxserve.serve.settings.ServeSettings`) come from the environment, one ``NASX_*``
variable per field (``NASX_BUNDLE``, ``NASX_WORKERS``, ``NASX_BATCHING``, ...), each defaulting to the field's
default when unset; ``NASX_BUNDLE`` unset means ``./bundle``, where a built bento carries its bundle.
"""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import bentoml
import numpy as np
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse

from nasxserve.runtime import load_bundle
from nasxserve.runtime.session import CPU
from nasxserve.serve.app import Infer, ServingState, create_app
from nasxserve.serve.batcher import MicroBatcher
from nasxserve.serve.local import BATCH_METRIC
from nasxserve.serve.metrics import install as label_metrics_by_route
from nasxserve.serve.settings import ServeSettings

label_metrics_by_route()        # before BentoML builds the app around the service

SETTINGS = ServeSettings.from_env(os.environ)


def bundle_path(settings: ServeSettings) -> Path:
    if settings.bundle is not None:
        return settings.bundle
    bundled = Path.cwd() / "bundle"            # a built bento carries its bundle in its source folder
    if (bundled / "manifest.json").is_file():
        return bundled
    raise RuntimeError(f"set {ServeSettings.env_name('bundle')} to the bundle folder (nasx serve BUNDLE does this)")


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


@bentoml.service(name="nasx", workers=SETTINGS.workers, traffic={"timeout": 60},
                 logging={"access": {"enabled": SETTINGS.access_log}})
@bentoml.asgi_app(app, path="/")
class Nasx:
    def __init__(self) -> None:
        settings = SETTINGS
        self.bundle = load_bundle(bundle_path(settings), settings.provider, threads=settings.threads or None,
                                  trusted_keys=[settings.trusted_key] if settings.trusted_key else [])
        infer: Infer
        if settings.batching:
            on_cpu = self.bundle.provider == CPU
            lanes = settings.model_lanes(on_cpu)
            infer = MicroBatcher(self.bundle.run, settings.max_batch, batch_size_metric.observe, lanes=lanes,
                                 parts=min(lanes, settings.model_cores(on_cpu)))
        else:
            infer = self._direct
        self.state = ServingState(self.bundle, infer,
                                  max_pixels=settings.pixel_limit(self.bundle.height, self.bundle.width),
                                  max_body_bytes=settings.max_body_bytes)

    async def _direct(self, x: np.ndarray) -> dict[str, np.ndarray]:
        out = await asyncio.to_thread(self.bundle.run, x)
        batch_size_metric.observe(len(x))
        return out
