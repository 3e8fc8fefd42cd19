"""The typed contracts between nasx's parts (nasxserve.contracts): the published JSON Schemas are what the models
describe, a manifest and a report written before the models existed read back unchanged, a real bundle validates
against the published schema as an app without nasx would check it, the schema and nasx refuse the same
manifests, and the serve settings travel through the environment as one object."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import REPO

from nasxserve.contracts import Manifest, RunReport, RunSettings
from nasxserve.errors import ConfigError
from nasxserve.runtime.format import manifest_digest

DATA = Path(__file__).parent / "data"
# the manifest and report of a tiny digits run as nasx 0.1.0 wrote them before the contracts were typed
OLD_MANIFEST = DATA / "manifest-format-1.json"
OLD_REPORT = DATA / "report.json"


def _gen_schemas():
    spec = importlib.util.spec_from_file_location("gen_schemas", REPO / "docs" / "gen_schemas.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def published(name: str):
    """A validator of the published schema ``docs/schemas/NAME``, as an app would build it from the file."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the dev extra")
    schema = json.loads((REPO / "docs" / "schemas" / name).read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# ============================================================================ the published schemas

def test_the_published_schemas_are_what_the_models_describe():
    gen = _gen_schemas()
    assert set(gen.SCHEMAS) == {"manifest.schema.json", "explain.schema.json"}
    for name in gen.SCHEMAS:
        committed = (REPO / "docs" / "schemas" / name).read_text(encoding="utf-8")
        assert committed == gen.render(name), (f"docs/schemas/{name} is out of date with nasxserve.contracts: "
                                               f"regenerate it with `{gen.REGENERATE}` and commit the result")
    assert gen.main(["--check"]) == 0


def test_the_manual_links_the_schemas():
    for page, names in (("export.md", ["manifest"]), ("serving.md", ["explain"]),
                        ("design.md", ["manifest", "explain"])):
        text = (REPO / "docs" / page).read_text(encoding="utf-8")
        assert all(f"(schemas/{name}.schema.json)" in text for name in names), page


def test_an_exported_bundle_validates_against_the_published_schema(digits_bundle: Path):
    manifest = json.loads((digits_bundle / "manifest.json").read_text(encoding="utf-8"))
    errors = [e.message for e in published("manifest.schema.json").iter_errors(manifest)]
    assert not errors, errors[:3]
    assert Manifest.model_validate(manifest).as_json() == manifest


# ============================================================================ bundles written before the models

def test_a_manifest_written_before_the_models_reads_back_unchanged():
    """The manifest format on disk did not change: a manifest of the earlier writer validates and dumps back to
    the very same JSON, so its digest still holds and the ONNX metadata still match."""
    raw = json.loads(OLD_MANIFEST.read_text(encoding="utf-8"))
    manifest = Manifest.model_validate(raw)
    assert manifest.as_json() == raw
    assert json.dumps(manifest.as_json()) == json.dumps(raw)          # the same key order, the same number types
    assert manifest.bundle_digest.sha256 == manifest_digest(raw) == manifest_digest(manifest.as_json())
    assert manifest.method == "nasxnet" and manifest.head == "prototype"
    assert manifest.prototypes[0].class_ == "0" and manifest.input.brightness is not None
    assert not list(published("manifest.schema.json").iter_errors(raw))


def test_a_manifest_without_the_brightness_spread_still_reads():
    """Bundles exported before nasx recorded the training images' brightness (format 1 all the same)."""
    raw = json.loads(OLD_MANIFEST.read_text(encoding="utf-8"))
    del raw["input"]["brightness"]
    manifest = Manifest.model_validate(raw)
    assert manifest.input.brightness is None and manifest.as_json() == raw
    assert not list(published("manifest.schema.json").iter_errors(raw))


def _set(raw: dict, path: str, value) -> dict:
    out = copy.deepcopy(raw)
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return out


BAD_MANIFESTS = [
    ("format_version", "1"),                       # a string is not the version
    ("format_version", 2),
    ("input.channels", "1"),                       # no coercion: the schema and nasx refuse the same things
    ("input.height", 0),
    ("input.color_mode", "CMYK"),
    ("files", ["model.onnx"]),
    ("files.model.onnx", {"sha256": "not hex"}),
    ("prototypes.0.class", 3),
    ("last_layer.weight", [["a"]]),
    ("classes", KeyError),
    ("bundle_digest", KeyError),
]


def bad_manifest(path: str, value) -> dict:
    raw = json.loads(OLD_MANIFEST.read_text(encoding="utf-8"))
    if path.startswith("files.model.onnx"):
        bad = copy.deepcopy(raw)
        bad["files"]["model.onnx"] = value
        return bad
    return _set(raw, path, value)


@pytest.mark.parametrize("path, value", BAD_MANIFESTS)
def test_the_schema_and_the_reader_refuse_the_same_manifests(path: str, value):
    bad = bad_manifest(path, value)
    with pytest.raises(ValidationError):
        Manifest.model_validate(bad)
    assert list(published("manifest.schema.json").iter_errors(bad)), f"the schema accepts {path} = {value!r}"


# ============================================================================ a run's report and settings

def test_a_run_report_reads_back_with_its_method_head_and_extensions():
    raw = json.loads(OLD_REPORT.read_text(encoding="utf-8"))
    report = RunReport.model_validate(raw)
    assert report.as_json() == raw                                   # every field kept, the unknown ones too
    assert (report.method, report.head) == ("nasxnet", "prototype")
    assert report.data is not None and report.data.image_size == [8, 8]
    assert report.test is not None and report.test.aux_acc == raw["test"]["aux_acc"]
    assert list(report.facts("wall_time_s", "backbone", "genotype_darts")) == ["wall_time_s", "genotype_darts"]
    older = {k: v for k, v in raw.items() if k not in ("method", "head")}      # written before they were recorded
    assert (RunReport.model_validate(older).method, RunReport.model_validate(older).head) == ("nasxnet", "prototype")


def test_run_settings_say_which_extensions_a_run_trained_with():
    assert RunSettings.read({}).extensions_on() == {}
    assert RunSettings.read({"retrain": None, "projection": None}).data.crop == "none"
    settings = RunSettings.read({"data": {"spec": "digits", "image_size": 8}, "retrain": {"deletion_cost": 0.5},
                                 "projection": {"box_calibration": True}, "seed": 0})
    assert settings.extensions_on() == {"deletion_cost": 0.5, "box_calibration": True}
    assert settings.data.spec == "digits" and settings.data.val_share == 0.0     # a config from before val_share
    now = RunSettings.read({"extensions": {"enabled": ["deletion-cost"], "deletion_cost": 2.0},
                            "retrain": {"epochs_joint": 3}})
    assert now.extensions_on() == {"deletion_cost": 2.0}
    assert RunSettings.read({"extensions": {"enabled": [], "deletion_cost": 2.0}}).extensions_on() == {}


# ============================================================================ serve settings

def test_serve_settings_travel_through_the_environment_as_one_object(tmp_path: Path):
    from nasxserve.serve.settings import DEFAULTS, ServeSettings

    settings = ServeSettings(bundle=tmp_path, workers=3, batching=False, max_batch=8, threads=0, lanes=2,
                             max_pixels=1000, provider="cpu", access_log=True, trusted_key=tmp_path / "team.pub")
    env = settings.to_env()
    assert env["NASX_BUNDLE"] == str(tmp_path) and env["NASX_WORKERS"] == "3" and env["NASX_BATCHING"] == "0"
    assert set(env) == {ServeSettings.env_name(f) for f in ServeSettings.model_fields}
    assert ServeSettings.from_env(env) == settings
    assert ServeSettings.from_env({}) == DEFAULTS and "NASX_BUNDLE" not in DEFAULTS.to_env()
    assert ServeSettings.from_env({"NASX_WORKERS": " ", "NASX_MAX_BATCH": "4"}) == ServeSettings(max_batch=4)
    with pytest.raises(ConfigError, match="NASX_MAX_BATCH"):
        ServeSettings.from_env({"NASX_MAX_BATCH": "lots"})
    with pytest.raises(ConfigError, match="NASX_WORKERS"):
        ServeSettings.from_env({"NASX_WORKERS": "0"})


def test_model_lanes_share_the_cores_among_workers_and_threads(monkeypatch):
    from nasxserve.serve import settings as module
    from nasxserve.serve.settings import ServeSettings

    monkeypatch.setattr(module, "usable_cores", lambda: 16)
    default = ServeSettings()
    assert (default.model_cores(on_cpu=True), default.model_lanes(on_cpu=True)) == (16, 32)   # two calls a core
    shared = ServeSettings(workers=3, threads=2)
    assert (shared.model_cores(on_cpu=True), shared.model_lanes(on_cpu=True)) == (2, 4)       # 16 // 6
    many = ServeSettings(workers=32)
    assert (many.model_cores(on_cpu=True), many.model_lanes(on_cpu=True)) == (1, 2)           # never none
    pool = ServeSettings(threads=0)
    assert (pool.model_cores(on_cpu=True), pool.model_lanes(on_cpu=True)) == (1, 1)   # ONNX Runtime's pool: every core
    assert (default.model_cores(on_cpu=False), default.model_lanes(on_cpu=False)) == (1, 1)   # a GPU: calls queue
    assert ServeSettings(lanes=3, threads=0).model_lanes(on_cpu=False) == 3     # the operator's, when given


def test_nasx_serve_takes_its_defaults_from_the_serve_settings():
    import click
    import typer

    from nasxserve.cli import app
    from nasxserve.serve.settings import DEFAULTS, ServeSettings

    group = typer.main.get_command(app)
    command = group.get_command(click.Context(group), "serve")
    options = {p.name: p.default for p in command.params
               if p.name in ServeSettings.model_fields and p.param_type_name == "option"}
    assert set(options) == {"workers", "batching", "max_batch", "threads", "lanes", "max_pixels", "provider",
                            "trusted_key"}
    assert options == {name: getattr(DEFAULTS, name) for name in options}


def test_the_manual_lists_every_serve_setting_with_its_default():
    import re

    from nasxserve.serve.settings import DEFAULTS, ServeSettings

    text = (REPO / "docs" / "serving.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(NASX_[A-Z_]+)` \| `?([^|`]+?)`? \|", text, flags=re.M))
    assert set(rows) == {ServeSettings.env_name(f) for f in ServeSettings.model_fields}
    defaults = DEFAULTS.to_env()
    assert {name: value for name, value in rows.items() if name in defaults} == defaults
