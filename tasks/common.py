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


def ensure_gpu_limit(slots: int = 1) -> None:
    """Create the global 'gpu' concurrency limit if the server has none (an operator's own
    setting is left alone), so that strict acquisition below never means 'unlimited'."""
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


class _ProcessSlot:
    """This process's share of the global 'gpu' limit, for the thread runner.

    Taking a global slot per task costs about 0.8 s of a task's wall time (Prefect 3.8,
    `benchmarks/slot_benchmark.py`: 0.16 s this way), which at one task per shard is most of a
    toy-sized task and tens of minutes over a real dataset. So one slot is taken when the first of this
    process's device tasks arrives and held, by a holder thread (Prefect's lease context stays in
    one thread), until the last queued one is done; meanwhile the tasks take turns on a local
    lock. A burst of mapped tasks pays for one acquisition; other processes and flow runs still
    wait for the global slot as before."""

    def __init__(self):
        self._state = threading.Lock()
        self._device = threading.RLock()  # one task at a time on this process's device
        self._users = 0
        self._holder: _SlotHolder | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._state:
            self._users += 1
            if self._holder is None:
                self._holder = _SlotHolder()
            holder = self._holder
        try:
            holder.wait()
            with self._device:
                yield
        finally:
            with self._state:
                self._users -= 1
                if self._users == 0:
                    holder.release()
                    self._holder = None


class _SlotHolder:
    """Acquires the global slot on its own thread and holds it until released."""

    def __init__(self):
        self._acquired, self._release = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        ctx = contextvars.copy_context()  # the flow's Prefect settings (API URL) go with it
        self._thread = threading.Thread(target=ctx.run, args=(self._run,), name="gpu-slot-holder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from prefect.concurrency.context import ConcurrencyContext
        from prefect.concurrency.sync import concurrency

        try:
            # a context of its own: the copied task's would release the lease when that task ends
            with ConcurrencyContext(), concurrency(GPU_LIMIT, occupy=1, strict=True):
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


_PROCESS_SLOT = _ProcessSlot()


@contextlib.contextmanager
def device_slot() -> Iterator[None]:
    """The one device policy: a task that runs the model or the SAE holds a device slot while it
    does. On the thread runner that is this process's share of the global concurrency limit
    'gpu' (`_ProcessSlot`: one task at a time on the device; it also bounds how many shards'
    work is in memory at once; the limit keeps other runs off the device meanwhile). On Dask the
    scheduler already grants the task a worker's resources={"GPU": 1} (see flows.curate), one
    task per device, so no second limit is taken."""
    if _on_dask_worker():
        yield
        return
    with _PROCESS_SLOT.hold():
        yield
