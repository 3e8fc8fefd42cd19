"""Limits of the real server (``nasx serve`` on 127.0.0.1) against requests an attacker would send (issue 28):
every endpoint, /v2 included, refuses an oversized body while it streams; /v2 answers only sane tensors; every
client error is a short JSON 4xx."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
pytest.importorskip("fastapi")

from nasxserve.runtime import load_bundle  # noqa: E402
from nasxserve.serve.local import send_chunked  # noqa: E402

pytestmark = pytest.mark.slow
LIMIT = 32 * 1024 * 1024                # the server's default body limit


@pytest.fixture(scope="module")
def bundle(digits_bundle: Path):
    return load_bundle(digits_bundle, "cpu")


def _infer(server, bundle, x: np.ndarray, outputs=None, data=None):
    body = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist() if data is None else data}]}
    if outputs is not None:
        body["outputs"] = [{"name": n} for n in outputs]
    return server.post(f"/v2/models/{bundle.manifest.name}/infer", json=body)


def _short_json_4xx(r, status: int | None = None, error: str | None = None) -> dict:
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    assert status is None or r.status_code == status, (r.status_code, r.text[:500])
    assert len(r.content) < 2000, f"{len(r.content)} bytes of error reply"
    body = r.json()
    assert set(body) == {"error", "detail"} and body["detail"], body
    assert error is None or body["error"] == error, body
    return body


# ============================================================================ /v2

def test_v2_refuses_repeated_outputs_without_computing_them(server, bundle, digit_pngs):
    x = bundle.prepare(digit_pngs[:2]).x
    _short_json_4xx(_infer(server, bundle, x, ["similarity_maps", "similarity_maps"]), 400, "duplicate output")
    started = time.monotonic()
    r = _infer(server, bundle, np.repeat(x, 128, axis=0), ["similarity_maps"] * 200)
    _short_json_4xx(r, 422)
    assert time.monotonic() - started < 5
    assert _infer(server, bundle, x, ["logits", "similarity_maps"]).status_code == 200


@pytest.mark.parametrize("bad", ["strings", "booleans", "nulls", "nested"])
def test_v2_takes_only_numbers_as_fp32(bad: str, server, bundle, digit_pngs):
    x = bundle.prepare(digit_pngs[:1]).x
    values = x.ravel().tolist()
    data = {"strings": [str(v) for v in values], "booleans": [True] + values[1:], "nulls": [None] + values[1:],
            "nested": [values]}[bad]
    _short_json_4xx(_infer(server, bundle, x, ["logits"], data=data), 422, "invalid request")


def test_v2_reports_non_finite_outputs_as_an_error_not_null(server, bundle):
    x = np.full((1, 1, 8, 8), 3e38, np.float32)
    x[0, 0, ::2] = -3e38
    r = _infer(server, bundle, x)
    if r.status_code == 200:        # the model happened to stay finite: then no output may be null
        assert all(v is not None for o in r.json()["outputs"] for v in o["data"])
    else:
        _short_json_4xx(r, 422, "non-finite output")


def test_v2_bounds_the_response_size():
    from nasxserve.serve.app import MAX_RESPONSE_VALUES, ApiError, _oip_outputs
    from nasxserve.serve.schemas import InferRequest
    from nasxserve.contracts import OutputSpec
    cub = SimpleNamespace(manifest=SimpleNamespace(outputs=[
        OutputSpec(name="logits", dtype="float32", shape=["batch", 200]),
        OutputSpec(name="similarity_maps", dtype="float32", shape=["batch", 2000, 7, 7])]))
    body = InferRequest(inputs=[], outputs=[{"name": "similarity_maps"}])
    assert _oip_outputs(cub, body, 2) == ["similarity_maps"]
    with pytest.raises(ApiError, match=f"the limit is {MAX_RESPONSE_VALUES}") as e:
        _oip_outputs(cub, body, 256)
    assert e.value.status == 413


# ============================================================================ body limits while reading

def test_a_declared_oversized_body_is_refused_on_every_endpoint(server, bundle):
    big = b"0" * (LIMIT + 1)
    for path in ("/predict", "/explain", f"/v2/models/{bundle.manifest.name}/infer"):
        r = server.post(path, content=big, headers={"content-type": "application/json"})
        _short_json_4xx(r, 413, "body too large")


@pytest.mark.parametrize("path, ctype", [("/predict", "multipart/form-data; boundary=xyz"),
                                         ("/explain", "image/png"),
                                         ("/v2/models/digits/infer", "application/json")])
def test_a_chunked_body_is_refused_once_past_the_limit(path: str, ctype: str, server):
    prefix = {"/predict": b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                          b'Content-Type: image/png\r\n\r\n',
              "/v2/models/digits/infer": b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", '
                                         b'"data": [1'}.get(path, b"")
    sent, answer = send_chunked(str(server.base_url), path, ctype, 200 * 1024 * 1024, prefix)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert sent <= LIMIT + 64 * 1024 * 1024, f"{sent / 2**20:.0f} MB were read before the 413"
    assert server.get("/readyz").status_code == 200


V2_HEAD = b'{"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1'


@pytest.mark.parametrize("path, prefix, fill, status", [("/v2/models/digits/infer", V2_HEAD, b",0", 413),
                                                        ("/predict", b'{"image": "AAAA"', b', "k": 0', 400)])
def test_a_json_body_of_more_items_than_it_can_need_is_refused_while_it_streams(path: str, prefix: bytes, fill: bytes,
                                                                                status: int, server, bundle):
    """Under the byte limit, a body of tiny items would still be a large parse (a 30 MB /v2 body of 15M numbers
    took 383 MB and 2.3 s on the event loop): its commas are counted as it arrives. A digits model takes at most
    256 x 256 numbers per request; an image sent as JSON is one base64 string."""
    sent, answer = send_chunked(str(server.base_url), path, "application/json", 30 * 1024 * 1024, prefix, fill=fill)
    assert answer.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    assert sent < 16 * 1024 * 1024, f"{sent / 2**20:.0f} MB were read before the {status}"
    body = prefix + fill * 200_000 + (b"]}]}" if path.startswith("/v2") else b"}")
    _short_json_4xx(server.post(path, content=body, headers={"content-type": "application/json"}), status,
                    "too many values" if status == 413 else "bad JSON")
    _short_json_4xx(server.post(path, content=V2_HEAD + b"]}]}", headers={"content-type": "application/json"}), 400)
    assert server.get("/readyz").status_code == 200


@pytest.mark.parametrize("headers", [[("content-type", "application/vnd.example+json")],
                                     [("content-type", "application/json"), ("content-type", "text/plain")],
                                     [("content-type", "text/plain")]])
def test_the_item_count_holds_for_every_type_a_parser_would_read_as_json(headers, server):
    """FastAPI parses a +json type as JSON, and Starlette reads the first of two Content-Type headers; a /v2 body is
    counted whatever its type says."""
    body = V2_HEAD + b",0" * 200_000 + b"]}]}"
    _short_json_4xx(server.post("/v2/models/digits/infer", content=body, headers=headers), 413, "too many values")


def test_a_number_too_long_for_python_is_a_400_not_a_500(server):
    r = server.post("/predict", content=b'{"image": "AAAA", "n": ' + b"1" * 5000 + b"}",
                    headers={"content-type": "application/json"})
    _short_json_4xx(r, 400, "bad JSON")


# ============================================================================ short JSON errors

def test_deeply_nested_json_is_a_400_not_a_500(server):
    r = server.post("/predict", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    _short_json_4xx(r, 400, "bad JSON")


def test_an_error_never_echoes_a_huge_input(server, digit_pngs):
    many_keys = json.dumps({f"key{i}": 0 for i in range(300_000)})
    _short_json_4xx(server.post("/predict", content=many_keys, headers={"content-type": "application/json"}), 400)
    png = digit_pngs[0].read_bytes()
    for target in ("\u00b2", "x" * 20_000):
        body = _short_json_4xx(server.post("/explain", params={"class": target}, content=png,
                                           headers={"content-type": "image/png"}), 400, "unknown class")
        assert "invalid literal" not in body["detail"]
    _short_json_4xx(server.get("/" + "x" * 5000), 404)


# ============================================================================ headers, formats, decoding

def test_security_headers_on_the_page_the_api_and_errors(server, digit_pngs):
    png = digit_pngs[0].read_bytes()
    answers = [server.get("/"), server.get("/metadata"), server.get("/docs"), server.get("/nowhere"),
               server.post("/predict", content=png, headers={"content-type": "image/png"}),
               server.post("/predict", content=b"0" * (LIMIT + 1), headers={"content-type": "image/png"})]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff", r.url
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, r.url
        assert r.headers["x-frame-options"] == "DENY" and r.headers["x-request-id"], r.url
    assert "'unsafe-inline'" not in answers[0].headers["content-security-policy"].split("script-src")[1].split(";")[0]


def test_an_ico_holding_a_large_png_is_refused_before_decoding(server):
    import io

    from PIL import Image
    ico = io.BytesIO()
    Image.new("RGB", (256, 256), (9, 9, 9)).save(ico, "ICO")
    r = server.post("/predict", content=ico.getvalue(), headers={"content-type": "image/x-icon"})
    body = _short_json_4xx(r, 400, "bad image")
    assert "accepted format" in body["detail"] and "PNG" in body["detail"]


def test_readyz_answers_while_a_heavy_image_is_decoded(digits_bundle: Path, tmp_path: Path):
    """A 16-bit 6000x6000 PNG (under a MB, 36 MP to decode and convert) on a server that allows it: the
    decoding runs in a thread pool, so /readyz answers at once meanwhile. The image is large enough that its
    decode outlasts several polls on an idle machine too (16 MP took 0.27 s, room for two)."""
    import io
    import threading

    from PIL import Image

    from nasxserve.serve.local import local_server
    buf = io.BytesIO()
    Image.fromarray(np.tile(np.arange(6000, dtype=np.uint16) * 10, (6000, 1))).save(buf, "PNG")
    heavy = buf.getvalue()
    with (tmp_path / "server.log").open("w") as log, \
            local_server(digits_bundle, "--max-pixels", "40000000", log=log, timeout=90) as s, \
            httpx.Client(base_url=s.url, timeout=60) as client, httpx.Client(base_url=s.url, timeout=10) as poll:
        client.get("/readyz")
        done = []

        def post_heavy() -> None:
            t0 = time.monotonic()
            done.append(client.post("/predict", content=heavy, headers={"content-type": "image/png"}).status_code)
            done.append(time.monotonic() - t0)
        worker = threading.Thread(target=post_heavy)
        worker.start()
        time.sleep(0.05)
        latencies = []
        while worker.is_alive():
            t0 = time.monotonic()
            assert poll.get("/readyz").status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.02)
        worker.join()
    status, heavy_s = done
    assert status == 200
    # blocked, the first /readyz would wait for the whole decode; relative, so that a loaded machine slowing
    # both alike does not fail it
    assert len(latencies) >= 3 and max(latencies) < 0.5 * heavy_s, (latencies, heavy_s)


# ============================================================================ metrics

def test_a_second_server_on_the_machine_leaves_the_first_ones_metrics_alone(server, digits_bundle: Path,
                                                                             digit_pngs, tmp_path: Path):
    from nasxserve.serve.local import batch_histogram, local_server
    png = digit_pngs[0].read_bytes()
    assert server.post("/predict", content=png, headers={"content-type": "image/png"}).status_code == 200
    before = batch_histogram(server.get("/metrics").text)[1]
    with (tmp_path / "second.log").open("w") as log, local_server(digits_bundle, log=log, timeout=90) as second:
        for _ in range(3):
            assert server.post("/predict", content=png, headers={"content-type": "image/png"}).status_code == 200
        first_images = batch_histogram(server.get("/metrics").text)[1]
        second_images = batch_histogram(httpx.get(f"{second.url}/metrics", timeout=10).text)[1]
        # the second runs on the defaults: an 8 x 8 model's pixel budget is a phone photo's 12 MP, not 64 MP
        photo = httpx.post(f"{second.url}/predict", content=_flat_png(4000, 3001),
                           headers={"content-type": "image/png"}, timeout=30)
        assert photo.status_code == 413 and "the limit is 12" in photo.json()["detail"], photo.text
        assert httpx.post(f"{second.url}/predict", content=_flat_png(4000, 3000), headers={"content-type": "image/png"},
                          timeout=60).status_code == 200
    assert before >= 1 and first_images == before + 3, (before, first_images)
    assert second_images == 0


def _flat_png(width: int, height: int) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    return buf.getvalue()


def test_the_default_pixel_budget_is_sized_to_the_model():
    from nasxserve.imaging import MAX_PIXELS
    from nasxserve.serve.settings import ServeSettings, model_max_pixels
    assert model_max_pixels(8, 8) == model_max_pixels(32, 32) == 12_000_000       # a phone photo
    assert model_max_pixels(224, 224) == 1024 * 224 * 224                            # 51.4 MP
    assert model_max_pixels(512, 512) == MAX_PIXELS                                  # never over the decoder's
    assert ServeSettings().pixel_limit(224, 224) == 1024 * 224 * 224
    assert ServeSettings(max_pixels=70_000_000).pixel_limit(16, 16) == 70_000_000   # the operator's, when given


def test_unknown_paths_and_ids_add_no_metric_series(server, bundle):
    for i in range(100):
        server.get(f"/nowhere-{i}")
        server.get(f"/prototypes/{i % 20}")
        server.post(f"/v2/models/x{i}/infer", json={})
    metrics = server.get("/metrics").text
    assert "/nowhere-" not in metrics and "/prototypes/1" not in metrics and "/v2/models/x1" not in metrics
    assert 'endpoint="/prototypes/{prototype_id}"' in metrics and 'endpoint="{unknown}"' in metrics
    series = len([line for line in metrics.splitlines() if line and not line.startswith("#")])
    for i in range(100, 300):
        server.get(f"/nowhere-{i}")
    assert len([line for line in server.get("/metrics").text.splitlines()
                if line and not line.startswith("#")]) == series
    # the application still sees the real path
    r = server.get("/nowhere-12345")
    assert r.status_code == 404 and "/nowhere-12345" in r.json()["detail"]
    assert server.get("/prototypes/3").status_code == 200


def test_route_templates():
    from nasxserve.serve.metrics import route_template
    assert route_template("/prototypes/7") == "/prototypes/{prototype_id}"
    assert route_template("/prototypes/7/context") == "/prototypes/{prototype_id}/context"
    assert route_template("/prototypes/7/other") == "{unknown}"
    assert route_template("/v2/models/digits/infer") == "/v2/models/{name}/infer"
    assert route_template("/predict") == "/predict" and route_template("/viewer/viewer.js") == "/viewer/{file}"
    assert route_template("/" + "x" * 1000) == "{unknown}"
