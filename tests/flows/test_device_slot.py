"""The thread runner's device slot: one task at a time on the device, one global-limit
acquisition per burst of mapped tasks (not one per task), and the slot given back afterwards, on
a real Prefect API (the test harness's server)."""

import threading
import time


def _active_slots(name: str) -> int:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_mapped_tasks_share_one_acquisition_and_never_overlap(prefect_harness, monkeypatch):
    import prefect.concurrency.sync as sync_mod
    from prefect import flow, task

    from tasks.common import GPU_LIMIT, device_slot, ensure_gpu_limit

    calls = []
    real = sync_mod.concurrency

    def counting(*a, **k):
        calls.append(a)
        return real(*a, **k)

    monkeypatch.setattr(sync_mod, "concurrency", counting)
    inside, spans, lock = [], [], threading.Lock()

    @task
    def on_device(i: int) -> int:
        with device_slot():
            with lock:
                inside.append(i)
                held = len(inside)
            start = time.perf_counter()
            time.sleep(0.05)
            spans.append((start, time.perf_counter(), held, _active_slots(GPU_LIMIT)))
            with lock:
                inside.remove(i)
        return i

    @flow
    def burst() -> list[int]:
        ensure_gpu_limit()
        return [f.result() for f in [on_device.submit(i) for i in range(6)]]

    assert burst() == list(range(6))
    assert all(held == 1 for _, _, held, _ in spans)  # one task at a time on the device
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert [a for *_, a in spans] == [1] * 6, (spans, calls)  # the global slot was held meanwhile
    assert 1 <= len(calls) < 6  # far fewer acquisitions than tasks (one per burst)
    assert _active_slots(GPU_LIMIT) == 0  # and given back


def test_an_acquisition_error_reaches_the_task(prefect_harness, monkeypatch):
    """A limit that does not exist (strict acquisition) fails the task that waits for it, rather
    than letting it run without a slot or hang."""
    import pytest
    from prefect import flow, task

    from tasks import common

    monkeypatch.setattr(common, "GPU_LIMIT", "no-such-limit-for-this-test")

    @task
    def on_device() -> None:
        with common.device_slot():
            pass

    @flow
    def one() -> None:
        on_device()

    with pytest.raises(Exception, match="no-such-limit-for-this-test"):
        one()
    assert common._PROCESS_SLOT._holder is None  # nothing left behind for the next task


def test_one_lane_per_gpu_runs_tasks_side_by_side_on_their_own_devices(prefect_harness, monkeypatch):
    """Issue 20: with N visible GPUs a process runs N device tasks at once, each on its own lane's
    device ('auto' becomes cuda:<lane>), never two on one lane; the limit is taken once for the
    burst and occupies no more slots than it has."""
    from prefect import flow, task

    from saev_core.pipeline.specs import ModelSpec
    from tasks import common

    monkeypatch.setattr(common, "visible_gpus", lambda: 2)
    monkeypatch.setattr(common, "_PROCESS_SLOT", common._ProcessSlot())
    lanes_in_use, seen, lock = set(), [], threading.Lock()

    @task
    def on_device(i: int) -> str:
        with common.device_slot() as lane:
            with lock:
                assert lane not in lanes_in_use  # never two tasks on one lane
                lanes_in_use.add(lane)
                seen.append((time.perf_counter(), len(lanes_in_use)))
            time.sleep(0.2)
            device = common.placed(ModelSpec(device="auto"), lane).device
            with lock:
                lanes_in_use.discard(lane)
        return device

    @flow
    def burst() -> list[str]:
        common.ensure_gpu_limit(2)
        return [f.result() for f in [on_device.submit(i) for i in range(6)]]

    devices = burst()
    assert set(devices) == {"cuda:0", "cuda:1"}
    assert max(n for _, n in seen) == 2  # two tasks ran side by side
    assert common.placed(ModelSpec(device="cpu"), 1).device == "cpu"  # the user's choice is kept
    assert common.placed(ModelSpec(device="cuda:3"), 1).device == "cuda:3"
    assert _active_slots(common.GPU_LIMIT) == 0
