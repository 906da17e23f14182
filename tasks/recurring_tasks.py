"""Tasks of recurring curation (issue 22): promote a run's curation model, load a pinned one
(checksums verified), split a grown dataset into rows already scored under it and new rows, store
the new scores, and record the run's decisions, changes and place in the dataset's history. The
work is in saev_core.pipeline.curation_model / incremental / history."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from saev_core.data import publish, storage
from saev_core.data.subsets import list_subsets
from saev_core.pipeline import curation_model as cmodel
from saev_core.pipeline import history, incremental
from saev_core.pipeline.specs import OutputSpec

from .common import RETRY


@task(name="promote-curation-model", cache_policy=NO_CACHE, **RETRY)
def promote(run: str, name: str, output_uri: str | None, keep_percent: int | None, options: dict | None) -> dict:
    """Copy the run's curation model to <output>/_models/<name>/v<N>/ (a new version, never an
    overwrite); returns its card."""
    card = cmodel.promote_run(run, name, output_uri, keep_percent, options)
    get_run_logger().info("promoted %s to %s (%s), keep threshold %.4g at top-%d%%", run, card.ref, card.uri,
                          card.threshold, card.keep_threshold["percent"])
    return card.model_dump(mode="json")


@task(name="load-curation-model", cache_policy=NO_CACHE, **RETRY)
def load_curation_model(ref: str, output_uri: str, options: dict | None) -> dict:
    """The pinned curation model, every file checked against its sha256 (CurationModelError,
    permanent, when one is missing or changed)."""
    card = cmodel.load(ref, output_uri, options)
    get_run_logger().info("curation model %s (%s): %d files verified", card.ref, card.uri, len(card.files))
    return card.model_dump(mode="json")


@task(name="split-new-rows", cache_policy=NO_CACHE, **RETRY)
def split_new_rows(record_uris: list[str], card: dict, work_uri: str, run_id: str, shard_rows: int,
                   options: dict | None) -> dict:
    """Rows already scored under the curation model (by content: sample_id) and new ones. The
    store is seeded from the promoted run the first time. Returns the new rows' record shards,
    the reused rows' score file (None when none) and counts."""
    logger = get_run_logger()
    cm = cmodel.CurationModel.model_validate(card)
    methods = cm.scoring["columns"]
    store = incremental.store_uri(work_uri, cm.key)
    seeded = 0
    if not storage.list_files(store, options, suffixes=(".parquet",)):
        try:
            scores = publish.read_scores(cm.source_run, options)
        except Exception as exc:  # noqa: BLE001 - the source run may be gone: score everything once
            logger.warning("could not seed the score store from %s (%s): every row is scored", cm.source_run, exc)
        else:
            seeded = incremental.seed_store(work_uri, cm.key, scores, cm.scoring["method"], methods, options)
            logger.info("score store of %s seeded with %d rows of %s", cm.ref, seeded, cm.source_run)
    ids = set()
    for uri in record_uris:
        t = pq.read_table(io.BytesIO(storage.read_bytes(uri, options)), columns=["sample_id"])
        ids.update(t.column("sample_id").to_pylist())
    known = incremental.read_store(work_uri, cm.key, methods, options, wanted=ids)
    known_ids = set(known.column("sample_id").to_pylist())
    out = incremental.new_row_shards(record_uris, known_ids, storage.join(work_uri, "incremental", cm.key),
                                     shard_rows, options)
    known_uri = None
    if known.num_rows:
        known_uri = incremental.write_known(known, storage.join(work_uri, "incremental", cm.key, "known",
                                                                f"{run_id}.parquet"), options)
    logger.info("%d of %d rows scored before under %s (reused); %d new rows forwarded", out["reused_rows"],
                out["total"], cm.ref, out["rows"])
    return {**out, "known_uri": known_uri, "seeded": seeded, "ids": sorted(ids)}


@task(name="store-scores", cache_policy=NO_CACHE, **RETRY)
def store_scores(score_uris: list[str], card: dict, work_uri: str, options: dict | None) -> int:
    cm = cmodel.CurationModel.model_validate(card)
    tables = [pq.read_table(io.BytesIO(storage.read_bytes(u, options))) for u in score_uris]
    return incremental.append_store(work_uri, cm.key, tables, cm.scoring["columns"], options)


@task(name="record-history", cache_policy=NO_CACHE)
def record_history(staging: str, final: str, scores: pa.Table, manifest: dict, output: OutputSpec,
                   options: dict | None, record_uris: list[str] | None = None) -> dict:
    """Write decisions.parquet, changes.parquet (against the parent run), the `kept` subset (a
    pinned run's rows at or above the curation model's keep_threshold, from `record_uris`) and
    README.md (the HF dataset card) into the staged run; return the manifest's additions (with
    `subsets` when `kept` was added) and the report's history section. Before the manifest,
    which lists the run's files."""
    logger = get_run_logger()
    dataset_uri = storage.parent(final)
    subsets = {}
    for name, uris in list_subsets(staging, options).items():
        subsets[name] = {s for u in uris for s in
                         pq.read_table(io.BytesIO(storage.read_bytes(u, options)), columns=["sample_id"])
                         .column(0).to_pylist()}
    cm = manifest.get("curation_model")
    rule = history.decision_rule(output.keep_percents, cm["keep_threshold"]["score"] if cm else None)
    decisions = history.decisions_table(scores, subsets, rule, output.row_key)
    with storage.atomic_output(storage.join(staging, history.DECISIONS_FILE), options) as fh:
        pq.write_table(decisions, fh)
    kept = sum(decisions.column("kept").to_pylist())
    update: dict = {"decisions": {"file": history.DECISIONS_FILE, "rule": rule, "kept": kept,
                                  "row_key": output.row_key or "row_index"}}
    published = manifest.get("subsets") or {}
    if rule["kind"] == "threshold" and record_uris is not None:
        info = history.write_kept_subset(staging, record_uris, decisions, options)
        published = update["subsets"] = {**published, history.KEPT_SUBSET: {**info, "threshold": rule["threshold"]}}
        logger.info("subset %s: %d rows (score >= %.4g)", history.KEPT_SUBSET, info["rows"], rule["threshold"])
    parent = history.find_parent(dataset_uri, output.parent_run, cm, options, exclude=final)
    if parent:
        before_manifest = publish.read_manifest(parent, options)
        before = history.read_decisions(parent, options, output.row_key)
        table, summary = history.compare(before, decisions, before_manifest, {**manifest, **update})
        with storage.atomic_output(storage.join(staging, history.CHANGES_FILE), options) as fh:
            pq.write_table(table, fh)
        update["changes"] = {"parent_run": parent, "parent_run_id": storage.basename(parent),
                             "file": history.CHANGES_FILE, **summary}
        logger.info("against %s: %d added, %d removed, %d changed; %d decisions flipped (%d on unchanged rows)",
                    parent, summary["added"], summary["removed"], summary["changed"], summary["flipped"],
                    summary["flipped_unchanged"])
    else:
        update["changes"] = None
    full = {**manifest, **update}
    rows = history.history_rows(dataset_uri, options) + [history.history_row(final, full)]
    card = history.dataset_card(storage.basename(final), published, full)
    storage.write_bytes(storage.join(staging, history.CARD_FILE), card.encode(), options)
    return {"update": update, "html": history.history_html(rows, storage.basename(final))}

