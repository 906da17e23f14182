"""The curate flow end to end under a Prefect test harness, publishing to a real S3 server
(moto in server mode on loopback)."""

import json

import pytest

from flows.params import CurateParams
from saev_core.data import publish
from saev_core.data import storage
from tiny_mllms import build_llava


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_llava(tmp_path_factory.mktemp("model")))


def _params(model_dir, work, output, run_id, **scoring):
    return CurateParams.model_validate({
        "dataset": {"uri": "toy://rlaif-v", "toy_samples": 60, "shard_rows": 25},
        "model": {"model_id": model_dir, "layer": 1, "device": "cpu", "batch_size": 16},
        "sae": {"steps": 120, "batch_size": 256, "expansion_factor": 4, "lr": 1e-3},
        "scoring": {"weight_samples": 40, **scoring},
        "output": {"uri": output, "work_uri": str(work), "run_id": run_id, "keep_percents": [25, 50]},
    })


def test_flow_publishes_to_s3_and_reruns_from_cache(prefect_harness, s3_bucket, model_dir, tmp_path, monkeypatch):
    import datasets
    from PIL import Image

    from flows.curate import curate

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    output = s3_bucket.uri("curated")
    p = _params(model_dir, tmp_path / "work", output, "first")
    p.storage.endpoint_url = s3_bucket.endpoint_url
    first = curate(p)
    run = first["run"]
    so = s3_bucket.storage_options
    assert run == f"{output}/toy-rlaif-v/first"
    assert publish.is_complete(run, so)
    manifest = publish.read_manifest(run, so)
    assert manifest["counts"]["rows_in"] == 60 and manifest["counts"]["scored"] == 60 - manifest["counts"]["quarantined"]
    assert manifest["validation"]["success"] and manifest["subsets"]["top-25"]["rows"] == 15
    assert "testing" not in json.dumps(manifest)  # credentials never reach the manifest
    for name in ("scores.parquet", "quarantine.parquet", "validation.json", "report.html"):
        assert storage.exists(storage.join(run, name), so), name

    ds = datasets.load_dataset("parquet", data_files=f"{run}/subsets/top-50/*.parquet",
                               storage_options=dict(so), split="train")
    assert ds.num_rows == 30 and set(ds.column_names) >= {"prompt", "chosen", "rejected", "images"}
    assert isinstance(ds[0]["images"][0], Image.Image)
    # the subset holds the 30 best-scored samples
    scores = publish.read_scores(run, so).to_pylist()
    best = sorted(scores, key=lambda r: (-r["score"], r["sample_id"]))[:30]
    assert set(ds["sample_id"]) == {r["sample_id"] for r in best}

    # a rerun reuses the activation cache and the SAE, and gives byte-identical scores
    p2 = _params(model_dir, tmp_path / "work", output, "second")
    p2.storage.endpoint_url = s3_bucket.endpoint_url
    second = curate(p2)
    assert second["sae"] == first["sae"]
    stage = {s["stage"]: s["detail"] for s in second["stages"]}
    assert "0 computed, 3 reused" in stage["activations"]
    assert stage["sae"].startswith("loaded")
    assert storage.read_bytes(f"{output}/toy-rlaif-v/second/scores.parquet", so) == \
        storage.read_bytes(f"{run}/scores.parquet", so)

    # a published run is never overwritten
    with pytest.raises(Exception, match="already"):
        curate(p2)


def test_validation_failure_publishes_nothing(prefect_harness, model_dir, tmp_path, monkeypatch):
    """A planted NaN score fails the GX gate: the flow fails naming the expectation, no manifest."""
    import math

    import saev_core.pipeline.stages as stages_mod
    from flows.curate import curate
    from saev_core.data.validation import ValidationFailed

    real = stages_mod.score_all
    planted = {"done": False}

    def with_nan(*a, **k):
        out = real(*a, **k)
        if not planted["done"]:
            planted["done"] = True
            out = {m: (math.nan if i == 0 else v) for i, (m, v) in enumerate(out.items())}
        return out

    monkeypatch.setattr(stages_mod, "score_all", with_nan)
    p = _params(model_dir, tmp_path / "work", str(tmp_path / "out"), "nan", seed=12345)  # fresh scoring cache key
    with pytest.raises(ValidationFailed, match=r"scores\.score_(not_null|finite)"):
        curate(p)
    run = tmp_path / "out" / "toy-rlaif-v" / "nan"
    assert not (run / "manifest.json").exists()
    assert not (run / "subsets").exists()
