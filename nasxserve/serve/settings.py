"""The settings of a served bundle, defined once: ``nasx serve`` fills them from its options and hands them to the
BentoML service (:mod:`nasxserve.serve.service`), which runs in processes of BentoML's, through the environment.

Each field travels as one variable, ``NASX_`` and the field's name in capitals (``max_batch``: ``NASX_MAX_BATCH``),
written by :meth:`ServeSettings.to_env` and read by :meth:`ServeSettings.from_env` and nowhere else. A variable
that is unset or blank means the field's default, so a container (``bentofile.yaml``) can set any of them alone,
e.g. ``NASX_WORKERS=2``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nasxserve.contracts import describe
from nasxserve.errors import ConfigError
from nasxserve.imaging import MAX_PIXELS

ENV_PREFIX = "NASX_"
# The default pixel budget per image: enough to send a 12 MP phone photo to any model, and 1,024 times the model's
# input for a large one, never over the decoder's own default (imaging.MAX_PIXELS). A 16 x 16 digits model then
# accepts 12 MP, not 64 MP: each decoded pixel costs up to 8 bytes before the image is shrunk to the model's size.
PHOTO_PIXELS = 12_000_000
PIXELS_PER_INPUT_PIXEL = 1024


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system reports one, else every core."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def model_max_pixels(height: int, width: int) -> int:
    """The default pixel budget of a (height, width) model (see :data:`PHOTO_PIXELS`)."""
    return min(MAX_PIXELS, max(PHOTO_PIXELS, PIXELS_PER_INPUT_PIXEL * height * width))


class ServeSettings(BaseModel):
    """How ``nasx serve`` serves a bundle; the defaults are the ones of its options and of the container."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bundle: Optional[Path] = Field(default=None, description="the bundle folder; unset: ./bundle (where a built "
                                                             "bento carries it)")
    workers: int = Field(default=1, ge=1, description="worker processes, each with its own ONNX Runtime session")
    batching: bool = Field(default=True, description="merge concurrent requests into one ONNX Runtime call")
    max_batch: int = Field(default=32, ge=1, description="the largest merged batch")
    threads: int = Field(default=1, ge=0, description="ONNX Runtime intra-op threads per model call (0: its default, "
                                                      "all cores)")
    lanes: int = Field(default=0, ge=0, description="model calls a worker runs at once, a lone batch cut over idle "
                                                    "ones, one part per core (0: two per core of the worker's share "
                                                    "of the machine, divided by threads; 1 with threads 0 or on a "
                                                    "GPU)")
    max_pixels: Optional[int] = Field(default=None, ge=64, description="larger images are refused with 413; unset: "
                                                                        "sized to the model (model_max_pixels)")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1,
                                description="larger request bodies are refused with 413")
    provider: str = Field(default="auto", description="ONNX Runtime execution provider: auto, cpu or cuda")
    trusted_key: Optional[Path] = Field(default=None, description="an Ed25519 public key (PEM): serve the bundle only "
                                                                   "if it is signed by it")
    access_log: bool = Field(default=False, description="BentoML's access log")

    def pixel_limit(self, height: int, width: int) -> int:
        """The pixel budget per image for a (height, width) model: ``max_pixels`` when set, else
        :func:`model_max_pixels`."""
        return self.max_pixels if self.max_pixels is not None else model_max_pixels(height, width)

    def model_cores(self, on_cpu: bool) -> int:
        """The cores a worker's model calls may use, in calls of ``threads`` threads: the worker's share of the
        machine (:func:`usable_cores` over ``workers``) divided by ``threads``; 1 where ONNX Runtime's own pool
        takes every core (``threads`` 0) or off the CPU (``on_cpu`` false)."""
        if self.threads == 0 or not on_cpu:
            return 1
        return max(1, usable_cores() // (self.workers * self.threads))

    def model_lanes(self, on_cpu: bool) -> int:
        """The model calls a worker runs at once: ``lanes`` when set; else two per core of :meth:`model_cores`,
        one running and one ready to run, and 1 where that is one core's worth (``threads`` 0, a GPU: calls
        side by side there only queue)."""
        if self.lanes:
            return self.lanes
        return 2 * self.model_cores(on_cpu) if on_cpu and self.threads else 1

    @staticmethod
    def env_name(field: str) -> str:
        """The environment variable that carries ``field``."""
        return ENV_PREFIX + field.upper()

    def to_env(self) -> dict[str, str]:
        """The variables that carry these settings (``bundle`` only when set); booleans as 1 and 0."""
        env = {}
        for field, value in self.model_dump().items():
            if value is None:
                continue
            env[self.env_name(field)] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServeSettings:
        """The settings the variables of ``environ`` carry; unset or blank ones take the default. A value that
        does not fit its field is a :class:`ConfigError` naming the variable."""
        given: dict[str, Any] = {}
        for field in cls.model_fields:
            value = environ.get(cls.env_name(field), "").strip()
            if value:
                given[field] = value
        try:
            return cls.model_validate(given)
        except ValidationError as e:
            names = {str(err["loc"][0]): cls.env_name(str(err["loc"][0])) for err in e.errors() if err["loc"]}
            message = describe(e)
            for field, variable in names.items():
                message = message.replace(f"{field}:", f"{variable}:", 1)
            raise ConfigError(f"the serving settings in the environment are invalid: {message}") from None

    @classmethod
    def of(cls, **settings: Any) -> ServeSettings:
        """Settings from keyword arguments (``nasx serve``'s options), a bad value as a :class:`ConfigError`."""
        try:
            return cls(**settings)
        except ValidationError as e:
            raise ConfigError(f"invalid serving settings: {describe(e)}") from None


DEFAULTS = ServeSettings()
