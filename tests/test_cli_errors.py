"""Bad input to ``nasx train`` / ``nasx search`` gets one clear line on stderr, a non-zero exit and no
traceback, and leaves the file system as it was. Every case runs the real CLI in a subprocess.

Each subprocess pays for importing torch, so the cases are declared up front and run concurrently by a
module fixture; each test then checks its own case's result.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from conftest import nasx_env, run_nasx, snapshot, tiny_config, write_yaml

torch = pytest.importorskip("torch")
NO_GPU = not torch.cuda.is_available()


@dataclass
class Case:
    """``setup(folder)`` prepares files in the case's own folder and returns the CLI arguments."""

    setup: Callable[[Path], list[Any]]
    enabled: bool = True
    folder: Path | None = None
    before: dict[str, str] = field(default_factory=dict)   # snapshot of folder/"guarded", if any
    proc: subprocess.CompletedProcess | None = None


def _tiny(folder: Path) -> Path:
    return write_yaml(folder / "tiny.yaml", tiny_config())


UNKNOWN_OP = {
    "normal": [["sep_conv_3x3", 0], ["warp_drive", 1], ["skip_connect", 0], ["sep_conv_3x3", 1]],
    "normal_concat": [2, 3],
    "reduce": [["max_pool_3x3", 0], ["max_pool_3x3", 1], ["skip_connect", 2], ["max_pool_3x3", 1]],
    "reduce_concat": [2, 3],
}


def _genotype_case(name: str, content: str) -> Case:
    def setup(f: Path) -> list[Any]:
        (f / name).write_text(content, encoding="utf-8")
        return ["train", "--config", _tiny(f), "--genotype", f / name, "--out", f / "run", "-q"]
    return Case(setup)


def _config_case(content: Any) -> Case:
    return Case(lambda f: ["train", "--config", write_yaml(f / "bad.yaml", content), "--out", f / "run", "-q"])


def _empty_imagefolder(f: Path) -> list[Any]:
    (f / "empty" / "train").mkdir(parents=True)
    (f / "empty" / "test").mkdir()
    (f / "empty" / "train" / "cat").mkdir()     # a class folder without images does not count
    return ["train", "--config", _tiny(f), "--data", f"imagefolder:{f / 'empty'}", "--out", f / "run", "-q"]


def _not_a_run(f: Path) -> list[Any]:
    (f / "guarded").mkdir()
    (f / "guarded" / "notes.txt").write_text("hello", encoding="utf-8")
    return ["train", "--resume", f / "guarded", "-q"]


def _non_empty_out(f: Path) -> list[Any]:
    g = f / "guarded"
    (g / "checkpoints").mkdir(parents=True)
    (g / "keep.txt").write_text("precious", encoding="utf-8")
    (g / "checkpoints" / "last.pt").write_bytes(b"not really a checkpoint")
    (g / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    return ["train", "--config", _tiny(f), "--out", g, "-q"]


CASES: dict[str, Case] = {
    "missing_data_folder": Case(lambda f: ["train", "--config", _tiny(f), "--data", "imagefolder:/does/not/exist",
                                           "--out", f / "run", "-q"]),
    "empty_imagefolder": Case(_empty_imagefolder),
    "unknown_dataset": Case(lambda f: ["train", "--config", _tiny(f), "--data", "mnist", "--out", f / "run", "-q"]),
    "genotype_garbage": _genotype_case("garbage.txt", "this is %% not a genotype }{"),
    "genotype_unknown_op": _genotype_case("unknown_op.json", json.dumps(UNKNOWN_OP)),
    "config_unknown_nested_key": _config_case({"search": {"nonsense": 1}}),
    "config_unknown_top_key": _config_case({"nonsense_top": 1}),
    "search_epochs_option": Case(lambda f: ["search", "--config", _tiny(f), "--search-epochs", "1,2",
                                            "--out", f / "run", "-q"]),
    "cuda_without_gpu": Case(lambda f: ["train", "--config", _tiny(f), "--device", "cuda", "--out", f / "run", "-q"],
                             enabled=NO_GPU),
    "resume_not_a_run": Case(_not_a_run),
    "print_config_resume": Case(lambda f: ["train", "--resume", f / "elsewhere", "--print-config"]),
    "out_non_empty": Case(_non_empty_out),
    "usage_unknown_option": Case(lambda f: ["train", "--bogus", "--out", f / "run"]),
    "usage_bad_int": Case(lambda f: ["train", "--seed", "abc", "--out", f / "run"]),
    "usage_search_genotype": Case(lambda f: ["search", "--genotype", "DARTS_V2", "--out", f / "run"]),
    "usage_unknown_command": Case(lambda f: ["trian", "--out", f / "run"]),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("cli_errors")
    env = nasx_env()
    jobs = {}
    for name, case in CASES.items():
        if not case.enabled:
            continue
        case.folder = root / name
        case.folder.mkdir()
        args = case.setup(case.folder)
        if (case.folder / "guarded").exists():
            case.before = snapshot(case.folder / "guarded")
        jobs[name] = args

    def run(name: str) -> None:
        CASES[name].proc = run_nasx(jobs[name], env, CASES[name].folder, timeout=240)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run, jobs))
    return CASES


def check(results: dict[str, Case], name: str, *fragments: str) -> str:
    """Case ``name`` failed with exactly one stderr line ``error: ...`` containing ``fragments``, and
    created no run directory (``run/`` in its folder, or a default ``runs/``)."""
    case = results[name]
    proc = case.proc
    assert proc is not None
    assert proc.returncode != 0, f"expected failure, got exit 0; stdout={proc.stdout!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert proc.stdout.strip() == "", f"nothing should go to stdout on error: {proc.stdout!r}"
    run_dir = case.folder / "run"
    assert not run_dir.exists(), f"{run_dir} was created although the command failed: {list(run_dir.rglob('*'))}"
    assert not (case.folder / "runs").exists(), "a default runs/ folder was created"
    return line


# ---------------------------------------------------------------------------------------------- data

def test_missing_data_folder(results):
    check(results, "missing_data_folder", "/does/not/exist", "does not exist", "train/<class>")


def test_image_folder_without_classes(results):
    check(results, "empty_imagefolder", "no class folders")


def test_unknown_dataset_name(results):
    check(results, "unknown_dataset", "unknown dataset 'mnist'", "digits", "imagefolder")


# ------------------------------------------------------------------------------------------ genotype

def test_genotype_file_with_garbage(results):
    line = check(results, "genotype_garbage", "garbage.txt", "not valid JSON")
    assert line.count("error:") == 1


def test_genotype_json_with_unknown_op(results):
    check(results, "genotype_unknown_op", "unknown_op.json", "unknown operation 'warp_drive'", "sep_conv_3x3")


# -------------------------------------------------------------------------------------------- config

def test_config_unknown_nested_key(results):
    line = check(results, "config_unknown_nested_key", "'search.nonsense'")
    assert "channels" in line, "the message should list the valid keys of the section"


def test_config_unknown_top_level_key(results):
    line = check(results, "config_unknown_top_key", "'nonsense_top'")
    assert "retrain" in line and "search" in line


def test_bad_search_epochs_option(results):
    check(results, "search_epochs_option", "--search-epochs", "'1,2'")


# -------------------------------------------------------------------------------------------- device

@pytest.mark.skipif(not NO_GPU, reason="a CUDA GPU is available, so --device cuda is valid here")
def test_cuda_without_gpu(results):
    check(results, "cuda_without_gpu", "--device cuda", "no CUDA GPU")


# ------------------------------------------------------------------------------------ run directories

def test_resume_on_a_folder_that_is_not_a_run(results):
    case = results["resume_not_a_run"]
    check(results, "resume_not_a_run", "cannot resume", str(case.folder / "guarded"), "checkpoints/last.pt")
    assert snapshot(case.folder / "guarded") == case.before
    assert sorted(p.name for p in (case.folder / "guarded").iterdir()) == ["notes.txt"]


def test_print_config_with_resume_points_at_the_runs_own_config(results):
    case = results["print_config_resume"]
    check(results, "print_config_resume", "--print-config", str(case.folder / "elsewhere" / "config.yaml"))


def test_out_pointing_at_a_non_empty_folder(results):
    name = "out_non_empty"
    case = results[name]
    guarded = case.folder / "guarded"
    check(results, name, str(guarded), "not empty", "--resume")
    assert case.before and snapshot(guarded) == case.before
    assert not (guarded / "config.yaml").exists()


# ------------------------------------------------------------------------------------- usage errors

@pytest.mark.parametrize("name,fragment", [
    ("usage_unknown_option", "--bogus"),
    ("usage_bad_int", "valid integer"),
    ("usage_search_genotype", "--genotype"),
    ("usage_unknown_command", "trian"),
])
def test_usage_errors_have_no_traceback(results, name, fragment):
    """Typos on the command line are reported by the option parser: a short message, exit 2."""
    proc = results[name].proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.returncode
    assert fragment in proc.stderr
    assert not (results[name].folder / "run").exists()


# ---------------------------------------------------------------------------------------------- help

def test_root_help(nasx):
    proc = nasx("--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "train" in proc.stdout and "search" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_no_arguments_shows_usage_without_traceback(nasx):
    proc = nasx(timeout=60)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Usage" in proc.stdout + proc.stderr
    assert "train" in proc.stdout + proc.stderr


@pytest.mark.parametrize("command,options", [
    ("train", ["--data", "--resume", "--genotype", "--device", "--out", "--config", "--search-epochs",
               "--retrain-epochs", "--seed", "--quiet", "--print-config"]),
    ("search", ["--data", "--resume", "--device", "--out", "--config", "--search-epochs", "--seed",
                "--print-config"]),
])
def test_command_help(nasx, command, options):
    proc = nasx(command, "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in options:
        assert option in proc.stdout, f"{command} --help does not mention {option}:\n{proc.stdout}"
    assert "Traceback" not in proc.stderr
    from nasxserve.data import DATASETS
    text = " ".join(proc.stdout.replace("\u2502", " ").split())      # the help panel's text, unwrapped
    assert all(f" {name}," in text for name in DATASETS), text


def test_console_script_version(env, tmp_path):
    script = Path(sys.executable).parent / "nasx"
    if not script.is_file():
        pytest.skip(f"no nasx console script next to {sys.executable}")
    proc = subprocess.run([str(script), "--version"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    from nasxserve import __version__
    assert proc.stdout.strip() == f"nasx {__version__}"
