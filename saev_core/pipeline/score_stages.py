"""The pipeline's scoring stages as plain functions over storage URIs (the rest are in `stages`):
per-sample statistics (from cached residuals or a fused pass), score tables and their assembly,
log-probs, canaries and groups. Same contract as `stages`: each takes its own spec and URIs and
returns small results; `*_uri` functions place each artefact by exactly the inputs that change it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from saev_core.data import storage
from saev_core.data.images import normalize_image
from saev_core.data.passthrough import add_passthrough
from saev_core.data.ingest import read_record_shard
from saev_core.model.activation_cache import ActivationCache, CacheSpec
from saev_core.model.budget import capture_stream
from saev_core.model.mllm import MLLMAdapter
from saev_core.pipeline.hashing import digest, source_hash
from saev_core.pipeline.results import Canaries
from saev_core.pipeline.specs import ScoreSpec
from saev_core.pipeline.stages import record_loader, write_table
from saev_core.sae.scoring import SCORERS, SampleStats, ScoreContext, sample_stats, score_all, score_shard_methods
from saev_core.sae.training import encode
from saev_core.sae.stats_store import read_stats, write_stats

# ------------------------------------------------------------------------------------ scores
def scores_uri(work_uri: str, sae_sha: str, weights_uri: str, delta: float, methods: Sequence[str], spec: ScoreSpec,
               key: str) -> str:
    return storage.join(work_uri, "scores",
                        digest([sae_sha, weights_uri, delta, list(methods), spec.top_k, spec.seed, spec.null_samples,
                                source_hash()]),
                        f"{key}.parquet")


def stats_uri(work_uri: str, spec: CacheSpec, sae_sha: str, record_key: str, encode: str = "float32") -> str:
    """Per-sample statistics of one record shard under one SAE (and its encode precision,
    ModelSpec.encode_key): reused whatever the weights, delta and methods (applied afterwards)."""
    parts = [spec.key(), sae_sha, source_hash()] + ([encode] if encode != "float32" else [])
    return storage.join(work_uri, "stats", digest(parts), f"{record_key}.safetensors")


def _stats_on_device(sample_id: str, sae, acts: torch.Tensor, is_image: torch.Tensor,
                     content: torch.Tensor | None = None, truncated_tokens: int = 0) -> SampleStats:
    """Encode and reduce one sample on the SAE's device; only the small statistics come back."""
    dev = next(sae.parameters()).device
    acts, is_image = acts.to(dev), is_image.to(dev)
    content = None if content is None else content.to(dev)
    st = sample_stats(sample_id, encode(sae, acts, on_device=True), acts, is_image, content)
    return dataclasses.replace(st, truncated_tokens=int(truncated_tokens),
                               **{f.name: getattr(st, f.name).cpu() for f in dataclasses.fields(st)
                                  if isinstance(getattr(st, f.name), torch.Tensor)})


def shard_stats(cache: ActivationCache, key: str, sae) -> Iterable[SampleStats]:
    """Per-sample statistics of one cached shard, one sample read at a time."""
    index = cache.index(key)
    ids, starts, lengths = (index.column(c).to_pylist() for c in ("sample_id", "start", "length"))
    truncated = cache.read_truncation(key)
    with cache.open_shard(key, checked=True) as f:
        for sample_id, lo, n in zip(ids, starts, lengths):
            content = f.rows("content", lo, lo + n).bool() if "content" in f.meta else None
            st = _stats_on_device(sample_id, sae, f.rows("acts", lo, lo + n).float(),
                                  f.rows("is_image", lo, lo + n).bool(), content, truncated.get(sample_id, 0))
            yield st


def record_stats(adapter: MLLMAdapter, records_uri: str, sae, batch_size: int = 8, response: str = "none",
                 storage_options: dict | None = None, progress: Callable[[int], None] | None = None,
                 batch_tokens: int = 8192, skip: Iterable[str] = ()) -> dict[str, SampleStats]:
    """Fused scoring pass over one record shard (less the samples in `skip`): forward to the
    hooked layer -> SAE encode -> per-sample statistics, all on the model's device, in the same
    token-bounded batches as the capture. No residual is stored or copied to the host. Returns
    {sample_id: statistics} in record order."""
    table = read_record_shard(records_uri, storage_options, columns=["sample_id", "prompt", "image", "chosen",
                                                                      "rejected"])
    skip = set(skip)
    rows = [r for r in table.to_pylist() if r["sample_id"] not in skip]
    out: dict[str, SampleStats] = {}
    stream = capture_stream(adapter, len(rows), record_loader(rows, response), with_responses=response != "none",
                            batch_size=batch_size, batch_tokens=batch_tokens, progress=progress, on_device=True)
    with contextlib.closing(stream):
        for i, c in stream:
            out[rows[i]["sample_id"]] = _stats_on_device(rows[i]["sample_id"], sae, c.acts, c.is_image, c.content,
                                                         c.truncated_tokens)
    return {r["sample_id"]: out[r["sample_id"]] for r in rows}  # record order


def _lossless(spec: CacheSpec) -> bool:
    """Whether cached residuals are the forward pass's own values (stored at least as precisely)."""
    return spec.storage_dtype in ("float32", spec.compute_dtype)


def record_shard_stats(cache: ActivationCache, record_key: str, records_uri: str, sae,
                       adapter: Callable[[], MLLMAdapter], stats_at: str, batch_size: int = 8, batch_tokens: int = 8192,
                       storage_options: dict | None = None, progress: Callable[[int], None] | None = None,
                       cached_key: str | None = None) -> tuple[list[SampleStats], str]:
    """The per-sample statistics of one record shard, in record order, and where they came from.

    Statistics stored by an earlier pass with this SAE are read back ("stored"). Otherwise the
    samples whose residuals are cached losslessly (the activation shard `cached_key`, holding any
    subset of the record shard's rows; the whole shard when it is `record_key`) are scored from
    the cache, read once in order, and only the others go through a fused pass ("cache",
    "fused", or "cache+fused"); statistics that needed the model are stored at `stats_at`.
    `adapter` is called only for a fused pass (loading the model costs)."""
    if cache.is_finished(record_key) and _lossless(cache.spec):  # the whole shard, in record order
        return list(shard_stats(cache, record_key, sae)), "cache"
    if storage.exists(stats_at, storage_options):
        return read_stats(stats_at, storage_options), "stored"
    ids = read_record_shard(records_uri, storage_options, columns=["sample_id"]).column("sample_id").to_pylist()
    from_cache: dict[str, SampleStats] = {}
    if cached_key and cache.is_finished(cached_key) and _lossless(cache.spec):
        from_cache = {st.sample_id: st for st in shard_stats(cache, cached_key, sae)}
        if progress:
            progress(len(from_cache))
    fused = record_stats(adapter(), records_uri, sae, batch_size, cache.spec.response, storage_options, progress,
                         batch_tokens, skip=from_cache) if len(from_cache) < len(ids) else {}
    stats = [from_cache.get(s) or fused[s] for s in ids]
    write_stats(stats_at, stats, storage_options)
    return stats, ("cache+fused" if fused else "cache") if from_cache else "fused"


def score_table(stats: Iterable[SampleStats], methods: Sequence[str], ctx: ScoreContext,
                logp: dict[str, dict] | None = None) -> pa.Table:
    """One row per sample: sample_id, one column per method, the length control and how many text
    tokens the token budget cut. `ctx`: the weights, delta and `ScoreSpec` (ScoreSpec.context).
    Model-based methods read `logp` (sample_id -> log-probs). Shard-level methods (null_z) keep
    the shard's per-sample stats ([samples, d_sae] x 3)."""
    shard_level = [m for m in methods if SCORERS[m].shard_level]
    rows, kept = [], []
    for st in stats:
        if logp is not None:
            st.logp = logp.get(st.sample_id)
        rows.append({"sample_id": st.sample_id, **score_all(st, list(methods), ctx),
                     "n_positions": st.n_positions, "n_image_positions": st.n_image,
                     "truncated_tokens": st.truncated_tokens})
        if shard_level:
            kept.append(st)
    if shard_level:
        for m, vals in score_shard_methods(kept, shard_level, ctx).items():
            for row, v in zip(rows, vals):
                row[m] = v
    order = ["sample_id", *methods, "n_positions", "n_image_positions", "truncated_tokens"]
    return pa.Table.from_pylist([{c: r[c] for c in order} for r in rows])


def score_shard(cache: ActivationCache, key: str, sae, methods: Sequence[str], ctx: ScoreContext,
                logp: dict[str, dict] | None = None) -> pa.Table:
    """Scores of one cached shard (see score_table)."""
    return score_table(shard_stats(cache, key, sae), methods, ctx, logp)


def assemble_scores(score_uris: Sequence[str], record_uris: Sequence[str], method: str,
                    storage_options: dict | None) -> pa.Table:
    """One table: sample_id, the chosen method's column, row_index, every other score column, then
    the source's own columns (saev_core.data.passthrough.add_passthrough). Sorted by sample_id so that
    reruns produce byte-identical files. Each method keeps its own name up to the published file
    (publish_stage.published_scores)."""
    parts = [pq.read_table(io.BytesIO(storage.read_bytes(u, storage_options))) for u in score_uris]
    table = pa.concat_tables(parts) if parts else pa.table({"sample_id": pa.array([], pa.string()),
                                                             method: pa.array([], pa.float64())})
    shards = [read_record_shard(u, storage_options, columns=["sample_id", "row_index", "extra"]) for u in record_uris]
    rows = pa.concat_tables(shards)
    row_of = dict(zip(rows.column("sample_id").to_pylist(), rows.column("row_index").to_pylist()))
    table = table.append_column("row_index", pa.array([row_of.get(s) for s in table.column("sample_id").to_pylist()],
                                                       pa.int64()))
    others = [c for c in table.column_names if c not in ("sample_id", method, "row_index")]
    table = table.select(["sample_id", method, "row_index", *others])
    return add_passthrough(table, shards).sort_by("sample_id")


def logprob_record_shard(adapter: MLLMAdapter, records_uri: str, cache: ActivationCache, batch_size: int = 8,
                         storage_options: dict | None = None, batch_tokens: int = 8192) -> dict:
    """Mean per-token log p(chosen | image, prompt) and log p(rejected | ...) of one record shard,
    the shared prefix run once per sample (saev_core.model.logprobs); stored beside the shard's
    activations (<shard key>.logp.parquet) and reused when there. Returns {"key": shard key,
    "samples": n, "reused": bool, "forwards_per_sample": full forwards' worth of positions run}."""
    from saev_core.model.activation_cache import shard_key
    from saev_core.model.logprobs import LogprobCost, pair_logprobs

    table = read_record_shard(records_uri, storage_options, columns=["sample_id", "prompt", "image", "chosen",
                                                                      "rejected"])
    ids = table.column("sample_id").to_pylist()
    key = shard_key(ids)
    uri = storage.join(cache.uri, f"{key}.logp.parquet")
    reused = storage.exists(uri, storage_options)
    cost = LogprobCost()
    if not reused:
        out = {"sample_id": ids, "logp_chosen": [], "logp_rejected": []}
        for r in table.to_pylist():
            (c, j), one = pair_logprobs(adapter, normalize_image(r["image"]), r["prompt"], (r["chosen"], r["rejected"]))
            out["logp_chosen"].append(c)
            out["logp_rejected"].append(j)
            cost.add(one)
        write_table(pa.table(out), uri, storage_options)
    return {"key": key, "samples": len(ids), "reused": reused,
            "forwards_per_sample": None if reused else cost.forwards_per_sample}


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


def write_canaries(record_uris: Sequence[str], out_uri: str, cfg, shard_rows: int,
                   storage_options: dict | None = None) -> Canaries:
    """Canary record shards (<out>/records/shard-NNNNN.parquet, the canonical schema, so they go
    through the same activations and scoring) and the canary table (<out>/canaries.parquet),
    from the kept record shards. Reused when the table is already there."""
    import pyarrow.parquet as pq

    from saev_core.data.canaries import make_canaries

    table_uri = storage.join(out_uri, "canaries.parquet")
    if not storage.exists(table_uri, storage_options):
        records, info = make_canaries(lambda i: read_record_shard(record_uris[i], storage_options),
                                      len(record_uris), cfg)
        n_shards = -(-records.num_rows // shard_rows)  # 0 when too few records to make any canary
        bounds = [records.num_rows * i // n_shards for i in range(n_shards + 1)] if n_shards else [0]
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            write_table(records.slice(lo, hi - lo), storage.join(out_uri, "records", f"shard-{i:05d}.parquet"),
                        storage_options)
        write_table(info, table_uri, storage_options)  # last: its presence means the canaries are complete
    with storage.open_input(table_uri, storage_options) as fh:
        info = pq.read_table(fh)
    n = info.num_rows
    uris = [storage.join(out_uri, "records", f"shard-{i:05d}.parquet") for i in range(-(-n // shard_rows))]
    kinds = info.column("kind").to_pylist()
    return Canaries(record_uris=uris, table_uri=table_uri, n=n, by_kind={k: kinds.count(k) for k in sorted(set(kinds))})


def stratify_groups(record_uris: Sequence[str], sample_ids: Sequence[str], stratify_by: str, n_clusters: int = 8,
                    seed: int = 0, storage_options: dict | None = None) -> list:
    """A group label per sample (aligned with `sample_ids`): k-means clusters of the prompt words
    ('prompt_clusters'), or the value of a source column kept in the record's extra JSON."""
    from saev_core.data.records import decode_extra
    from saev_core.data.selection import prompt_clusters

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
