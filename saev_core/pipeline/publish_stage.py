"""The publish stage: scores, quarantine and the top-p% subsets written into the run folder and
validated as written. The manifest is NOT written here: it comes last, after the reports."""

from __future__ import annotations

import logging
from typing import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from saev_core.data import publish, storage
from saev_core.data.gx_results import ValidationFailed
from saev_core.data.ingest import read_record_shard
from saev_core.data.passthrough import passthrough_schema
from saev_core.data.subsets import SUBSET_COLUMNS, SubsetWriter, subset_name
from saev_core.data.validation import validate_quarantine, validate_run, validate_scores
from saev_core.data.selection import keep_sets, top_percent_within
from saev_core.pipeline.results import IngestSummary

log = logging.getLogger(__name__)


def published_scores(scores: pa.Table, method: str) -> pa.Table:
    """The run's scores as published: the chosen method's column is `score` (the published schema,
    which the subsets, the report and later runs read); every other method keeps its name."""
    return scores.rename_columns(["score" if c == method else c for c in scores.column_names])


def gate_scores(scores: pa.Table, expected_rows: int, rows_in: int, quarantined: int, max_rate: float) -> dict:
    """The first gate, before anything is published: scores complete, unique and finite."""
    result = validate_scores(scores, expected_rows)
    result = type(result).combine(result, validate_quarantine(rows_in, quarantined, max_rate, kept=expected_rows))
    if not result.success:
        raise ValidationFailed(result)
    return result.to_dict()


def publish_outputs(run: str, scores: pa.Table, record_uris: Sequence[str], quarantine_uri: str,
                    keep_percents: Sequence[int], ingest_summary: IngestSummary, max_rate: float,
                    storage_options: dict | None, groups: Sequence | None = None) -> dict:
    """Write scores, quarantine and subsets, validate them as written, and write validation.json.
    With `groups` (one label per score row) each subset is the top p% within each group."""
    publish.ensure_unpublished(run, storage_options)
    publish.write_scores(run, scores, storage_options)
    with storage.open_input(quarantine_uri, storage_options) as fh:
        publish.write_quarantine(run, pq.read_table(fh), storage_options)
    passthrough = passthrough_schema(
        (read_record_shard(u, storage_options, columns=["sample_id", "extra"]) for u in record_uris),
        reserved=SUBSET_COLUMNS)
    ids, vals = scores.column("sample_id").to_pylist(), scores.column("score").to_pylist()
    if groups is None:
        chosen = keep_sets(ids, vals, keep_percents)
    else:
        chosen = {p: {ids[i]: vals[i] for i in top_percent_within(ids, vals, groups, p)} for p in keep_percents}
    subsets = {}
    for p, picked in chosen.items():
        with SubsetWriter(run, p, storage_options, passthrough=passthrough) as writer:
            for uri in record_uris:
                writer.write_records(read_record_shard(uri, storage_options), picked)
        subsets[subset_name(p)] = {"rows": writer.rows, "min_score": min(picked.values()) if picked else None,
                                   "files": len(writer.files)}
        log.info("subset %s: %d rows", subset_name(p), writer.rows)
    result = validate_run(run, expected_rows=scores.num_rows, rows_in=ingest_summary.rows_in,
                          quarantined=ingest_summary.quarantined, max_quarantine_rate=max_rate,
                          keep_percents=list(keep_percents) if groups is None else (),
                          expected_subset_rows=None if groups is None else
                          {subset_name(p): len(chosen[p]) for p in keep_percents},
                          kept=ingest_summary.kept,
                          storage_options=storage_options)
    publish.write_validation(run, result, storage_options)
    if not result.success:
        raise ValidationFailed(result)
    return {"subsets": subsets, "validation": {"success": True, "n_expectations": len(result.expectations)}}


def write_report(run: str, html: str, storage_options: dict | None) -> str:
    uri = storage.join(run, "report.html")
    storage.write_bytes(uri, html.encode(), storage_options)
    return uri
