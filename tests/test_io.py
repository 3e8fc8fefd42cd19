"""Atomic writes keep what the user had and give files the permissions a plain open() would."""
from __future__ import annotations

import os
import stat

import pytest

from nasxserve.io import atomic_write, atomic_write_text, sibling_folder


@pytest.fixture
def umask():
    """Set the process umask for one test, and restore it after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_a_new_file_gets_the_umask_permissions_not_mkstemps_private_ones(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_text(tmp_path / "report.json", "{}\n")
    assert mode(tmp_path / "report.json") == expected


def test_a_replaced_file_keeps_its_permissions(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "config.yaml"
    path.write_text("old\n")
    path.chmod(0o640)
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and mode(path) == 0o640


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("kept\n")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_sibling_folder_gets_the_umask_permissions(tmp_path, umask):
    umask(0o027)
    folder = sibling_folder(tmp_path / "bundle", "tmp")
    assert folder.parent == tmp_path and mode(folder) == 0o750
