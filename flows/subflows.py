"""The sub-flows of a curation run: the stages a user reruns on their own, with typed parameters
(`build-activation-cache`, `train-sae`, `score`, `publish`), and the other model passes
(`log-prob-pass`, `report-samples`), so that they run on the same runner as the run. Mapped
stages run on the flow's task runner: threads by default, or an existing Dask cluster when
`dask_address` is set (tasks that run the model then ask Dask for resources={"GPU": 1}).
"""

from __future__ import annotations

import contextlib

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from flows.params import StorageSpec
from saev_core.data import publish, storage
from saev_core.interp.render import link_html
from saev_core.interp.report import render_report, report_examples
from saev_core.model.activation_cache import CacheSpec
from saev_core.pipeline.manifest import RunManifest
from saev_core.pipeline.loaded_models import hidden_size
from saev_core.pipeline.residual_sample import ResidualSample
from saev_core.pipeline.results import CacheBuild, IngestSummary, SAECheckpoint, Scored, Weights
from saev_core.pipeline.specs import ModelSpec, OutputSpec, SAESpec, ScoringSpec, ValidationSpec
from saev_core.pipeline.stages import training_keys
from tasks.common import ensure_gpu_limit
from tasks.explain_tasks import explain_run
from tasks.model_tasks import (cache_activations, cache_report_samples, cross_modal_weights, log_probs, score_records,
                               train_or_load_sae)
from tasks.publish_tasks import gate_scores, publish_run, write_manifest, write_report
from tasks.recurring_tasks import record_history


MAPPED_THREADS = 4  # threads of the mapped stages on the thread runner (one holds the device slot)


def threads() -> ThreadPoolTaskRunner:
    """The thread runner with a bounded pool. Prefect's default starts a thread per submitted
    task: with one task per shard that is every shard's task engine alive at once (measured:
    +0.9 GB at 79 shards, benchmarks/SCALE.md), although the device slot lets one run at a time.
    `PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS` overrides the default of 4, or one more than the
    visible GPUs (one task per GPU lane, tasks.common.device_slot) when that is more."""
    from prefect.settings import get_current_settings

    from tasks.common import visible_gpus

    return ThreadPoolTaskRunner(max_workers=get_current_settings().tasks.runner.thread_pool_max_workers
                                or max(MAPPED_THREADS, visible_gpus() + 1))


def task_runner(address: str | None):
    if not address:
        return None
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


@contextlib.contextmanager
def _device_resources(model: ModelSpec, dask: bool):
    """On Dask, tasks that run the model go only to workers that advertise a GPU (unless the model
    is pinned to the CPU); on threads the device slot of tasks.common does the same job."""
    if not (dask and model.uses_gpu()):
        yield
        return
    import dask as dask_mod

    with dask_mod.annotate(resources={"GPU": 1}):
        yield


def _from_cache(future_or_state) -> bool:
    """True when Prefect served the task from its cross-run cache instead of running it."""
    state = getattr(future_or_state, "state", future_or_state)
    return state.name == "Cached"


@flow(name="build-activation-cache", task_runner=threads())
def build_activation_cache(model: ModelSpec, spec: CacheSpec, record_uris: list[str], work_uri: str,
                           storage_spec: StorageSpec = StorageSpec(), dask: bool = False,
                           sample: ResidualSample = ResidualSample()) -> CacheBuild:
    """Activations of the residual sample (`sample`: the rows the SAE and the weights read, drawn
    across the whole dataset), one mapped task per record shard, one device slot each.
    `keys[i]` is the activation shard of record shard i (None when none of its rows are kept)."""
    ensure_gpu_limit()
    options = storage_spec.options()
    with _device_resources(model, dask):
        futures = [cache_activations.submit(u, model, spec, work_uri, options, sample) for u in record_uris]
    shards = [f.result() for f in futures]
    done = [s for s in shards if s["key"]]
    reused = [s["reused"] or _from_cache(f) for s, f in zip(shards, futures) if s["key"]]
    return CacheBuild(sample_keys=[s["key"] for s in shards], record_keys=[s["record_key"] for s in shards],
                      computed=reused.count(False), reused=reused.count(True),
                      samples=sum(s["samples"] for s in done), rows=sum(s["rows"] for s in shards))


@flow(name="log-prob-pass", task_runner=threads())
def log_probs_flow(model: ModelSpec, spec: CacheSpec, record_uris: list[str], work_uri: str,
                   storage_spec: StorageSpec = StorageSpec(), dask: bool = False) -> int:
    """Log-probs of chosen and rejected for every record shard (mapped, on the activations' runner:
    GPU workers on Dask), for the model-based methods."""
    ensure_gpu_limit()
    options = storage_spec.options()
    with _device_resources(model, dask):
        futures = [log_probs.submit(u, model, spec, work_uri, options) for u in record_uris]
    return len([f.result() for f in futures])


@flow(name="report-samples", task_runner=threads())
def report_samples_flow(model: ModelSpec, spec: CacheSpec, record_uris: list[str], sample_ids: list[str],
                        work_uri: str, storage_spec: StorageSpec = StorageSpec(), dask: bool = False) -> str:
    """Residuals of the report's samples that the residual sample left out, captured where the
    model runs (a GPU worker on Dask), so the report never loads the model in the flow's process."""
    ensure_gpu_limit()
    with _device_resources(model, dask):
        future = cache_report_samples.submit(record_uris, sample_ids, model, spec, work_uri, storage_spec.options())
    return future.result()


@flow(name="train-sae", task_runner=threads())
def train_sae_flow(sae: SAESpec, model: ModelSpec, spec: CacheSpec, shard_keys: list[str], shard_rows: int,
                   work_uri: str, storage_spec: StorageSpec = StorageSpec(), ce_records_uri: str | None = None,
                   dask: bool = False) -> SAECheckpoint:
    """Load the configured checkpoint or train the SAE on the cached activations: a device task
    on the run's runner (a GPU worker on Dask), never in the flow's process."""
    ensure_gpu_limit()
    keys = training_keys(sae, shard_keys, shard_rows)
    with _device_resources(model, dask):
        future = train_or_load_sae.submit(sae, spec, keys, work_uri, storage_spec.options(), hidden_size(model),
                                          model.device, model, ce_records_uri)
    out = future.result()
    return out.model_copy(update={"trained": out.trained and not _from_cache(future), "train_shards": keys})


@flow(name="score", task_runner=threads())
def score_flow(scoring: ScoringSpec, model: ModelSpec, spec: CacheSpec, cache_keys: list[str], record_uris: list[str],
               record_keys: list[str], sae_uri: str, sae_sha: str, work_uri: str,
               storage_spec: StorageSpec = StorageSpec(), dask: bool = False,
               sample_keys: list[str | None] | None = None, weights: Weights | None = None) -> Scored:
    """Cross-modal weights on a sample of the cached (real) residuals, then every record shard
    scored (mapped; its cached rows from the cache (`sample_keys[i]`: the activation shard of
    record shard i's residual sample, None when none), the others by a fused pass on the model's
    device), baselines as extra columns. Returns the scores' URIs in `record_uris` order.
    `weights`: fixed by a pinned curation model (nothing computed; issue 22)."""
    ensure_gpu_limit()
    options = storage_spec.options()
    methods = scoring.columns()
    with _device_resources(model, dask):
        w = weights or cross_modal_weights.submit(sae_uri, sae_sha, spec, cache_keys, work_uri, options,
                                                  scoring.weights, model).result()
        futures = [score_records.submit(u, k, model, sae_uri, sae_sha, w.uri, w.delta, spec, work_uri, options,
                                        methods, scoring.score, c)
                   for u, k, c in zip(record_uris, record_keys, sample_keys or [None] * len(record_uris))]
    return Scored(weights=w, score_uris=[f.result() for f in futures], methods=methods)


@flow(name="publish")
def publish_flow(run: str, scores_uri: str, record_uris: list[str], ingest_summary: IngestSummary, manifest: RunManifest,
                 output: OutputSpec, validation: ValidationSpec, method: str,
                 storage_spec: StorageSpec = StorageSpec(), groups: list | None = None, staged: bool = False) -> dict:
    """Gate, then write scores, quarantine, subsets, validation.json, report.html and, last,
    manifest.json into a staging folder, promoted to `run` only once complete. `staged`: the
    staging folder was begun by the caller (and may hold run files already, e.g. canaries)."""
    import pyarrow.parquet as pq

    options = storage_spec.options()
    final = run
    removed = publish.clean_incomplete(storage.parent(final), options)  # what killed publishes left behind
    if removed:
        get_run_logger().warning("removed %d incomplete run folder(s): %s", len(removed), removed)
    publish.clean_failed(storage.parent(final), options, output.keep_failed_days)  # old failed runs' evidence
    if staged:
        publish.ensure_unpublished(final, options)
        run = publish.staging_uri(final)
    else:
        run = publish.begin_run(final, options)
    with storage.open_input(scores_uri, options) as fh:
        scores = pq.read_table(fh)  # as published: the method's column is `score`
    s = ingest_summary
    gate = gate_scores(scores, s.kept, s.rows_in, s.quarantined, validation.max_quarantine_rate)
    keep = output.keep_percents
    out = publish_run(run, scores, record_uris, s.quarantine_uri, keep, s, validation.max_quarantine_rate, options,
                      groups)
    low, high = report_examples(scores, record_uris, options)
    recurring = record_history(run, final, scores, manifest.model_copy(update={"subsets": out["subsets"]}).to_json(),
                               output, options, record_uris)  # issue 22: decisions, changes, `kept`, dataset card
    out["subsets"] = recurring["update"].pop("subsets", out["subsets"])  # + `kept` when pinned
    interp = explain_run(run, manifest, record_uris, None, options)  # before the manifest, which lists files
    counts = {"rows in": s.rows_in, "kept after ingest": s.kept, "quarantined": s.quarantined,
              "cross-modal features": manifest.scoring.n_cross_modal,
              **{name: info["rows"] for name, info in out["subsets"].items()}}
    html = render_report(title=f"SAE-V curation: {final}", method=method,
                         scores=scores.column("score").to_pylist(),
                         threshold=out["subsets"][f"top-{keep[0]}"]["min_score"], counts=counts,
                         stages=manifest.stages, lowest=low, highest=high, detection=manifest.detection_auroc,
                         extra_html=(link_html(interp) if interp else "") + recurring["html"],
                         canaries=(manifest.canaries or {}).get("table"),
                         flags=(manifest.ranking_gate or {}).get("flags", ()))
    write_report(run, html, options)
    manifest = manifest.model_copy(update={
        "subsets": out["subsets"], "thresholds": {name: i["min_score"] for name, i in out["subsets"].items()},
        "validation": {**out["validation"], "scores_gate": gate["success"]}, "report": "report.html",
        "interp_report": interp, **recurring["update"]})
    write_manifest(run, manifest.to_json(), options)
    publish.promote(run, final, options)
    return {"run": final, "report": storage.join(final, "report.html"), "interp": interp, **out}
