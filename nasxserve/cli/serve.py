"""``nasx serve``: the BentoML service over a bundle, on this machine."""
from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from nasxserve.errors import RuntimeSetupError
from nasxserve.serve.settings import DEFAULTS, ServeSettings, model_max_pixels

console = Console(stderr=True, soft_wrap=True)     # a log keeps the URL and paths on one line
SERVICE = "nasxserve.serve.service:Nasx"


def serve(
    bundle: Path = typer.Argument(..., help="Bundle folder (from nasx export)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(3000, "--port", min=1, max=65535, help="TCP port."),
    workers: int = typer.Option(DEFAULTS.workers, "--workers", min=1,
                                help="Worker processes (each holds one ONNX Runtime session)."),
    batching: bool = typer.Option(DEFAULTS.batching, "--batching/--no-batching",
                                  help="Merge concurrent requests into one ONNX Runtime call."),
    max_batch: int = typer.Option(DEFAULTS.max_batch, "--max-batch", min=1, help="Largest merged batch."),
    threads: int = typer.Option(DEFAULTS.threads, "--threads", min=0,
                                help="ONNX Runtime threads per model call (0: its default, all cores)."),
    lanes: int = typer.Option(DEFAULTS.lanes, "--lanes", min=0,
                              help="Model calls a worker runs at once; a lone batch (an explanation's hidden copies) "
                                   "is cut over idle ones, a part per core. 0: two per core of the worker's share, "
                                   "divided by --threads (1 with --threads 0 or on a GPU)."),
    max_pixels: Optional[int] = typer.Option(DEFAULTS.max_pixels, "--max-pixels", min=64, show_default=False,
                                             help="Refuse larger images with 413. Default: sized to the model, 12 MP "
                                                  "(a phone photo) or 1,024 times its input if larger, at most 64 MP."),
    provider: str = typer.Option(DEFAULTS.provider, "--provider", help="ONNX Runtime provider: auto, cpu or cuda."),
    trusted_key: Optional[Path] = typer.Option(None, "--trusted-key",
                                               help="An Ed25519 public key (PEM, as nasx keygen writes KEY.pub): serve "
                                                    "the bundle only if it is signed by this key (nasx sign). Each "
                                                    "worker checks it again when it loads the bundle."),
) -> None:
    """Serve a bundle over HTTP with BentoML.

    Endpoints: /predict, /explain, /metadata, /prototypes/{id}, the Open Inference Protocol's /v2/models/...,
    /livez, /readyz and /metrics. Usage tracking is off unless BENTOML_DO_NOT_TRACK=False.
    """
    from nasxserve.runtime import load_bundle
    from nasxserve.runtime.session import CPU
    if importlib.util.find_spec("bentoml") is None or importlib.util.find_spec("fastapi") is None:
        raise RuntimeSetupError("serving needs BentoML and FastAPI: pip install 'nasx[serve]'")
    # the options give these settings; the others (the body limit, the access log, the pixel budget when
    # --max-pixels is not given and the trusted key when --trusted-key is not) keep what the environment says
    options = dict(bundle=Path(bundle).resolve(), workers=workers, batching=batching, max_batch=max_batch,
                   threads=threads, lanes=lanes, provider=provider) \
        | ({} if max_pixels is None else {"max_pixels": max_pixels}) \
        | ({} if trusted_key is None else {"trusted_key": trusted_key.expanduser().resolve()})
    settings = ServeSettings.of(**(ServeSettings.from_env(os.environ).model_dump() | options))
    # a damaged or unsigned bundle fails here, with its reason, before any server starts
    b = load_bundle(bundle, provider, trusted_keys=[settings.trusted_key] if settings.trusted_key else [])
    sized = model_max_pixels(b.height, b.width)
    limit = settings.pixel_limit(b.height, b.width)
    if limit > sized:
        console.print(f"[yellow]a pixel budget of {limit:,} raises the {sized:,} this {b.width}x{b.height} model gets "
                      f"by default: one image may take about {limit * 8 / 1e9:.1f} GB to decode and convert[/yellow]")
    env = dict(os.environ, **settings.to_env())
    env.setdefault("BENTOML_DO_NOT_TRACK", "True")
    # BentoML keeps its Prometheus multiprocess folder in BENTOML_HOME and empties it when a server starts: two
    # servers sharing it froze the first one's /metrics. Each nasx serve gets its own home (the served service
    # uses none of the model or bento stores there), removed when it stops.
    home = tempfile.mkdtemp(prefix="nasx-serve-")
    env["BENTOML_HOME"] = home
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    lanes = settings.model_lanes(b.provider == CPU)
    console.print(f"serving {b.manifest.name} ({len(b.classes)} classes, {len(b.prototypes)} prototypes) at {url}  "
                  f"[dim]({settings.workers} worker{'s' * (settings.workers > 1)}, {lanes} model "
                  f"call{'s' * (lanes > 1)} at once each; API docs {url}/docs, Ctrl-C to stop)[/dim]")
    cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE, "--host", host, "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env)
    # explicit handlers: a process started in the background inherits an ignored SIGINT, and
    # SIGTERM (docker stop, systemd) should shut the server down the same way
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        console.print("stopped")
        raise typer.Exit(0) from None
    finally:
        if proc.poll() is not None:
            shutil.rmtree(home, ignore_errors=True)
    if code:
        raise typer.Exit(code)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """A Ctrl-C in a terminal reaches the server too; a SIGINT sent to this process alone does not, so
    ask the server to shut down (SIGTERM: graceful), and kill it only if it does not."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
