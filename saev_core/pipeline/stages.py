"""The pipeline's stages as plain functions over storage URIs: what the Prefect tasks wrap. Here:
ingest, activations, the SAE and the weights; the statistics, scores, log-probs, canaries and
groups are in `score_stages`.

Each function takes its own spec and URIs and returns small, serialisable results (keys, URIs,
counts), so the same code runs in a notebook, in a thread, or on a Dask worker. Where each
artefact lives under the work folder is decided here too (`*_uri` functions): content-addressed
by exactly the inputs that change it, plus the library's source hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from saev_core.data import storage
from saev_core.data.images import normalize_image
from saev_core.data.ingest import ingest_to_storage, read_ingest_summary, read_record_shard
from saev_core.data.source_files import JSON_SUFFIXES, PARQUET_SUFFIXES
from saev_core.model.activation_cache import ActivationCache, CacheSpec, shard_key
from saev_core.model.budget import capture_stream
from saev_core.model.mllm import MLLMAdapter
from saev_core.pipeline.hashing import digest, package_hash, source_hash
from saev_core.pipeline.residual_sample import ResidualSample
from saev_core.pipeline.results import IngestSummary, SAECheckpoint, Weights
from saev_core.pipeline.specs import DatasetSpec, SAESpec, WeightsSpec
from saev_core.sae.feed import CacheFeed, draw_training_sample
from saev_core.sae.training import CFG_FILE, WEIGHTS_FILE, encode, load_sae, save_sae, train_sae
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
    a finished ingest of the same files (same sizes and stamps), settings and ingest code
    (saev_core/data) is reused. Returns the summary."""
    policy = {"allow_remote_images": dataset.allow_remote_images, "max_image_bytes": dataset.max_image_bytes}
    key = digest([source_fingerprint(source, source_options), dataset.format, dataset.mapping, dataset.shard_rows,
                  policy, dataset.max_text_chars, package_hash("data")])
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
    stream = capture_stream(adapter, len(rows), record_loader(rows, response), with_responses=response != "none",
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
    stream = capture_stream(adapter, len(rows), record_loader(rows, cache.spec.response),
                            with_responses=cache.spec.response != "none", batch_size=batch_size,
                            batch_tokens=batch_tokens, out_dtype=cache.dtype)
    with cache.writer(want) as writer, contextlib.closing(stream):
        for i, cap in stream:
            writer.add(i, cap)
        return writer.finish()


def record_loader(rows: list[dict], response: str) -> Callable[[int], tuple]:
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
