"""Assemble scores, validate (Great Expectations gate), and publish the run folder."""

from __future__ import annotations

import pyarrow as pa
from prefect import task

from saev_core.data import publish
from saev_core.pipeline import publish_stage, score_stages
from saev_core.pipeline.results import IngestSummary

from .common import RETRY


@task(name="assemble-scores")
def assemble_scores(score_uris: list[str], record_uris: list[str], method: str, options: dict | None) -> pa.Table:
    return score_stages.assemble_scores(score_uris, record_uris, method, options)


@task(name="validate-scores")
def gate_scores(scores: pa.Table, expected_rows: int, rows_in: int, quarantined: int, max_rate: float) -> dict:
    return publish_stage.gate_scores(scores, expected_rows, rows_in, quarantined, max_rate)


@task(name="publish-run", **RETRY)
def publish_run(run: str, scores: pa.Table, record_uris: list[str], quarantine_uri: str, keep_percents: list[int],
                ingest_summary: IngestSummary, max_rate: float, options: dict | None, groups: list | None = None) -> dict:
    """Scores, quarantine, subsets and validation.json; the manifest comes later (`write_manifest`)."""
    return publish_stage.publish_outputs(run, scores, record_uris, quarantine_uri, keep_percents, ingest_summary,
                                      max_rate, options, groups)


@task(name="write-report")
def write_report(run: str, html: str, options: dict | None) -> str:
    return publish_stage.write_report(run, html, options)


@task(name="write-manifest")
def write_manifest(run: str, manifest: dict, options: dict | None) -> str:
    return publish.write_manifest(run, manifest, options)
