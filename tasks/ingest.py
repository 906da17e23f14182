"""The ingest task: any source (after its scheme's reader, e.g. toy://) into canonical shards."""

from __future__ import annotations

from prefect import get_run_logger, task

from saev_core.pipeline.results import IngestSummary
from saev_core.pipeline.specs import DatasetSpec
from saev_core.pipeline.sources import ResolvedSource, resolve_dataset
from saev_core.pipeline.stages import ingest_once

from .common import retry_unless_permanent

TRANSIENT_RETRIES = dict(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=retry_unless_permanent)


@task(name="resolve-dataset")
def resolve_source(dataset: DatasetSpec, work_uri: str) -> ResolvedSource:
    """Build the dataset first when its URI scheme has a reader (toy://); else read it as it is."""
    return resolve_dataset(dataset, work_uri)


@task(name="ingest", **TRANSIENT_RETRIES)
def ingest(dataset: DatasetSpec, source: str, work_uri: str, source_options: dict | None,
           work_options: dict | None) -> IngestSummary:
    """Canonical record shards + quarantine under the work folder; a finished ingest is reused."""
    logger = get_run_logger()

    def progress(shard):
        logger.info("ingested shard %d: %d records, %d quarantined", shard.index, shard.records.num_rows,
                    shard.quarantine.num_rows)

    summary = ingest_once(dataset, source, work_uri, source_options, work_options, progress)
    logger.info("ingest: %s %s", summary.describe(), summary.by_reason)
    return summary
