"""The `curate` flow: preference dataset in; scored, validated, DPO-ready subsets out.

    ingest -> activations -> SAE (train or load) -> cross-modal weights -> scores -> [evaluate] -> publish

Residuals are cached only for the sample the SAE and the weights read (`ResidualSample`, drawn
across the whole dataset); every record shard is then scored from its cached residuals when all
of them are cached, else by a fused pass (forward -> SAE encode -> per-sample statistics on the
model's device), so a run at scale stores statistics, not residuals.

A list of stages, each handed only its own spec and timed into one `RunStats`. The stages a
user reruns on their own are sub-flows with typed parameters (`build-activation-cache`,
`train-sae`, `score`, `publish`); the other model passes (`log-prob-pass`, `report-samples`) are
sub-flows too, so they run on the same runner. Mapped stages run on the flow's task runner: threads by
default, or an existing Dask cluster when `dask_address` is set (tasks that run the model then
ask Dask for resources={"GPU": 1}). Datasets whose labels are known (the toy world) get an
evaluation stage; nothing else in the flow knows about them.
"""

from __future__ import annotations

import contextlib
import dataclasses

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.checks import preflight_params
from flows.params import CurateParams, StorageSpec
from saev_core.data import publish, storage
from saev_core.data.ingest import NoUsableRows
from saev_core.interp.explain import lowest_scored
from saev_core.interp.render import link_html
from saev_core.interp.report import render_report, report_examples
from saev_core.model.activation_cache import CacheSpec
from saev_core.pipeline.manifest import RunManifest, run_manifest
from saev_core.pipeline.models import hidden_size, model_fingerprint
from saev_core.pipeline.plan import RunPlan
from saev_core.pipeline.publishing import published_scores
from saev_core.pipeline.residual_sample import ResidualSample
from saev_core.pipeline.results import CacheBuild, IngestSummary, SAECheckpoint, Scored, Weights
from saev_core.pipeline.run_stats import RunStats
from saev_core.pipeline.specs import ModelSpec, OutputSpec, SAESpec, ScoringSpec, ValidationSpec
from saev_core.pipeline.stages import record_key, stratify_groups, training_keys, write_table
from saev_core.sae.evaluation import detection_from_truth
from saev_core.sae.scoring import SCORERS
from tasks.canary_tasks import gate_ranking, image_swap_pairs, make_canaries, measure_canaries
from tasks.common import ensure_gpu_limit
from tasks.explain_tasks import explain_run
from tasks.ingest import ingest, resolve_source
from tasks.model_tasks import (cache_activations, cache_report_samples, cross_modal_weights, log_probs, score_records,
                               train_or_load_sae)
from tasks.publish_tasks import assemble_scores, gate_scores, publish_run, write_manifest, write_report
from tasks.recurring_tasks import record_history


MAPPED_THREADS = 4  # threads of the mapped stages on the thread runner (one holds the device slot)


def _threads() -> ThreadPoolTaskRunner:
    """The thread runner with a bounded pool. Prefect's default starts a thread per submitted
    task: with one task per shard that is every shard's task engine alive at once (measured:
    +0.9 GB at 79 shards, benchmarks/SCALE.md), although the device slot lets one run at a time.
    `PREFECT_TASKS_RUNNER_THREAD_POOL_MAX_WORKERS` overrides the default of 4, or one more than the
    visible GPUs (one task per GPU lane, tasks.common.device_slot) when that is more."""
    from prefect.settings import get_current_settings

    from tasks.common import visible_gpus

    return ThreadPoolTaskRunner(max_workers=get_current_settings().tasks.runner.thread_pool_max_workers
                                or max(MAPPED_THREADS, visible_gpus() + 1))


def _task_runner(address: str | None):
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


def _in(sub_flow, runner):
    return sub_flow.with_options(task_runner=runner) if runner else sub_flow


@flow(name="build-activation-cache", task_runner=_threads())
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


@flow(name="log-prob-pass", task_runner=_threads())
def log_probs_flow(model: ModelSpec, spec: CacheSpec, record_uris: list[str], work_uri: str,
                   storage_spec: StorageSpec = StorageSpec(), dask: bool = False) -> int:
    """Log-probs of chosen and rejected for every record shard (mapped, on the activations' runner:
    GPU workers on Dask), for the model-based methods."""
    ensure_gpu_limit()
    options = storage_spec.options()
    with _device_resources(model, dask):
        futures = [log_probs.submit(u, model, spec, work_uri, options) for u in record_uris]
    return len([f.result() for f in futures])


@flow(name="report-samples", task_runner=_threads())
def report_samples_flow(model: ModelSpec, spec: CacheSpec, record_uris: list[str], sample_ids: list[str],
                        work_uri: str, storage_spec: StorageSpec = StorageSpec(), dask: bool = False) -> str:
    """Residuals of the report's samples that the residual sample left out, captured where the
    model runs (a GPU worker on Dask), so the report never loads the model in the flow's process."""
    ensure_gpu_limit()
    with _device_resources(model, dask):
        future = cache_report_samples.submit(record_uris, sample_ids, model, spec, work_uri, storage_spec.options())
    return future.result()


@flow(name="train-sae", task_runner=_threads())
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


@flow(name="score", task_runner=_threads())
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
        scores = published_scores(pq.read_table(fh), method)
    s = ingest_summary
    gate = gate_scores(scores, s.kept, s.rows_in, s.quarantined, validation.max_quarantine_rate)
    keep = output.keep_percents
    out = publish_run(run, scores, record_uris, s.quarantine_uri, keep, s, validation.max_quarantine_rate, options,
                      groups)
    low, high = report_examples(scores, record_uris, options)
    recurring = record_history(run, final, scores, manifest.model_copy(update={"subsets": out["subsets"]}).to_json(),
                               output, options)  # issue 22: decisions, changes vs the parent, dataset card
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


@dataclasses.dataclass
class _RunTrace:
    """What a failing run had got to: the failure path keeps it as evidence."""

    plan: RunPlan | None = None
    stats: RunStats | None = None
    summary: IngestSummary | None = None
    scores: object = None  # pa.Table once assembled, as it would be published
    stage: str | None = None  # a step outside the timed stages (the ranking gate)


def ingest_stage(params: CurateParams, plan: RunPlan, options: dict | None, stats: RunStats, trace):
    """The ingest stage of a run (shared by `curate` and the pinned recurring run): record shards
    and quarantine; a dataset with no usable row, or a run id already published, is refused here."""
    with stats.timed_stage("ingest") as st:
        source = resolve_source(params.dataset, plan.work)
        summary = ingest(params.dataset, source.uri, plan.work, options if storage.is_remote(source.uri) else None,
                         options)
        record_uris = summary.record_uris
        trace.summary = summary
        st.detail = summary.describe()
    if not record_uris:
        raise NoUsableRows(params.dataset.uri, summary.model_dump())
    publish.ensure_unpublished(plan.run, options)
    return source, summary, record_uris


@flow(name="curate", log_prints=True, task_runner=_threads())
def curate(params: CurateParams = CurateParams()) -> dict:
    """Score a preference dataset with SAE-V and publish the top-p% subsets. A run that fails keeps
    its evidence in <dataset>/_failed/<run_id>/ and ends Failed with the refusal's paragraph."""
    trace = _RunTrace()
    try:
        return _curate(params, trace)
    except Exception as exc:
        _keep_evidence(exc, params, trace)
        raise


def _curate(params: CurateParams, trace: _RunTrace) -> dict:
    stats = trace.stats = RunStats(get_run_logger())
    options = params.storage.options()
    plan = trace.plan = RunPlan.create(params.dataset, params.output, params.model_dump(mode="json"))
    runner = _task_runner(params.dask_address)
    dask = runner is not None
    if params.scoring.curation_model:  # issue 22: a pinned curation model scores only the new rows
        from flows.recurring import curate_pinned

        return curate_pinned(params, plan, stats, runner, trace)

    with stats.timed_stage("preflight") as st:  # permanent problems fail here, before any work
        st.detail = str(preflight_params(params, plan.run)["dataset"]["format"])

    source, summary, record_uris = ingest_stage(params, plan, options, stats, trace)

    canaries, canary_uris = None, []
    if params.scoring.canaries.enabled:
        with stats.timed_stage("canaries") as st:
            canaries = make_canaries(record_uris, plan.work, params.scoring.canaries, params.dataset.shard_rows,
                                     options, summary.fingerprint)
            canary_uris = canaries.record_uris
            st.detail = f"{canaries.n} canaries {canaries.by_kind}"

    spec = CacheSpec.for_model(params.model, fingerprint=model_fingerprint(params.model.model_id,
                                                                           params.model.revision))
    residuals = ResidualSample.plan(params.sae, params.scoring.weights, summary.kept)
    with stats.timed_stage("activations") as st:  # canaries: scored, never cached (no SAE, no weights)
        cache = _in(build_activation_cache, runner)(params.model, spec, record_uris, plan.work, params.storage, dask,
                                                    residuals)
        cache_keys = cache.cached_keys
        if not cache_keys:
            raise RuntimeError(f"no residuals cached from {len(record_uris)} record shards ({residuals.describe()})")
        st.detail = (f"{cache.samples} of {cache.rows} samples in {len(cache_keys)} shards "
                     f"({cache.computed} computed, {cache.reused} reused)")
        if residuals.needed and cache.samples < residuals.needed:
            get_run_logger().warning("the residual sample holds %d samples, fewer than the %d the SAE and the weights "
                                     "ask for: they use what there is", cache.samples, residuals.needed)
    every_uri = record_uris + canary_uris
    every_key = cache.record_keys + [record_key(u, options) for u in canary_uris]
    if any(SCORERS[m].needs_logp for m in params.scoring.columns()):
        with stats.timed_stage("log-probs") as st:
            n = _in(log_probs_flow, runner)(params.model, spec, every_uri, plan.work, params.storage, dask)
            st.detail = f"{n} shards, chosen and rejected"

    with stats.timed_stage("sae") as st:
        sae = _in(train_sae_flow, runner)(params.sae, params.model, spec, cache_keys, params.dataset.shard_rows,
                                          plan.work, params.storage, record_uris[0], dask)
        st.detail = ("trained " if sae.trained else "loaded ") + sae.uri

    with stats.timed_stage("scores") as st:
        scored = _in(score_flow, runner)(params.scoring, params.model, spec, cache_keys, every_uri, every_key,
                                         sae.uri, sae.sha256, plan.work, params.storage, dask,
                                         cache.sample_keys + [None] * len(canary_uris))
        real_scores, canary_score_uris = scored.score_uris[:len(record_uris)], scored.score_uris[len(record_uris):]
        scores = assemble_scores(real_scores, record_uris, params.scoring.method, options)
        trace.scores = published_scores(scores, params.scoring.method)
        w = scored.weights
        st.detail = f"{scores.num_rows} samples, {w.n_cross_modal} cross-modal features, delta {w.delta:.4g}"

    detection = None
    if source.truth_uri:  # the evaluation stage: labels known by construction
        detection = detection_from_truth(source.truth_uri, scores, scored.methods)

    canary_rows, pairs = None, None
    staging = publish.begin_run(plan.run, options)  # run files are written here, promoted when complete
    if canaries and canaries.n:
        with stats.timed_stage("canary-table") as st:
            canary_scores = assemble_scores(canary_score_uris, canary_uris, params.scoring.method, options)
            canary_rows = measure_canaries(storage.join(staging, "canaries.parquet"), scores, canary_scores,
                                           canaries.table_uri, scored.methods, params.output.keep_percents, options)
            pairs = image_swap_pairs(canaries.table_uri, scores, canary_scores, params.scoring.method, options)
            st.detail = f"{canaries.n} canaries x {len(scored.methods)} methods"
    groups = None
    if params.output.stratify_by:
        groups = stratify_groups(record_uris, scores.column("sample_id").to_pylist(), params.output.stratify_by,
                                 params.output.stratify_clusters, params.scoring.score.seed, options)
    trace.stage = "ranking-gate"
    gate = gate_ranking(scores, params.scoring.method, params.output.keep_percents, params.validation,
                        w.n_cross_modal, pairs, groups, canary_rows=canary_rows,
                        settings=_gate_settings(params, scored.methods, w))
    trace.stage = None

    with stats.timed_stage("publish") as st:
        ids = scores.column("sample_id").to_pylist()
        outside = [s for s in lowest_scored(ids, scores.column(params.scoring.method).to_pylist())
                   if not residuals.keeps(s)]
        report_shards = None
        if outside:  # the report explains them: their residuals, captured on the device
            report_shards = [_in(report_samples_flow, runner)(params.model, spec, record_uris, outside, plan.work,
                                                              params.storage, dask)]
        scores_uri = write_table(scores, storage.join(plan.work, "scores", plan.run_id, "scores.parquet"), options)
        manifest = run_manifest(plan.run_id, params.model_dump(mode="json"), params.dataset.uri, summary,
                                params.model, spec, sae, params.scoring, w, scores.num_rows, detection, stats.stages,
                                plan.work, record_uris)
        manifest = manifest.model_copy(update={
            "cache_shards": cache.sample_keys, "residual_sample": dataclasses.asdict(residuals),
            "report_shards": report_shards,
            "canaries": None if canaries is None else {
                "n": canaries.n, "by_kind": canaries.by_kind, "canary_shards": every_key[len(record_uris):],
                "file": "canaries.parquet" if canary_rows else None, "table": canary_rows},
            "ranking_gate": gate})
        published = publish_flow(plan.run, scores_uri, record_uris, summary, manifest, params.output,
                                 params.validation, params.scoring.method, params.storage, groups, staged=True)
        st.detail = plan.run

    _summary_artifacts(stats, plan, summary, scores.num_rows, w, published, detection, canary_rows, gate["flags"])
    return {"run": plan.run, "run_id": plan.run_id, "counts": manifest.counts, "detection": detection,
            "stages": stats.stages, "seconds": stats.seconds, "sae": sae.uri, "weights": w.model_dump(),
            "subsets": published["subsets"], "canaries": canary_rows, "flags": gate["flags"]}


def _gate_settings(params: CurateParams, methods: list[str], w: Weights) -> dict:
    """The settings a ranking-gate refusal names as what would change its outcome."""
    return {"methods": list(methods), "pool": params.scoring.weights.pool,
            "weight_samples": params.scoring.weights.weight_samples,
            "expansion_factor": params.sae.expansion_factor, "sae_checkpoint": params.sae.checkpoint,
            "d_sae": w.d_sae}


def _jsonable(obj):
    """JSON without NaN/inf (FAILED.json is read by any JSON reader)."""
    import math

    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def _keep_evidence(exc: BaseException, params: CurateParams, trace: _RunTrace) -> None:
    """Write <dataset>/_failed/<run_id>/: what the run staged, its quarantine and scores when they
    exist, FAILED.json (stage, reason, parameters). The exception gets `kept_at` (a refusal's
    paragraph then names the folder, and so does the flow run's state message). A failure here
    is logged, never raised over the run's own error."""
    from prefect.context import get_run_context

    from saev_core.refusal import Refusal

    plan, logger = trace.plan, get_run_logger()
    if plan is None or isinstance(exc, publish.RunAlreadyPublished) or getattr(exc, "where", None) == "output.run_id":
        return  # nothing of this run to keep (and the run id's folders belong to another run)
    options = params.storage.options()
    stage = getattr(exc, "stage", None) or trace.stage or (trace.stats.current if trace.stats else None)
    refusal = isinstance(exc, Refusal)
    try:
        flow_run = get_run_context().flow_run
        record = {"stage": stage, "error": type(exc).__name__,
                  "reason": exc.paragraph() if refusal else " ".join(str(exc).split()),
                  "where": getattr(exc, "where", None), "fix": getattr(exc, "fix", None),
                  "evidence": getattr(exc, "evidence", None), "permanent": _permanent(exc),
                  "flow_run_id": str(flow_run.id) if flow_run else None,
                  "stages": trace.stats.stages if trace.stats else [],
                  "parameters": params.model_dump(mode="json")}
        summary = trace.summary
        if summary:
            record["counts"] = summary.counts()
        kept = publish.keep_failed(plan.run, _jsonable(record), options,
                                   files={publish.QUARANTINE_FILE: summary.quarantine_uri if summary else None},
                                   tables={publish.SCORES_FILE: trace.scores})
        publish.clean_failed(storage.parent(plan.run), options, params.output.keep_failed_days)
    except Exception as err:  # noqa: BLE001 - the run's own error is what the user must see
        logger.warning("could not keep the failed run's evidence (%s: %s)", type(err).__name__, err)
        return
    try:
        exc.kept_at = kept
        if refusal:
            exc.args = (exc.paragraph(),)
    except AttributeError:  # an exception type that takes no attributes
        pass
    logger.info("run failed at stage %s; evidence kept in %s", stage, kept)


def _permanent(exc: BaseException) -> bool:
    from saev_core.pipeline.preflight import is_permanent

    return is_permanent(exc)


def _summary_artifacts(stats: RunStats, plan: RunPlan, summary: IngestSummary, scored: int, w: Weights, published: dict,
                       detection: dict | None, canary_rows: list[dict] | None = None, flags: list[str] = ()) -> None:
    create_table_artifact(stats.stages, key="curate-stages", description="per-stage timings and counts")
    lines = [f"# Curation run `{plan.run_id}`", "", f"- run folder: `{plan.run}` (report: `{published['report']}`)",
             f"- rows in {summary.rows_in}, quarantined {summary.quarantined}, scored {scored}",
             f"- {w.n_cross_modal} cross-modal features of {w.d_sae}; delta {w.delta:.4g}"]
    if published.get("interp"):
        lines.append(f"- interpretability report: `{storage.join(plan.run, published['interp'])}`")
    lines += [f"- {name}: {info['rows']} samples (score >= {info['min_score']:.4g})"
              for name, info in published["subsets"].items()]
    if canary_rows:
        kinds = sorted({r["kind"] for r in canary_rows})
        lines += ["", "Canaries, paired win rate P(canary < its source) (0.5 = chance):", "",
                  "| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        table = {(r["method"], r["kind"]): r["paired_win_rate"] for r in canary_rows}
        for m in dict.fromkeys(r["method"] for r in canary_rows):
            lines.append(f"| {m} | " + " | ".join(f"{table[(m, k)]:.3f}" for k in kinds) + " |")
    lines += [f"- WARNING: {f}" for f in flags]
    if detection:
        lines += ["", "| method | overall AUROC |", "|---|---|"]
        lines += [f"| {m} | {v['overall']:.3f} |" for m, v in detection.items()]
    create_markdown_artifact("\n".join(lines), key="curate-summary", description="curation run summary")
