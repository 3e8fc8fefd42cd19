"""Loading a :class:`~nasxserve.training.config.TrainConfig`: defaults, then the preset, then a YAML file, then
the flags (as a nested mapping); unknown keys and values of the wrong type are errors that name the key."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from nasxserve.contracts import with_extensions_section
from nasxserve.errors import ConfigError
from nasxserve.training.config import DataConfig, TrainConfig
from nasxserve.training.presets import preset_overrides

REMOVED_KEYS = {
    "projection.last_layer": "after every projection the last layer is now reconnected to the prototypes' new "
                             "classes and fitted (projection.last_layer_passes, _lr, _l1), because keeping the old h "
                             "left prototypes voting for classes other than the one they are shown with; delete the "
                             "key (a run started by an older nasx cannot be resumed: start it again)",
    "projection.last_layer_epochs": "renamed projection.last_layer_passes",
}


def apply_overrides(cfg: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set fields of the dataclass ``cfg`` from a nested mapping; unknown keys are an error."""
    if not isinstance(values, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top level)'} must be a mapping")
    if not prefix:
        values = with_extensions_section(values)
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path in REMOVED_KEYS:
            raise ConfigError(f"config key {path!r} no longer exists: {REMOVED_KEYS[path]}")
        if key not in fields:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(fields)}")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            apply_overrides(current, value, path + ".")
        else:
            setattr(cfg, key, _coerce(path, current, fields[key].type, value))


def _coerce(path: str, current: Any, annotation: Any, value: Any) -> Any:
    if value is None:
        if current is None or "None" in str(annotation):
            return None
        raise ConfigError(f"config key {path!r} cannot be empty")
    try:
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise TypeError
            return value
        if isinstance(current, tuple):
            return tuple(float(v) for v in value)
        if isinstance(current, list):
            if not isinstance(value, (list, tuple)):
                raise TypeError
            item = next((t for t in (int, str) if f"list[{t.__name__}]" in str(annotation)), float)
            return [_coerce(path, item(), item.__name__, v) for v in value]
        if isinstance(current, int) or "int" in str(annotation):
            if isinstance(value, bool) or float(value) != int(value):
                raise TypeError
            return int(value)
        if isinstance(current, float) or "float" in str(annotation):
            return float(value)
        return str(value) if isinstance(current, str) or "str" in str(annotation) else value
    except (TypeError, ValueError):
        raise ConfigError(f"config key {path!r}: {value!r} is not a valid {type(current).__name__}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                preset: str | None = None) -> TrainConfig:
    """Defaults, then the preset for the dataset, then the YAML file (if any), then ``overrides`` (nested
    mapping). The preset is ``preset``, else the file's or the overrides' ``preset`` key, else ``cpu``; the
    dataset is the one the file or the overrides name (digits when neither does)."""
    file_values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            file_values = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(file_values, dict):
            raise ConfigError(f"config file {p} must hold a mapping of config sections")
    overrides = overrides or {}
    layers = (file_values, overrides)
    name = preset or next((v["preset"] for v in reversed(layers) if "preset" in v), TrainConfig.preset)
    spec = next((v["data"]["spec"] for v in reversed(layers) if isinstance(v.get("data"), dict)
                 and "spec" in v["data"]), DataConfig.spec)
    cfg = TrainConfig()
    apply_overrides(cfg, preset_overrides(str(name), str(spec)))
    for values in layers:
        apply_overrides(cfg, values)
    cfg.preset = str(name)
    return cfg.validate()


def config_from_dict(data: dict[str, Any]) -> TrainConfig:
    cfg = TrainConfig()
    apply_overrides(cfg, data)
    return cfg.validate()
