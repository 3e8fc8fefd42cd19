"""MicroBatcher: concurrent requests share one model call; answers go back to the right caller."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from nasxserve.serve.batcher import MicroBatcher


class SlowDouble:
    """A stand-in model: doubles its input, records the batch sizes it saw, takes a little time."""

    def __init__(self, delay: float = 0.02, fail_on: float | None = None):
        self.calls: list[int] = []
        self.delay = delay
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.calls.append(len(x))
        threading.Event().wait(self.delay)
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("model failed")
        return {"y": x * 2, "first": x[:, 0]}


def test_a_lone_request_runs_at_once_and_alone():
    model = SlowDouble(delay=0.0)
    batcher = MicroBatcher(model)
    out = asyncio.run(batcher(np.full((1, 3), 5.0)))
    np.testing.assert_array_equal(out["y"], np.full((1, 3), 10.0))
    assert model.calls == [1]


def test_concurrent_requests_are_merged_and_each_gets_its_own_answer():
    model = SlowDouble()
    sizes = []
    batcher = MicroBatcher(model, max_batch=8, on_batch=sizes.append)

    async def main():
        return await asyncio.gather(*(batcher(np.full((1, 2), float(i))) for i in range(20)))

    outs = asyncio.run(main())
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], np.full((1, 2), 2.0 * i))
        assert out["first"].shape == (1,) and out["first"][0] == i
    assert model.calls == [8, 8, 4]          # all 20 were queued before the first call started
    assert sizes == model.calls


def test_multi_image_requests_are_kept_whole():
    model = SlowDouble()
    batcher = MicroBatcher(model, max_batch=4)

    async def main():
        return await asyncio.gather(*(batcher(np.full((3, 1), float(i))) for i in range(5)))

    outs = asyncio.run(main())
    assert [o["y"].shape for o in outs] == [(3, 1)] * 5
    assert all(c % 3 == 0 for c in model.calls)


def test_a_failing_batch_fails_its_requests_and_the_next_batch_still_runs():
    model = SlowDouble(fail_on=3.0)
    batcher = MicroBatcher(model, max_batch=32)

    async def main():
        first = asyncio.gather(*(batcher(np.full((1, 1), float(i))) for i in range(6)), return_exceptions=True)
        results = await first
        after = await batcher(np.full((1, 1), 7.0))
        return results, after

    results, after = asyncio.run(main())
    failed = [r for r in results if isinstance(r, Exception)]
    assert failed and all(isinstance(r, RuntimeError) for r in failed)
    assert after["y"][0, 0] == 14.0
    with pytest.raises(RuntimeError):
        asyncio.run(MicroBatcher(SlowDouble(fail_on=1.0))(np.ones((1, 1))))


class Concurrency(SlowDouble):
    """SlowDouble that also records the most calls it saw running at once."""

    def __init__(self, delay: float = 0.02):
        super().__init__(delay)
        self.running = self.most = 0

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            return super().__call__(x)
        finally:
            with self.lock:
                self.running -= 1


def test_a_lone_batch_is_cut_over_the_idle_lanes_and_put_back_in_order():
    model = Concurrency()
    sizes = []
    batcher = MicroBatcher(model, lanes=3, parts=3, min_part=8, on_batch=sizes.append)
    x = np.arange(26.0)[:, None]
    out = asyncio.run(batcher(x))
    np.testing.assert_array_equal(out["y"], 2 * x)
    np.testing.assert_array_equal(out["first"], x[:, 0])
    assert sorted(model.calls) == [8, 9, 9] and model.most == 3     # three parts, run at once
    assert sorted(sizes) == [8, 9, 9]


def test_a_batch_is_never_cut_below_min_part_images():
    model = Concurrency()
    batcher = MicroBatcher(model, lanes=4, parts=4, min_part=8)
    asyncio.run(batcher(np.ones((1, 1))))
    asyncio.run(batcher(np.ones((15, 1))))
    asyncio.run(batcher(np.ones((16, 1))))
    assert model.calls == [1, 15, 8, 8]


def test_a_batch_is_cut_into_at_most_parts_parts_however_many_lanes_idle():
    model = Concurrency()
    batcher = MicroBatcher(model, lanes=4, parts=2, min_part=8)
    asyncio.run(batcher(np.ones((40, 1))))
    assert model.calls == [20, 20] and model.most == 2


def test_under_load_lanes_run_whole_batches_side_by_side_and_never_more():
    model = Concurrency()
    batcher = MicroBatcher(model, max_batch=26, lanes=2, parts=2, min_part=8)

    async def main():
        return await asyncio.gather(*(batcher(np.full((26, 1), float(i))) for i in range(6)))

    outs = asyncio.run(main())
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out["y"], np.full((26, 1), 2.0 * i))
    assert model.most == 2                        # two lanes busy at once, never three
    assert 26 in model.calls                      # with others waiting, a batch is run whole


def test_a_failing_part_fails_its_batch_and_frees_every_lane():
    model = SlowDouble(fail_on=20.0)
    batcher = MicroBatcher(model, lanes=2, parts=2, min_part=8)

    async def main():
        with pytest.raises(RuntimeError):
            await batcher(np.arange(26.0)[:, None])        # the second part holds the 20
        assert batcher._busy == 0
        return await batcher(np.full((16, 1), 1.0))

    out = asyncio.run(main())
    np.testing.assert_array_equal(out["y"], np.full((16, 1), 2.0))
    assert model.calls[-2:] == [8, 8]                       # both lanes were free again


def test_lanes_must_be_positive():
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(SlowDouble(), lanes=0)
    with pytest.raises(ValueError, match="at least 1"):
        MicroBatcher(SlowDouble(), parts=0)


def test_small_requests_wait_for_the_running_lane_and_a_large_one_takes_another():
    model = Concurrency(delay=0.1)
    batcher = MicroBatcher(model, lanes=4, parts=1, min_part=8)

    async def arrive_while_a_call_runs(x: np.ndarray) -> None:
        first = asyncio.ensure_future(batcher(np.ones((1, 1))))
        await asyncio.sleep(0.01)                 # the first request's call is running
        later = []
        for _ in range(3):
            later.append(asyncio.ensure_future(batcher(x)))
            await asyncio.sleep(0.005)
        await asyncio.gather(first, *later)

    asyncio.run(arrive_while_a_call_runs(np.ones((1, 1))))
    assert model.most == 1 and sum(model.calls) == 4       # merged behind the running call, never beside it
    heavy = Concurrency(delay=0.1)
    batcher = MicroBatcher(heavy, lanes=4, parts=1, min_part=8)
    asyncio.run(arrive_while_a_call_runs(np.ones((26, 1))))
    assert heavy.most >= 2                                 # 26 images are worth a lane of their own
