"""Run ``nasx serve`` in a subprocess on loopback and wait until it is ready, read its batching metric,
and stream it a chunked body: for integration tests, benchmarks and scripts that need the real server
(standard library only)."""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional, Union
from urllib.parse import urlparse

HOST = "127.0.0.1"
BATCH_METRIC = "nasx_batch_size"     # the histogram of images per ONNX Runtime call in /metrics


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def batch_histogram(metrics: str) -> tuple[float, float]:
    """(model calls, images) so far, from the Prometheus text of /metrics (summed over workers)."""
    calls = images = 0.0
    for line in metrics.splitlines():
        if line.startswith(f"{BATCH_METRIC}_count"):
            calls += float(line.rsplit(" ", 1)[1])
        elif line.startswith(f"{BATCH_METRIC}_sum"):
            images += float(line.rsplit(" ", 1)[1])
    return calls, images


@dataclass
class LocalServer:
    url: str
    process: subprocess.Popen


class ServerDidNotStart(RuntimeError):
    pass


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=1) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def local_server(bundle: Union[str, Path], *options: str, log: Optional[IO] = None,
                 timeout: float = 120) -> Iterator[LocalServer]:
    """``nasx serve BUNDLE --host 127.0.0.1 --port <free> OPTIONS`` until the block ends, then SIGINT (as
    Ctrl-C) and a wait for it to stop; ``process.returncode`` tells how it stopped. Usage tracking off.

    Raises:
        ServerDidNotStart: it exited, or /readyz did not answer 200 within ``timeout`` seconds.
    """
    port = free_port()
    env = dict(os.environ, BENTOML_DO_NOT_TRACK="True")
    out = log if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "nasxserve", "serve", str(bundle), "--host", HOST,
                             "--port", str(port), *options], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _ready(url):
            if proc.poll() is not None:
                raise ServerDidNotStart(f"nasx serve exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise ServerDidNotStart(f"nasx serve did not answer {url}/readyz within {timeout:.0f} s")
            time.sleep(0.3)
        yield LocalServer(url, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def send_chunked(url: str, path: str, content_type: str, total: int, prefix: bytes = b"",
                 chunk: int = 1 << 20, fill: bytes = b"A") -> tuple[int, bytes]:
    """POST ``prefix``, then ``total`` bytes of ``fill`` repeated, with Transfer-Encoding: chunked (no
    Content-Length) over a raw socket, stopping as soon as the server answers; returns (bytes sent, the start of
    the answer)."""
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port or 80), timeout=60)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {u.hostname}\r\nContent-Type: {content_type}\r\n"
                 f"Transfer-Encoding: chunked\r\n\r\n".encode())
    block = b"%x\r\n" % chunk + (fill * (chunk // len(fill) + 1))[:chunk] + b"\r\n"
    sent = 0
    answer = b""
    try:
        if prefix:
            sock.sendall(b"%x\r\n" % len(prefix) + prefix + b"\r\n")
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break
            sock.sendall(block)
            sent += chunk
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        sock.settimeout(30)
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    except (TimeoutError, ConnectionResetError):
        pass
    finally:
        sock.close()
    return sent, answer
