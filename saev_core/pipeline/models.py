"""Loading the run's model once per process, and identifying its weights for cache keys."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from saev_core.model.mllm import MLLMAdapter, model_hidden_size
from saev_core.pipeline.sources import resolve_model_id
from saev_core.pipeline.specs import ModelSpec

_SMALL_FILE = 16 * 2**20
_adapters: dict[tuple, MLLMAdapter] = {}
_adapters_lock = threading.Lock()


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

