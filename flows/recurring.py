"""Recurring curation (issue 22): runs that score with a pinned curation model, and the flows
that make one.

    promote RUN --name NAME       a finished run's SAE, weights, delta, scoring spec, model identity
                                   and keep threshold -> <output>/_models/NAME/v<N>/ (checksummed)
    curate with scoring.curation_model=NAME[@vN]
        ingest -> [rows scored before under the model: reused by content] -> new rows only:
        canaries -> log-probs -> scores (the model's SAE, weights and delta) -> gate -> publish
    train-and-promote              a curate run that trains, then promote

A pinned run trains nothing and computes no weights or delta, so a row's score depends on its
content only; the store of scores (saev_core.pipeline.incremental) makes a nightly run over a
grown dataset forward only the new rows. Canaries are made from the new rows, plus the fixed
reference set the model was promoted with (the promoted run's canaries and their scores), so the
canary table stays comparable across nights.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger

from flows.checks import preflight_params
from flows.params import CurateParams, StorageSpec
from flows.stages import RunTrace, gate_settings, ingest_stage, on_runner, summary_artifacts
from flows.subflows import log_probs_flow, publish_flow, report_samples_flow, score_flow
from saev_core.data import publish, storage
from saev_core.model.activation_cache import CacheSpec
from saev_core.pipeline import curation_model as cmodel
from saev_core.pipeline import incremental
from saev_core.pipeline.hashing import digest
from saev_core.pipeline.manifest import run_manifest
from saev_core.pipeline.loaded_models import model_fingerprint
from saev_core.pipeline.plan import RunPlan
from saev_core.pipeline.publish_stage import published_scores
from saev_core.pipeline.report_samples import uncached_report_samples
from saev_core.pipeline.results import SAECheckpoint
from saev_core.pipeline.run_stats import RunStats
from saev_core.pipeline.stages import record_key, write_table
from saev_core.pipeline.score_stages import stratify_groups
from saev_core.sae.evaluation import detection_from_truth
from saev_core.sae.scoring import SCORERS
from tasks.canary_tasks import gate_ranking, image_swap_pairs, make_canaries, measure_canaries
from tasks.publish_tasks import assemble_scores
from tasks.recurring_tasks import load_curation_model, promote, split_new_rows, store_scores

# ModelSpec fields a curation model fixes (the rest, device and batching, stay the run's)
PINNED_MODEL_FIELDS = ("model_id", "revision", "layer", "dtype", "max_tokens", "trust_remote_code", "cache_dtype",
                       "sae_dtype")
# CacheSpec fields that change a row's statistics (where the model lives may differ)
PINNED_CACHE_FIELDS = ("layer", "compute_dtype", "response", "max_tokens")


def pinned_params(params: CurateParams, cm: cmodel.CurationModel) -> CurateParams:
    """The run's parameters with the model and scoring fixed by the curation model."""
    model = params.model.model_copy(update={k: cm.model.get(k) for k in PINNED_MODEL_FIELDS if k in cm.model})
    return params.model_copy(update={"model": model, "scoring": cm.scoring_spec(params.scoring)})


def check_cache(cm: cmodel.CurationModel, spec: CacheSpec) -> None:
    """The run's forward pass must be the one the model's statistics were computed under."""
    mine = spec.to_dict()
    diff = {k: (cm.cache.get(k), mine.get(k)) for k in PINNED_CACHE_FIELDS if cm.cache.get(k) != mine.get(k)}
    if diff:
        raise cmodel.CurationModelError(
            f"curation model {cm.ref}", "the run's forward pass differs from the one it was promoted with: "
            + ", ".join(f"{k} {a!r} then, {b!r} now" for k, (a, b) in diff.items()),
            "Set model.dtype (and the device) as when it was promoted, or train and promote a new version")


def curate_pinned(params: CurateParams, plan: RunPlan, stats: RunStats, runner, trace=None) -> dict:
    """The curate flow's body with a pinned curation model (called inside `curate`, whose
    failure path keeps what `trace` (flows.stages.RunTrace) recorded as evidence)."""
    trace = trace if trace is not None else RunTrace()

    logger = get_run_logger()
    options = params.storage.options()
    dask = runner is not None
    with stats.timed_stage("preflight") as st:
        st.detail = str(preflight_params(params, plan.run, curation_model=False)["dataset"]["format"])

    with stats.timed_stage("curation-model") as st:
        card = load_curation_model(params.scoring.curation_model, plan.output, options)
        cm = cmodel.CurationModel.model_validate(card)
        params = pinned_params(params, cm)
        spec = CacheSpec.for_model(params.model, fingerprint=model_fingerprint(params.model.model_id,
                                                                               params.model.revision))
        cmodel.check_model(cm, spec.model_fingerprint)
        check_cache(cm, spec)
        st.detail = f"{cm.ref} at {cm.uri}; keep threshold {cm.threshold:.4g} (top-{cm.keep_threshold['percent']}%)"

    source, summary, record_uris = ingest_stage(params, plan, options, stats, trace)

    with stats.timed_stage("incremental") as st:
        split = split_new_rows(record_uris, card, plan.work, plan.run_id, params.dataset.shard_rows, options)
        new_uris = split["record_uris"]
        st.detail = f"{split['rows']} new rows forwarded, {split['reused_rows']} scored before under {cm.ref}"

    canaries, canary_uris, reference, spec_c = None, [], None, params.scoring.canaries
    if spec_c.enabled and cm.reference_canaries_uri:  # the fixed set, comparable across nights
        reference = incremental.reference_canaries(cm.reference_canaries_uri, params.scoring.method,
                                                   params.scoring.columns(), split["ids"], options)
    if spec_c.enabled and new_uris:
        with stats.timed_stage("canaries") as st:
            # a share of the new rows; min_count only for what the reference set leaves short of it
            spec_c = spec_c.model_copy(update={"min_count": max(0, spec_c.min_count - (reference[0].num_rows
                                                                                       if reference else 0))})
            canaries = make_canaries(new_uris, plan.work, spec_c, params.dataset.shard_rows, options,
                                     digest([summary.fingerprint, new_uris]))
            canary_uris = canaries.record_uris
            st.detail = f"{canaries.n} canaries {canaries.by_kind} from the new rows"

    every_uri = new_uris + canary_uris
    every_key = [record_key(u, options) for u in every_uri]
    if every_uri and any(SCORERS[m].needs_logp for m in params.scoring.columns()):
        with stats.timed_stage("log-probs") as st:
            n = on_runner(log_probs_flow, runner)(params.model, spec, every_uri, plan.work, params.storage, dask)
            st.detail = f"{n} shards, chosen and rejected"

    w = cm.weights_info()
    sae = SAECheckpoint(uri=cm.sae_uri, sha256=cm.sae_sha256, trained=False, train_shards=[])
    with stats.timed_stage("scores") as st:
        new_scores, canary_score_uris, methods = [], [], params.scoring.columns()
        if every_uri:
            scored = on_runner(score_flow, runner)(params.scoring, params.model, spec, [], every_uri, every_key,
                                                   cm.sae_uri, cm.sae_sha256, plan.work, params.storage, dask, None, w)
            new_scores = scored.score_uris[:len(new_uris)]
            canary_score_uris = scored.score_uris[len(new_uris):]
            methods = scored.methods
            store_scores(new_scores, card, plan.work, options)
        known = [split["known_uri"]] if split["known_uri"] else []
        scores = assemble_scores(known + new_scores, record_uris, params.scoring.method, options)
        trace.scores = published_scores(scores, params.scoring.method)
        st.detail = (f"{scores.num_rows} samples ({split['rows']} scored now, {split['reused_rows']} reused), "
                     f"{w.n_cross_modal} cross-modal features, delta {w.delta:.4g}")

    detection = None
    if source.truth_uri:
        detection = detection_from_truth(source.truth_uri, scores, methods)

    canary_rows, pairs, by_kind = None, None, {}
    staging = publish.begin_run(plan.run, options)
    n_new, n_ref = (canaries.n if canaries else 0), (reference[0].num_rows if reference else 0)
    if n_new or n_ref:
        with stats.timed_stage("canary-table") as st:
            cols, infos, parts = ["sample_id", *methods], [], []
            if n_new:
                with storage.open_input(canaries.table_uri, options) as fh:
                    infos.append(pq.read_table(fh).select(["canary_id", "source_id", "donor_id", "kind"]))
                parts.append(assemble_scores(canary_score_uris, canary_uris, params.scoring.method, options)
                             .select(cols))
            if n_ref:
                infos.append(reference[0])
                parts.append(reference[1].select(cols))
            info = pa.concat_tables(infos, promote_options="permissive")
            table_uri = write_table(info, storage.join(plan.work, "canaries", "pinned", plan.run_id,
                                                       "canaries.parquet"), options)
            canary_scores = pa.concat_tables(parts, promote_options="permissive")
            canary_rows = measure_canaries(storage.join(staging, "canaries.parquet"), scores, canary_scores,
                                           table_uri, methods, params.output.keep_percents, options)
            pairs = image_swap_pairs(table_uri, scores, canary_scores, params.scoring.method, options)
            kinds = info.column("kind").to_pylist()
            by_kind = {k: kinds.count(k) for k in sorted(set(kinds))}
            st.detail = f"{n_new} canaries of the new rows + {n_ref} reference canaries x {len(methods)} methods"
    groups = None
    if params.output.stratify_by:
        groups = stratify_groups(record_uris, scores.column("sample_id").to_pylist(), params.output.stratify_by,
                                 params.output.stratify_clusters, params.scoring.score.seed, options)
    trace.stage = "ranking-gate"
    gate = gate_ranking(scores, params.scoring.method, params.output.keep_percents, params.validation,
                        w.n_cross_modal, pairs, groups, canary_rows=canary_rows,
                        settings=gate_settings(params, methods, w))
    trace.stage = None

    with stats.timed_stage("publish") as st:
        outside = uncached_report_samples(scores, params.scoring.method)  # nothing is cached
        report_shards = [on_runner(report_samples_flow, runner)(params.model, spec, record_uris, outside, plan.work,
                                                                params.storage, dask)] if outside else None
        scores_uri = write_table(published_scores(scores, params.scoring.method),
                                 storage.join(plan.work, "scores", plan.run_id, "scores.parquet"), options)
        manifest = run_manifest(plan.run_id, params.model_dump(mode="json"), params.dataset.uri, summary,
                                params.model, spec, sae, params.scoring, w, scores.num_rows, detection, stats.stages,
                                plan.work, record_uris)
        manifest = manifest.model_copy(update={
            "cache_shards": [None] * len(record_uris), "residual_sample": None, "report_shards": report_shards,
            "canaries": None if not (n_new or n_ref) else {
                "n": n_new + n_ref, "new": n_new, "reference": n_ref, "by_kind": by_kind,
                "canary_shards": every_key[len(new_uris):], "file": "canaries.parquet" if canary_rows else None,
                "table": canary_rows},
            "ranking_gate": gate, "curation_model": cm.record(),
            "incremental": {"forwarded": split["rows"], "reused": split["reused_rows"], "total": split["total"],
                            "seeded": split["seeded"], "canaries_forwarded": len(canary_uris) and canaries.n}})
        published = publish_flow(plan.run, scores_uri, record_uris, summary, manifest, params.output,
                                 params.validation, params.scoring.method, params.storage, groups, staged=True)
        st.detail = plan.run
    logger.info("scored with %s: %d new rows forwarded, %d reused", cm.ref, split["rows"], split["reused_rows"])
    summary_artifacts(stats, plan, summary, scores.num_rows, w, published, detection, canary_rows, gate["flags"])
    return {"run": plan.run, "run_id": plan.run_id, "counts": manifest.counts, "detection": detection,
            "stages": stats.stages, "seconds": stats.seconds, "sae": cm.sae_uri, "weights": w.model_dump(),
            "subsets": published["subsets"], "canaries": canary_rows, "flags": gate["flags"],
            "curation_model": cm.record(), "incremental": manifest.incremental}


@flow(name="promote-curation-model")
def promote_flow(run: str, name: str, output_uri: str | None = None, keep_percent: int | None = None,
                 storage_spec: StorageSpec = StorageSpec()) -> dict:
    """Copy a finished run's curation model to <output>/_models/<name>/v<N>/ (a new version)."""
    return promote(run, name, output_uri, keep_percent, storage_spec.options())


@flow(name="train-and-promote", log_prints=True)
def train_and_promote(params: CurateParams = CurateParams(), name: str = "nightly",
                      keep_percent: int | None = None) -> dict:
    """A curate run that trains its own SAE, weights and delta, then promoted as the next
    version of `name`: what the nightly runs pin from then on."""
    from flows.curate import curate

    if params.scoring.curation_model:
        raise cmodel.CurationModelError("scoring.curation_model", "is set: a run that pins a model trains nothing "
                                        "to promote", "Unset it for train-and-promote")
    result = curate(params)
    card = promote(result["run"], name, None, keep_percent, params.storage.options())  # <output> of the run
    return {**result, "promoted": {k: card[k] for k in ("name", "version", "keep_threshold", "files")}}

