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


def _params(model_dir, work, output, run_id, output_extra=None, validation=None, **scoring):
    # a random tiny model cannot rank anything: the ranking gate is opened unless a test sets it
    return CurateParams.model_validate({
        "dataset": {"uri": "toy://rlaif-v", "toy_samples": 60, "shard_rows": 25},
        "model": {"model_id": model_dir, "layer": 1, "device": "cpu", "batch_size": 16},
        "sae": {"steps": 120, "batch_size": 256, "expansion_factor": 4, "lr": 1e-3},
        "scoring": {"weights": {"weight_samples": 40}, "canaries": {"min_count": 12}, **scoring},
        "output": {"uri": output, "work_uri": str(work), "run_id": run_id, "keep_percents": [25, 50],
                   **(output_extra or {})},
        "validation": validation or {"max_tie_share": 1.0, "min_cross_modal_features": 0},
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
    assert "0 computed, 3 reused" in stage["activations"]  # 3 real shards; canaries are never cached
    assert stage["sae"].startswith("loaded")
    assert storage.read_bytes(f"{output}/toy-rlaif-v/second/scores.parquet", so) == \
        storage.read_bytes(f"{run}/scores.parquet", so)

    # a published run is never overwritten
    with pytest.raises(Exception, match="already"):
        curate(p2)


def test_validation_failure_publishes_nothing(prefect_harness, model_dir, tmp_path, monkeypatch):
    """A planted NaN score fails the GX gate: the flow fails naming the expectation, no manifest."""
    import math

    import saev_core.pipeline.score_stages as stages_mod
    from flows.curate import curate
    from saev_core.data.gx_results import ValidationFailed

    from saev_core.data.canaries import is_canary_id

    real = stages_mod.score_all
    planted = {"done": False}

    def with_nan(stats, *a, **k):
        out = real(stats, *a, **k)
        if not planted["done"] and not is_canary_id(stats.sample_id):  # canary shards are scored alongside
            planted["done"] = True
            out = {m: (math.nan if i == 0 else v) for i, (m, v) in enumerate(out.items())}
        return out

    monkeypatch.setattr(stages_mod, "score_all", with_nan)
    p = _params(model_dir, tmp_path / "work", str(tmp_path / "out"), "nan", score={"seed": 12345})  # fresh scoring cache key
    with pytest.raises(ValidationFailed, match=r"scores\.score_(not_null|finite)"):
        curate(p)
    run = tmp_path / "out" / "toy-rlaif-v" / "nan"
    assert not (run / "manifest.json").exists()
    assert not (run / "subsets").exists()


def test_canaries_are_scored_never_trained_on_weighted_or_published(prefect_harness, model_dir, tmp_path):
    """Checked on the written files: canaries.parquet, scores, subsets, and the activation shards
    the SAE and the weights were computed from."""
    import pyarrow.parquet as pq

    from flows.curate import curate
    from saev_core.data.canaries import KINDS, is_canary_id
    from saev_core.data.selection import n_keep, prompt_clusters

    out = tmp_path / "out"
    p = _params(model_dir, tmp_path / "work", str(out), "can", output_extra={"stratify_by": "prompt_clusters",
                                                                            "stratify_clusters": 3},
                baselines=["cooccur_l0", "null_z_cooccur", "logp_margin"])
    result = curate(p)
    run = out / "toy-rlaif-v" / "can"
    manifest = json.loads((run / "manifest.json").read_text())
    canaries = pq.read_table(run / "canaries.parquet").to_pylist()
    assert len(canaries) == 12 and {c["kind"] for c in canaries} == set(KINDS)
    assert all(is_canary_id(c["canary_id"]) and not is_canary_id(c["source_id"]) for c in canaries)
    for col in ("reference", "cooccur_l0", "null_z_cooccur", "logp_margin", "source_reference"):
        assert all(c[col] is not None for c in canaries), col
    # never published
    scores = pq.read_table(run / "scores.parquet")
    real = set(scores.column("sample_id").to_pylist())
    assert not any(is_canary_id(s) for s in real) and {c["source_id"] for c in canaries} <= real
    for f in (run / "subsets").rglob("*.parquet"):
        assert not any(is_canary_id(s) for s in pq.read_table(f, columns=["sample_id"]).column(0).to_pylist())
    # never in SAE training or weight estimation: no activation shard holds a canary (they are
    # scored by the fused pass, never cached), and the SAE and weights read activation shards only
    from pathlib import Path

    from saev_core.model.activation_cache import CacheSpec

    cache = Path(manifest["work_uri"]) / "activations" / CacheSpec(**manifest["cache"]).key()
    cached = {f.name.removesuffix(".index.parquet"): pq.read_table(f).column("sample_id").to_pylist()
              for f in cache.glob("*.index.parquet")}
    used = set(manifest["sae"]["train_shards"]) | set(manifest["scoring"]["weight_shards"])
    assert used and used <= set(cached)
    assert not any(is_canary_id(s) for ids in cached.values() for s in ids)
    assert len(manifest["canaries"]["canary_shards"]) == 1  # the record shard of the 12 canaries
    # the table: in the manifest, the report and the flow's result
    rows = manifest["canaries"]["table"]
    assert {(r["method"], r["kind"]) for r in rows} == {(m, k) for m in ("reference", "cooccur_l0", "null_z_cooccur",
                                                                         "logp_margin") for k in KINDS}
    assert rows == result["canaries"] and "Canaries" in (run / "report.html").read_text()
    flipped = [c for c in canaries if c["kind"] == "flipped"]
    # chosen and rejected exchanged, through the same log-prob pass: the margin changes sign
    assert [c["logp_margin"] for c in flipped] == pytest.approx([-c["source_logp_margin"] for c in flipped],
                                                                rel=1e-4, abs=1e-6)
    # stratified: each subset is the top p% within each prompt cluster
    prompts = {}
    for f in sorted((tmp_path / "work" / "ingest").rglob("shard-*.parquet")):
        t = pq.read_table(f, columns=["sample_id", "prompt"])
        prompts.update(zip(t.column(0).to_pylist(), t.column(1).to_pylist()))
    ids = scores.column("sample_id").to_pylist()
    groups = prompt_clusters([prompts[i] for i in ids], 3, 0)
    sub = {r for f in (run / "subsets" / "top-50").glob("*.parquet")
           for r in pq.read_table(f, columns=["sample_id"]).column(0).to_pylist()}
    assert len(sub) == sum(n_keep(groups.count(g), 50) for g in set(groups))

    # the gate: a score that ties (length of templated toy prompts) fails, and nothing is published
    from tasks.canary_tasks import RankingGateFailed

    bad = _params(model_dir, tmp_path / "work", str(out), "ties", method="length",
                  validation={"max_tie_share": 0.05, "min_cross_modal_features": 0})
    with pytest.raises(RankingGateFailed, match="picked by sample_id order from a tie"):
        curate(bad)
    assert not (out / "toy-rlaif-v" / "ties" / "manifest.json").exists()
    assert not (out / "toy-rlaif-v" / "ties" / "subsets").exists()
