"""Signed bundles (issue 28, docs/security.md "Signed bundles"): a key pair from nasx keygen, a signature over the
bundle digest from nasx sign or nasx export --sign-key, checked by nasx verify and nasx serve --trusted-key."""
from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from test_security import EDITS, _one_line_refusal, reseal

pytest.importorskip("cryptography")


@pytest.fixture
def keys(nasx, tmp_path: Path) -> tuple[Path, Path]:
    """(private, public) of a fresh key pair made by nasx keygen."""
    private = tmp_path / "keys" / "team"
    private.parent.mkdir()
    r = nasx("keygen", private)
    assert r.returncode == 0, r.stderr
    return private, private.with_name("team.pub")


@pytest.fixture
def signed(digits_bundle: Path, keys, nasx, tmp_path: Path) -> Path:
    bundle = tmp_path / "signed"
    shutil.copytree(digits_bundle, bundle)
    r = nasx("sign", bundle, "--key", keys[0])
    assert r.returncode == 0, r.stderr
    return bundle


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(keys, nasx):
    private, public = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    before = private.read_bytes()
    _one_line_refusal(nasx("keygen", private), "exists; choose another name")
    assert private.read_bytes() == before


def test_keygen_and_sign_fail_in_one_line_where_they_cannot_write(signed: Path, keys, nasx, tmp_path: Path):
    _one_line_refusal(nasx("keygen", tmp_path / "no-such-folder" / "k"), "cannot write")
    target = tmp_path / "elsewhere.pem"
    (tmp_path / "k2.pub").symlink_to(target)                 # a dangling link where the public key would go
    _one_line_refusal(nasx("keygen", tmp_path / "k2"), "k2.pub exists")
    assert not target.exists() and not (tmp_path / "k2").exists()
    (signed / "signature.json").unlink()
    (signed / "signature.json").mkdir()
    _one_line_refusal(nasx("sign", signed, "--key", keys[0]), "cannot write")


def test_a_signed_bundle_verifies_with_its_key_and_says_so_without_it(signed: Path, keys, nasx):
    r = nasx("verify", signed, "--trusted-key", keys[1])
    assert r.returncode == 0, r.stderr
    assert "signature: ok (signed by the trusted key" in r.stdout
    record = json.loads((signed / "signature.json").read_text())
    digest = json.loads((signed / "manifest.json").read_text())["bundle_digest"]["sha256"]
    assert record["signed"] == f"nasx-bundle:{digest}" and record["algorithm"] == "ed25519"
    r = nasx("verify", signed)
    assert r.returncode == 0 and "signature: present, not checked" in r.stdout, r.stdout


def test_another_key_an_unsigned_bundle_and_a_damaged_signature_are_refused(signed: Path, digits_bundle: Path, keys,
                                                                           nasx, tmp_path: Path):
    other = tmp_path / "other"
    assert nasx("keygen", other).returncode == 0
    _one_line_refusal(nasx("verify", signed, "--trusted-key", f"{other}.pub"), "which is not among the trusted keys")
    _one_line_refusal(nasx("verify", digits_bundle, "--trusted-key", keys[1]), "is not signed")
    record = json.loads((signed / "signature.json").read_text())
    record["signature"] = record["signature"][:-4] + ("AAA=" if record["signature"][-4:] != "AAA=" else "BBB=")
    (signed / "signature.json").write_text(json.dumps(record))
    _one_line_refusal(nasx("verify", signed, "--trusted-key", keys[1]), "does not sign this bundle's digest")
    (signed / "signature.json").write_text("[" * 10_000)
    _one_line_refusal(nasx("verify", signed, "--trusted-key", keys[1]), "signature.json is malformed")
    (signed / "signature.json").write_bytes(json.dumps(record).encode() + b" " * 50_000_000)    # read 4 KB of it
    _one_line_refusal(nasx("verify", signed, "--trusted-key", keys[1]), "signature.json is malformed")
    _one_line_refusal(nasx("verify", signed, "--trusted-key", keys[0]), "is not a PEM public key")


@pytest.mark.parametrize("edit", ["classes", "last_layer"])
def test_a_bundle_edited_and_resealed_after_signing_fails_its_signature(edit: str, signed: Path, keys, nasx):
    """The crafter of issue 28 rewrites the manifest and every checksum; only the signature can tell."""
    manifest = json.loads((signed / "manifest.json").read_text())
    EDITS[edit][0](manifest)
    reseal(signed, manifest)
    _one_line_refusal(nasx("verify", signed, "--trusted-key", keys[1]), "does not sign this bundle's digest")


def test_export_signs_with_a_key_and_refuses_a_bad_key_before_exporting(trained_digits_run: Path, keys, nasx,
                                                                         tmp_path: Path):
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello")
    _one_line_refusal(nasx("export", trained_digits_run, "-o", tmp_path / "b1", "--formats", "onnx",
                           "--sign-key", bad), "is not a PEM private key")
    assert not (tmp_path / "b1").exists()
    r = nasx("export", trained_digits_run, "-o", tmp_path / "b2", "--formats", "onnx", "--sign-key", keys[0])
    assert r.returncode == 0, r.stderr
    assert "signed by" in r.stderr
    assert nasx("verify", tmp_path / "b2", "--trusted-key", keys[1]).returncode == 0


@pytest.mark.slow
def test_serve_with_a_trusted_key_refuses_an_unsigned_bundle_and_serves_a_signed_one(signed: Path, digits_bundle: Path,
                                                                                     keys, nasx, tmp_path: Path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("bentoml")
    from nasxserve.serve.local import local_server
    _one_line_refusal(nasx("serve", digits_bundle, "--trusted-key", keys[1], "--port", "1"), "is not signed")
    from conftest import nasx_env, run_nasx
    env = dict(nasx_env(), NASX_TRUSTED_KEY=str(keys[1]))
    _one_line_refusal(run_nasx(["serve", str(digits_bundle), "--port", "1"], env, tmp_path), "is not signed")
    with (tmp_path / "server.log").open("w") as log, \
            local_server(signed, "--trusted-key", keys[1], log=log, timeout=90) as s:
        assert httpx.get(f"{s.url}/metadata", timeout=30).json()["name"] == "digits"
