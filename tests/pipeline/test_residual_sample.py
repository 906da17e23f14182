"""Residuals are cached only for the samples the SAE and the weights read; every other sample is
scored by the fused pass. Unit tests of the draw, then the flow end to end: a run that caches a
sample publishes the same SAE-only scores as a run that caches everything (same SAE), and its
interpretability report captures the uncached samples it shows."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from flows.params import CurateParams
from saev_core.pipeline.residual_sample import ResidualSample, with_margin
from saev_core.pipeline.specs import SAESpec, WeightsSpec
from tiny_mllms import build_llava


def test_plan_caches_what_the_sae_and_the_weights_need():
    w = WeightsSpec(weight_samples=1000)
    assert ResidualSample.plan(SAESpec(), w, 83_000).everything  # training on every sample: cache all
    trained = ResidualSample.plan(SAESpec(train_samples=20_000), w, 83_000)
    assert trained.needed == 20_000 and trained.fraction == pytest.approx(with_margin(20_000) / 83_000)
    given = ResidualSample.plan(SAESpec(checkpoint="s3://b/sae", train_samples=20_000), w, 83_000)
    assert given.needed == 1000 and given.fraction == pytest.approx(with_margin(1000) / 83_000)
    assert ResidualSample.plan(SAESpec(checkpoint="x"), w, 500).everything  # more needed than there is
    assert with_margin(100) == 140  # four standard deviations of the binomial draw
    with pytest.raises(ValueError, match="fraction"):
        ResidualSample(0.0)


def test_draw_is_seeded_spread_and_near_its_fraction():
    ids = [f"sample-{i}" for i in range(20_000)]
    s = ResidualSample(0.1, seed=3)
    kept = [i for i in ids if s.keeps(i)]
    assert kept == [i for i in ids if ResidualSample(0.1, seed=3).keeps(i)]  # same seed, same rows
    assert kept != [i for i in ids if ResidualSample(0.1, seed=4).keeps(i)]
    assert abs(len(kept) - 2000) < 4 * (20_000 * 0.1 * 0.9) ** 0.5
    # spread over the dataset, not its first shards: every block of 2,000 ids keeps about 10%
    for lo in range(0, 20_000, 2000):
        assert 120 < sum(s.keeps(i) for i in ids[lo:lo + 2000]) < 280


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_llava(tmp_path_factory.mktemp("model")))


def _params(model_dir, work, output, run_id, **sae):
    return CurateParams.model_validate({
        "dataset": {"uri": "toy://rlaif-v", "toy_samples": 60, "shard_rows": 25},
        "model": {"model_id": model_dir, "layer": 1, "device": "cpu", "batch_size": 16},
        "sae": {"steps": 120, "batch_size": 256, "expansion_factor": 4, "lr": 1e-3, **sae},
        "scoring": {"weights": {"weight_samples": 8}, "baselines": ["l0", "raw_cosine", "length"],
                    "canaries": {"min_count": 12}},
        "output": {"uri": output, "work_uri": str(work), "run_id": run_id, "keep_percents": [50]},
        "validation": {"max_tie_share": 1.0, "min_cross_modal_features": 0},
    })


def test_sampled_cache_scores_like_the_full_cache(prefect_harness, model_dir, tmp_path):
    from flows.curate import curate
    from saev_core.data.canaries import is_canary_id
    from saev_core.model.activation_cache import CacheSpec

    out, work = tmp_path / "out", tmp_path / "work"
    full = curate(_params(model_dir, tmp_path / "work-full", str(out), "full"))  # trains on every sample
    m_full = json.loads((out / "toy-rlaif-v" / "full" / "manifest.json").read_text())
    assert m_full["residual_sample"]["fraction"] == 1
    # the same SAE as a checkpoint, a fresh work folder: only the weight subset (8 samples, plus
    # a margin of 4 standard deviations of the draw) is cached
    part = curate(_params(model_dir, work, str(out), "part", checkpoint=full["sae"]))
    run = out / "toy-rlaif-v" / "part"
    m = json.loads((run / "manifest.json").read_text())
    kept = m["counts"]["kept"]
    assert m["residual_sample"]["fraction"] == pytest.approx(with_margin(8) / kept)

    cache = Path(m["work_uri"]) / "activations" / CacheSpec(**m["cache"]).key()
    cached = [s for k in m["cache_shards"] if k for s in pq.read_table(cache / f"{k}.index.parquet")
              .column("sample_id").to_pylist()]
    sample = ResidualSample(**m["residual_sample"])
    assert 0 < len(cached) < kept / 2 and all(sample.keeps(s) for s in cached)
    assert not any(is_canary_id(s) for s in cached)
    stage = {s["stage"]: s["detail"] for s in part["stages"]}
    assert stage["activations"].startswith(f"{len(cached)} of {kept} samples")
    # statistics, not residuals, for the shards scored by the fused pass (3 real + 1 canary shard)
    assert len(list((work / "stats").rglob("*.safetensors"))) == 4

    # every kept sample scored; the columns that depend only on the SAE and the residuals are
    # exactly the full cache's (the weight-based ones differ: other weight samples, other delta)
    a = {r["sample_id"]: r for r in pq.read_table(out / "toy-rlaif-v" / "full" / "scores.parquet").to_pylist()}
    b = {r["sample_id"]: r for r in pq.read_table(run / "scores.parquet").to_pylist()}
    assert set(a) == set(b) and len(b) == kept
    for col in ("l0", "raw_cosine", "n_positions", "n_image_positions", "truncated_tokens"):
        assert [b[s][col] for s in sorted(b)] == [a[s][col] for s in sorted(a)], col
    canaries = pq.read_table(run / "canaries.parquet")
    assert canaries.num_rows == 12 and None not in canaries.column("reference").to_pylist()

    # the interpretability report explains the lowest-scored samples: those outside the residual
    # sample were captured by a device task into a small shard of their own
    assert m["interp_report"] == "interp/index.html" and (run / "interp" / "index.html").exists()
    lowest = [r["sample_id"] for r in sorted(b.values(), key=lambda r: (r["score"], r["sample_id"]))[:6]]
    outside = [s for s in lowest if s not in cached]
    assert outside and len(m["report_shards"]) == 1
    assert pq.read_table(cache / f"{m['report_shards'][0]}.index.parquet").column("sample_id").to_pylist() == outside
    html = (run / "interp" / "index.html").read_text()
    assert all(s[:12] in html for s in lowest)

    # `explain` on a sample in neither captures it with the run's model: the full run's residuals
    from saev_core.pipeline.run_sources import RunSources
    from saev_core.model.activation_cache import ActivationCache

    src = RunSources.from_run(str(run))
    other = next(s for s in sorted(b) if s not in cached and s not in outside)
    rec = src.records([other])[other]
    assert rec["shard_key"] is None
    acts, is_image = src.activations(other, rec)
    full_cache = ActivationCache(str(tmp_path / "work-full" / "activations"), CacheSpec(**m["cache"]))
    full_keys = [k for k in json.loads((out / "toy-rlaif-v" / "full" / "manifest.json").read_text())["cache_shards"]]
    ref = {sid: (a, i) for k in full_keys for sid, a, i in full_cache.iter_samples(k)}[other]
    assert torch.equal(is_image, ref[1])
    torch.testing.assert_close(acts, ref[0], atol=1e-4, rtol=1e-4)  # alone vs batched: padding only
