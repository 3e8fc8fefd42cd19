"""A bundle's files before anything runs: the manifest read and validated, every file checked against its sha256,
the folder walked for links and special files, and what the manifest claims cross-checked against the ONNX graph's
metadata and the weights (docs/security.md). numpy and ONNX Runtime's model metadata only; nothing is unpickled."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from nasxserve.contracts import Manifest, describe
from nasxserve.errors import BundleError
from nasxserve.runtime.format import (CONFIG_FILE, DIGEST_FIELD, FORMAT, FORMAT_VERSION, INPUT_NAME, MANIFEST,
                                      METADATA_PREFIX, ONNX_FILE, ONNX_METADATA_KEYS, PARITY_FILE,
                                      REQUIRED_FILES, WEIGHTS_FILE, manifest_digest)
from nasxserve.runtime.parity import ParityRule

MAX_MANIFEST_BYTES = 64 * 2**20      # the manifest of a 200-class x 10-prototype model is ~20 MB (its last layer)


def read_manifest(root: Path) -> Manifest:
    """Parse and check ``manifest.json`` of the bundle at ``root``: format, version, every field's type
    (:class:`~nasxserve.contracts.Manifest`) and the digest over the file as read."""
    if not root.is_dir():
        raise BundleError(f"{root} is not a folder; a bundle is the folder `nasx export` writes")
    path = root / MANIFEST
    if not path.is_file():
        run_dir = (root / "config.yaml").is_file() and (root / "checkpoints").is_dir()
        hint = (f"; it looks like a training run: make a bundle of it with `nasx export {root} -o BUNDLE`" if run_dir
                else "; a bundle is the folder `nasx export` writes")
        raise BundleError(f"{root} is not a nasx bundle: {MANIFEST} is missing{hint}")
    if path.is_symlink():
        raise BundleError(f"{path} is a symbolic link; a bundle holds only regular files")
    raw = _read_json(path, MAX_MANIFEST_BYTES)
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise BundleError(f"{path} is not a nasx bundle manifest (format is not {FORMAT!r})")
    version = raw.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = "upgrade nasx to read it" if newer else "re-export it with this nasx"
        raise BundleError(f"bundle format version {version!r} is not supported (this nasx reads version "
                          f"{FORMAT_VERSION}); {hint}")
    manifest = _validate(path, raw)
    if manifest.bundle_digest.sha256 != manifest_digest(raw):
        raise BundleError(f"{path} does not match its {DIGEST_FIELD}: the manifest was edited or damaged; "
                          f"re-export the bundle")
    return manifest


# what a field that fails its type holds, in the words of the runtime's older checks
_FIELD_MEANING = {"files": "is not a mapping of file names to {sha256, bytes}", "classes": "is not a list of names",
                  "input": "does not give the input's shape and preprocessing",
                  "prototypes": "is not a list of prototypes", "last_layer": "has no valid weight matrix",
                  DIGEST_FIELD: "is not a {sha256, of} object"}


def _validate(path: Path, raw: dict[str, Any]) -> Manifest:
    """``raw`` as a :class:`Manifest`, or a one-line :class:`BundleError` naming the missing or malformed fields."""
    try:
        return Manifest.model_validate(raw)
    except ValidationError as e:
        problems = e.errors(include_url=False, include_input=False)
        missing = [str(p["loc"][0]) for p in problems if p["type"] == "missing" and len(p["loc"]) == 1]
        if missing == [DIGEST_FIELD]:
            raise BundleError(f"{path} has no {DIGEST_FIELD}: it was written by an older nasx or edited; re-export "
                              f"the bundle with this nasx") from None
        if missing:
            raise BundleError(f"{path} lacks the fields {missing}; re-export the bundle") from None
        field = str(problems[0]["loc"][0]) if problems[0]["loc"] else ""
        meaning = _FIELD_MEANING.get(field, "is malformed")
        raise BundleError(f"{path}: {field!r} {meaning} ({describe(e, limit=1)}); re-export the bundle") from None


def _read_json(path: Path, limit: int) -> Any:
    """A JSON file of at most ``limit`` bytes, any parse problem (deep nesting included) as a BundleError."""
    if path.stat().st_size > limit:
        raise BundleError(f"{path} is larger than {limit // 2**20} MB; it is not a file nasx export wrote")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        reason = "it is nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise BundleError(f"{path} does not parse as JSON ({reason}); re-export the bundle") from None


def _safetensors_tensor(path: Path, name: str) -> np.ndarray | None:
    """Tensor ``name`` of a safetensors file, read from its header without torch; None if there is none."""
    dtypes = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64}
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= MAX_MANIFEST_BYTES:
            raise BundleError(f"{path} is not a safetensors file")
        try:
            header = json.loads(f.read(n))
            entry = header.get(name)
            if entry is None:
                return None
            dtype = np.dtype(dtypes[entry["dtype"]]).newbyteorder("<")
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            if end - begin != dtype.itemsize * int(np.prod(shape)) or begin < 0:
                raise ValueError("offsets do not match the shape")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise BundleError(f"{path}: unreadable safetensors header ({e})") from None
        f.seek(8 + n + begin)
        data = f.read(end - begin)
    if len(data) != end - begin:
        raise BundleError(f"{path} is truncated")
    return np.frombuffer(data, dtype).reshape(shape)


def check_claims(root: Path, manifest: Manifest, session: Any) -> None:
    """What the manifest says against what the model files say themselves: the ONNX graph's ``nasx.*`` metadata
    (classes, input and preprocessing, ...), ``config.json``'s classes and model, ``weights.safetensors``'
    last-layer weight, and the ONNX graph's behaviour (its logits are the manifest's last-layer weight times its
    similarities). Raises :class:`BundleError` naming the first disagreement."""
    meta = session.get_modelmeta().custom_metadata_map
    for key in ONNX_METADATA_KEYS:
        raw = meta.get(METADATA_PREFIX + key)
        if raw is None:
            raise BundleError(f"{ONNX_FILE} lacks its {METADATA_PREFIX}{key} metadata; re-export the bundle")
        try:
            claimed = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise BundleError(f"{ONNX_FILE}'s {METADATA_PREFIX}{key} metadata does not parse") from None
        if claimed != manifest.as_json({key}).get(key):
            raise BundleError(f"{MANIFEST}'s {key} does not match {ONNX_FILE}'s own {METADATA_PREFIX}{key} metadata: "
                              f"the manifest or the model was changed; re-export the bundle")
    config = _read_json(root / CONFIG_FILE, MAX_MANIFEST_BYTES)
    for key, value in (("classes", manifest.classes), ("model", manifest.model)):
        if not isinstance(config, dict) or config.get(key) != value:
            raise BundleError(f"{MANIFEST}'s {key} does not match {CONFIG_FILE}'s; re-export the bundle")
    weight = np.asarray(manifest.last_layer.weight, np.float64)
    stored = _safetensors_tensor(root / WEIGHTS_FILE, "last_layer.weight")
    if stored is None or stored.shape != weight.shape or not np.array_equal(stored.astype(np.float64), weight):
        raise BundleError(f"{MANIFEST}'s last_layer.weight does not equal last_layer.weight in {WEIGHTS_FILE}: the "
                          f"manifest or the weights were changed; re-export the bundle")
    with np.load(root / PARITY_FILE, allow_pickle=False) as data:
        x = np.ascontiguousarray(data["input"][:2], np.float32)
    logits, sims = session.run(["logits", "similarities"], {INPUT_NAME: x})
    if logits.shape != (len(x), weight.shape[0]) or sims.shape != (len(x), weight.shape[1]):
        raise BundleError(f"{ONNX_FILE} gives {logits.shape[1]} logits and {sims.shape[1]} similarities, but "
                          f"{MANIFEST}'s last layer is {weight.shape[0]}x{weight.shape[1]}")
    rule = ParityRule()
    if (np.abs(sims.astype(np.float64) @ weight.T - logits) > rule.allowed("logits", logits)).any():
        raise BundleError(f"{MANIFEST}'s last_layer.weight is not the weight {ONNX_FILE} computes its logits with: "
                          f"explanations would not add up to the predictions; re-export the bundle")


def verify_files(root: Path, manifest: Manifest, keep: Sequence[str] = ()) -> dict[str, bytes]:
    """Every file the manifest lists exists and matches its sha256; the required ones are listed.

    Returns the bytes of the files named in ``keep``, read once and checked as read, so that what
    is used is exactly what was verified."""
    files = manifest.files
    kept: dict[str, bytes] = {}
    unlisted = [f for f in REQUIRED_FILES if f not in files]
    if unlisted:
        raise BundleError(f"{root / MANIFEST} does not list {unlisted}; re-export the bundle")
    check_tree(root)
    real_root = root.resolve()
    for rel, entry in files.items():
        path = root / rel
        parts = Path(rel).parts
        if Path(rel).is_absolute() or ".." in parts or "\\" in rel or not parts:
            raise BundleError(f"{root / MANIFEST} lists a file outside the bundle: {rel}")
        if not path.resolve().is_relative_to(real_root):
            raise BundleError(f"bundle file {rel} resolves outside the bundle; re-export the bundle")
        if not path.is_file():
            raise BundleError(f"bundle file {rel} is missing from {root}; re-export the bundle")
        h = hashlib.sha256()
        with open_regular(path) as f:
            if rel in keep:
                kept[rel] = f.read()
                h.update(kept[rel])
            else:
                while block := f.read(1 << 20):
                    h.update(block)
        digest = h.hexdigest()
        if digest != entry.sha256:
            raise BundleError(f"bundle file {rel} does not match its sha256 in {MANIFEST}: it was changed or "
                              f"damaged; re-export the bundle")
    return kept


MAX_ENTRIES = 100_000


def check_tree(root: Path) -> None:
    """Everything in the bundle folder is a regular file or a folder: no symbolic link (which could point at
    /etc/passwd and have it served as a prototype image), no device, pipe or socket."""
    entries = 0
    for dirpath, dirnames, filenames in os.walk(root):          # does not follow links
        for name in dirnames + filenames:
            entries += 1
            if entries > MAX_ENTRIES:
                raise BundleError(f"{root} holds more than {MAX_ENTRIES} entries; it is not a bundle nasx export wrote")
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(mode):
                raise BundleError(f"bundle entry {rel} is a symbolic link; a bundle holds only regular files and "
                                  f"folders (re-export it, or copy it with the links resolved)")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise BundleError(f"bundle entry {rel} is not a regular file (a device, pipe or socket); a bundle "
                                  f"holds only regular files and folders")


def open_regular(path: Path):
    """``path`` opened for reading, refusing a symbolic link or anything but a regular file at the moment it is
    opened (the bundle could be changed after it was checked)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BundleError(f"bundle file {path.name} cannot be opened as a regular file ({e.strerror})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
        f.close()
        raise BundleError(f"bundle file {path.name} is not a regular file")
    return f


def read_regular(path: Path) -> bytes:
    with open_regular(path) as f:
        return f.read()
