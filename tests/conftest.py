"""Shared fixtures: tiny configurations, a synthetic image folder, and running ``nasx`` as a subprocess.

Everything here is sized for a shared two-core CPU machine: a whole search + retrain on the tiny
configurations takes seconds, not minutes.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

# pytest-xdist runs the suite in one worker per core (pyproject's addopts): one intra-op thread in each worker and
# in every process it starts, so that the workers' OpenMP threads never spin-wait for each other's cores. Set
# before torch is first imported; an OMP_NUM_THREADS of the caller's wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
CIFAR10_MINI = REPO.parent / "shared" / "data" / "cifar10-mini"

# The smallest configuration that still runs every stage of the search and of the retrain, with
# projections inside both phases. Keys are those of nasxserve.training.config.TrainConfig.
TINY_CONFIG: dict[str, Any] = {
    "data": {"batch_size": 64, "eval_batch_size": 512, "image_size": 8, "train_portion": 0.25},
    "model": {"prototypes_per_class": 2, "prototype_dim": 8},
    "search": {"channels": 4, "layers": 3, "epochs_adapt": 1, "epochs_joint": 1, "epochs_finetune": 1,
               "project_every": 0},
    "retrain": {"channels": 4, "layers": 3, "epochs_joint": 2, "epochs_finetune": 1, "project_every": 2},
    "projection": {"last_layer_passes": 5},
    "device": "cpu",
    "seed": 0,
    "threads": 1,
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with the nested mapping ``extra`` merged in."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_config(**sections: Any) -> dict[str, Any]:
    """``TINY_CONFIG`` with sections overridden, e.g. ``tiny_config(search={"epochs_joint": 2})``."""
    return merge(TINY_CONFIG, sections)


def write_yaml(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def make_imagefolder(root: Path, classes: int = 3, train_per_class: int = 16, test_per_class: int = 8,
                     size: int = 8, seed: int = 0) -> Path:
    """A small learnable ``train/<class>/*.png`` + ``test/<class>/*.png`` tree: class k is noise with a
    bright square at a class-specific place. Returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    half = size // 2
    corners = [(0, 0), (0, half), (half, 0), (half, half)]
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for k in range(classes):
            d = root / split / f"class_{k}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
                r, c = corners[k % len(corners)]
                img[r:r + half, c:c + half, k % 3] = 230
                Image.fromarray(img).save(d / f"{i:04d}.png")
    return root


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder`` (to prove nothing was touched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write_manifest(bundle: Path, manifest: dict[str, Any], seal: bool = True) -> None:
    """Write an edited manifest into ``bundle``; ``seal`` recomputes its digest, as anyone who edits a bundle
    on purpose can (the file checks and cross-checks must then catch what is wrong)."""
    from nasxserve.runtime.format import seal_manifest
    (bundle / "manifest.json").write_text(json.dumps(seal_manifest(manifest) if seal else manifest, indent=2) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def nasx_env() -> dict[str, str]:
    """The environment for ``nasx`` subprocesses: no telemetry, wide help output, no colours."""
    e = dict(os.environ)
    e.update(BENTOML_DO_NOT_TRACK="True", COLUMNS="200", PYTHONUNBUFFERED="1", NO_COLOR="1")
    e.pop("FORCE_COLOR", None)
    return e


@pytest.fixture
def env() -> dict[str, str]:
    return nasx_env()


def run_nasx(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m nasxserve ARGS`` in ``cwd``; returns the completed process (text stdout/stderr)."""
    return subprocess.run([sys.executable, "-m", "nasxserve", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def nasx(env: dict[str, str], tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run the CLI with the working directory in ``tmp_path`` (so a stray default ``runs/`` lands there)."""
    def run(*args: Any, timeout: float = 300) -> subprocess.CompletedProcess:
        return run_nasx(list(args), env, tmp_path, timeout)
    return run


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Callable[..., Path]:
    """Write ``tiny_config(**sections)`` to a YAML file in ``tmp_path`` and return its path."""
    def write(name: str = "tiny.yaml", **sections: Any) -> Path:
        return write_yaml(tmp_path / name, tiny_config(**sections))
    return write


@pytest.fixture(scope="session")
def synthetic_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-class, 8x8 RGB image folder (48 train, 24 test images), shared by the session; read-only."""
    return make_imagefolder(tmp_path_factory.mktemp("synthetic") / "data")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waiting on the 2-core machine when other
    processes compete for it (convolutions then take ms instead of us). Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def trained_digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run on digits (8x8, DARTS_V2 retrained for three epochs), shared; read-only."""
    pytest.importorskip("torch")
    from nasxserve.training.config_loading import config_from_dict
    from nasxserve.training.trainer import Trainer

    out = tmp_path_factory.mktemp("digits-run") / "run"
    cfg = config_from_dict(tiny_config(genotype="DARTS_V2"))
    Trainer.fresh(cfg, str(out)).train()
    return out


@pytest.fixture(scope="session")
def digits_bundle(trained_digits_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle of ``trained_digits_run`` in all three formats; shared, read-only (copy it to tamper)."""
    from nasxserve.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("digits-bundle") / "bundle"
    export_bundle(trained_digits_run, out)
    return out


@pytest.fixture(scope="session")
def digit_pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The first 17 test digits of the 8x8 dataset as greyscale PNGs, named ``NN_label.png``."""
    pytest.importorskip("sklearn")
    from PIL import Image

    from nasxserve.data import load_dataset

    data = load_dataset("digits", 8)
    folder = tmp_path_factory.mktemp("digit-pngs")
    paths = []
    for i in range(17):
        p = folder / f"{i:02d}_{int(data.test.labels[i])}.png"
        Image.fromarray(data.test.raw(i)[:, :, 0], mode="L").save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def server(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory):
    """``nasx serve`` on the digits bundle on 127.0.0.1 (a free port, 1 MP pixel limit) for the module; an
    httpx client on it. The server must stop cleanly on SIGINT."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("bentoml")
    from nasxserve.serve.local import ServerDidNotStart, local_server

    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with log_path.open("w") as log:
        try:
            with local_server(digits_bundle, "--max-pixels", "1000000", log=log, timeout=90) as s, \
                    httpx.Client(base_url=s.url, timeout=30) as client:
                yield client
        except ServerDidNotStart as e:
            pytest.fail(f"{e}: {log_path.read_text()[-3000:]}")
    assert s.process.returncode == 0, log_path.read_text()[-3000:]
