"""Shared plumbing for the Prefect tasks: model handles per process, the GPU slot, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from prefect.cache_policies import INPUTS, TASK_SOURCE

from saev_core.mllm import MLLMAdapter

GPU_LIMIT = "gpu"
# Cross-run caching: a task whose inputs and code are unchanged is not run again. Storage
# options are left out of the key: rotating credentials must not invalidate finished work.
CACHED = (INPUTS + TASK_SOURCE) - "options"

_adapters: dict[tuple, MLLMAdapter] = {}
_adapters_lock = threading.Lock()


def resolve_model_id(model_id: str) -> str:
    if model_id == "toy":
        from saev_core.toyworld import toy_model_path

        return str(toy_model_path())
    return model_id


def model_fingerprint(model_id: str, revision: str | None) -> str:
    """Identifies the weights: the revision for a hub id, a content hash for a local folder."""
    path = Path(resolve_model_id(model_id))
    if not path.is_dir():
        return revision or "main"
    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.suffix in (".json", ".safetensors", ".jinja", ".bin"):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:20]


def adapter_for(model_id: str, layer: int, device: str, dtype: str | None, revision: str | None,
                trust_remote_code: bool) -> MLLMAdapter:
    """One loaded model per (process, spec): Dask workers and threads reuse it across tasks."""
    key = (model_id, layer, device, dtype, revision, trust_remote_code)
    with _adapters_lock:
        if key not in _adapters:
            _adapters[key] = MLLMAdapter.from_pretrained(resolve_model_id(model_id), layer=layer, device=device,
                                                         dtype=dtype, revision=revision,
                                                         trust_remote_code=trust_remote_code)
        return _adapters[key]


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


@contextlib.contextmanager
def gpu_slot() -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        yield


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
