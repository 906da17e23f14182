"""The `curate` flow: preference dataset in; scored, validated, DPO-ready subsets out.

    ingest -> activations -> SAE (train or load) -> cross-modal weights -> scores -> [evaluate] -> publish

Residuals are cached only for the sample the SAE and the weights read (`ResidualSample`, drawn
across the whole dataset); every record shard is then scored from its cached residuals when all
of them are cached, else by a fused pass (forward -> SAE encode -> per-sample statistics on the
model's device), so a run at scale stores statistics, not residuals.

A straight line of stages (flows/stages.py, each handed only its own spec and timed into one
`RunStats`), which run their sub-flows (flows/subflows.py) on the run's runner. Datasets whose
labels are known (the toy world) get an evaluation stage; nothing else in the flow knows about them.
"""

from __future__ import annotations

import dataclasses

from prefect import flow, get_run_logger

from flows.params import CurateParams
from flows.stages import (RunTrace, activations_stage, cache_spec, canary_stage, canary_table_stage, finish,
                          ingest_stage, logprob_stage, preflight_stage, publish_stage, ranking_gate_stage, sae_stage,
                          scores_stage, start_run)
from flows.subflows import threads
from saev_core.data import publish, storage
from saev_core.pipeline.manifest import canaries_entry, run_manifest
from saev_core.pipeline.residual_sample import ResidualSample
from saev_core.pipeline.report_samples import uncached_report_samples
from saev_core.pipeline.stages import record_key
from saev_core.sae.evaluation import detection_from_truth


@flow(name="curate", log_prints=True, task_runner=threads())
def curate(params: CurateParams = CurateParams()) -> dict:
    """Score a preference dataset with SAE-V and publish the top-p% subsets. A run that fails keeps
    its evidence in <dataset>/_failed/<run_id>/ and ends Failed with the refusal's paragraph."""
    trace = RunTrace()
    try:
        return _curate(params, trace)
    except Exception as exc:
        _keep_evidence(exc, params, trace)
        raise


def _curate(params: CurateParams, trace: RunTrace) -> dict:
    """The stages of ARCHITECTURE.md, in order."""
    run = start_run(params, trace)
    if params.scoring.curation_model:  # issue 22: a pinned curation model scores only the new rows
        from flows.recurring import curate_pinned

        return curate_pinned(params, run.plan, run.stats, run.runner, trace)
    preflight_stage(run)
    source, summary, record_uris = ingest_stage(params, run.plan, run.options, run.stats, trace)
    canaries = canary_stage(run, record_uris, summary.fingerprint)
    canary_uris = canaries.record_uris if canaries else []
    spec = cache_spec(params.model)
    residuals = ResidualSample.plan(params.sae, params.scoring.weights, summary.kept)
    cache = activations_stage(run, spec, record_uris, residuals)
    every_key = cache.record_keys + [record_key(u, run.options) for u in canary_uris]
    logprob_stage(run, spec, record_uris + canary_uris)
    sae = sae_stage(run, spec, cache, record_uris[0])
    scored, scores, canary_scores = scores_stage(run, spec, sae, record_uris, canary_uris, every_key, cache)
    detection = detection_from_truth(source.truth_uri, scores, scored.methods) if source.truth_uri else None
    canary_rows, pairs = canary_table_stage(run, canaries and canaries.table_uri, scores, canary_scores,
                                            scored.methods)
    gate, groups = ranking_gate_stage(run, scores, record_uris, scored.weights, scored.methods, pairs, canary_rows)
    published, manifest = publish_stage(
        run, spec, record_uris, uncached_report_samples(scores, params.scoring.method, residuals.keeps),
        groups, lambda report_shards: run_manifest(
            run.plan.run_id, params.model_dump(mode="json"), params.dataset.uri, summary, params.model, spec, sae,
            params.scoring, scored.weights, scores.num_rows, detection, run.stats.stages, run.plan.work, record_uris,
            cache_shards=cache.sample_keys, residual_sample=dataclasses.asdict(residuals),
            report_shards=report_shards, ranking_gate=gate, canaries=canaries and canaries_entry(
                canaries.n, canaries.by_kind, every_key[len(record_uris):], canary_rows)))
    return finish(run, summary, scores, scored.weights, published, manifest, detection, canary_rows, gate)


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


def _keep_evidence(exc: BaseException, params: CurateParams, trace: RunTrace) -> None:
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
