"""The README's quickstart, run as written in a temporary folder: train (with a short config instead of the
default run's minutes), export, the sample images, predict, explain, then the server and the curl example."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, tiny_config, write_yaml

pytestmark = pytest.mark.slow


def quickstart_blocks() -> list[list[str]]:
    """The bash blocks of the README's Quickstart section, each as its commands (continuations joined)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [[line for line in block.replace("\\\n", "").splitlines() if line.strip()] for block in blocks]


def _run(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_the_readme_quickstart_runs_as_written(tmp_path: Path):
    from nasxserve.serve.local import free_port

    env = dict(os.environ, BENTOML_DO_NOT_TRACK="True", NO_COLOR="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    short = write_yaml(tmp_path / "short.yaml", tiny_config())
    offline, online = quickstart_blocks()
    assert offline[0].startswith("nasx train --out runs/digits")
    for line in offline:
        command = line.replace("nasx train ", f"nasx train --config {short} ", 1)
        r = _run(command, tmp_path, env)
        assert r.returncode == 0, f"{line}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert (tmp_path / "explained.png").is_file() and len(list((tmp_path / "samples").glob("*.png"))) == 10

    # the extra is installed here; the server and the curl are run as written, on a free port
    assert online[0].startswith("pip install") and online[1].startswith("nasx serve bundle --port 3000")
    port = free_port()
    server = subprocess.Popen(["bash", "-c", "exec " + online[1].replace("--port 3000", f"--port {port}")],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _ready(f"http://127.0.0.1:{port}"):
            assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()[-3000:]
            time.sleep(0.3)
        for line in online[2:]:
            r = _run(line.replace("localhost:3000", f"127.0.0.1:{port}"), tmp_path, env)
            assert r.returncode == 0, f"{line}\n{r.stderr[-2000:]}"
            answer = json.loads(r.stdout)
            data = answer["explanations"][0]["data"]
            assert len(data["top_prototypes"]) == 3, answer                # ?top_prototypes=3
            assert data["evidence_sum"] == pytest.approx(data["logit"], abs=1e-3)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=30)
