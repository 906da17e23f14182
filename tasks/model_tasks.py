"""Tasks that touch the model or the SAE: activation caching (of the residual sample), SAE
training/loading, cross-modal weights, and per-record-shard scoring (from the cache or fused).
Each resolves its inputs, makes one saev_core call under the device policy, and logs; results
are small (keys, URIs, counts), never tensors."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from tqdm.auto import tqdm

from saev_core.data import storage
from saev_core.data.ingest import read_record_shard
from saev_core.model.activation_cache import CacheSpec
from saev_core.pipeline import score_stages, stages
from saev_core.model.mllm import resolve_device
from saev_core.pipeline.loaded_models import adapter_for, sae_for
from saev_core.pipeline.residual_sample import ResidualSample
from saev_core.pipeline.results import SAECheckpoint, Weights
from saev_core.pipeline.specs import ModelSpec, SAESpec, ScoreSpec, WeightsSpec
from saev_core.sae.training import CFG_FILE
from saev_core.sae.weights import load_weights

from .common import RETRY, cached, device_slot, placed


def _progress(what: str, name: str, n: int):
    """A tqdm bar in the log and a Prefect progress artifact in the UI for one shard's work."""
    artifact = create_progress_artifact(0.0, description=f"{what} of {name}")
    bar = tqdm(total=n, desc=f"{what} {name}", unit="sample", leave=False)

    def update(k: int) -> None:
        bar.update(k)
        update_progress_artifact(artifact, 100.0 * bar.n / max(n, 1))

    def close() -> None:
        bar.close()
        update_progress_artifact(artifact, 100.0)

    return update, close


@task(name="cache-activations", **RETRY)
def cache_activations(records_uri: str, model: ModelSpec, spec: CacheSpec, work_uri: str,
                      options: dict | None, sample: ResidualSample = ResidualSample()) -> dict:
    """Activations of the rows of one record shard that `sample` keeps (the SAE's training sample
    and the weight subset), at the hooked layer. No Prefect cache here: the activation cache is
    content-addressed, and a finished shard (done marker present) is reused after a check as
    cheap as a cache lookup, which can never point at a deleted shard."""
    logger = get_run_logger()
    name = records_uri.rsplit("/", 1)[-1]
    ids = read_record_shard(records_uri, options, columns=["sample_id"]).column("sample_id").to_pylist()
    progress, close = _progress("activations", name, sum(map(sample.keeps, ids)))
    with device_slot() as lane:
        out = stages.cache_record_shard(adapter_for(placed(model, lane)), records_uri,
                                        stages.activation_cache(work_uri, spec, options), batch_size=model.batch_size,
                                        response=spec.response, storage_options=options, progress=progress,
                                        batch_tokens=model.batch_tokens, sample=sample)
    close()
    logger.info("shard %s: %s of %s samples cached%s", out["key"], out["samples"], out["rows"],
                " (reused)" if out["reused"] else "")
    return out


def _sae_outputs(p: dict) -> list[str]:
    if p["sae"].checkpoint:
        return []
    uri = stages.sae_checkpoint_uri(p["work_uri"], p["spec"], p["shard_keys"], p["sae"], p["device"])
    return [storage.join(uri, CFG_FILE)]


@task(name="train-or-load-sae", cache_policy=cached(_sae_outputs), persist_result=True, **RETRY)
def train_or_load_sae(sae: SAESpec, spec: CacheSpec, shard_keys: list[str], work_uri: str, options: dict | None,
                      d_in: int, device: str, model: ModelSpec | None = None,
                      ce_records_uri: str | None = None) -> SAECheckpoint:
    """Load the given checkpoint, or train the SAE-V recipe on the cached activations and save
    it (SAELens format) under <work>/sae/<hash of data, config and code>; reused when there.
    A device task: training and its spliced-CE check (which loads the model) run on the slot's
    device (a GPU worker on Dask). `device` is the model spec's setting as written ('auto' is
    resolved here, on the worker, where the GPU is). Returns the checkpoint's URI and sha256,
    which identify it downstream."""
    logger = get_run_logger()
    if sae.checkpoint:
        return stages.load_checkpoint(sae.checkpoint, d_in, options)
    uri = stages.sae_checkpoint_uri(work_uri, spec, shard_keys, sae, device)
    found = stages.finished_checkpoint(uri, options)
    if found:
        logger.info("reusing trained SAE %s", uri)
        return found

    with device_slot() as lane:
        where = placed(model, lane) if model is not None else None
        run_on = str(resolve_device(where.device if where is not None else device))

        def ce(trained) -> dict | None:
            if where is None or ce_records_uri is None:
                return None
            return stages.spliced_ce_on_records(trained, adapter_for(where), ce_records_uri, options,
                                                batch_size=where.batch_size, batch_tokens=where.batch_tokens)

        out = stages.train_checkpoint(sae, stages.activation_cache(work_uri, spec, options), shard_keys, d_in,
                                      run_on, uri, options, ce)
    metrics = out.metrics
    create_table_artifact(
        [{"part": part, **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics[part].items()}}
         for part in ("all", "image", "text")],
        key="sae-training-metrics", description=f"SAE {uri}: dead fraction {metrics['dead_fraction']:.3f}")
    logger.info("trained SAE %s: EV %.3f, L0 %.1f, dead %.3f, CE %s", uri, metrics["all"]["explained_variance"],
                metrics["all"]["l0"], metrics["dead_fraction"], metrics.get("next_token_ce"))
    return out


def _weights_outputs(p: dict) -> list[str]:
    return [stages.weights_uri(p["work_uri"], p["sae_sha"], p["spec"], p["shard_keys"], p["weights"],
                               p["model"].encode_key())]


@task(name="cross-modal-weights", cache_policy=cached(_weights_outputs), persist_result=True, **RETRY)
def cross_modal_weights(sae_uri: str, sae_sha: str, spec: CacheSpec, shard_keys: list[str], work_uri: str,
                        options: dict | None, weights: WeightsSpec, model: ModelSpec) -> Weights:
    """Weights w_k on a seeded `weight_samples` samples of the cached residuals; delta from their
    activation distribution. A device task: the SAE encodes on the slot's device."""
    uri = stages.weights_uri(work_uri, sae_sha, spec, shard_keys, weights, model.encode_key())
    with device_slot() as lane:
        sae = sae_for(sae_uri, sae_sha, placed(model, lane), options)
        return stages.compute_weights(sae, stages.activation_cache(work_uri, spec, options), shard_keys, weights,
                                      uri, options)


def _score_outputs(p: dict) -> list[str]:
    return [score_stages.scores_uri(p["work_uri"], p["sae_sha"], p["weights_uri"], p["delta"], p["methods"], p["score"],
                              p["record_key"])]


@task(name="score-records", cache_policy=cached(_score_outputs), persist_result=True, **RETRY)
def score_records(records_uri: str, record_key: str, model: ModelSpec, sae_uri: str, sae_sha: str, weights_uri: str,
                  delta: float, spec: CacheSpec, work_uri: str, options: dict | None, methods: list[str],
                  score: ScoreSpec, cached_key: str | None = None) -> str:
    """Scores of one record shard, written to <work>/scores/<hash>/<record key>.parquet. The
    per-sample statistics come from its cached residuals (`cached_key`: the activation shard of
    its rows in the residual sample) and, for the rows not cached, from a fused pass on the
    model's device (forward -> SAE encode -> statistics; no residual stored), kept under
    <work>/stats/ for the next weights or methods. Model-based methods read
    the shard's log-probs, written beside the activations by the log-probs task."""
    from saev_core.sae.scoring import SCORERS

    logger = get_run_logger()
    cache = stages.activation_cache(work_uri, spec, options)
    logp = score_stages.read_logp(cache, record_key, options) if any(SCORERS[m].needs_logp for m in methods) else None
    name = records_uri.rsplit("/", 1)[-1]
    progress, close = _progress("scoring", name,
                                read_record_shard(records_uri, options, columns=["sample_id"]).num_rows)
    with device_slot() as lane:
        where = placed(model, lane)
        sae = sae_for(sae_uri, sae_sha, where, options)
        stats, source = score_stages.record_shard_stats(cache, record_key, records_uri, sae, lambda: adapter_for(where),
                                                  score_stages.stats_uri(work_uri, spec, sae_sha, record_key,
                                                                   model.encode_key()),
                                                  model.batch_size, model.batch_tokens, options, progress,
                                                  cached_key)
        table = score_stages.score_table(stats, methods, score.context(load_weights(weights_uri, options), delta), logp)
    close()
    logger.info("scored %s: %d samples from %s", name, table.num_rows,
                {"cache": "cached residuals", "stored": "stored statistics", "fused": "a fused pass",
                 "cache+fused": "cached residuals and a fused pass for the rest"}[source])
    return stages.write_table(table, score_stages.scores_uri(work_uri, sae_sha, weights_uri, delta, methods, score,
                                                       record_key), options)


@task(name="cache-report-samples", **RETRY)
def cache_report_samples(record_uris: list[str], sample_ids: list[str], model: ModelSpec, spec: CacheSpec,
                         work_uri: str, options: dict | None) -> str:
    """Residuals of the samples the run's report explains that the residual sample left out, as
    one small activation shard, so the report never loads the model in the flow's process."""
    with device_slot() as lane:
        return stages.cache_samples(adapter_for(placed(model, lane)), record_uris, sample_ids,
                                    stages.activation_cache(work_uri, spec, options), model.batch_size,
                                    model.batch_tokens, options)


@task(name="log-probs", **RETRY)
def log_probs(records_uri: str, model: ModelSpec, spec: CacheSpec, work_uri: str, options: dict | None) -> dict:
    """Mean per-token log p(chosen) and log p(rejected) of one record shard (two full forwards),
    cached beside the shard's activations."""
    with device_slot() as lane:
        return score_stages.logprob_record_shard(adapter_for(placed(model, lane)), records_uri,
                                           stages.activation_cache(work_uri, spec, options), model.batch_size,
                                           options, model.batch_tokens)
