"""The pipeline's stages as plain functions over storage URIs: what the Prefect tasks wrap.

Each function takes everything it needs as arguments and returns small, serialisable results
(keys, URIs, counts), so the same code runs in a notebook, in a thread, or on a Dask worker.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence

import pyarrow as pa
import torch
from PIL import Image

from saev_core.data import storage
from saev_core.data.images import normalize_image
from saev_core.model.activation_cache import ActivationCache
from saev_core.data.ingest import read_record_shard
from saev_core.model.budget import capture_bounded
from saev_core.model.mllm import MLLMAdapter
from saev_core.sae.scoring import SampleStats, sample_stats, score_all
from saev_core.sae.training import encode
from saev_core.sae.weights import CrossModalWeights, CrossModalWeightsBuilder

log = logging.getLogger(__name__)


def _image(data: bytes) -> Image.Image:
    return normalize_image(data)


def cache_record_shard(adapter: MLLMAdapter, records_uri: str, cache: ActivationCache, batch_size: int = 8,
                       response: str = "none", storage_options: dict | None = None,
                       progress: Callable[[int], None] | None = None, batch_tokens: int = 8192) -> dict:
    """Run the model over one canonical record shard and store its activations.

    Returns {"key", "samples", "tokens", "reused"}; a finished shard is not recomputed.
    """
    from saev_core.model.activation_cache import shard_key

    table = read_record_shard(records_uri, storage_options, columns=["sample_id", "prompt", "image", "chosen",
                                                                      "rejected"])
    ids = table.column("sample_id").to_pylist()
    if not ids:
        return {"key": None, "samples": 0, "tokens": 0, "reused": False}
    key = shard_key(ids)
    if cache.is_finished(key):
        return {"key": key, "samples": len(ids), "tokens": None, "reused": True}
    rows = table.to_pylist()
    out = []
    # a block of batch_size samples at a time, split further so no forward exceeds batch_tokens
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        responses = None if response == "none" else [r[response] for r in chunk]
        caps = capture_bounded(adapter, [_image(r["image"]) for r in chunk], [r["prompt"] for r in chunk],
                               responses, batch_size=batch_size, batch_tokens=batch_tokens, progress=progress)
        out.extend(zip((r["sample_id"] for r in chunk), caps))
    written = cache.write_shard(out)
    assert written == key
    return {"key": key, "samples": len(out), "tokens": sum(s.n_positions for _, s in out), "reused": False}


def training_source(cache: ActivationCache, keys: Sequence[str]) -> Callable[[], Iterable[torch.Tensor]]:
    """A re-iterable source of cached residual vectors, for saev_core.sae.train_sae."""
    return lambda: cache.token_chunks(keys)


def build_weights(cache: ActivationCache, keys: Sequence[str], sae, pool_size: int = 30, k: int = 5,
                  max_samples: int | None = None) -> tuple[CrossModalWeights, CrossModalWeightsBuilder]:
    """Two streamed passes over the cached shards `keys` (up to `max_samples` samples)."""
    builder = CrossModalWeightsBuilder(sae.cfg.d_sae, pool_size=pool_size, k=k)

    def stream():
        """(acts, is_image) one sample at a time: codes are [tokens of one sample, d_sae], never
        a whole shard's (which would be ~100 GB at d_sae 65k)."""
        left = max_samples
        for key in keys:
            for _, acts, is_image in cache.read_shard(key).samples():
                if left is not None and left <= 0:
                    return
                yield acts, is_image
                if left is not None:
                    left -= 1

    for acts, is_image in stream():
        builder.observe(encode(sae, acts), is_image, [acts.shape[0]])
    builder.plan()
    for acts, _ in stream():
        builder.gather(acts)
    return builder.result(), builder


def shard_stats(cache: ActivationCache, key: str, sae) -> Iterable[SampleStats]:
    for sample_id, acts, is_image in cache.read_shard(key).samples():
        yield sample_stats(sample_id, encode(sae, acts), acts, is_image)


def score_shard(cache: ActivationCache, key: str, sae, weights: CrossModalWeights, delta: float,
                methods: Sequence[str], top_k: int = 10, seed: int = 0) -> pa.Table:
    """One row per sample: sample_id, one column per method, and the length control."""
    rows = []
    truncated = cache.read_truncation(key)
    for st in shard_stats(cache, key, sae):
        rows.append({"sample_id": st.sample_id, **score_all(st, list(methods), weights, delta, top_k, seed),
                     "n_positions": st.n_positions, "n_image_positions": st.n_image,
                     "truncated_tokens": truncated.get(st.sample_id, 0)})
    return pa.Table.from_pylist(rows)


def write_table(table: pa.Table, uri: str, storage_options: dict | None = None) -> str:
    import pyarrow.parquet as pq

    with storage.atomic_output(uri, storage_options) as fh:
        pq.write_table(table, fh)
    return uri
