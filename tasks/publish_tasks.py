"""Assemble scores, validate (Great Expectations gate), and publish the run folder."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import get_run_logger, task

from saev_core.data import publish
from saev_core.data import storage
from saev_core.data.ingest import read_record_shard
from saev_core.sae.selection import n_keep, ranked
from saev_core.data.validation import ValidationFailed, validate_quarantine, validate_run, validate_scores

from .common import retry_unless_permanent

RETRY = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_permanent)


@task(name="assemble-scores")
def assemble_scores(score_uris: list[str], record_uris: list[str], method: str, options: dict | None) -> pa.Table:
    """One table: sample_id, score (the chosen method), row_index, then every other column.
    Sorted by sample_id so that reruns produce byte-identical files."""
    parts = [pq.read_table(io.BytesIO(storage.read_bytes(u, options))) for u in score_uris]
    table = pa.concat_tables(parts) if parts else pa.table({"sample_id": pa.array([], pa.string()),
                                                             method: pa.array([], pa.float64())})
    rows = pa.concat_tables([read_record_shard(u, options, columns=["sample_id", "row_index"]) for u in record_uris])
    row_of = dict(zip(rows.column("sample_id").to_pylist(), rows.column("row_index").to_pylist()))
    table = table.append_column("row_index", pa.array([row_of.get(s) for s in table.column("sample_id").to_pylist()],
                                                       pa.int64()))
    others = [c for c in table.column_names if c not in ("sample_id", method, "row_index")]
    table = table.select(["sample_id", method, "row_index", *others]).rename_columns(
        ["sample_id", "score", "row_index", *others])
    return table.sort_by("sample_id")


@task(name="validate-scores")
def gate_scores(scores: pa.Table, expected_rows: int, rows_in: int, quarantined: int, max_rate: float) -> dict:
    """The first gate, before anything is published: scores complete, unique and finite."""
    result = validate_scores(scores, expected_rows)
    result = type(result).combine(result, validate_quarantine(rows_in, quarantined, max_rate,
                                                              kept=expected_rows))
    if not result.success:
        raise ValidationFailed(result)
    return result.to_dict()


def selection(scores: pa.Table, keep_percents: list[int]) -> dict[int, dict[str, float]]:
    ids = scores.column("sample_id").to_pylist()
    vals = scores.column("score").to_pylist()
    order = ranked(ids, vals)
    return {p: {ids[i]: vals[i] for i in order[: n_keep(len(ids), p)]} for p in keep_percents}


@task(name="publish-run", **RETRY)
def publish_run(run: str, scores: pa.Table, record_uris: list[str], quarantine_uri: str, keep_percents: list[int],
                ingest_summary: dict, max_rate: float, options: dict | None) -> dict:
    """Write scores, quarantine and subsets, validate them as written, and write validation.json.
    The manifest is NOT written here: only after the report, by `write_manifest`."""
    logger = get_run_logger()
    publish.ensure_unpublished(run, options)
    publish.write_scores(run, scores, options)
    with storage.open_input(quarantine_uri, options) as fh:
        publish.write_quarantine(run, pq.read_table(fh), options)
    chosen = selection(scores, keep_percents)
    subsets = {}
    for p, picked in chosen.items():
        with publish.SubsetWriter(run, p, options) as writer:
            for uri in record_uris:
                writer.write_records(read_record_shard(uri, options), picked)
        subsets[publish.subset_name(p)] = {"rows": writer.rows, "min_score": min(picked.values()) if picked else None,
                                           "files": len(writer.files)}
        logger.info("subset %s: %d rows", publish.subset_name(p), writer.rows)
    result = validate_run(run, expected_rows=scores.num_rows, rows_in=ingest_summary["rows_in"],
                          quarantined=ingest_summary["quarantined"], max_quarantine_rate=max_rate,
                          keep_percents=keep_percents, kept=ingest_summary["kept"], storage_options=options)
    publish.write_validation(run, result, options)
    if not result.success:
        raise ValidationFailed(result)
    return {"subsets": subsets, "validation": {"success": True, "n_expectations": len(result.expectations)}}


@task(name="write-report")
def write_report(run: str, html: str, options: dict | None) -> str:
    uri = storage.join(run, "report.html")
    storage.write_bytes(uri, html.encode(), options)
    return uri


@task(name="write-manifest")
def write_manifest(run: str, manifest: dict, options: dict | None) -> str:
    return publish.write_manifest(run, manifest, options)


def examples(scores: pa.Table, record_uris: list[str], options: dict | None, n: int = 6) -> tuple[list, list]:
    """The n lowest- and n highest-scored samples with their images, for the report."""
    ids = scores.column("sample_id").to_pylist()
    vals = scores.column("score").to_pylist()
    order = ranked(ids, vals)
    want = {ids[i]: vals[i] for i in order[:n] + order[-n:]}
    found = {}
    for uri in record_uris:
        t = read_record_shard(uri, options, columns=["sample_id", "prompt", "image", "chosen", "rejected"])
        t = t.filter(pc.is_in(t.column("sample_id"), pa.array(list(want))))
        for r in t.to_pylist():
            found[r["sample_id"]] = {**r, "score": want[r["sample_id"]]}
    # `order` is best first
    high = [found[ids[i]] for i in order[:n] if ids[i] in found]
    low = [found[ids[i]] for i in order[::-1][:n] if ids[i] in found]
    return low, high
