"""HTTP latency and throughput of `nasx serve` on loopback, with batching on and off.

Starts the real server (127.0.0.1, a free port) on BUNDLE twice (--batching, --no-batching); for
/predict, /explain (the default, evidence region rule) and /explain?regions=activation (the papers' rule,
which runs the model on the image alone) at 1, 8 and 32 concurrent clients (one keep-alive connection each), sends
``--requests`` requests after ``--warmup`` untimed ones and records each request's latency. Prints
one JSON object: p50 / p95 / p99 ms, requests/s, errors, the server's images per ONNX Runtime call
and the load generator's own CPU time per request.

The load generator shares the machine with the server, so it has to be cheap: it writes a prepared
HTTP/1.1 request on a raw asyncio stream and reads the status line, headers and body (about 0.13 ms
of CPU a request, where httpx takes about 2 ms and would be measured instead of the server). Every
answer must be a 200 whose JSON has the endpoint's "predictions"; anything else counts as an error.

    python benchmarks/serve_load.py BUNDLE [--requests 800 --workers 1 --lanes 0]
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from nasxserve.serve.local import batch_histogram, local_server

CLIENTS = (1, 8, 32)
PATHS = ("/predict", "/explain", "/explain?regions=activation")


def test_image(bundle: Path) -> bytes:
    spec = json.loads((bundle / "manifest.json").read_text())["input"]
    rng = np.random.default_rng(0)
    shape = (spec["height"], spec["width"]) if spec["channels"] == 1 else (spec["height"], spec["width"], 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def batch_counters(url: str) -> tuple[float, float]:
    return batch_histogram(httpx.get(f"{url}/metrics").text)


class Connection:
    """One keep-alive HTTP/1.1 connection that sends the same prepared request again and again."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes):
        self.reader, self.writer, self.request = reader, writer, request

    @classmethod
    async def open(cls, url: str, path: str, image: bytes) -> "Connection":
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(image)}\r\n\r\n")
        return cls(reader, writer, head.encode("ascii") + image)

    async def send(self) -> tuple[int, bytes]:
        """The status code and the body of one request."""
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
        length = {k.strip().lower(): v.strip() for k, v in headers.items()}.get(b"content-length")
        if length is None:
            raise SystemExit(f"the server answered without a Content-Length: {head!r}")
        return int(lines[0].split()[1]), await self.reader.readexactly(int(length))

    def close(self) -> None:
        self.writer.close()


async def load(url: str, path: str, image: bytes, clients: int, requests: int) -> dict:
    latencies: list[float] = []
    errors = 0
    per_client = -(-requests // clients)

    async def client() -> None:
        nonlocal errors
        conn = await Connection.open(url, path, image)
        try:
            for i in range(per_client):
                start = time.perf_counter()
                status, body = await conn.send()
                latencies.append(time.perf_counter() - start)
                # parse one answer in 16, outside the timing, so a wrong body is caught without making
                # the load generator the bottleneck
                errors += status != 200 or (i % 16 == 0 and "predictions" not in json.loads(body))
        finally:
            conn.close()

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    ms = np.asarray(latencies) * 1e3
    return {"requests": len(ms), "errors": errors, "requests_per_s": round(len(ms) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "load_generator_cpu_ms_per_request": round(cpu / len(ms) * 1e3, 3)}


def measure(url: str, path: str, image: bytes, clients: int, requests: int) -> dict:
    before = batch_counters(url)
    stats = asyncio.run(load(url, path, image, clients, requests))
    after = batch_counters(url)
    calls, images = after[0] - before[0], after[1] - before[1]
    stats["images_per_model_call"] = round(images / calls, 2) if calls else None
    return stats


def median_row(runs: list[dict]) -> dict:
    """The median of every figure over the runs (requests and errors: their sum), and each run's
    requests/s."""
    row = {}
    for key in runs[0]:
        values = [r[key] for r in runs if r[key] is not None]
        if key in ("requests", "errors"):
            row[key] = sum(values)
        else:
            row[key] = round(float(np.median(values)), 3) if values else None
    row["requests_per_s_each_run"] = [r["requests_per_s"] for r in runs]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--requests", type=int, default=800, help="timed requests per endpoint and client count")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--repeat", type=int, default=3, help="runs of each row; the row reports their medians")
    p.add_argument("--lanes", type=int, default=0, help="model calls a worker runs at once (0: the server's default)")
    a = p.parse_args()
    image = test_image(a.bundle)
    result: dict = {"bundle": str(a.bundle), "workers": a.workers, "lanes": a.lanes, "repeat": a.repeat,
                    "cpu_count": os.cpu_count(),
                    "machine": platform.machine(), "python": platform.python_version(), "runs": {}}
    for batching in (True, False):
        options = ("--batching" if batching else "--no-batching", "--workers", str(a.workers),
                   *(("--lanes", str(a.lanes)) if a.lanes else ()))
        with local_server(a.bundle, *options) as server:
            url = server.url
            runs = {}
            for path in PATHS:
                for clients in CLIENTS:
                    asyncio.run(load(url, path, image, clients, a.warmup))
                    runs[f"{path} x{clients}"] = median_row([measure(url, path, image, clients, a.requests)
                                                             for _ in range(a.repeat)])
            result["runs"]["batching_on" if batching else "batching_off"] = runs
    print(json.dumps(result))


if __name__ == "__main__":
    main()
