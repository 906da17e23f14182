"""Shared plumbing for the Prefect tasks: model handles per process, the GPU slot, hashing."""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from saev_core.data import storage
from saev_core.model.mllm import MLLMAdapter, resolve_model_id

GPU_LIMIT = "gpu"
_ROOT = Path(__file__).resolve().parents[1]
_code_version: str | None = None


def code_version() -> str:
    """Hash of the library and task sources: a fix anywhere in saev_core invalidates cached
    results (Prefect's TASK_SOURCE sees only the task function's own body)."""
    global _code_version
    if _code_version is None:
        h = hashlib.sha256()
        for f in sorted([*(_ROOT / "saev_core").rglob("*.py"), *(_ROOT / "tasks").glob("*.py")]):
            h.update(f.relative_to(_ROOT).as_posix().encode())
            h.update(f.read_bytes())
        _code_version = h.hexdigest()[:16]
    return _code_version


def cached(outputs=None):
    """Cross-run cache policy: inputs + task source + library code version + the storage
    endpoint (credentials left out: rotating keys must not invalidate finished work) + whether
    the task's outputs (URIs computed from its parameters by `outputs`) still exist, so a
    deleted work folder is recomputed rather than served from a stale cache entry."""

    def key(_ctx, params: dict) -> str:
        options = params.get("options")
        present = [storage.exists(u, options) for u in outputs(params)] if outputs else []
        return digest([code_version(), storage.redact_storage_options(options), present])

    return ((INPUTS + TASK_SOURCE) - "options") + CacheKeyFnPolicy(cache_key_fn=key)

_adapters: dict[tuple, MLLMAdapter] = {}
_adapters_lock = threading.Lock()


_SMALL_FILE = 16 * 2**20


def model_fingerprint(model_id: str, revision: str | None) -> str:
    """Identifies the weights. A local folder: every file's name and size, the content of files
    under 16 MB (configs, tokenizers, code, small models) and the modification time of larger
    ones (reading 15 GB of weights per run to hash them would cost more than the run). A hub id:
    its revision (pin one: "main" moves)."""
    path = Path(resolve_model_id(model_id))
    if not path.is_dir():
        return f"hub:{model_id}@{revision or 'main'}"
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path).as_posix()}:{st.st_size}".encode())
        h.update(f.read_bytes() if st.st_size < _SMALL_FILE else str(st.st_mtime_ns).encode())
    return h.hexdigest()[:20]


def adapter_for(model_id: str, layer: int, device: str, dtype: str | None, revision: str | None,
                trust_remote_code: bool) -> MLLMAdapter:
    """One loaded model per (process, spec): Dask workers and threads reuse it across tasks.
    The fingerprint is in the key, so a long-lived worker notices new weights in a folder."""
    key = (model_id, model_fingerprint(model_id, revision), layer, device, dtype, revision, trust_remote_code)
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


def retry_unless_permanent(task, task_run, state) -> bool:
    """Prefect retry condition: retry transient faults only. A bad schema, a missing path or
    layer, an already published run fail at once (saev_core.pipeline.preflight.is_permanent)."""
    from saev_core.pipeline.preflight import is_permanent

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - the result could not be read: keep the retry policy
        return True
    return not (isinstance(exc, BaseException) and is_permanent(exc))


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
