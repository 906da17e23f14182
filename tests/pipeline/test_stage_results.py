"""Typed stage results and one name per score column (issue 23): the ingest stage hands on an
`IngestSummary`, the assembled scores keep each method's column under its own name up to the
published file, and the canary and detection tables are formatted in one place."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saev_core.pipeline.publish_stage import published_scores
from saev_core.pipeline.report_samples import uncached_report_samples
from saev_core.pipeline.results import CacheBuild, IngestSummary
from saev_core.pipeline.run_tables import canary_lines, detection_lines
from saev_core.pipeline.score_stages import assemble_scores
from saev_core.pipeline.specs import DatasetSpec
from saev_core.pipeline.stages import ingest_once
from saev_core.toyworld.generator import write_preference_dataset


@pytest.fixture(scope="module")
def ingested(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    data = write_preference_dataset(root / "toy", 12, corruption_rate=0.3, seed=3)
    summary = ingest_once(DatasetSpec(uri=str(data["parquet"]), shard_rows=5), str(data["parquet"]),
                          str(root / "work"), None, None)
    return root, summary, str(data["parquet"])


def test_the_ingest_stage_hands_on_a_typed_summary_and_reuses_it(ingested):
    root, summary, data = ingested
    assert isinstance(summary, IngestSummary)
    assert (summary.rows_in, summary.kept, len(summary.record_uris)) == (12, 12, 3)
    assert summary.counts() == {"rows_in": 12, "kept": 12, "quarantined": 0, "by_reason": {}}
    again = ingest_once(DatasetSpec(uri=data, shard_rows=5), data, str(root / "work"), None, None)
    assert again == summary  # read back from ingest.json: the same typed summary


def test_an_ingest_made_by_other_ingest_code_is_not_reused(ingested, monkeypatch):
    """A fix in saev_core/data (how rows are read or quarantined) must reach a work folder that
    holds an ingest of the same files: the ingest code's hash is part of the reuse key."""
    from saev_core.pipeline import stages

    root, summary, data = ingested
    monkeypatch.setattr(stages, "package_hash", lambda package: "other-ingest-code")
    redone = ingest_once(DatasetSpec(uri=data, shard_rows=5), data, str(root / "work"), None, None)
    assert redone.counts() == summary.counts()
    assert set(redone.record_uris).isdisjoint(summary.record_uris)  # written anew, in another folder


def test_a_method_keeps_its_column_name_up_to_the_published_file(ingested):
    root, summary, _ = ingested
    uris = []
    for i, uri in enumerate(summary.record_uris):
        ids = pq.read_table(uri, columns=["sample_id"]).column("sample_id").to_pylist()
        t = pa.table({"sample_id": ids, "l0": [float(len(s)) for s in ids], "reference": [0.5 + i] * len(ids)})
        uris.append(str(root / f"scores-{i}.parquet"))
        pq.write_table(t, uris[-1])
    scores = assemble_scores(uris, summary.record_uris, "reference", None)
    assert scores.column_names[:4] == ["sample_id", "reference", "row_index", "l0"]
    published = published_scores(scores, "reference")
    assert published.column_names[:4] == ["sample_id", "score", "row_index", "l0"]  # the published schema
    assert published.column("score").to_pylist() == scores.column("reference").to_pylist()
    by = sorted(zip(scores.column("reference").to_pylist(), scores.column("sample_id").to_pylist()))
    assert uncached_report_samples(scores, "reference") == [s for _, s in by[:6]]  # the report's six, lowest first
    assert uncached_report_samples(scores, "reference", cached=lambda s: True) == []


def test_the_canary_and_detection_tables_are_formatted_once():
    rows = [{"method": "reference", "kind": "image_swap", "paired_win_rate": 0.8125},
            {"method": "reference", "kind": "flipped", "paired_win_rate": float("nan")},
            {"method": "l0", "kind": "image_swap", "paired_win_rate": 0.5}]
    assert canary_lines(rows) == ["| method | flipped | image_swap |", "|---|---|---|",
                                  "| reference | - | 0.812 |", "| l0 | - | 0.500 |"]
    assert detection_lines({"reference": {"overall": 0.91, "swap": 0.7}}) == [
        "| method | overall | swap |", "|---|---|---|", "| reference | 0.910 | 0.700 |"]


def test_cache_build_reads_as_a_mapping_for_prefect():
    """Prefect walks a result as a mapping (`dict(model)`): no field may hide a dict method."""
    c = CacheBuild(sample_keys=["a", None], record_keys=["a", "b"], computed=1, reused=0, samples=3, rows=5)
    assert dict(c)["sample_keys"] == ["a", None] and c.cached_keys == ["a"]
