"""The Great Expectations gate: passing tables, planted failures named in the error."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from saev_core.data import publish
from saev_core.data import subsets
from saev_core.data import validation
from saev_core.data.gx_results import ValidationFailed, ValidationResult, raise_if_failed
from saev_core.data.records import CanonicalRecord, records_to_table


def scores_frame(n=8):
    return pd.DataFrame({"sample_id": [f"{i:032x}" for i in range(n)], "score": np.linspace(-2, 5, n)})


def test_scores_pass_and_serialise():
    res = validation.validate_scores(scores_frame(), expected_rows=8)
    assert res.success, res.failed_names
    names = [e.name for e in res.expectations]
    assert names == [
        "scores.required_columns",
        "scores.row_count",
        "scores.sample_id_not_null",
        "scores.sample_id_unique",
        "scores.score_not_null",
        "scores.score_finite",
    ]
    assert res["scores.row_count"].observed["observed_value"] == 8
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert d["success"] is True and d["failed"] == []
    assert ValidationResult.from_dict(d).success
    raise_if_failed(res)


def test_planted_nan_fails_naming_the_expectation():
    df = scores_frame()
    df.loc[3, "score"] = np.nan
    res = validation.validate_scores(df, expected_rows=8)
    assert not res.success and res.failed_names == ["scores.score_not_null"]
    with pytest.raises(ValidationFailed) as err:
        raise_if_failed(res)
    assert "scores.score_not_null" in str(err.value)
    assert "expect_column_values_to_not_be_null" in str(err.value)
    json.dumps(res.to_dict(), allow_nan=False)  # NaN observed values are made JSON-safe


def test_other_score_failures():
    df = scores_frame()
    df.loc[1, "score"] = np.inf
    df.loc[2, "sample_id"] = df.loc[0, "sample_id"]
    res = validation.validate_scores(pa.Table.from_pandas(df), expected_rows=9)
    assert set(res.failed_names) == {"scores.score_finite", "scores.sample_id_unique", "scores.row_count"}
    res = validation.validate_scores(df.drop(columns=["score"]), expected_rows=8)
    assert "scores.required_columns" in res.failed_names
    assert res["scores.score_not_null"].error  # the missing column is reported, not crashed on


def test_quarantine_rate():
    assert validation.validate_quarantine(100, 5, 0.1, kept=95).success
    res = validation.validate_quarantine(100, 30, 0.1, kept=70)
    assert res.failed_names == ["quarantine.rate"]
    res = validation.validate_quarantine(100, 5, 0.1, kept=90)
    assert res.failed_names == ["quarantine.counts_balance"]


def _png(i):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (i * 30 % 256, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def run_dir(tmp_path):
    n = 10
    recs = records_to_table(CanonicalRecord.build(i, f"q{i}", _png(i), f"c{i}", f"r{i}") for i in range(n))
    ids = recs.column("sample_id").to_pylist()
    run = publish.run_uri(str(tmp_path), "toy", "v1")
    publish.write_scores(run, {"sample_id": ids, "score": [float(i) for i in range(n)]})
    return run, recs, ids


def test_run_passes_and_wrong_subset_size_fails(run_dir):
    run, recs, ids = run_dir
    top = {ids[i]: float(i) for i in range(5, 10)}  # n_keep(10, 50) == 5
    subsets.write_subset(run, 50, [recs], top)
    ok = validation.validate_run(run, expected_rows=10, keep_percents=[50], rows_in=12, quarantined=2, max_quarantine_rate=0.5)
    assert ok.success, [e.describe() for e in ok.failures]
    assert "subset[top-50].hf_image_features" in [e.name for e in ok.expectations]

    four = {ids[i]: float(i) for i in range(6, 10)}
    subsets.write_subset(run, 40, [recs], four)  # 4 rows where top-40 of 10 means 4: fine...
    bad = validation.validate_run(
        run, expected_rows=10, keep_percents=[50], expected_subset_rows={"top-40": 5},
        rows_in=12, quarantined=2, max_quarantine_rate=0.5,
    )
    assert bad.failed_names == ["subset[top-40].row_count"]
    with pytest.raises(ValidationFailed, match=r"subset\[top-40\]\.row_count"):
        raise_if_failed(bad)
    missing = validation.validate_run(run, expected_rows=10, keep_percents=[30], rows_in=10, quarantined=0, max_quarantine_rate=0.1)
    assert missing.failed_names == ["subset[top-30].exists"]


def test_subset_foreign_ids_and_plain_parquet_fail(run_dir, tmp_path):
    run, recs, ids = run_dir
    # written with plain pyarrow: no huggingface metadata, and an id that is not in the scores
    rows = [
        {"prompt": "p", "chosen": "c", "rejected": "r", "images": [{"bytes": _png(1), "path": None}], "sample_id": ids[0], "score": 1.0},
        {"prompt": "p", "chosen": "c", "rejected": "r", "images": [{"bytes": _png(2), "path": None}], "sample_id": "f" * 32, "score": 2.0},
    ]
    path = tmp_path / "plain" / "part-00000.parquet"
    path.parent.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), path)
    res = validation.validate_subset(str(path.parent), 2, ids, name="top-20")
    assert set(res.failed_names) == {"subset[top-20].sample_ids_in_scores", "subset[top-20].hf_image_features"}
    msg = str(ValidationFailed(res))
    assert "sample_ids_in_scores" in msg and "hf_image_features" in msg
