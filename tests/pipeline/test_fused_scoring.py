"""The fused scoring pass (forward -> SAE encode -> per-sample statistics, no residuals stored)
gives exactly the scores of the cached path on the toy world, through the statistics store."""

import pyarrow as pa
import pytest
import torch

from saev_core.data import ingest
from saev_core.model.activation_cache import ActivationCache, CacheSpec
from saev_core.model.mllm import MLLMAdapter
from saev_core.pipeline import score_stages, stages
from saev_core.pipeline.specs import ScoreSpec, WeightsSpec
from saev_core.sae.scoring import SCORERS
from saev_core.sae.stats_store import read_stats, write_stats
from saev_core.sae.training import SAETrainConfig, train_sae
from saev_core.toyworld import toy_model_path
from saev_core.toyworld.generator import write_preference_dataset


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    data = write_preference_dataset(root / "toy", 24, corruption_rate=0.3, seed=11)
    ingest.ingest_to_storage(str(data["parquet"]), str(root / "ingest"), shard_rows=10)
    records = ingest.list_record_shards(str(root / "ingest"))
    adapter = MLLMAdapter.from_pretrained(str(toy_model_path()), layer=2, device="cpu")
    cache = ActivationCache(str(root / "cache"), CacheSpec("toy", 2))
    keys = [stages.cache_record_shard(adapter, u, cache, batch_size=8)["key"] for u in records]
    cfg = SAETrainConfig(d_sae=256, steps=40, batch_size=256, lr=1e-3, n_batches_for_norm_estimate=2,
                         shuffle_buffer_tokens=1024)
    torch.manual_seed(0)
    sae = train_sae(stages.training_source(cache, keys, max_tokens=1500, seed=0), adapter.hidden_size, cfg)
    return root, records, adapter, cache, keys, sae


def test_fused_scores_equal_cached_scores(toy):
    root, records, adapter, cache, keys, sae = toy
    weights, builder = stages.build_weights(cache, keys, sae, WeightsSpec(pool_size=12, k=2))
    ctx = ScoreSpec().context(weights, builder.resolve_delta(0.5, None))
    assert weights.n_cross_modal > 0
    methods = [m for m, s in SCORERS.items() if not s.needs_logp]  # no log-prob pass here
    cached = pa.concat_tables([score_stages.score_shard(cache, k, sae, methods, ctx) for k in keys])
    fused = []
    for i, uri in enumerate(records):
        out = str(root / "stats" / f"{i}.safetensors")
        write_stats(out, list(score_stages.record_stats(adapter, uri, sae, batch_size=8).values()))
        fused.append(score_stages.score_table(read_stats(out), methods, ctx))
    fused = pa.concat_tables(fused)
    assert fused.num_rows == cached.num_rows == 24
    assert fused.to_pylist() == cached.to_pylist()  # every method, exactly
    assert len(set(fused.column("reference").to_pylist())) > 5  # the scores do vary


class _CountingAdapter:
    """The real adapter, counting the samples it forwards."""

    def __init__(self, adapter):
        self._adapter, self.forwarded = adapter, 0

    def capture(self, images, *args, **kwargs):
        self.forwarded += len(images)
        return self._adapter.capture(images, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._adapter, name)


def test_partly_cached_shard_forwards_only_the_uncached_samples(toy):
    """Issue 20: a sample whose residuals are cached is scored from them, whatever the rest of its
    record shard; only the others go through the fused pass, and the statistics are those of a
    fused pass over the whole shard."""
    from saev_core.pipeline.residual_sample import ResidualSample
    from saev_core.model.activation_cache import shard_key

    root, records, adapter, _, _, sae = toy
    uri = records[0]
    ids = ingest.read_record_shard(uri, None, columns=["sample_id"]).column("sample_id").to_pylist()
    sample = ResidualSample(fraction=0.5, seed=3)
    cached_ids = [s for s in ids if sample.keeps(s)]
    assert 0 < len(cached_ids) < len(ids)
    cache = ActivationCache(str(root / "partial-cache"), CacheSpec("toy", 2))
    out = stages.cache_record_shard(adapter, uri, cache, batch_size=8, sample=sample)
    assert out["samples"] == len(cached_ids)
    counting = _CountingAdapter(adapter)
    record_key = shard_key(ids)
    stats, source = score_stages.record_shard_stats(cache, record_key, uri, sae, lambda: counting,
                                              str(root / "partial-stats.safetensors"), cached_key=out["key"])
    assert source == "cache+fused"
    assert counting.forwarded == len(ids) - len(cached_ids)
    whole = score_stages.record_stats(adapter, uri, sae, batch_size=8)
    assert [s.sample_id for s in stats] == ids
    for st in stats:
        ref = whole[st.sample_id]
        assert torch.equal(st.text_max, ref.text_max) and torch.equal(st.image_max, ref.image_max)
        assert st.raw_cosine == ref.raw_cosine and st.l0 == ref.l0
    # the second time, the stored statistics: nothing forwarded
    again, source = score_stages.record_shard_stats(cache, record_key, uri, sae, lambda: counting,
                                              str(root / "partial-stats.safetensors"), cached_key=out["key"])
    assert source == "stored" and counting.forwarded == len(ids) - len(cached_ids)
