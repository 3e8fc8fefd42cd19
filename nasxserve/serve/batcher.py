"""Merge concurrent single-image inferences into one ONNX Runtime call, and run calls side by side.

Requests that arrive while every lane is busy wait for the next free one; a request that finds a lane
idle runs at once. So one client never waits for a batching window, and under load every call takes
everything queued (up to ``max_batch`` images), which is the batch size the load can fill. The model
runs in worker threads (ONNX Runtime releases the GIL), so the event loop keeps reading and decoding
requests meanwhile.

A *lane* is one model call at a time on its own thread. Under load each lane takes the next batch as soon
as it is free; with more lanes than cores, a core that finishes a call finds the next one ready instead of
waiting for the event loop to hand it over. A lane beside a running one starts only when at least
``min_part`` images wait: small requests (``/predict``'s single images) are merged behind the running
call, where calls side by side would each be small and cost the event loop, the bottleneck of a cheap
model, more. A batch that finds other lanes idle and nothing else waiting is cut into equal parts, at most
``parts`` (one per core), run at once: an explanation's image and its hidden copies (26 images on digits)
then take the time of a part, not of the whole. Parts hold at least ``min_part`` images, so a single image
is never cut, and parts of one size give each image the same float results as the whole batch on ONNX
Runtime's CPU kernels.

BentoML's own adaptive batching was measured first (a batchable API called through the service's
in-process client): on the digits bundle it added ~12 ms at one client, and at 32 clients it either
answered 503 for requests queued past ``max_latency_ms`` or, with a window long enough to avoid
that, held single requests ~90 ms; its in-process client also dropped connections under load
(bentoml/BentoML#4971). For models that take a millisecond the HTTP hop costs more than it saves.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, cast

import numpy as np

Run = Callable[[np.ndarray], dict[str, np.ndarray]]
MIN_PART = 8            # the fewest images in a part of a cut batch: a single image, or a few, run whole
Job = tuple[np.ndarray, asyncio.Future]


def cuts(n: int, lanes: int, min_part: int) -> list[int]:
    """The edges of the parts a batch of n images is cut into over ``lanes`` lanes: as many equal parts (to an
    image) as there are lanes, each of at least ``min_part`` images; one part when it cannot be cut.
    ``cuts(26, 2, 8) == [0, 13, 26]``."""
    parts = max(1, min(lanes, n // min_part))
    return [n * i // parts for i in range(parts + 1)]


class MicroBatcher:
    """``await batcher(x)`` for x (b, C, H, W) returns the model's outputs for those b images.

    Args:
        run: the model on a batch, (B, C, H, W) -> dict of (B, ...) arrays; called from up to ``lanes``
            threads at once.
        max_batch: most images merged into one batch (a larger request is still run whole).
        on_batch: called with each model call's number of images (for metrics).
        lanes: model calls run at once.
        parts: most parts a batch is cut into over idle lanes (the cores the calls may use).
        min_part: fewest images in a part.
    """

    def __init__(self, run: Run, max_batch: int = 32, on_batch: Optional[Callable[[int], None]] = None,
                 lanes: int = 1, parts: int = 1, min_part: int = MIN_PART):
        if min(lanes, parts, min_part) < 1:
            raise ValueError(f"lanes, parts and min_part must be at least 1; got {lanes}, {parts} and {min_part}")
        self._run = run
        self.max_batch = max_batch
        self.lanes = lanes
        self.parts = parts
        self.min_part = min_part
        self._on_batch = on_batch
        self._pending: deque[Job] = deque()
        self._busy = 0                       # lanes running or lent to a cut batch
        self._queued = 0                     # images waiting in _pending
        self._tasks: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(lanes, thread_name_prefix="nasx-infer")

    async def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((x, future))
        self._queued += len(x)
        # a second lane starts only for a batch worth cutting: small requests wait to be merged into one call,
        # which costs the event loop less than several small calls side by side
        if self._busy == 0 or (self._busy < self.lanes and self._queued >= self.min_part):
            self._busy += 1
            task = asyncio.create_task(self._lane())
            self._tasks.add(task)                  # the loop keeps only weak references to tasks
            task.add_done_callback(self._tasks.discard)
        return await future

    def _take(self) -> list[Job]:
        jobs: list[Job] = []
        size = 0
        while self._pending and (not jobs or size + len(self._pending[0][0]) <= self.max_batch):
            x, future = self._pending.popleft()
            self._queued -= len(x)
            if future.done():              # the client went away
                continue
            jobs.append((x, future))
            size += len(x)
        return jobs

    async def _lane(self) -> None:
        # the next batch starts before the answers of this one are built, so the model never waits on them
        try:
            while self._pending:
                jobs = self._take()
                if jobs:
                    await self._serve(jobs)
        finally:
            self._busy -= 1

    def _cuts(self, n: int) -> list[int]:
        """Where a batch of n images is cut: over this lane and the idle ones when nothing else waits, into at
        most ``parts`` parts."""
        idle = 0 if self._pending else self.lanes - self._busy
        return cuts(n, min(self.parts, 1 + idle), self.min_part)

    async def _serve(self, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        x = np.concatenate([j[0] for j in jobs]) if len(jobs) > 1 else jobs[0][0]
        edges = self._cuts(len(x))
        spans = list(zip(edges[:-1], edges[1:]))
        lent = len(spans) - 1
        self._busy += lent
        try:      # every part is waited for, so a lane is never lent while its thread still runs a part
            outs = await asyncio.gather(*(loop.run_in_executor(self._executor, self._run, x[a:b]) for a, b in spans),
                                        return_exceptions=True)
        finally:
            self._busy -= lent
        failed = next((o for o in outs if isinstance(o, BaseException)), None)
        if failed is not None:                  # every waiting request gets the failure
            for _, future in jobs:
                if not future.done():
                    future.set_exception(failed)
            return
        parts = cast(list[dict[str, np.ndarray]], outs)
        out = parts[0] if len(parts) == 1 else {k: np.concatenate([o[k] for o in parts]) for k in parts[0]}
        if self._on_batch is not None:
            for a, b in spans:
                self._on_batch(b - a)
        start = 0
        for xi, future in jobs:
            if not future.done():
                future.set_result({k: v[start:start + len(xi)] for k, v in out.items()})
            start += len(xi)
