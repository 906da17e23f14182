"""Loading the run's model once per process, and identifying its weights for cache keys."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path

from saev_core.model.mllm import MLLMAdapter, default_dtype, dtype_name, model_hidden_size, resolve_device
from saev_core.pipeline.sources import resolve_model_id
from saev_core.pipeline.specs import ModelSpec

_SMALL_FILE = 16 * 2**20
_adapters: dict[tuple, MLLMAdapter] = {}
_adapters_lock = threading.Lock()
_saes: "OrderedDict[tuple, object]" = OrderedDict()
_saes_lock = threading.Lock()
_SAES_KEPT = 2  # a run uses one SAE; two lets a worker move between runs without reloading each time


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


def adapter_for(model: ModelSpec) -> MLLMAdapter:
    """One loaded model per (process, spec): Dask workers and threads reuse it across tasks.
    The fingerprint is in the key, so a long-lived worker notices new weights in a folder."""
    key = (model.model_id, model_fingerprint(model.model_id, model.revision), model.layer, model.device,
           model.dtype, model.revision, model.trust_remote_code, model.max_tokens)
    with _adapters_lock:
        if key not in _adapters:
            _adapters[key] = MLLMAdapter.from_pretrained(resolve_model_id(model.model_id), layer=model.layer,
                                                         device=model.device, dtype=model.dtype,
                                                         revision=model.revision,
                                                         trust_remote_code=model.trust_remote_code)
            _adapters[key].max_tokens = model.max_tokens
        return _adapters[key]


def hidden_size(model: ModelSpec) -> int:
    """Residual width from the config alone (an orchestrating process never loads the weights)."""
    return model_hidden_size(resolve_model_id(model.model_id), model.revision, model.trust_remote_code)



def encode_dtype(model: ModelSpec) -> str:
    """The dtype the SAE encodes in on this worker: float32, or the forward's own dtype."""
    if model.sae_dtype == "float32":
        return "float32"
    if model.dtype:
        return dtype_name(model.dtype)
    return str(default_dtype(resolve_device(model.device))).removeprefix("torch.")


def sae_for(uri: str, sha256: str, model: ModelSpec, storage_options: dict | None = None):
    """One loaded SAE per (process, checkpoint, device, dtype), reused across tasks: a 65k-feature
    SAE is 2 GB, and loading it per record shard read 1.4 TB for an 83k-sample run."""
    from saev_core.sae.training import load_sae

    device, dtype = str(resolve_device(model.device)), encode_dtype(model)
    key = (sha256, device, dtype)
    with _saes_lock:
        if key in _saes:
            _saes.move_to_end(key)
            return _saes[key]
        sae = load_sae(uri, device=device, storage_options=storage_options, dtype=dtype)
        _saes[key] = sae
        while len(_saes) > _SAES_KEPT:
            _saes.popitem(last=False)
        return sae
