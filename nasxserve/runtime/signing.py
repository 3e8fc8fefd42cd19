"""Ed25519 signatures of bundles: who made a bundle, not only that it is intact (docs/security.md, "Signed
bundles").

The bundle digest (the manifest's ``bundle_digest``) already covers every file; a signature covers the digest.
It lives beside the manifest in ``signature.json``, which no digest lists, so a bundle can be signed after it
was written, by someone other than its exporter, and by more than one key in turn (the last one counts):

    {"format": "nasx-signature", "algorithm": "ed25519", "public_key": <base64, 32 bytes>,
     "signature": <base64, 64 bytes>, "signed": "nasx-bundle:<digest hex>"}

Keys are PEM files as ``nasx keygen`` (or ``openssl genpkey -algorithm ed25519``) writes them: the private key
PKCS#8 without a passphrase, the public key SubjectPublicKeyInfo. The ``cryptography`` package does the
mathematics; it is the ``sign`` extra, needed only when signing or checking a signature.
"""
from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from nasxserve.errors import BundleError, RuntimeSetupError
from nasxserve.io import atomic_write_json
from nasxserve.runtime.files import open_regular

SIGNATURE_FILE = "signature.json"
SIGNATURE_FORMAT = "nasx-signature"
MAX_SIGNATURE_BYTES = 4096


def signed_message(digest: str) -> bytes:
    """What a signature signs: the bundle digest, prefixed so that a bundle signature is not valid for anything
    else the same key may sign."""
    return f"nasx-bundle:{digest}".encode("ascii")


def _crypto() -> Any:
    """The parts of ``cryptography`` used here, or a :class:`RuntimeSetupError` that says how to install it."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise RuntimeSetupError("signing and checking signatures need the cryptography package: "
                                "pip install 'nasx[sign]'") from None
    return SimpleNamespace(ed25519=ed25519, serialization=serialization, InvalidSignature=InvalidSignature)


def generate_key(private_path: Path) -> Path:
    """Write a new Ed25519 private key to ``private_path`` (readable by its owner only) and its public key to
    ``private_path`` + ``.pub``; returns the public key's path. Refuses to overwrite either."""
    c = _crypto()
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise BundleError(f"{path} exists; choose another name (a key is never overwritten)")
    key = c.ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(c.serialization.Encoding.PEM, c.serialization.PrivateFormat.PKCS8,
                                    c.serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(c.serialization.Encoding.PEM,
                                               c.serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    _write_new(public_path, public_pem, 0o644)
    return public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``data``; never through an existing file or link (O_EXCL does not follow one)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except FileExistsError:
        raise BundleError(f"{path} exists; choose another name (a key is never overwritten)") from None
    except OSError as e:
        raise BundleError(f"cannot write {path} ({e.strerror})") from None


def load_private_key(path: Path) -> Any:
    """The Ed25519 private key in the PEM file ``path``, or a :class:`BundleError` saying what the file is."""
    return _load_pem(path, private=True)


def _load_pem(path: Path, private: bool) -> Any:
    c = _crypto()
    kind = "private" if private else "public"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read the {kind} key {path} ({e.strerror})") from None
    try:
        key = (c.serialization.load_pem_private_key(data, password=None) if private
               else c.serialization.load_pem_public_key(data))
    except TypeError:
        raise BundleError(f"{path} is encrypted; give an unencrypted Ed25519 key (nasx keygen writes one)") from None
    except ValueError:
        raise BundleError(f"{path} is not a PEM {kind} key; nasx keygen writes KEY (private) and KEY.pub "
                          f"(public)") from None
    expected = c.ed25519.Ed25519PrivateKey if private else c.ed25519.Ed25519PublicKey
    if not isinstance(key, expected):
        raise BundleError(f"{path} is a {type(key).__name__.removeprefix('_')} key, not Ed25519")
    return key


def public_key_id(raw: bytes) -> str:
    """A short name of a public key for messages: the base64 of its 32 bytes."""
    return base64.b64encode(raw).decode()


def _raw_public(key: Any) -> bytes:
    c = _crypto()
    return key.public_bytes(c.serialization.Encoding.Raw, c.serialization.PublicFormat.Raw)


def sign_bundle(root: Path, digest: str, key: Any) -> str:
    """Sign the bundle at ``root`` whose (already checked) digest is ``digest`` with ``key`` (from
    :func:`load_private_key`); writes ``signature.json`` atomically and returns the signer's public key id."""
    raw = _raw_public(key.public_key())
    try:
        atomic_write_json(root / SIGNATURE_FILE, {
            "format": SIGNATURE_FORMAT, "algorithm": "ed25519", "public_key": public_key_id(raw),
            "signature": base64.b64encode(key.sign(signed_message(digest))).decode(),
            "signed": signed_message(digest).decode()})
    except OSError as e:
        raise BundleError(f"cannot write {root / SIGNATURE_FILE} ({e.strerror}); is the bundle writable?") from None
    return public_key_id(raw)


def check_signature(root: Path, digest: str, trusted_keys: Sequence[Path]) -> str:
    """That ``signature.json`` signs ``digest`` with one of ``trusted_keys`` (public PEM files); returns that
    key's id. Raises :class:`BundleError` naming what is wrong: no signature, a key not trusted, a signature
    that does not verify."""
    c = _crypto()
    trusted = {_raw_public(_load_pem(p, private=False)) for p in trusted_keys}
    path = root / SIGNATURE_FILE
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{root} is not signed (no regular {SIGNATURE_FILE}); ask its author for a signed bundle, "
                          f"or drop --trusted-key to accept an unsigned one")
    try:
        with open_regular(path) as f:
            data = f.read(MAX_SIGNATURE_BYTES + 1)       # a signature is a few hundred bytes; never read more
        record = json.loads(data) if len(data) <= MAX_SIGNATURE_BYTES else None
        if not isinstance(record, dict) or record.get("format") != SIGNATURE_FORMAT:
            raise ValueError("not a nasx signature")
        if record.get("algorithm") != "ed25519":
            raise ValueError(f"algorithm {str(record.get('algorithm'))[:40]!r}, not ed25519")
        raw = base64.b64decode(record["public_key"], validate=True)
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise BundleError(f"{path} is malformed ({str(e)[:200]}); sign the bundle again") from None
    if raw not in trusted:
        raise BundleError(f"{root} is signed by the key {public_key_id(raw)[:60]}, which is not among the trusted "
                          f"keys ({', '.join(str(p) for p in trusted_keys)})")
    try:
        c.ed25519.Ed25519PublicKey.from_public_bytes(raw).verify(signature, signed_message(digest))
    except (c.InvalidSignature, ValueError):
        raise BundleError(f"{path} does not sign this bundle's digest {digest}: the bundle was changed after it "
                          f"was signed, or the signature was damaged") from None
    return public_key_id(raw)
