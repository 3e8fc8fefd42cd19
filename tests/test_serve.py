"""The real BentoML server (``nasx serve`` on 127.0.0.1, a free port) on a bundle of a tiny trained run,
called over HTTP with httpx: answers equal the torch-free runtime's, every bad request is a 4xx with a
JSON error, and concurrent requests are merged into batches."""
from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nasxserve.serve.local import batch_histogram, free_port


httpx = pytest.importorskip("httpx")
pytest.importorskip("bentoml")
pytest.importorskip("fastapi")

from nasxserve.runtime import load_bundle  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(digits_bundle: Path):
    return load_bundle(digits_bundle, "cpu")


def _png(path: Path) -> bytes:
    return path.read_bytes()


# ============================================================================ answers

def test_an_inverted_image_is_answered_with_a_warning(server, digit_pngs):
    from PIL import Image
    with Image.open(digit_pngs[0]) as im:
        buffer = io.BytesIO()
        Image.eval(im.convert("L"), lambda v: 255 - v).save(buffer, format="PNG")
    for route in ("/predict", "/explain"):
        plain = server.post(route, content=_png(digit_pngs[0]), headers={"content-type": "image/png"})
        flipped = server.post(route, content=buffer.getvalue(), headers={"content-type": "image/png"})
        assert plain.status_code == flipped.status_code == 200
        assert plain.json()["warnings"] == []
        assert len(flipped.json()["warnings"]) == 1 and "looks inverted" in flipped.json()["warnings"][0]


def test_predict_equals_the_runtime_for_every_input_kind(server, bundle, digit_pngs):
    for png in digit_pngs[:4]:
        expected = bundle.predict([png], top_k=3)[0]["predictions"]
        data = _png(png)
        answers = [
            server.post("/predict?top_k=3", files={"image": ("x.png", data, "image/png")}),
            server.post("/predict?top_k=3", content=data, headers={"content-type": "image/png"}),
            server.post("/predict?top_k=3", json={"image": base64.b64encode(data).decode()}),
            server.post("/predict?top_k=3", json={"image": "data:image/png;base64," + base64.b64encode(data).decode()}),
        ]
        for r in answers:
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["image"] == {"width": 8, "height": 8}
            assert [p["label"] for p in body["predictions"]] == [p["class"] for p in expected]
            assert [p["logit"] for p in body["predictions"]] == pytest.approx([p["logit"] for p in expected], abs=1e-4)
            assert body["model"]["sha256"] == bundle.manifest.files["model.onnx"].sha256


def test_explain_evidence_adds_up_and_equals_the_runtime(server, bundle, digit_pngs):
    for png in digit_pngs[:4]:
        r = server.post("/explain?top_prototypes=20", content=_png(png), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        data = r.json()["explanations"][0]["data"]
        expected = bundle.explain([png], top_prototypes=20)[0]["explanations"][0]
        assert data["target_class_id"] == expected["index"] == r.json()["predictions"][0]["class_id"]
        assert data["evidence_sum"] == pytest.approx(data["logit"], abs=1e-4)
        assert sum(p["contribution"] for p in data["top_prototypes"]) == pytest.approx(data["logit"], abs=1e-4)
        assert [p["prototype_id"] for p in data["top_prototypes"]] == [e["prototype"] for e in expected["evidence"]]
        assert [p["box_xyxy"] for p in data["top_prototypes"]] == [e["box"] for e in expected["evidence"]]
        for p in data["top_prototypes"]:
            assert p["contribution"] == pytest.approx(p["weight"] * p["similarity"], rel=1e-6)
            # the training patch is boxed by the rule that boxed the image, and its URLs say which
            source = bundle.prototypes[p["prototype_id"]].source
            assert p["source"]["regions"] == "evidence" and p["source"]["box_xyxy"] == source.evidence_box
            assert p["source"]["patch_url"] == f"/prototypes/{p['prototype_id']}?regions=evidence"
            assert p["source"]["context_url"] == f"/prototypes/{p['prototype_id']}/context?regions=evidence"
            if p["contribution"] > 0:   # positive evidence for a class only ever comes from that class's prototypes
                assert p["class_id"] == data["target_class_id"], p
        own = sum(abs(p["contribution"]) for p in data["top_prototypes"] if p["class_id"] == data["target_class_id"])
        assert data["own_class_share"] == pytest.approx(own / sum(abs(p["contribution"])
                                                                  for p in data["top_prototypes"]), rel=1e-6)
        assert data["own_class_share"] == pytest.approx(expected["own_class_share"])


def test_explain_draws_the_region_rule_asked_for(server, bundle, digit_pngs):
    png = _png(digit_pngs[2])
    for rule in ("evidence", "activation"):
        r = server.post(f"/explain?top_prototypes=3&regions={rule}", content=png, headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        explanation = r.json()["explanations"][0]
        expected = bundle.explain([digit_pngs[2]], top_prototypes=3, regions=rule)[0]["explanations"][0]
        assert explanation["meta"]["regions"] == rule
        boxes = [p["box_xyxy"] for p in explanation["data"]["top_prototypes"]]
        assert boxes == [e["box"] for e in expected["evidence"]]
    default = server.post("/explain?top_prototypes=3", content=png, headers={"content-type": "image/png"})
    assert default.json()["explanations"][0]["meta"]["regions"] == "evidence"
    r = server.post("/explain?regions=peaks", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "regions" in r.text


def test_explain_answers_validate_against_the_published_schema(server, digit_pngs):
    """What an app reads from /explain is what docs/schemas/explain.schema.json says, heatmaps or not."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    from conftest import REPO
    schema = json.loads((REPO / "docs" / "schemas" / "explain.schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    for params in ({"top_prototypes": 3}, {"class": "7", "top_prototypes": 50, "heatmap": "true", "top_k": 10}):
        r = server.post("/explain", params=params, content=_png(digit_pngs[1]), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        errors = [e.message for e in validator.iter_errors(r.json())]
        assert not errors, errors[:3]
    assert list(validator.iter_errors({"model": {}, "image": {"width": 8}, "predictions": []}))


def test_explain_a_named_class_with_heatmaps(server, bundle, digit_pngs):
    r = server.post("/explain", params={"class": "7", "top_prototypes": 3, "heatmap": "true"},
                    content=_png(digit_pngs[0]), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    data = r.json()["explanations"][0]["data"]
    assert data["target_class_id"] == 7 and data["label"] == "7"
    assert data["evidence_sum"] == pytest.approx(data["logit"], abs=1e-4)
    for p in data["top_prototypes"]:
        heat = Image.open(io.BytesIO(base64.b64decode(p["heatmap"])))
        assert heat.format == "PNG" and heat.size == (8, 8) and heat.mode == "L"
        assert np.asarray(heat).max() == 255


def test_prototype_pngs_metadata_and_openapi(server, bundle, digits_bundle: Path):
    for j in (0, 5, len(bundle.prototypes) - 1):
        r = server.get(f"/prototypes/{j}")
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert r.content == (digits_bundle / f"prototypes/{j:04d}.png").read_bytes()
        context = server.get(f"/prototypes/{j}/context").content
        assert context == (digits_bundle / f"prototypes/{j:04d}_context.png").read_bytes()
        for kind, suffix in (("", ""), ("/context", "_context")):
            r = server.get(f"/prototypes/{j}{kind}?regions=evidence")
            assert r.content == (digits_bundle / f"prototypes/{j:04d}_evidence{suffix}.png").read_bytes()
    assert server.get("/prototypes/0?regions=gradient").status_code == 422
    r = server.get(f"/prototypes/{len(bundle.prototypes)}")
    assert r.status_code == 404 and r.json()["error"] == "unknown prototype"
    meta = server.get("/metadata").json()
    assert meta["classes"] == bundle.classes and meta["genotype"] == bundle.manifest.genotype
    assert len(meta["prototypes"]) == len(bundle.prototypes) and "files" not in meta and "training" not in meta
    assert str(digits_bundle) not in json.dumps(meta) and "prototypes/0000.png" not in json.dumps(meta)
    paths = server.get("/docs.json").json()["paths"]
    for route in ("/predict", "/explain", "/metadata", "/prototypes/{prototype_id}", "/v2/models/{name}",
                  "/v2/models/{name}/infer"):
        assert route in paths, sorted(paths)
    schema = json.dumps(paths["/explain"])
    assert "ExplainResponse" in schema
    for probe in ("/livez", "/readyz", "/metrics", "/"):
        assert server.get(probe).status_code == 200
    unknown = server.post("/predictions", content=b"x")
    assert unknown.status_code == 404 and unknown.json()["error"] == "not found"
    wrong_method = server.get("/predict")
    assert wrong_method.status_code == 405 and set(wrong_method.json()) == {"error", "detail"}


def test_open_inference_protocol(server, bundle, digit_pngs):
    name = bundle.manifest.name
    meta = server.get(f"/v2/models/{name}").json()
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "similarities", "min_distances", "best_patch",
                                                    "similarity_maps"]
    x = bundle.prepare(digit_pngs[:3]).x
    r = server.post(f"/v2/models/{name}/infer", json={
        "id": "abc",
        "inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}],
        "outputs": [{"name": "logits"}, {"name": "best_patch"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "abc" and [o["name"] for o in body["outputs"]] == ["logits", "best_patch"]
    expected = bundle.run(x)
    logits = np.asarray(body["outputs"][0]["data"]).reshape(body["outputs"][0]["shape"])
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-4)
    assert body["outputs"][1]["datatype"] == "INT64"
    assert server.get("/v2/models/nope").status_code == 404


# ============================================================================ bad requests

def _bad_requests(png: bytes) -> list[tuple[str, dict]]:
    big = io.BytesIO()
    Image.new("L", (1200, 1000)).save(big, "PNG")                    # 1.2 MP > the server's 1 MP limit
    tiny = io.BytesIO()
    Image.new("L", (2, 2)).save(tiny, "PNG")
    kinds = [
        ("not an image", dict(content=b"hello, world", headers={"content-type": "image/png"})),
        ("truncated", dict(content=png[: len(png) // 2], headers={"content-type": "image/png"})),
        ("empty body", dict(content=b"", headers={"content-type": "image/png"})),
        ("unsupported content type", dict(content=png, headers={"content-type": "text/plain"})),
        ("too many pixels", dict(content=big.getvalue(), headers={"content-type": "image/png"})),
        ("too small", dict(content=tiny.getvalue(), headers={"content-type": "image/png"})),
        ("wrong field", dict(files={"picture": ("x.png", png, "image/png")})),
        ("field is text", dict(data={"image": "not a file"}, files={"other": ("x.png", png, "image/png")})),
        ("bad json", dict(content=b"{not json", headers={"content-type": "application/json"})),
        ("json without image", dict(json={"picture": "abc"})),
        ("bad base64", dict(json={"image": "!!!not base64!!!"})),
        ("base64 of garbage", dict(json={"image": base64.b64encode(b"garbage" * 10).decode()})),
        ("data uri without base64", dict(json={"image": "data:image/png,abc"})),
        ("top_k zero", dict(params={"top_k": 0}, content=png, headers={"content-type": "image/png"})),
        ("top_k text", dict(params={"top_k": "many"}, content=png, headers={"content-type": "image/png"})),
    ]
    return kinds


def test_two_hundred_bad_requests_get_json_4xx_and_the_server_survives(server, digit_pngs):
    png = _png(digit_pngs[0])
    kinds = _bad_requests(png)
    extra = [("/explain", dict(params={"class": "cat"}, content=png, headers={"content-type": "image/png"})),
             ("/explain", dict(params={"top_prototypes": 1000}, content=png, headers={"content-type": "image/png"})),
             ("/prototypes/99999", None), ("/prototypes/-1", None), ("/prototypes/abc", None),
             ("/predictions", None), ("/v2/models", None)]
    seen = {}
    sent = 0
    while sent < 210:
        for name, kwargs in kinds:
            for path in ("/predict", "/explain"):
                r = server.post(path, **kwargs)
                assert 400 <= r.status_code < 500, (name, path, r.status_code, r.text)
                body = r.json()
                assert set(body) == {"error", "detail"} and body["detail"], (name, body)
                seen[name] = (r.status_code, body["error"])
                sent += 1
        for path, kwargs in extra:
            r = server.post(path, **kwargs) if kwargs else server.get(path)
            assert 400 <= r.status_code < 500 and set(r.json()) == {"error", "detail"}, (path, r.text)
            sent += 1
    assert seen["too many pixels"][0] == 413 and seen["unsupported content type"][0] == 415
    assert seen["wrong field"][1] == "missing field" and seen["not an image"][1] == "bad image"
    assert server.get("/readyz").status_code == 200
    r = server.post("/predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200
    assert r.json()["predictions"] == server.post("/predict", files={"image": ("x.png", png)}).json()["predictions"]


# ============================================================================ load and batching

def hidden_copies(server) -> int:
    """Copies of the image one /explain runs: a block per latent cell, and one per inner corner of that grid."""
    grid = server.get("/metadata").json()["latent_grid"]
    h, w = min(grid["height"], 8), min(grid["width"], 8)
    return h * w + (h - 1) * (w - 1)


def test_two_thousand_requests_from_32_clients_without_errors_and_batched(server, digit_pngs):
    before = batch_histogram(server.get("/metrics").text)
    payloads = [_png(p) for p in digit_pngs]
    errors: list[str] = []
    lock = threading.Lock()
    base = str(server.base_url)

    def client(i: int) -> int:
        done = 0
        with httpx.Client(base_url=base, timeout=60) as c:
            for k in range(63):                                   # 32 x 63 = 2,016 requests
                path = "/explain" if k % 4 == 0 else "/predict"
                r = c.post(path, content=payloads[(i + k) % len(payloads)], headers={"content-type": "image/png"})
                if r.status_code != 200:
                    with lock:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                done += 1
        return done

    with ThreadPoolExecutor(32) as pool:
        sent = sum(pool.map(client, range(32)))
    assert sent >= 2000 and errors == []
    batches, images = (a - b for a, b in zip(batch_histogram(server.get("/metrics").text), before))
    explained = 32 * len(range(0, 63, 4))
    # an /explain runs the image with its hidden copies, in place of the image alone
    assert images == sent + explained * hidden_copies(server)
    assert batches < images / 2, f"{images} images in {batches} batches: requests were not merged"


def test_nasx_serve_refuses_a_damaged_bundle_before_starting(digits_bundle: Path, tmp_path: Path, nasx):
    import shutil
    copy = tmp_path / "bundle"
    shutil.copytree(digits_bundle, copy)
    (copy / "parity.npz").write_bytes(b"changed")
    r = nasx("serve", copy, "--port", str(free_port()), timeout=60)
    assert r.returncode == 2
    assert "parity.npz does not match its sha256" in r.stderr and "Traceback" not in r.stderr


def test_bentoml_build_makes_a_torch_free_bento_that_holds_the_bundle(digits_bundle: Path, tmp_path: Path):
    import shutil
    from conftest import REPO, nasx_env
    ctx = tmp_path / "repo"
    shutil.copytree(REPO / "nasxserve", ctx / "nasxserve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "bentofile.yaml", ctx)
    shutil.copytree(digits_bundle, ctx / "bundle")
    env = dict(nasx_env(), BENTOML_HOME=str(tmp_path / "bentoml-home"))
    r = subprocess.run([sys.executable, "-m", "bentoml", "build", "."], cwd=ctx, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    bento = next(p for p in (tmp_path / "bentoml-home" / "bentos" / "nasx").iterdir() if p.is_dir())   # not "latest"
    src = bento / "src"
    assert (src / "bundle" / "manifest.json").read_bytes() == (digits_bundle / "manifest.json").read_bytes()
    assert (src / "nasxserve" / "serve" / "service.py").is_file()
    assert (src / "nasxserve" / "serve" / "static" / "viewer.js").is_file()        # the page at /
    assert not (src / "nasxserve" / "training").exists() and not (src / "nasxserve" / "export").exists()
    requirements = "\n".join(p.read_text() for p in bento.rglob("requirements*.txt")).lower()
    assert "onnxruntime" in requirements and "fastapi" in requirements
    assert not re.search(r"^(torch|torchvision|nvidia-cu\w*)\b", requirements, re.M), "torch in the bento"
