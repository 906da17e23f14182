"""The pipeline's stages as plain functions over storage URIs: what the Prefect tasks wrap.

Each function takes everything it needs as arguments and returns small, serialisable results
(keys, URIs, counts), so the same code runs in a notebook, in a thread, or on a Dask worker.
"""

from __future__ import annotations

import io
import logging
from typing import Callable, Iterable, Sequence

import pyarrow as pa
import torch
from PIL import Image

from saev_core.data import storage
from saev_core.model.activation_cache import ActivationCache
from saev_core.data.ingest import read_record_shard
from saev_core.model.mllm import MLLMAdapter
from saev_core.sae.scoring import SCORERS, SampleStats, sample_stats, score_all, score_shard_methods
from saev_core.sae.training import encode
from saev_core.sae.weights import CrossModalWeights, CrossModalWeightsBuilder, PerModalityWeightsBuilder

log = logging.getLogger(__name__)


def _image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def cache_record_shard(adapter: MLLMAdapter, records_uri: str, cache: ActivationCache, batch_size: int = 8,
                       response: str = "none", storage_options: dict | None = None,
                       progress: Callable[[int], None] | None = None) -> dict:
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
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        responses = None if response == "none" else [r[response] for r in chunk]
        caps = adapter.capture([_image(r["image"]) for r in chunk], [r["prompt"] for r in chunk], responses)
        out.extend(zip((r["sample_id"] for r in chunk), caps))
        if progress:
            progress(len(chunk))
    written = cache.write_shard(out)
    assert written == key
    return {"key": key, "samples": len(out), "tokens": sum(s.n_positions for _, s in out), "reused": False}


def training_source(cache: ActivationCache, keys: Sequence[str]) -> Callable[[], Iterable[torch.Tensor]]:
    """A re-iterable source of cached residual vectors, for saev_core.sae.train_sae."""
    return lambda: cache.token_chunks(keys)


def build_weights(cache: ActivationCache, keys: Sequence[str], sae, pool_size: int = 30, k: int = 5,
                  max_samples: int | None = None, pool: str = "joint", delta: float | None = None,
                  delta_quantile: float | None = None) -> tuple[CrossModalWeights, CrossModalWeightsBuilder]:
    """Two streamed passes over the cached shards `keys` (up to `max_samples` samples).
    pool="per_modality" takes each feature's top-k text and image tokens from separate pools,
    both above delta (given, or the `delta_quantile` of positive activations)."""
    if pool == "joint":
        builder = CrossModalWeightsBuilder(sae.cfg.d_sae, pool_size=pool_size, k=k)
    elif pool == "per_modality":
        builder = PerModalityWeightsBuilder(sae.cfg.d_sae, pool_size=pool_size, k=k,
                                            delta=None if delta_quantile is not None else delta,
                                            delta_quantile=delta_quantile)
    else:
        raise ValueError(f"pool {pool!r}: use 'joint' or 'per_modality'")

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


def shard_stats(cache: ActivationCache, key: str, sae, logp: dict[str, dict] | None = None) -> Iterable[SampleStats]:
    shard = cache.read_shard(key)
    for i, (sample_id, acts, is_image) in enumerate(shard.samples()):
        st = sample_stats(sample_id, encode(sae, acts), acts, is_image, shard.sample_content(i))
        if logp is not None:
            st.logp = logp.get(sample_id)
        yield st


def score_shard(cache: ActivationCache, key: str, sae, weights: CrossModalWeights, delta: float,
                methods: Sequence[str], top_k: int = 10, seed: int = 0, null_samples: int = 16,
                logp: dict[str, dict] | None = None) -> pa.Table:
    """One row per sample: sample_id, one column per method, and the length control.
    Shard-level methods (null_z) keep the shard's per-sample stats ([samples, d_sae] x 3)."""
    shard_level = [m for m in methods if SCORERS[m].shard_level]
    rows, kept = [], []
    for st in shard_stats(cache, key, sae, logp):
        rows.append({"sample_id": st.sample_id, **score_all(st, list(methods), weights, delta, top_k, seed),
                     "n_positions": st.n_positions, "n_image_positions": st.n_image})
        if shard_level:
            kept.append(st)
    if shard_level:
        for m, vals in score_shard_methods(kept, shard_level, weights, delta, top_k, seed, null_samples).items():
            for row, v in zip(rows, vals):
                row[m] = v
    order = ["sample_id", *methods, "n_positions", "n_image_positions"]
    return pa.Table.from_pylist([{c: r[c] for c in order} for r in rows])


def logprob_record_shard(adapter: MLLMAdapter, records_uri: str, cache: ActivationCache, batch_size: int = 8,
                         storage_options: dict | None = None) -> dict:
    """Mean per-token log p(chosen | image, prompt) and log p(rejected | ...) of one record shard,
    from full forwards; stored beside the shard's activations (<shard key>.logp.parquet) and
    reused when there. Returns {"key": shard key, "samples": n, "reused": bool}."""
    from saev_core.model.activation_cache import shard_key
    from saev_core.sae.metrics import response_logprob

    table = read_record_shard(records_uri, storage_options, columns=["sample_id", "prompt", "image", "chosen",
                                                                      "rejected"])
    ids = table.column("sample_id").to_pylist()
    key = shard_key(ids)
    uri = storage.join(cache.uri, f"{key}.logp.parquet")
    reused = storage.exists(uri, storage_options)
    if not reused:
        rows = table.to_pylist()
        out = {"sample_id": ids, "logp_chosen": [], "logp_rejected": []}
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = [_image(r["image"]) for r in chunk]
            prompts = [r["prompt"] for r in chunk]
            for col in ("chosen", "rejected"):
                out[f"logp_{col}"] += response_logprob(adapter, images, prompts, [r[col] for r in chunk], mean=True)
        write_table(pa.table(out), uri, storage_options)
    return {"key": key, "samples": len(ids), "reused": reused}


def read_logp(cache: ActivationCache, key: str, storage_options: dict | None = None) -> dict[str, dict]:
    """{sample_id: {"logp_chosen", "logp_rejected"}} of one shard, written by logprob_record_shard."""
    import pyarrow.parquet as pq

    uri = storage.join(cache.uri, f"{key}.logp.parquet")
    if not storage.exists(uri, storage_options):
        raise FileNotFoundError(f"no log-probs for shard {key} ({uri}): run the log-prob pass first")
    with storage.open_input(uri, storage_options) as fh:
        t = pq.read_table(fh)
    return {sid: {"logp_chosen": c, "logp_rejected": r} for sid, c, r in
            zip(t.column("sample_id").to_pylist(), t.column("logp_chosen").to_pylist(),
                t.column("logp_rejected").to_pylist())}


def write_table(table: pa.Table, uri: str, storage_options: dict | None = None) -> str:
    import pyarrow.parquet as pq

    with storage.atomic_output(uri, storage_options) as fh:
        pq.write_table(table, fh)
    return uri


def write_canaries(record_uris: Sequence[str], out_uri: str, cfg, shard_rows: int,
                   storage_options: dict | None = None) -> dict:
    """Canary record shards (<out>/records/shard-NNNNN.parquet, the canonical schema, so they go
    through the same activations and scoring) and the canary table (<out>/canaries.parquet),
    from the kept record shards. Reused when the table is already there.
    Returns {"record_uris", "table_uri", "n", "by_kind"}."""
    import pyarrow.parquet as pq

    from saev_core.data.canaries import make_canaries

    table_uri = storage.join(out_uri, "canaries.parquet")
    if not storage.exists(table_uri, storage_options):
        records, info = make_canaries(lambda i: read_record_shard(record_uris[i], storage_options),
                                      len(record_uris), cfg)
        n_shards = -(-records.num_rows // shard_rows)
        bounds = [records.num_rows * i // n_shards for i in range(n_shards + 1)]  # even sizes: no tiny last shard
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            write_table(records.slice(lo, hi - lo), storage.join(out_uri, "records", f"shard-{i:05d}.parquet"),
                        storage_options)
        write_table(info, table_uri, storage_options)  # last: its presence means the canaries are complete
    with storage.open_input(table_uri, storage_options) as fh:
        info = pq.read_table(fh)
    n = info.num_rows
    uris = [storage.join(out_uri, "records", f"shard-{i:05d}.parquet") for i in range(-(-n // shard_rows))]
    kinds = info.column("kind").to_pylist()
    return {"record_uris": uris, "table_uri": table_uri, "n": n, "by_kind": {k: kinds.count(k) for k in sorted(set(kinds))}}


def stratify_groups(record_uris: Sequence[str], sample_ids: Sequence[str], stratify_by: str, n_clusters: int = 8,
                    seed: int = 0, storage_options: dict | None = None) -> list:
    """A group label per sample (aligned with `sample_ids`): k-means clusters of the prompt words
    ('prompt_clusters'), or the value of a source column kept in the record's extra JSON."""
    from saev_core.data.records import decode_extra
    from saev_core.sae.selection import prompt_clusters

    column = "prompt" if stratify_by == "prompt_clusters" else "extra"
    value = {}
    for uri in record_uris:
        t = read_record_shard(uri, storage_options, columns=["sample_id", column])
        value.update(zip(t.column("sample_id").to_pylist(), t.column(column).to_pylist()))
    missing = [s for s in sample_ids if s not in value]
    if missing:
        raise ValueError(f"stratify_by: {len(missing)} scored samples are not in the record shards, e.g. {missing[:2]}")
    if stratify_by == "prompt_clusters":
        return prompt_clusters([value[s] for s in sample_ids], n_clusters, seed)
    out = []
    for s in sample_ids:
        extra = decode_extra(value[s])
        if stratify_by not in extra:
            raise ValueError(f"output.stratify_by={stratify_by!r}: sample {s} has no such source column "
                             f"(its columns: {sorted(extra)}); use 'prompt_clusters' or one of those")
        group = extra[stratify_by]
        out.append(group if isinstance(group, (str, int, float, bool)) or group is None else str(group))
    return out
