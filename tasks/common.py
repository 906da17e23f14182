"""Shared plumbing for the Prefect tasks: the cross-run cache policy, retries, and the one device
policy every task that runs the model or the SAE follows."""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Iterator

from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from saev_core.data import storage
from saev_core.pipeline.hashing import digest, source_hash

GPU_LIMIT = "gpu"


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient faults only. A bad schema, a missing path or
    layer, an already published run fail at once (saev_core.pipeline.preflight.is_permanent)."""
    from saev_core.pipeline.preflight import is_permanent

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result could not be read: keep the retry policy
        return True
    return not (isinstance(exc, BaseException) and is_permanent(exc))


RETRY = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent)


def cached(outputs=None):
    """Cross-run cache policy: inputs + task source + library source hash + the storage endpoint
    (credentials left out: rotating keys must not invalidate finished work) + whether the task's
    outputs (URIs computed from its parameters by `outputs`) still exist, so a deleted work folder
    is recomputed rather than served from a stale cache entry."""

    def key(_ctx, params: dict) -> str:
        options = params.get("options")
        present = [storage.exists(u, options) for u in outputs(params)] if outputs else []
        return digest([source_hash(), storage.redact_storage_options(options), present])

    return ((INPUTS + TASK_SOURCE) - "options") + CacheKeyFnPolicy(cache_key_fn=key)


def ensure_gpu_limit(slots: int | None = None) -> None:
    """Create the global 'gpu' concurrency limit if the server has none (an operator's own
    setting is left alone), so that strict acquisition below never means 'unlimited'. Default:
    one slot per GPU this process sees (at least one)."""
    slots = slots or max(1, visible_gpus())
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(GPU_LIMIT)
        except ObjectNotFound:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=slots))


def _on_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
        return True
    except (ImportError, ValueError):
        return False


def visible_gpus() -> int:
    """CUDA devices this process sees (0 on a CPU-only machine)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


class _ProcessSlot:
    """This process's share of the global 'gpu' limit, for the thread runner.

    Taking a global slot per task costs about 0.8 s of a task's wall time (Prefect 3.8,
    `benchmarks/slot_benchmark.py`: 0.16 s this way), which at one task per shard is most of a
    toy-sized task and tens of minutes over a real dataset. So one acquisition is made when the
    first of this process's device tasks arrives and held, by a holder thread (Prefect's lease
    context stays in one thread), until the last queued one is done. It occupies one slot per
    lane: a lane per visible GPU (one on a CPU-only machine), each running one task at a time on
    its own device, so 8 GPUs run 8 shards at once instead of stacking them on cuda:0. A burst of
    mapped tasks pays for one acquisition; other processes and flow runs still wait for the
    global slots as before."""

    def __init__(self, lanes: int | None = None):
        self._state = threading.Condition()
        self._lanes = lanes
        self._free: list[int] = []
        self._users = 0
        self._holder: _SlotHolder | None = None

    @property
    def lanes(self) -> int:
        if self._lanes is None:
            self._lanes = max(1, visible_gpus())
            self._free = list(range(self._lanes))
        return self._lanes

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """Yields the lane (GPU index) the task runs on."""
        with self._state:
            n = self.lanes
            self._users += 1
            if self._holder is None:
                self._holder = _SlotHolder(n)
            holder = self._holder
        lane = None
        try:
            holder.wait()
            with self._state:
                self._state.wait_for(lambda: self._free)
                lane = self._free.pop(0)
            yield lane
        finally:
            with self._state:
                if lane is not None:
                    self._free.append(lane)
                    self._free.sort()
                    self._state.notify()
                self._users -= 1
                if self._users == 0:
                    holder.release()
                    self._holder = None


class _SlotHolder:
    """Acquires `occupy` global slots on its own thread and holds them until released."""

    def __init__(self, occupy: int = 1):
        self._occupy = occupy
        self._acquired, self._release = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        ctx = contextvars.copy_context()  # the flow's Prefect settings (API URL) go with it
        self._thread = threading.Thread(target=ctx.run, args=(self._run,), name="gpu-slot-holder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from prefect.concurrency.context import ConcurrencyContext
        from prefect.concurrency.sync import concurrency

        try:
            occupy = min(self._occupy, _limit_size())  # an operator's smaller limit is respected
            # a context of its own: the copied task's would release the lease when that task ends
            with ConcurrencyContext(), concurrency(GPU_LIMIT, occupy=occupy, strict=True):
                self._acquired.set()
                self._release.wait()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting tasks
            self._error = exc
            self._acquired.set()

    def wait(self) -> None:
        self._acquired.wait()
        if self._error is not None:
            raise self._error

    def release(self) -> None:
        self._release.set()
        self._thread.join()


def _limit_size() -> int:
    """The global limit's size (a missing limit is reported by the acquisition itself)."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            return max(1, int(client.read_global_concurrency_limit_by_name(GPU_LIMIT).limit))
    except Exception:  # noqa: BLE001 - strict acquisition below raises the real error
        return 1


_PROCESS_SLOT = _ProcessSlot()


@contextlib.contextmanager
def device_slot() -> Iterator[int | None]:
    """The one device policy: a task that runs the model or the SAE holds a device slot while it
    does, and runs on the device it yields (`placed`). On the thread runner that is one lane of
    this process's share of the global concurrency limit 'gpu' (`_ProcessSlot`: one task at a time
    per visible GPU; it also bounds how many shards' work is in memory at once; the limit keeps
    other runs off the devices meanwhile); it yields the lane's GPU index. On Dask the scheduler
    already grants the task a worker's resources={"GPU": 1} (see flows.curate), one task per
    worker and device, so no second limit is taken and it yields None (the worker's own device)."""
    if _on_dask_worker():
        yield None
        return
    with _PROCESS_SLOT.hold() as lane:
        yield lane


def placed(model, lane: int | None):
    """The model spec on the slot's GPU: 'auto' or 'cuda' becomes 'cuda:<lane>' when this process
    sees GPUs; an explicit 'cuda:N' or 'cpu' is the user's and is kept."""
    if lane is None or model.device not in ("auto", "cuda") or visible_gpus() == 0:
        return model
    return model.model_copy(update={"device": f"cuda:{lane}"})
