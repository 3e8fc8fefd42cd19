"""A bundle or a request from a stranger can neither run code nor take the server down (issue 28).

Bundles are crafted as an attacker who writes every file, the manifest included, would craft them: the
checksums in the manifest are kept consistent, so only what the files contain is hostile."""
from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest

from conftest import nasx_env

pytest.importorskip("torch")


def reseal(bundle: Path) -> None:
    """Recompute the manifest's sha256 and size of every listed file, as a crafter who writes the manifest can."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel, entry in manifest["files"].items():
        data = (bundle / rel).read_bytes()
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code from the bundle ran')",)


def _craft_pt2(source: Path, target: Path, marker: Path) -> None:
    """``source`` (a real torch.export archive) with its pickled sample inputs replaced by a pickle whose loading
    writes ``marker``: ``torch.export.load`` falls back to ``torch.load(weights_only=False)`` on it."""
    payload = pickle.dumps({"inputs": _WritesMarker(marker)}, protocol=2)
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(target, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            zout.writestr(info, payload if info.filename.endswith("sample_inputs/model.pt") else data)


@pytest.fixture
def crafted_bundle(digits_bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    """(bundle, marker): the digits bundle with a model.pt2 whose loading writes ``marker``; checksums consistent."""
    bundle = tmp_path / "bundle"
    shutil.copytree(digits_bundle, bundle)
    marker = tmp_path / "marker"
    _craft_pt2(digits_bundle / "model.pt2", bundle / "model.pt2", marker)
    reseal(bundle)
    return bundle, marker


# ============================================================================ nothing in a bundle is unpickled

def test_nasx_verify_does_not_load_torch_files_unless_trusted(crafted_bundle, nasx):
    bundle, marker = crafted_bundle
    r = nasx("verify", bundle, "--json")
    assert r.returncode == 0, r.stderr
    assert not marker.exists(), "nasx verify ran code from the bundle"
    report = json.loads(r.stdout)
    assert set(report["live_pytorch"]) == {"onnx"} and report["live_pytorch"]["onnx"]["ok"]
    assert set(report["torch_files"]) == {"torchscript", "pt2"}
    assert all(state.startswith("sha256 only") for state in report["torch_files"].values())
    r = nasx("verify", bundle)
    assert r.returncode == 0 and "not loaded" in r.stdout and not marker.exists()
    # the crafted file is live: asking for it explicitly runs it, as the option's help says
    help_text = nasx("verify", "--help").stdout
    help_text = " ".join(help_text.replace("\u2502", " ").split())      # the help panel's text, unwrapped
    assert "--trust-torch-files" in help_text and "EXECUTES CODE FROM THE BUNDLE" in help_text
    nasx("verify", bundle, "--trust-torch-files")
    assert marker.exists()


@pytest.mark.slow
def test_nasx_serve_does_not_load_torch_files(crafted_bundle, tmp_path: Path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("bentoml")
    from nasxserve.serve.local import local_server
    bundle, marker = crafted_bundle
    with (tmp_path / "server.log").open("w") as log, local_server(bundle, log=log, timeout=90) as s:
        assert httpx.get(f"{s.url}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{s.url}/metadata", timeout=10).status_code == 200
    assert not marker.exists(), "nasx serve ran code from the bundle"
