"""Tasks that touch the model or the SAE: activation caching (GPU), SAE training/loading,
cross-modal weights, and per-shard scoring. Each wraps one saev_core step; results are small
(keys, URIs, counts) so they travel through Prefect and Dask, never tensors."""

from __future__ import annotations

import contextlib

from prefect import get_run_logger, task
from tqdm.auto import tqdm
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from saev_core.pipeline import stages
from saev_core.data import storage
from saev_core.model.activation_cache import ActivationCache, CacheSpec
from saev_core.sae.training import SAETrainConfig, load_sae, save_sae, train_sae
from saev_core.sae.weights import CrossModalWeights

from .common import adapter_for, cached, code_version, digest, gpu_slot, retry_unless_permanent

RETRY = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent)


def _cache(work_uri: str, spec: dict, options: dict | None) -> ActivationCache:
    return ActivationCache(storage.join(work_uri, "activations"), CacheSpec(**spec), options)


@task(name="cache-activations", **RETRY)
def cache_activations(records_uri: str, model: dict, spec: dict, work_uri: str, options: dict | None,
                      response: str = "none", use_gpu_slot: bool = True) -> dict:
    """Activations of one record shard at the hooked layer. No Prefect cache here: the
    activation cache is content-addressed, and a finished shard (done marker present) is reused
    after a check as cheap as a cache lookup, which can never point at a deleted shard."""
    logger = get_run_logger()
    cache = _cache(work_uri, spec, options)
    from saev_core.data.ingest import read_record_shard

    n = read_record_shard(records_uri, options, columns=["sample_id"]).num_rows
    done = {"n": 0}
    artifact = create_progress_artifact(0.0, description=f"activations of {records_uri.rsplit('/', 1)[-1]}")

    bar = tqdm(total=n, desc=f"activations {records_uri.rsplit('/', 1)[-1]}", unit="sample", leave=False)

    def progress(k: int) -> None:
        done["n"] += k
        bar.update(k)
        update_progress_artifact(artifact, 100.0 * done["n"] / max(n, 1))

    with gpu_slot() if use_gpu_slot else contextlib.nullcontext():
        adapter = adapter_for(model["model_id"], model["layer"], model["device"], model["dtype"],
                              model["revision"], model["trust_remote_code"])
        out = stages.cache_record_shard(adapter, records_uri, cache, batch_size=model["batch_size"],
                                        response=response, storage_options=options, progress=progress)
    bar.close()
    update_progress_artifact(artifact, 100.0)
    logger.info("shard %s: %s samples%s", out["key"], out["samples"], " (reused)" if out["reused"] else "")
    return out


def _train_config(sae_params: dict, device: str) -> SAETrainConfig:
    return SAETrainConfig(architecture=sae_params["architecture"], expansion_factor=sae_params["expansion_factor"],
                          l1_coefficient=sae_params["l1_coefficient"], k=sae_params["k"], lr=sae_params["lr"],
                          steps=sae_params["steps"], batch_size=sae_params["batch_size"], seed=sae_params["seed"],
                          device=device)


def sae_uri_for(p: dict) -> str:
    """Where an SAE trained from these parameters lives: a hash of data, config and code."""
    cfg = _train_config(p["sae_params"], p["device"]).to_dict()
    spec_key = CacheSpec(**p["spec"]).key()
    return storage.join(p["work_uri"], "sae", digest([spec_key, list(p["shard_keys"]), cfg, code_version()]))


def _sae_outputs(p: dict) -> list[str]:
    return [] if p["sae_params"].get("checkpoint") else [storage.join(sae_uri_for(p), "cfg.json")]


def sae_sha256(uri: str, options: dict | None) -> str:
    import hashlib

    return hashlib.sha256(storage.read_bytes(storage.join(uri, "sae_weights.safetensors"), options)).hexdigest()


@task(name="train-or-load-sae", cache_policy=cached(_sae_outputs), persist_result=True)
def train_or_load_sae(sae_params: dict, spec: dict, shard_keys: list[str], work_uri: str, options: dict | None,
                      d_in: int, device: str, model: dict | None = None, ce_records_uri: str | None = None) -> dict:
    """Load the given checkpoint, or train the SAE-V recipe on the cached activations and save
    it (SAELens format) under <work>/sae/<hash of data, config and code>; reused when there.
    Returns the checkpoint's URI and sha256, which identify it downstream."""
    logger = get_run_logger()
    if sae_params.get("checkpoint"):
        sae = load_sae(sae_params["checkpoint"], expected_d_in=d_in, storage_options=options)
        logger.info("loaded SAE %s (d_sae=%d)", sae_params["checkpoint"], sae.cfg.d_sae)
        return {"uri": sae_params["checkpoint"], "sha256": sae_sha256(sae_params["checkpoint"], options),
                "trained": False, "metrics": None}
    cfg = _train_config(sae_params, device)
    cache = _cache(work_uri, spec, options)
    uri = sae_uri_for({"sae_params": sae_params, "device": device, "spec": spec, "shard_keys": shard_keys,
                       "work_uri": work_uri})
    if storage.exists(storage.join(uri, "cfg.json"), options):
        logger.info("reusing trained SAE %s", uri)
        return {"uri": uri, "sha256": sae_sha256(uri, options), "trained": False,
                "metrics": _read_metrics(uri, options)}
    # on a GPU, training holds the slot like any other GPU work
    with gpu_slot() if device.startswith("cuda") else contextlib.nullcontext():
        sae = train_sae(stages.training_source(cache, shard_keys), d_in, cfg)
    metrics = sae_metrics(sae, cache, shard_keys[:2])
    if model is not None and ce_records_uri is not None:
        metrics["next_token_ce"] = spliced_ce_on_records(sae, model, ce_records_uri, options)
    storage.write_json(storage.join(uri, "metrics.json"), metrics, options)
    save_sae(sae, uri, options)  # cfg.json last: its presence means the checkpoint is complete
    create_table_artifact(
        [{"part": part, **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics[part].items()}}
         for part in ("all", "image", "text")],
        key="sae-training-metrics", description=f"SAE {uri}: dead fraction {metrics['dead_fraction']:.3f}")
    logger.info("trained SAE %s: EV %.3f, L0 %.1f, dead %.3f, CE %s", uri, metrics["all"]["explained_variance"],
                metrics["all"]["l0"], metrics["dead_fraction"], metrics.get("next_token_ce"))
    return {"uri": uri, "sha256": sae_sha256(uri, options), "trained": True, "metrics": metrics}


def sae_metrics(sae, cache: ActivationCache, keys: list[str]) -> dict:
    from saev_core.sae.metrics import ReconstructionStats

    stats = ReconstructionStats(sae.cfg.d_sae)
    for key in keys:
        for _, acts, is_image in cache.read_shard(key).samples():  # one sample at a time: bounded memory
            stats.add(sae, acts, is_image)
    return stats.report()


def spliced_ce_on_records(sae, model: dict, records_uri: str, options: dict | None, n: int = 16) -> dict:
    """Next-token CE on text targets: clean vs SAE spliced in vs zero-ablation at the hook."""
    from saev_core.data.ingest import read_record_shard
    from saev_core.sae.metrics import spliced_ce

    rows = read_record_shard(records_uri, options, columns=["prompt", "image", "chosen"]).slice(0, n).to_pylist()
    adapter = adapter_for(model["model_id"], model["layer"], model["device"], model["dtype"], model["revision"],
                          model["trust_remote_code"])
    with gpu_slot():
        return spliced_ce(adapter, sae, [stages._image(r["image"]) for r in rows], [r["prompt"] for r in rows],
                          [r["chosen"] for r in rows])


def _read_metrics(uri: str, options: dict | None) -> dict | None:
    path = storage.join(uri, "metrics.json")
    return storage.read_json(path, options) if storage.exists(path, options) else None


def weights_uri_for(p: dict) -> str:
    spec_key = CacheSpec(**p["spec"]).key()
    return storage.join(p["work_uri"], "weights",
                        digest([p["sae_sha"], spec_key, list(p["shard_keys"]), p["scoring"], code_version()])
                        + ".safetensors")


@task(name="cross-modal-weights", cache_policy=cached(lambda p: [weights_uri_for(p)]), persist_result=True)
def cross_modal_weights(sae_uri: str, sae_sha: str, spec: dict, shard_keys: list[str], work_uri: str,
                        options: dict | None, scoring: dict) -> dict:
    """Weights w_k on the first `weight_samples` samples; delta from the activation distribution."""
    logger = get_run_logger()
    sae = load_sae(sae_uri, storage_options=options)
    cache = _cache(work_uri, spec, options)
    weights, builder = stages.build_weights(cache, shard_keys, sae, scoring["pool_size"], scoring["k"],
                                            scoring["weight_samples"])
    q = scoring.get("delta_quantile")
    delta = builder.activation_quantile(q) if q is not None else float(scoring["delta"])
    uri = weights_uri_for({"sae_sha": sae_sha, "spec": spec, "shard_keys": shard_keys, "scoring": scoring,
                           "work_uri": work_uri})
    from safetensors.torch import save

    storage.write_bytes(uri, save({k: v.contiguous() for k, v in weights.to_tensors().items()}), options)
    logger.info("%d cross-modal features of %d; delta = %.4f", weights.n_cross_modal, sae.cfg.d_sae, delta)
    return {"uri": uri, "n_cross_modal": weights.n_cross_modal, "d_sae": int(sae.cfg.d_sae), "delta": delta,
            "tokens": builder.n_tokens}


def load_weights(uri: str, options: dict | None) -> CrossModalWeights:
    from safetensors.torch import load

    return CrossModalWeights.from_tensors(load(storage.read_bytes(uri, options)))


def score_uri_for(p: dict) -> str:
    return storage.join(p["work_uri"], "scores",
                        digest([p["sae_sha"], p["weights_uri"], p["delta"], p["methods"], p["top_k"], p["seed"],
                                code_version()]),
                        f"{p['shard_key']}.parquet")


@task(name="score-shard", cache_policy=cached(lambda p: [score_uri_for(p)]), persist_result=True, **RETRY)
def score_shard(shard_key: str, sae_uri: str, sae_sha: str, weights_uri: str, delta: float, spec: dict,
                work_uri: str, options: dict | None, methods: list[str], top_k: int, seed: int) -> str:
    """Scores of one cached shard, written to <work>/scores/<hash>/<shard>.parquet."""
    cache = _cache(work_uri, spec, options)
    sae = load_sae(sae_uri, storage_options=options)
    table = stages.score_shard(cache, shard_key, sae, load_weights(weights_uri, options), delta, methods,
                               top_k, seed)
    out = score_uri_for({"sae_sha": sae_sha, "weights_uri": weights_uri, "delta": delta, "methods": methods,
                         "top_k": top_k, "seed": seed, "shard_key": shard_key, "work_uri": work_uri})
    return stages.write_table(table, out, options)
