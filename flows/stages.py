"""The stages of a curation run as the `curate` flow calls them, in ARCHITECTURE.md's order:
each is handed the `Run` (parameters, plan, timer, trace, runner), times itself into the run's
`RunStats`, and returns a typed result (saev_core.pipeline.results). The pinned recurring run
(flows/recurring.py) shares them.
"""

from __future__ import annotations

import dataclasses

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.checks import preflight_params
from flows.params import CurateParams
from flows.subflows import (build_activation_cache, log_probs_flow, publish_flow, report_samples_flow, score_flow,
                            task_runner, train_sae_flow)
from saev_core.data import publish, storage
from saev_core.data.ingest import NoUsableRows
from saev_core.model.activation_cache import CacheSpec
from saev_core.pipeline.manifest import RunManifest
from saev_core.pipeline.loaded_models import model_fingerprint
from saev_core.pipeline.plan import RunPlan
from saev_core.pipeline.publish_stage import published_scores
from saev_core.pipeline.residual_sample import ResidualSample
from saev_core.pipeline.results import CacheBuild, Canaries, IngestSummary, SAECheckpoint, Weights
from saev_core.pipeline.run_tables import (CANARY_CAPTION, DETECTION_CAPTION, canary_lines, detection_lines,
                                           subset_line)
from saev_core.pipeline.run_stats import RunStats
from saev_core.pipeline.specs import ModelSpec
from saev_core.pipeline.stages import write_table
from saev_core.pipeline.score_stages import stratify_groups
from saev_core.sae.scoring import SCORERS
from tasks.canary_tasks import gate_ranking, image_swap_pairs, make_canaries, measure_canaries
from tasks.ingest import ingest, resolve_source
from tasks.publish_tasks import assemble_scores


@dataclasses.dataclass
class RunTrace:
    """What a failing run had got to: the failure path keeps it as evidence."""

    plan: RunPlan | None = None
    stats: RunStats | None = None
    summary: IngestSummary | None = None
    scores: object = None  # pa.Table once assembled, as it would be published
    stage: str | None = None  # a step outside the timed stages (the ranking gate)


@dataclasses.dataclass
class Run:
    """What every stage of one run reads: its parameters, plan, timer, trace, storage options and
    the runner its sub-flows go to (None: this process's threads)."""

    params: CurateParams
    plan: RunPlan
    stats: RunStats
    trace: RunTrace
    options: dict
    runner: object = None

    @property
    def dask(self) -> bool:
        return self.runner is not None

    def sub(self, sub_flow):
        return on_runner(sub_flow, self.runner)


def on_runner(sub_flow, runner):
    """A sub-flow on the run's runner (None: as it is, on this process's threads)."""
    return sub_flow.with_options(task_runner=runner) if runner else sub_flow


def start_run(params: CurateParams, trace: RunTrace) -> Run:
    trace.stats = RunStats(get_run_logger())
    trace.plan = RunPlan.create(params.dataset, params.output, params.model_dump(mode="json"))
    return Run(params, trace.plan, trace.stats, trace, params.storage.options(), task_runner(params.dask_address))


def preflight_stage(run: Run) -> None:
    """Permanent problems of the configuration and the inputs fail here, before any work."""
    with run.stats.timed_stage("preflight") as st:
        st.detail = str(preflight_params(run.params, run.plan.run)["dataset"]["format"])


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


def canary_stage(run: Run, record_uris: list[str], ingest_key: str) -> Canaries | None:
    """Known-bad copies of the run's records (None when canaries are off)."""
    spec = run.params.scoring.canaries
    if not spec.enabled:
        return None
    with run.stats.timed_stage("canaries") as st:
        canaries = make_canaries(record_uris, run.plan.work, spec, run.params.dataset.shard_rows, run.options,
                                 ingest_key)
        st.detail = f"{canaries.n} canaries {canaries.by_kind}"
    return canaries


def cache_spec(model: ModelSpec) -> CacheSpec:
    return CacheSpec.for_model(model, fingerprint=model_fingerprint(model.model_id, model.revision))


def activations_stage(run: Run, spec: CacheSpec, record_uris: list[str], residuals: ResidualSample) -> CacheBuild:
    """Residuals of the residual sample only (canaries are scored, never cached)."""
    with run.stats.timed_stage("activations") as st:
        cache = run.sub(build_activation_cache)(run.params.model, spec, record_uris, run.plan.work,
                                                run.params.storage, run.dask, residuals)
        if not cache.cached_keys:
            raise RuntimeError(f"no residuals cached from {len(record_uris)} record shards ({residuals.describe()})")
        st.detail = (f"{cache.samples} of {cache.rows} samples in {len(cache.cached_keys)} shards "
                     f"({cache.computed} computed, {cache.reused} reused)")
        if residuals.needed and cache.samples < residuals.needed:
            get_run_logger().warning("the residual sample holds %d samples, fewer than the %d the SAE and the weights "
                                     "ask for: they use what there is", cache.samples, residuals.needed)
    return cache


def logprob_stage(run: Run, spec: CacheSpec, uris: list[str]) -> None:
    """Log-probs of chosen and rejected, for the model-based methods (none asked: nothing runs)."""
    if any(SCORERS[m].needs_logp for m in run.params.scoring.columns()):
        with run.stats.timed_stage("log-probs") as st:
            n = run.sub(log_probs_flow)(run.params.model, spec, uris, run.plan.work, run.params.storage, run.dask)
            st.detail = f"{n} shards, chosen and rejected"


def sae_stage(run: Run, spec: CacheSpec, cache: CacheBuild, ce_records_uri: str) -> SAECheckpoint:
    with run.stats.timed_stage("sae") as st:
        sae = run.sub(train_sae_flow)(run.params.sae, run.params.model, spec, cache.cached_keys,
                                      run.params.dataset.shard_rows, run.plan.work, run.params.storage, ce_records_uri,
                                      run.dask)
        st.detail = ("trained " if sae.trained else "loaded ") + sae.uri
    return sae


def canary_table_stage(run: Run, table_uri: str | None, scores, canary_scores, methods: list[str]):
    """Begin the run's staging folder and, with canaries, write canaries.parquet there and measure
    every method on them. Returns (canary table rows, image_swap pairs), both None without canaries."""
    staging = publish.begin_run(run.plan.run, run.options)  # run files are written here, promoted when complete
    if table_uri is None or canary_scores is None or not canary_scores.num_rows:
        return None, None
    method, keep = run.params.scoring.method, run.params.output.keep_percents
    with run.stats.timed_stage("canary-table") as st:
        rows = measure_canaries(storage.join(staging, "canaries.parquet"), scores, canary_scores, table_uri, methods,
                                keep, run.options)
        pairs = image_swap_pairs(table_uri, scores, canary_scores, method, run.options)
        st.detail = f"{canary_scores.num_rows} canaries x {len(methods)} methods"
    return rows, pairs


def ranking_gate_stage(run: Run, scores, record_uris: list[str], w: Weights, methods: list[str], pairs,
                       canary_rows) -> tuple[dict, list | None]:
    """Fails before publish when the scores cannot rank this data. Returns (gate, groups)."""
    params, groups = run.params, None
    if params.output.stratify_by:
        groups = stratify_groups(record_uris, scores.column("sample_id").to_pylist(), params.output.stratify_by,
                                 params.output.stratify_clusters, params.scoring.score.seed, run.options)
    run.trace.stage = "ranking-gate"
    gate = gate_ranking(scores, params.scoring.method, params.output.keep_percents, params.validation,
                        w.n_cross_modal, pairs, groups, canary_rows=canary_rows,
                        settings=gate_settings(params, methods, w))
    run.trace.stage = None
    return gate, groups


def publish_stage(run: Run, spec: CacheSpec, record_uris: list[str], uncached: list[str],
                  groups: list | None, manifest_of) -> tuple[dict, RunManifest]:
    """Capture the report's uncached samples, keep the scores in the work folder, assemble the
    manifest (`manifest_of(report_shards)`) and publish. Returns (published, manifest)."""
    params = run.params
    with run.stats.timed_stage("publish") as st:
        report_shards = [run.sub(report_samples_flow)(params.model, spec, record_uris, uncached, run.plan.work,
                                                      params.storage, run.dask)] if uncached else None
        scores_uri = write_table(run.trace.scores,  # as published (scores_stage renamed the method's column)
                                 storage.join(run.plan.work, "scores", run.plan.run_id, "scores.parquet"), run.options)
        manifest = manifest_of(report_shards)
        published = publish_flow(run.plan.run, scores_uri, record_uris, run.trace.summary, manifest, params.output,
                                 params.validation, params.scoring.method, params.storage, groups, staged=True)
        st.detail = run.plan.run
    return published, manifest


def scores_stage(run: Run, spec: CacheSpec, sae: SAECheckpoint, record_uris: list[str], canary_uris: list[str],
                 every_key: list[str], cache: CacheBuild):
    """The weights, then every record shard scored (real, then canary), each kind assembled into
    one table. Returns (scored, scores, canary scores or None)."""
    params = run.params
    with run.stats.timed_stage("scores") as st:
        scored = run.sub(score_flow)(params.scoring, params.model, spec, cache.cached_keys, record_uris + canary_uris,
                                     every_key, sae.uri, sae.sha256, run.plan.work, params.storage, run.dask,
                                     cache.sample_keys + [None] * len(canary_uris))
        real, canary = scored.score_uris[:len(record_uris)], scored.score_uris[len(record_uris):]
        scores = assemble_scores(real, record_uris, params.scoring.method, run.options)
        run.trace.scores = published_scores(scores, params.scoring.method)
        canary_scores = assemble_scores(canary, canary_uris, params.scoring.method, run.options) if canary else None
        w = scored.weights
        st.detail = f"{scores.num_rows} samples, {w.n_cross_modal} cross-modal features, delta {w.delta:.4g}"
    return scored, scores, canary_scores


def finish(run: Run, summary: IngestSummary, scores, w: Weights, published: dict, manifest: RunManifest,
           detection: dict | None, canary_rows: list[dict] | None, gate: dict, **extra) -> dict:
    """The run's summary artifacts and what the flow returns."""
    summary_artifacts(run.stats, run.plan, summary, scores.num_rows, w, published, detection, canary_rows,
                      gate["flags"])
    return {"run": run.plan.run, "run_id": run.plan.run_id, "counts": manifest.counts, "detection": detection,
            "stages": run.stats.stages, "seconds": run.stats.seconds, "sae": manifest.sae.uri,
            "weights": w.model_dump(), "subsets": published["subsets"], "canaries": canary_rows,
            "flags": gate["flags"], **extra}


def gate_settings(params: CurateParams, methods: list[str], w: Weights) -> dict:
    """The settings a ranking-gate refusal names as what would change its outcome (for a pinned
    run, the curation model: its method, weights and SAE are not this run's to change)."""
    if params.scoring.curation_model:
        return {"methods": list(methods), "curation_model": params.scoring.curation_model}
    return {"methods": list(methods), "pool": params.scoring.weights.pool,
            "weight_samples": params.scoring.weights.weight_samples,
            "expansion_factor": params.sae.expansion_factor, "sae_checkpoint": params.sae.checkpoint,
            "d_sae": w.d_sae}


def summary_artifacts(stats: RunStats, plan: RunPlan, summary: IngestSummary, scored: int, w: Weights,
                      published: dict, detection: dict | None, canary_rows: list[dict] | None = None,
                      flags: list[str] = ()) -> None:
    create_table_artifact(stats.stages, key="curate-stages", description="per-stage timings and counts")
    lines = [f"# Curation run `{plan.run_id}`", "", f"- run folder: `{plan.run}` (report: `{published['report']}`)",
             f"- rows in {summary.rows_in}, quarantined {summary.quarantined}, scored {scored}",
             f"- {w.n_cross_modal} cross-modal features of {w.d_sae}; delta {w.delta:.4g}"]
    if published.get("interp"):
        lines.append(f"- interpretability report: `{storage.join(plan.run, published['interp'])}`")
    lines += [f"- {subset_line(name, info)}" for name, info in published["subsets"].items()]
    if canary_rows:
        lines += ["", CANARY_CAPTION, "", *canary_lines(canary_rows)]
    lines += [f"- WARNING: {f}" for f in flags]
    if detection:
        lines += ["", DETECTION_CAPTION, "", *detection_lines(detection)]
    create_markdown_artifact("\n".join(lines), key="curate-summary", description="curation run summary")
