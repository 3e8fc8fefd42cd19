"""What the attacks of docs/security.md cost the real server: memory, time and answer per probe (Linux).

Starts ``nasx serve BUNDLE`` on 127.0.0.1 (one worker, default limits), sends each hostile request once,
and reports for each: the HTTP status, the seconds until the answer, the size of the answer, and the
server's memory: the largest rise of any of its processes' peak resident set (``VmHWM``, reset through
``/proc/PID/clear_refs`` before the probe) above that process's resident set just before, and how much of it
was still held afterwards. The heavy-image probes also poll ``/readyz`` while they run and report its slowest
answer. With ``--allow-pixels N`` the image probes are repeated on a second server that accepts N pixels,
to show what a decode the budget lets through costs.

Prints one JSON object; docs/results.md quotes it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from nasxserve.serve.local import local_server, send_chunked

MB = 2 ** 20


# ============================================================================ the server's memory

def process_tree(root: int) -> list[int]:
    """``root`` and every process below it, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def memory_kb(pid: int) -> dict[str, int]:
    """{"VmRSS": ..., "VmHWM": ...} of one process in kB (empty once it has gone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


class MemoryWatch:
    """Peak and kept memory of a process tree across one probe."""

    def __init__(self, root: int):
        self.pids = [p for p in process_tree(root) if memory_kb(p)]

    def __enter__(self) -> MemoryWatch:
        for pid in self.pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")     # resets VmHWM to the current VmRSS
        self.before = {pid: memory_kb(pid).get("VmRSS", 0) for pid in self.pids}
        return self

    def __exit__(self, *exc) -> None:
        after = {pid: memory_kb(pid) for pid in self.pids}
        rises = {pid: (m.get("VmHWM", 0) - self.before[pid], m.get("VmRSS", 0) - self.before[pid])
                 for pid, m in after.items() if m}
        worst = max(rises, key=lambda pid: rises[pid][0])
        self.figures = {"peak_mb_above_idle": round(rises[worst][0] / 1024, 1),
                        "kept_mb": round(rises[worst][1] / 1024, 1),
                        "process_rss_before_mb": round(self.before[worst] / 1024, 1)}


# ============================================================================ hostile inputs

def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def sixteen_bit_png(side: int) -> bytes:
    """A grey 16-bit PNG of side x side that compresses to a few hundred kB (a ramp repeated per row)."""
    return png(np.tile(np.arange(side, dtype=np.uint16) * 8, (side, 1)))


def rgba_png(side: int) -> bytes:
    return png(np.zeros((side, side, 4), np.uint8))


def ico_around(inner_png: bytes) -> bytes:
    """An ICO file whose one entry is ``inner_png`` (ICO allows PNG entries of any size)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(inner_png), 6 + 16)
    return header + entry + inner_png


def v2_body(name: str, images: int, chw: tuple[int, int, int], outputs: list[str] | None = None) -> dict:
    x = np.zeros((images, *chw), np.float32)
    body: dict = {"inputs": [{"name": "image", "shape": list(x.shape), "datatype": "FP32",
                              "data": x.ravel().tolist()}]}
    if outputs:
        body["outputs"] = [{"name": n} for n in outputs]
    return body


# ============================================================================ probes

def answer(r: httpx.Response) -> dict:
    return {"status": r.status_code, "answer_bytes": len(r.content),
            "error": r.json().get("error") if r.headers.get("content-type", "").startswith("application/json")
            and r.status_code >= 400 else None}


def while_polling_readyz(url: str, send: Callable[[], dict]) -> dict:
    """Run ``send`` in a thread and poll /readyz every 20 ms until it returns; adds the slowest poll."""
    result: dict = {}
    sender = threading.Thread(target=lambda: result.update(send()))
    polls = []
    with httpx.Client(base_url=url, timeout=30) as poll:
        sender.start()
        while sender.is_alive():
            t0 = time.monotonic()
            poll.get("/readyz")
            polls.append(time.monotonic() - t0)
            time.sleep(0.02)
    sender.join()
    result["readyz_slowest_ms"] = round(1000 * max(polls), 1) if polls else None
    return result


def probe(server, name: str, send: Callable[[], dict], readyz: bool = False) -> dict:
    with MemoryWatch(server.process.pid) as memory:
        t0 = time.monotonic()
        row = while_polling_readyz(server.url, send) if readyz else send()
        row["seconds"] = round(time.monotonic() - t0, 3)
    row.update(memory.figures)
    print(f"{name}: {row}", file=sys.stderr, flush=True)
    return row


def image_probes(server, client: httpx.Client) -> dict:
    big16 = sixteen_bit_png(8000)
    big_rgba = rgba_png(8000)
    ico = ico_around(png(np.zeros((9000, 9000), np.uint8)))

    def post_image(data: bytes, ctype: str) -> Callable[[], dict]:
        return lambda: answer(client.post("/predict", content=data, headers={"content-type": ctype}))
    return {
        "16-bit PNG 8000x8000": dict(probe(server, "16-bit", post_image(big16, "image/png"), readyz=True),
                                     request_bytes=len(big16)),
        "RGBA PNG 8000x8000": dict(probe(server, "RGBA", post_image(big_rgba, "image/png"), readyz=True),
                                   request_bytes=len(big_rgba)),
        "ICO holding a 9000x9000 PNG": dict(probe(server, "ICO", post_image(ico, "image/x-icon")),
                                            request_bytes=len(ico)),
    }


def request_probes(server, client: httpx.Client, name: str) -> dict:
    infer = f"/v2/models/{name}/infer"
    spec = client.get("/metadata").json()["input"]
    chw = (spec["channels"], spec["height"], spec["width"])
    repeated = json.dumps(v2_body(name, 256, chw, ["similarity_maps"] * 200)).encode()
    forty_mb = json.dumps(v2_body(name, 1, chw)).encode()
    forty_mb = forty_mb[:-3] + b" " * (40 * MB - len(forty_mb)) + forty_mb[-3:]
    numbers = json.dumps(v2_body(name, 1, chw)).encode().replace(b"0.0", b"0" + b",0" * 15_000_000, 1)
    nested = b"[" * 100_000 + b"]" * 100_000
    long_number = b'{"image": "AAAA", "n": ' + b"1" * 5000 + b"}"
    many_keys = json.dumps({f"key{i}": 0 for i in range(1_000_000)}).encode()
    multipart = (b'--xyz\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                 b"Content-Type: image/png\r\n\r\n")

    def post_json(path: str, body: bytes) -> Callable[[], dict]:
        return lambda: dict(answer(client.post(path, content=body, headers={"content-type": "application/json"})),
                            request_bytes=len(body))

    def chunked() -> dict:
        sent, head = send_chunked(server.url, "/predict", "multipart/form-data; boundary=xyz", 200 * MB, multipart)
        status = re.match(rb"HTTP/1\.1 (\d+)", head)
        return {"status": int(status.group(1)) if status else None, "mb_sent_before_answer": round(sent / MB, 1)}

    def unknown_paths() -> dict:
        """Two rounds of 300: the first may add the one series of unknown paths, the second must add nothing."""
        sizes = [client.get("/metrics").content]
        statuses = set()
        for _ in range(2):
            statuses |= {client.get(f"/nowhere/{os.urandom(6).hex()}").status_code for _ in range(300)}
            sizes.append(client.get("/metrics").content)
        return {"status": sorted(statuses), "metrics_bytes": [len(m) for m in sizes],
                "metric_lines_added_per_round": [b.count(b"\n") - a.count(b"\n") for a, b in zip(sizes, sizes[1:])]}
    return {
        "/v2 asking for one output 200 times": probe(server, "repeated", post_json(infer, repeated)),
        "/v2 with a 40 MB JSON body": probe(server, "40 MB", post_json(infer, forty_mb)),
        "/v2 with 15M numbers in 30 MB": probe(server, "numbers", post_json(infer, numbers)),
        "200 MB multipart, chunked": probe(server, "chunked", chunked),
        "300 unknown paths": probe(server, "unknown", unknown_paths),
        "deeply nested JSON on /predict": probe(server, "nested", post_json("/predict", nested)),
        "JSON with 1M keys on /predict": probe(server, "keys", post_json("/predict", many_keys)),
        "a 5000-digit number in /predict's JSON": probe(server, "digits", post_json("/predict", long_number)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--allow-pixels", type=int, default=64_000_000,
                   help="--max-pixels of the second server, on which the image probes are repeated (0: skip)")
    a = p.parse_args()
    result: dict = {"bundle": str(a.bundle), "cpu_count": os.cpu_count(), "machine": platform.machine(),
                    "python": platform.python_version(), "default_limits": {}}
    with local_server(a.bundle) as server, httpx.Client(base_url=server.url, timeout=120) as client:
        name = client.get("/metadata").json()["name"]
        client.get("/readyz")
        result["default_limits"].update(request_probes(server, client, name))
        result["default_limits"].update(image_probes(server, client))
    if a.allow_pixels:
        with local_server(a.bundle, "--max-pixels", str(a.allow_pixels)) as server, \
                httpx.Client(base_url=server.url, timeout=120) as client:
            client.get("/readyz")
            result[f"max_pixels_{a.allow_pixels}"] = image_probes(server, client)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
