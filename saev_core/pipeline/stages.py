"""The pipeline's stages as plain functions over storage URIs: what the Prefect tasks wrap.

Each function takes its own spec and URIs and returns small, serialisable results (keys, URIs,
counts), so the same code runs in a notebook, in a thread, or on a Dask worker. Where each
artefact lives under the work folder is decided here too (`*_uri` functions): content-addressed
by exactly the inputs that change it, plus the library's source hash.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import logging
from typing import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

from saev_core.data import storage
from saev_core.data.images import normalize_image
from saev_core.data.publish import add_passthrough
from saev_core.data.ingest import JSON_SUFFIXES, PARQUET_SUFFIXES, ingest_to_storage, read_ingest_summary, \
    read_record_shard
from saev_core.model.activation_cache import ActivationCache, CacheSpec, shard_key
from saev_core.model.budget import capture_stream
from saev_core.model.mllm import MLLMAdapter
from saev_core.pipeline.hashing import digest, source_hash
from saev_core.pipeline.residual_sample import ResidualSample
from saev_core.pipeline.results import Canaries, IngestSummary, SAECheckpoint, Weights
from saev_core.pipeline.specs import DatasetSpec, SAESpec, ScoreSpec, WeightsSpec
from saev_core.sae.feed import CacheFeed, draw_training_sample
from saev_core.sae.scoring import SCORERS, SampleStats, ScoreContext, sample_stats, score_all, score_shard_methods
from saev_core.sae.training import CFG_FILE, WEIGHTS_FILE, encode, load_sae, save_sae, train_sae
from saev_core.sae.stats_store import read_stats, write_stats
from saev_core.sae.weights import CrossModalWeights, CrossModalWeightsBuilder, PerModalityWeightsBuilder, save_weights

log = logging.getLogger(__name__)


def _image(data: bytes) -> Image.Image:
    return normalize_image(data)


def write_table(table: pa.Table, uri: str, storage_options: dict | None = None) -> str:
    with storage.atomic_output(uri, storage_options) as fh:
        pq.write_table(table, fh)
    return uri


# ------------------------------------------------------------------------------------ ingest
def source_fingerprint(source: str, storage_options: dict | None) -> str:
    """Names, sizes and modification stamps of the source files: a cheap change detector."""
    fs, path = storage.get_fs(source, storage_options)
    if fs.isfile(path):
        files = [path]
    else:
        files = [storage.get_fs(u, storage_options)[1]
                 for u in storage.list_files(source, storage_options, suffixes=PARQUET_SUFFIXES + JSON_SUFFIXES)]
    info = []
    for f in sorted(files):
        meta = fs.info(f)
        stamp = meta.get("ETag") or meta.get("mtime") or meta.get("LastModified") or meta.get("created")
        info.append([f, int(meta.get("size") or 0), str(stamp)])
    return digest(info)


def ingest_once(dataset: DatasetSpec, source: str, work_uri: str, source_options: dict | None,
                work_options: dict | None, progress: Callable | None = None) -> IngestSummary:
    """Canonical record shards + quarantine under <work>/ingest/<hash of source files and settings>;
    a finished ingest of the same files (same sizes and stamps) is reused. Returns the summary."""
    policy = {"allow_remote_images": dataset.allow_remote_images, "max_image_bytes": dataset.max_image_bytes}
    key = digest([source_fingerprint(source, source_options), dataset.format, dataset.mapping, dataset.shard_rows,
                  policy, dataset.max_text_chars])
    out = storage.join(work_uri, "ingest", key)
    try:
        summary = IngestSummary.model_validate(read_ingest_summary(out, work_options))
        log.info("reusing finished ingest %s (%d kept, %d quarantined)", out, summary.kept, summary.quarantined)
        return summary
    except FileNotFoundError:
        pass
    return IngestSummary.model_validate(ingest_to_storage(
        source, out, dataset.format, shard_rows=dataset.shard_rows, mapping=dataset.mapping,
        storage_options=source_options, out_storage_options=work_options, progress=progress, image_policy=policy,
        max_text_chars=dataset.max_text_chars))


# ------------------------------------------------------------------------------- activations
def activation_cache(work_uri: str, spec: CacheSpec, storage_options: dict | None) -> ActivationCache:
    return ActivationCache(storage.join(work_uri, "activations"), spec, storage_options)


def record_key(records_uri: str, storage_options: dict | None = None) -> str | None:
    """The shard key of a record shard's samples (what its scores, log-probs and statistics are
    named by); None for an empty shard."""
    ids = read_record_shard(records_uri, storage_options, columns=["sample_id"]).column("sample_id").to_pylist()
    return shard_key(ids) if ids else None


def cache_record_shard(adapter: MLLMAdapter, records_uri: str, cache: ActivationCache, batch_size: int = 8,
                       response: str = "none", storage_options: dict | None = None,
                       progress: Callable[[int], None] | None = None, batch_tokens: int = 8192,
                       sample: ResidualSample = ResidualSample()) -> dict:
    """Run the model over the rows of one canonical record shard that `sample` keeps and store
    their activations (all rows by default).

    Returns {"key" (of the cached rows; None when none are kept), "record_key" (of all rows),
    "samples" (cached), "rows", "tokens", "reused"}; a finished shard is not recomputed.
    """
    table = read_record_shard(records_uri, storage_options, columns=["sample_id", "prompt", "image", "chosen",
                                                                      "rejected"])
    all_ids = table.column("sample_id").to_pylist()
    out = {"key": None, "record_key": shard_key(all_ids) if all_ids else None, "samples": 0, "rows": len(all_ids),
           "tokens": 0, "reused": False}
    ids = [s for s in all_ids if sample.keeps(s)]
    if not ids:
        return out
    key = shard_key(ids)
    out.update(key=key, samples=len(ids))
    if cache.is_finished(key):
        return {**out, "tokens": None, "reused": True}
    if len(ids) < len(all_ids):
        kept = set(ids)
        table = table.filter(pa.array([s in kept for s in all_ids]))
    rows = table.to_pylist()
    tokens = 0
    stream = capture_stream(adapter, len(rows), _loader(rows, response), with_responses=response != "none",
                            batch_size=batch_size, batch_tokens=batch_tokens, progress=progress, out_dtype=cache.dtype)
    with cache.writer(ids) as writer, contextlib.closing(stream):  # an error stops the prefetch thread too
        for i, cap in stream:
            writer.add(i, cap)
            tokens += cap.n_positions
        written = writer.finish()
    assert written == key
    return {**out, "tokens": tokens}


def cache_samples(adapter: MLLMAdapter, record_uris: Sequence[str], sample_ids: Sequence[str],
                  cache: ActivationCache, batch_size: int = 8, batch_tokens: int = 8192,
                  storage_options: dict | None = None) -> str:
    """Residuals of a few named samples (the report's, outside the residual sample) as one
    activation shard, in `sample_ids` order; reused when there. Returns its key."""
    want = list(dict.fromkeys(sample_ids))
    key = shard_key(want)
    if cache.is_finished(key):
        return key
    found: dict[str, dict] = {}
    for uri in record_uris:
        t = read_record_shard(uri, storage_options, columns=["sample_id", "prompt", "image", "chosen", "rejected"])
        t = t.filter(pc.is_in(t.column("sample_id"), pa.array(want, pa.string())))
        found.update((r["sample_id"], r) for r in t.to_pylist())
        if len(found) == len(want):
            break
    missing = [s for s in want if s not in found]
    if missing:
        raise ValueError(f"samples {missing[:3]} are not in the run's record shards")
    rows = [found[s] for s in want]
    stream = capture_stream(adapter, len(rows), _loader(rows, cache.spec.response),
                            with_responses=cache.spec.response != "none", batch_size=batch_size,
                            batch_tokens=batch_tokens, out_dtype=cache.dtype)
    with cache.writer(want) as writer, contextlib.closing(stream):
        for i, cap in stream:
            writer.add(i, cap)
        return writer.finish()


def _loader(rows: list[dict], response: str) -> Callable[[int], tuple]:
    """Row i's (image, prompt, response or None), its image decoded only when asked for."""
    return lambda i: (_image(rows[i]["image"]), rows[i]["prompt"], None if response == "none" else rows[i][response])


def training_source(cache: ActivationCache, keys: Sequence[str], max_tokens: int | None = None, seed: int = 0,
                    position_fraction: float = 1.0, max_samples: int | None = None) -> CacheFeed:
    """A re-iterable source for saev_core.sae.train_sae: a seeded sample of up to `max_tokens`
    positions (and `max_samples` samples) drawn across all of `keys`, read sample by sample in a
    new order every epoch."""
    return CacheFeed(cache, draw_training_sample(cache, keys, max_tokens, seed, position_fraction, max_samples))


# --------------------------------------------------------------------------------------- SAE
def training_keys(spec: SAESpec, shard_keys: Sequence[str], shard_rows: int) -> list[str]:
    """The shards the SAE's training sample is drawn from: all of them. `train_samples` and
    `max_tokens` bound a seeded sample drawn across every shard (saev_core.sae.feed), not the
    shard list (which used to keep the first shards only)."""
    return list(shard_keys)


def sae_checkpoint_uri(work_uri: str, cache: CacheSpec, shard_keys: Sequence[str], spec: SAESpec,
                       device: str) -> str:
    """Where an SAE trained from these activations and settings lives: a hash of data, config and code."""
    cfg = spec.to_train_config(device).to_dict()
    return storage.join(work_uri, "sae", digest([cache.key(), list(shard_keys), cfg, source_hash()]))


def sae_sha256(uri: str, storage_options: dict | None) -> str:
    return hashlib.sha256(storage.read_bytes(storage.join(uri, WEIGHTS_FILE), storage_options)).hexdigest()


def _read_metrics(uri: str, storage_options: dict | None) -> dict | None:
    path = storage.join(uri, "metrics.json")
    return storage.read_json(path, storage_options) if storage.exists(path, storage_options) else None


def load_checkpoint(uri: str, d_in: int, storage_options: dict | None) -> SAECheckpoint:
    """A given checkpoint, checked against the model's width; identified downstream by its sha256."""
    sae = load_sae(uri, expected_d_in=d_in, storage_options=storage_options)
    log.info("loaded SAE %s (d_sae=%d)", uri, sae.cfg.d_sae)
    return SAECheckpoint(uri=uri, sha256=sae_sha256(uri, storage_options), trained=False)


def finished_checkpoint(uri: str, storage_options: dict | None) -> SAECheckpoint | None:
    """A checkpoint this pipeline trained before (its cfg.json is written last), or None."""
    if not storage.exists(storage.join(uri, CFG_FILE), storage_options):
        return None
    return SAECheckpoint(uri=uri, sha256=sae_sha256(uri, storage_options), trained=False,
                         metrics=_read_metrics(uri, storage_options))


def train_checkpoint(spec: SAESpec, cache: ActivationCache, keys: Sequence[str], d_in: int, device: str, uri: str,
                     storage_options: dict | None, ce: Callable[[object], dict] | None = None) -> SAECheckpoint:
    """Train the SAE-V recipe on the cached activations, measure it, save it (SAELens format)."""
    cfg = spec.to_train_config(device)
    source = training_source(cache, keys, cfg.max_tokens, cfg.seed, cfg.position_fraction, cfg.max_samples)
    sae = train_sae(source, d_in, cfg)
    metrics = sae_metrics(sae, cache, list(keys)[:2])
    if ce is not None:
        metrics["next_token_ce"] = ce(sae)
    storage.write_json(storage.join(uri, "metrics.json"), metrics, storage_options)
    save_sae(sae, uri, storage_options)  # cfg.json last: its presence means the checkpoint is complete
    return SAECheckpoint(uri=uri, sha256=sae_sha256(uri, storage_options), trained=True, metrics=metrics)


def sae_metrics(sae, cache: ActivationCache, keys: Sequence[str]) -> dict:
    from saev_core.sae.metrics import ReconstructionStats

    stats = ReconstructionStats(sae.cfg.d_sae)
    for key in keys:
        for _, acts, is_image in cache.iter_samples(key):  # one sample at a time: bounded memory
            stats.add(sae, acts, is_image)
    return stats.report()


def spliced_ce_on_records(sae, adapter: MLLMAdapter, records_uri: str, storage_options: dict | None,
                          n: int = 16, batch_size: int = 8, batch_tokens: int = 8192) -> dict:
    """Next-token CE on text targets: clean vs SAE spliced in vs zero-ablation at the hook."""
    from saev_core.sae.metrics import spliced_ce

    rows = read_record_shard(records_uri, storage_options, columns=["prompt", "image", "chosen"]).slice(0, n)
    rows = rows.to_pylist()
    return spliced_ce(adapter, sae, [_image(r["image"]) for r in rows], [r["prompt"] for r in rows],
                      [r["chosen"] for r in rows], batch_size=batch_size, batch_tokens=batch_tokens)


# ----------------------------------------------------------------------------------- weights
def weights_uri(work_uri: str, sae_sha: str, cache: CacheSpec, shard_keys: Sequence[str], spec: WeightsSpec,
                encode: str = "float32") -> str:
    """`encode`: the SAE's encode precision (ModelSpec.encode_key)."""
    parts = [sae_sha, cache.key(), list(shard_keys), spec, source_hash()] + ([encode] if encode != "float32" else [])
    return storage.join(work_uri, "weights", digest(parts) + ".safetensors")


def build_weights(cache: ActivationCache, keys: Sequence[str], sae, spec: WeightsSpec, seed: int = 0,
                  ) -> tuple[CrossModalWeights, CrossModalWeightsBuilder]:
    """Two streamed passes over a seeded sample of `spec.weight_samples` samples drawn across every
    cached shard in `keys`, encoded on the SAE's device. pool="per_modality" takes each feature's
    top-k text and image tokens from separate pools, both above the spec's delta."""
    if spec.pool == "joint":
        builder = CrossModalWeightsBuilder(sae.cfg.d_sae, pool_size=spec.pool_size, k=spec.k)
    elif spec.pool == "per_modality":
        builder = PerModalityWeightsBuilder(sae.cfg.d_sae, pool_size=spec.pool_size, k=spec.k, delta=spec.delta,
                                            delta_quantile=spec.delta_quantile)
    else:
        raise ValueError(f"pool {spec.pool!r}: use 'joint' or 'per_modality'")
    subset = draw_training_sample(cache, keys, seed=seed, max_samples=spec.weight_samples)

    def stream():
        """(acts, is_image) one sample at a time, in the same order in both passes: codes are
        [tokens of one sample, d_sae], never a whole shard's (~100 GB at d_sae 65k)."""
        rows = zip(subset.keys, subset.starts, subset.lengths)
        for key, run in itertools.groupby(rows, key=lambda r: r[0]):  # each shard opened once per run
            with cache.open_shard(key, checked=True) as f:  # the draw checked every shard
                for _, lo, n in run:
                    yield f.rows("acts", lo, lo + n).float(), f.rows("is_image", lo, lo + n).bool()

    for acts, is_image in stream():
        z = encode(sae, acts, on_device=True)  # both builders keep their pools on the SAE's device
        builder.observe(z, is_image.to(z.device), [acts.shape[0]])
    builder.plan()
    for acts, _ in stream():
        builder.gather(acts)
    return builder.result(), builder


def compute_weights(sae, cache: ActivationCache, keys: Sequence[str], spec: WeightsSpec, uri: str,
                    storage_options: dict | None) -> Weights:
    """Weights w_k on a seeded `weight_samples` samples, delta from the activation distribution,
    saved to `uri`."""
    weights, builder = build_weights(cache, keys, sae, spec)
    delta = builder.resolve_delta(spec.delta_quantile, spec.delta)
    save_weights(weights, uri, storage_options)
    log.info("%d cross-modal features of %d; delta = %.4f", weights.n_cross_modal, sae.cfg.d_sae, delta)
    return Weights(uri=uri, n_cross_modal=weights.n_cross_modal, d_sae=int(sae.cfg.d_sae), delta=delta,
                   tokens=builder.n_tokens, shard_keys=list(keys))


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
    stream = capture_stream(adapter, len(rows), _loader(rows, response), with_responses=response != "none",
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
    the source's own columns (saev_core.data.publish.add_passthrough). Sorted by sample_id so that
    reruns produce byte-identical files. Each method keeps its own name up to the published file
    (publishing.published_scores)."""
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
            (c, j), one = pair_logprobs(adapter, _image(r["image"]), r["prompt"], (r["chosen"], r["rejected"]))
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
