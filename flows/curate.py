"""The `curate` flow: preference dataset in; scored, validated, DPO-ready subsets out.

    ingest -> activations -> SAE (train or load) -> cross-modal weights -> scores -> validate -> publish

The stages a user reruns on their own are sub-flows (`build-activation-cache`, `train-sae`,
`score`, `publish`). Mapped stages run on the flow's task runner: threads by default, or an
existing Dask cluster when `dask_address` is set (GPU tasks then ask Dask for resources={"GPU": 1}).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import time
from pathlib import Path

import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from saev_core.data import publish
from saev_core.data import storage
from saev_core.sae.evaluation import detection_table
from saev_core.interp.render import link_html
from saev_core.interp.report import render_report
from saev_core.model.activation_cache import CacheSpec
from saev_core.pipeline.stages import stratify_groups, write_table as stages_write
from saev_core.sae.scoring import SCORERS
from tasks.common import digest, ensure_gpu_limit, model_fingerprint
from tasks.canary_tasks import gate_ranking, image_swap_pairs, log_probs, make_canaries, measure_canaries
from tasks.explain_tasks import explain_run
from tasks.ingest import ingest, prepare_toy_dataset
from tasks.model_tasks import cache_activations, cross_modal_weights, score_shard, train_or_load_sae
from tasks.publish_tasks import assemble_scores, examples, gate_scores, publish_run, write_manifest, write_report

from .params import CurateParams


def _task_runner(address: str | None):
    if not address:
        return None
    from prefect_dask import DaskTaskRunner

    return DaskTaskRunner(address=address)


@contextlib.contextmanager
def _gpu_annotation(dask: bool):
    """On Dask, GPU tasks only go to workers that advertise a GPU resource."""
    if not dask:
        yield
        return
    import dask as dask_mod

    with dask_mod.annotate(resources={"GPU": 1}):
        yield


def _model_dict(p: CurateParams) -> dict:
    m = p.model
    return {"model_id": m.model_id, "layer": m.layer, "device": m.device, "dtype": m.dtype, "revision": m.revision,
            "trust_remote_code": m.trust_remote_code, "batch_size": m.batch_size}


def cache_spec(p: CurateParams, response: str = "none") -> dict:
    from saev_core.model.mllm import default_dtype, resolve_device

    device = resolve_device(p.model.device)
    compute = p.model.dtype or str(default_dtype(device)).removeprefix("torch.")
    return {"model_id": p.model.model_id, "layer": p.model.layer, "revision": p.model.revision,
            "storage_dtype": p.model.cache_dtype, "compute_dtype": compute, "response": response,
            "model_fingerprint": model_fingerprint(p.model.model_id, p.model.revision)}


def _wait(futures) -> list:
    return [f.result() for f in futures]


def _from_cache(future_or_state) -> bool:
    """True when Prefect served the task from its cross-run cache instead of running it."""
    state = getattr(future_or_state, "state", future_or_state)
    return state.name == "Cached"


@flow(name="build-activation-cache")
def build_activation_cache(params: CurateParams, record_uris: list[str], work_uri: str,
                           response: str = "none") -> dict:
    """Activations of every record shard (one mapped task per shard, one GPU slot each)."""
    dask = bool(params.dask_address)
    if not dask:
        ensure_gpu_limit()
    spec = cache_spec(params, response)
    options = params.storage.options()
    with _gpu_annotation(dask):
        futures = [cache_activations.submit(u, _model_dict(params), spec, work_uri, options, response,
                                            use_gpu_slot=not dask) for u in record_uris]
    shards = _wait(futures)
    reused = [s["reused"] or _from_cache(f) for s, f in zip(shards, futures)]
    return {"spec": spec, "keys": [s["key"] for s in shards if s["key"]],
            "computed": reused.count(False), "reused": reused.count(True)}


@flow(name="train-sae")
def train_sae_flow(params: CurateParams, spec: dict, shard_keys: list[str], work_uri: str,
                   ce_records_uri: str | None = None) -> dict:
    """Load the configured checkpoint or train the SAE on the cached activations."""
    ensure_gpu_limit()
    keys = shard_keys
    if params.sae.train_samples:
        keys = shard_keys[: max(1, -(-params.sae.train_samples // params.dataset.shard_rows))]
    from saev_core.model.mllm import model_hidden_size, resolve_device, resolve_model_id

    m = params.model
    hidden = model_hidden_size(resolve_model_id(m.model_id), m.revision, m.trust_remote_code)
    state = train_or_load_sae(params.sae.model_dump(), spec, keys, work_uri, params.storage.options(),
                              hidden, str(resolve_device(m.device)), _model_dict(params), ce_records_uri,
                              return_state=True)
    out = state.result()
    return {**out, "trained": out["trained"] and not _from_cache(state), "train_shards": list(keys)}


@flow(name="score")
def score_flow(params: CurateParams, spec: dict, shard_keys: list[str], sae_uri: str, sae_sha: str,
               work_uri: str, canary_keys: list[str] | None = None) -> dict:
    """Cross-modal weights on a subset of the real shards, then every shard scored (mapped),
    baselines as extra columns; canary shards are scored, never used for the weights."""
    options = params.storage.options()
    s = params.scoring
    w = cross_modal_weights(sae_uri, sae_sha, spec, shard_keys, work_uri, options,
                            s.model_dump(exclude={"canaries", "method", "baselines"}))
    methods = [s.method] + [b for b in s.baselines if b != s.method]
    canary_keys = canary_keys or []
    with _gpu_annotation(bool(params.dask_address)):
        futures = [score_shard.submit(k, sae_uri, sae_sha, w["uri"], w["delta"], spec, work_uri, options, methods,
                                      s.top_k, s.seed, s.null_samples) for k in [*shard_keys, *canary_keys]]
    uris = _wait(futures)
    return {"weights": w, "score_uris": uris[:len(shard_keys)], "canary_score_uris": uris[len(shard_keys):],
            "methods": methods}


@flow(name="publish")
def publish_flow(params: CurateParams, run: str, scores_uri: str, record_uris: list[str], ingest_summary: dict,
                 manifest: dict, groups: list | None = None) -> dict:
    """Gate, then write scores, quarantine, subsets, validation.json, report.html and, last, manifest.json."""
    import pyarrow.parquet as pq

    options = params.storage.options()
    with storage.open_input(scores_uri, options) as fh:
        scores = pq.read_table(fh)
    gate = gate_scores(scores, ingest_summary["kept"], ingest_summary["rows_in"], ingest_summary["quarantined"],
                       params.validation.max_quarantine_rate)
    keep = params.output.keep_percents
    out = publish_run(run, scores, record_uris, ingest_summary["quarantine_uri"], keep, ingest_summary,
                      params.validation.max_quarantine_rate, options, groups)
    low, high = examples(scores, record_uris, options)
    interp = explain_run(run, manifest, record_uris, None, options)  # before the manifest, which lists files
    counts = {"rows in": ingest_summary["rows_in"], "kept after ingest": ingest_summary["kept"],
              "quarantined": ingest_summary["quarantined"],
              "cross-modal features": manifest["scoring"]["n_cross_modal"],
              **{name: s["rows"] for name, s in out["subsets"].items()}}
    html = render_report(title=f"SAE-V curation: {run}", method=params.scoring.method,
                         scores=scores.column("score").to_pylist(), threshold=out["subsets"][f"top-{keep[0]}"]["min_score"],
                         counts=counts, stages=manifest["stages"], lowest=low, highest=high,
                         detection=manifest.get("detection_auroc"), extra_html=link_html(interp) if interp else "",
                         canaries=(manifest.get("canaries") or {}).get("table"),
                         flags=manifest["ranking_gate"]["flags"] if manifest.get("ranking_gate") else ())
    report_uri = write_report(run, html, options)
    manifest = {**manifest, "subsets": out["subsets"],
                "thresholds": {name: s["min_score"] for name, s in out["subsets"].items()},
                "validation": {**out["validation"], "scores_gate": gate["success"]}, "report": "report.html",
                "interp_report": interp}
    write_manifest(run, manifest, options)
    return {"run": run, "report": report_uri, "interp": interp, **out}


def _code_version() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _dataset_name(p: CurateParams) -> str:
    if p.dataset.name:
        return p.dataset.name
    base = p.dataset.uri.rstrip("/").split("/")[-1].split("?")[0]
    if p.dataset.uri.startswith("toy://"):
        base = f"toy-{base}"
    for suffix in (".parquet", ".jsonl", ".json", ".pq", ".gz"):
        base = base.removesuffix(suffix)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base) or "dataset"


def _truth_labels(truth_uri: str, row_index: list) -> list[str]:
    import pyarrow.parquet as pq

    t = pq.read_table(truth_uri, columns=["row", "corruption"])
    label = dict(zip(t.column("row").to_pylist(), t.column("corruption").to_pylist()))
    return [label[r] for r in row_index]


@flow(name="curate", log_prints=True)
def curate(params: CurateParams = CurateParams()) -> dict:
    """Score a preference dataset with SAE-V and publish the top-p% subsets."""
    logger = get_run_logger()
    t_start = time.perf_counter()
    stages: list[dict] = []

    def stage(name: str, t0: float, detail: str = "") -> None:
        stages.append({"stage": name, "seconds": round(time.perf_counter() - t0, 2), "detail": detail})
        logger.info("stage %s done in %.1fs %s", name, stages[-1]["seconds"], detail)

    options = params.storage.options()
    # local paths are made absolute: cache keys and the manifest must not depend on the cwd
    output = params.output.uri if storage.is_remote(params.output.uri) else os.path.abspath(params.output.uri)
    work = params.output.work_uri or storage.join(output, "_work")
    work = work if storage.is_remote(work) else os.path.abspath(work)
    source, truth_uri = params.dataset.uri, None

    t0 = time.perf_counter()
    if source.startswith("toy://"):
        if storage.is_remote(work):
            raise ValueError("toy:// datasets are built on local disk: set output.work_uri to a local folder")
        toy = prepare_toy_dataset(source, work, params.dataset.toy_samples, params.dataset.toy_corruption_rate,
                                  params.dataset.toy_seed)
        source, truth_uri = toy["source"], toy["truth"]
    summary = ingest(source, params.dataset.format, params.dataset.mapping, params.dataset.shard_rows, work,
                     options if storage.is_remote(source) else None, options)
    record_uris = [s["uri"] for s in summary["shards"] if s["rows"] > 0]
    stage("ingest", t0, f"{summary['rows_in']} rows, {summary['kept']} kept, {summary['quarantined']} quarantined")
    if not record_uris:
        raise ValueError(f"no usable rows in {params.dataset.uri}: all {summary['rows_in']} quarantined "
                         f"({summary['by_reason']})")

    run_id = params.output.run_id or (dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-"
                                      + digest(params.model_dump(mode="json"), 6))
    run = publish.run_uri(output, _dataset_name(params), run_id)
    publish.ensure_unpublished(run, options)

    canaries, canary_uris = None, []
    if params.scoring.canaries.enabled:
        t0 = time.perf_counter()
        canaries = make_canaries(record_uris, work, params.scoring.canaries.model_dump(mode="json"),
                                 params.dataset.shard_rows, options, summary["fingerprint"])
        canary_uris = canaries["record_uris"]
        stage("canaries", t0, f"{canaries['n']} canaries {canaries['by_kind']}")

    runner = _task_runner(params.dask_address)
    t0 = time.perf_counter()
    every_uri = record_uris + canary_uris  # canaries: same activations and scoring, never SAE or weights
    cache = build_activation_cache.with_options(task_runner=runner)(params, every_uri, work) if runner \
        else build_activation_cache(params, every_uri, work)
    if len(cache["keys"]) != len(every_uri):
        raise RuntimeError(f"{len(every_uri)} record shards gave {len(cache['keys'])} activation shards")
    real_keys, canary_keys = cache["keys"][:len(record_uris)], cache["keys"][len(record_uris):]
    stage("activations", t0, f"{len(cache['keys'])} shards ({cache['computed']} computed, {cache['reused']} reused)")
    methods = [params.scoring.method] + [b for b in params.scoring.baselines if b != params.scoring.method]
    if any(SCORERS[m].needs_logp for m in methods):
        t0 = time.perf_counter()
        _wait([log_probs.submit(u, _model_dict(params), cache["spec"], work, options) for u in every_uri])
        stage("log-probs", t0, f"{len(every_uri)} shards, chosen and rejected")

    t0 = time.perf_counter()
    sae = train_sae_flow(params, cache["spec"], real_keys, work, record_uris[0])
    stage("sae", t0, ("trained " if sae["trained"] else "loaded ") + sae["uri"])

    t0 = time.perf_counter()
    score_args = (params, cache["spec"], real_keys, sae["uri"], sae["sha256"], work, canary_keys)
    scored = score_flow.with_options(task_runner=runner)(*score_args) if runner else score_flow(*score_args)
    scores = assemble_scores(scored["score_uris"], record_uris, params.scoring.method, options)
    w = scored["weights"]
    stage("scores", t0, f"{scores.num_rows} samples, {w['n_cross_modal']} cross-modal features, delta {w['delta']:.4g}")

    canary_rows, pairs = None, None
    if canaries and canaries["n"]:
        canary_scores = assemble_scores(scored["canary_score_uris"], canary_uris, params.scoring.method, options)
        columns = [c for c in scores.column_names if c not in ("sample_id", "row_index", "n_positions",
                                                                "n_image_positions")]
        canary_rows = measure_canaries(run, scores, canary_scores, canaries["table_uri"], params.scoring.method,
                                       columns, params.output.keep_percents, options)
        by_id = dict(zip(scores.column("sample_id").to_pylist(), scores.column("score").to_pylist()))
        by_id.update(zip(canary_scores.column("sample_id").to_pylist(), canary_scores.column("score").to_pylist()))
        import pyarrow.parquet as pq

        with storage.open_input(canaries["table_uri"], options) as fh:
            pairs = image_swap_pairs(pq.read_table(fh).to_pylist(), by_id)
    groups = None
    if params.output.stratify_by:
        groups = stratify_groups(record_uris, scores.column("sample_id").to_pylist(), params.output.stratify_by,
                                 params.output.stratify_clusters, params.scoring.seed, options)
    gate = gate_ranking(scores, params.scoring.method, params.output.keep_percents,
                        params.validation.model_dump(), w["n_cross_modal"], canary_rows, pairs, groups)

    detection = None
    if truth_uri:
        labels = _truth_labels(truth_uri, scores.column("row_index").to_pylist())
        cols = {"score": scores.column("score").to_pylist()}
        cols.update({m: scores.column(m).to_pylist() for m in scored["methods"][1:]})
        detection = detection_table(cols, labels)

    t0 = time.perf_counter()
    scores_uri = stages_write(scores, storage.join(work, "scores", run_id, "scores.parquet"), options)
    manifest = {
        "run_id": run_id, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "code_version": _code_version(), "parameters": params.model_dump(mode="json"),
        "source": {"uri": params.dataset.uri, "format": summary["format"], "fingerprint": summary["fingerprint"]},
        "model": {**_model_dict(params), "fingerprint": cache["spec"]["model_fingerprint"]},
        "sae": {"uri": sae["uri"], "sha256": sae["sha256"], "trained": sae["trained"],
                "metrics": sae["metrics"], "train_shards": sae["train_shards"]},
        "scoring": {"method": params.scoring.method, "columns": scored["methods"], "delta": w["delta"],
                    "weights_uri": w["uri"], "weight_shards": w["shard_keys"],
                    "n_cross_modal": w["n_cross_modal"], "d_sae": w["d_sae"]},
        "activations": {"uri": storage.join(work, "activations", CacheSpec(**cache["spec"]).key()),
                        "canary_shards": canary_keys},
        "canaries": None if canaries is None else {
            "file": "canaries.parquet" if canary_rows else None, "n": canaries["n"], "by_kind": canaries["by_kind"],
            "table": canary_rows},
        "ranking_gate": gate,
        "counts": {"rows_in": summary["rows_in"], "kept": summary["kept"], "quarantined": summary["quarantined"],
                   "scored": scores.num_rows, "by_reason": summary["by_reason"]},
        "detection_auroc": detection, "stages": stages,
    }
    published = publish_flow(params, run, scores_uri, record_uris, summary, manifest, groups)
    stage("publish", t0, run)

    create_table_artifact(stages, key="curate-stages", description="per-stage timings and counts")
    lines = [f"# Curation run `{run_id}`", "", f"- run folder: `{run}` (report: `{published['report']}`)",
             f"- rows in {summary['rows_in']}, quarantined {summary['quarantined']}, scored {scores.num_rows}",
             f"- {w['n_cross_modal']} cross-modal features of {w['d_sae']}; delta {w['delta']:.4g}"]
    if published.get("interp"):
        lines.append(f"- interpretability report: `{storage.join(run, published['interp'])}`")
    lines += [f"- {name}: {info['rows']} samples (score >= {info['min_score']:.4g})"
              for name, info in published["subsets"].items()]
    if canary_rows:
        kinds = sorted({r["kind"] for r in canary_rows})
        lines += ["", "Canaries, paired win rate P(canary < its source) (0.5 = chance):", "",
                  "| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        table = {(r["method"], r["kind"]): r["paired_win_rate"] for r in canary_rows}
        for m in dict.fromkeys(r["method"] for r in canary_rows):
            lines.append(f"| {m} | " + " | ".join(f"{table[(m, k)]:.3f}" for k in kinds) + " |")
    lines += [f"- WARNING: {f}" for f in gate["flags"]]
    if detection:
        lines += ["", "| method | overall AUROC |", "|---|---|"]
        lines += [f"| {m} | {v['overall']:.3f} |" for m, v in detection.items()]
    create_markdown_artifact("\n".join(lines), key="curate-summary", description="curation run summary")
    return {"run": run, "run_id": run_id, "counts": manifest["counts"], "detection": detection, "stages": stages,
            "seconds": round(time.perf_counter() - t_start, 1), "sae": sae["uri"], "weights": w,
            "subsets": published["subsets"], "canaries": canary_rows, "flags": gate["flags"]}
