"""Shared plumbing for the Prefect tasks: the cross-run cache policy, retries, and the one device
policy every task that runs the model or the SAE follows."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def device_slot() -> Iterator[None]:
    """The one device policy: a task that runs the model or the SAE holds a device slot while it
    does. On the thread runner that is the global concurrency limit 'gpu' (one slot per device the
    host may use; it also bounds how many shards' activations are in memory at once). On Dask the
    scheduler already grants the task a worker's resources={"GPU": 1} (see flows.curate), one task
    per device, so no second limit is taken."""
    if _on_dask_worker():
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        yield
