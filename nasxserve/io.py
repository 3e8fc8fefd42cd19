"""Atomic writes: a file is written to a temporary file in the same folder, fsynced and renamed; a folder
(a bundle, a generated dataset) is built in a temporary sibling folder, fsynced and renamed into place."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (setting it, even for an instant,
    would race with files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, ValueError, StopIteration, IndexError):
        mask = os.umask(0)
        os.umask(mask)
        return mask


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(fileobj)`` on a temporary file, then atomically replace ``path`` with it.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask), or keeps those of the
    file it replaces: mkstemp's private 0600 would hide reports and checkpoints from the user's group."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        permissions = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        permissions = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, permissions)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def sibling_folder(out: Path, tag: str) -> Path:
    """A new empty folder beside ``out`` (the same file system, so it can be renamed onto ``out``), with a
    folder's usual permissions (0777 less the umask) rather than mkdtemp's private ones."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{tag}-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under ``folder``, and ``folder`` itself."""
    for p in folder.rglob("*"):
        if p.is_file() or p.is_dir():
            _fsync_path(p)
    _fsync_path(folder)


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename the finished folder ``tmp`` (made by :func:`sibling_folder`, fsynced) to ``out``. An existing
    ``out`` is set aside first and removed only after, so ``out`` is at every moment the old folder or the new."""
    old = None
    if out.exists():
        old = sibling_folder(out, "old")
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    _fsync_path(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
