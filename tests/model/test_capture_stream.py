"""A shard's capture in length-grouped, token-capped batches with the next batch prepared ahead,
written through a spool so memory holds one batch, not the shard (issue 15)."""

import pytest
import torch

from saev_core.model.activation_cache import ActivationCache, CacheError, CacheSpec
from saev_core.model.budget import capture_stream, sample_lengths
from saev_core.model.mllm import MLLMAdapter
from tiny_mllms import build_llava, random_image

PROMPTS = ["a", "what colour is the circle in this picture , and is it near the square ?", "is it red ?",
           "describe the image in a few words .", "shape ?", "is there a small blue triangle next to a circle ?"]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return MLLMAdapter.from_pretrained(str(build_llava(tmp_path_factory.mktemp("llava"))), layer=1, device="cpu")


def _load(i):
    return random_image(i, 24 + 8 * (i % 3)), PROMPTS[i], None


def test_batches_are_length_grouped_and_capped(adapter, monkeypatch):
    lengths = [sample_lengths(adapter, [im], [p])[0] for im, p, _ in map(_load, range(6))]
    seen = []
    real = adapter.capture

    def spy(images, prompts, responses=None, on_device=False, batch=None):
        seen.append(int(batch["attention_mask"].shape[0]) * int(batch["attention_mask"].shape[1]))
        return real(images, prompts, responses, on_device=on_device, batch=batch)

    monkeypatch.setattr(adapter, "capture", spy)
    budget = 2 * max(lengths)
    order = [i for i, _ in capture_stream(adapter, 6, _load, batch_size=4, batch_tokens=budget)]
    assert sorted(order) == list(range(6))
    assert [lengths[i] for i in order] == sorted(lengths)  # shortest first: little padding
    assert all(t <= budget for t in seen) and len(seen) >= 3


def test_prefetch_changes_nothing_but_timing(adapter):
    a = dict(capture_stream(adapter, 6, _load, batch_size=3, batch_tokens=10_000, prefetch=True))
    b = dict(capture_stream(adapter, 6, _load, batch_size=3, batch_tokens=10_000, prefetch=False))
    for i in range(6):
        assert torch.equal(a[i].acts, b[i].acts) and torch.equal(a[i].is_image, b[i].is_image)


def test_shard_fed_out_of_order_is_the_shard_written_in_order(adapter, tmp_path):
    caps = dict(capture_stream(adapter, 6, _load, batch_size=2, batch_tokens=10_000))
    ids = [f"s{i}" for i in range(6)]
    in_order = ActivationCache(str(tmp_path / "a"), CacheSpec("m", 1))
    key = in_order.write_shard([(ids[i], caps[i]) for i in range(6)])
    streamed = ActivationCache(str(tmp_path / "b"), CacheSpec("m", 1))
    with streamed.writer(ids) as w:
        for i in (4, 0, 5, 2, 1, 3):
            w.add(i, caps[i])
        assert w.finish() == key
    for suffix in (".safetensors", ".index.parquet"):
        assert (tmp_path / "a" / in_order.spec.key() / f"{key}{suffix}").read_bytes() == \
            (tmp_path / "b" / streamed.spec.key() / f"{key}{suffix}").read_bytes()
    shard = streamed.read_shard(key)
    for i in range(6):
        assert shard.sample(i)[0] == ids[i] and torch.equal(shard.sample(i)[1], caps[i].acts)


def test_an_incomplete_shard_is_refused(adapter, tmp_path):
    caps = dict(capture_stream(adapter, 2, _load, batch_size=2, batch_tokens=10_000))
    cache = ActivationCache(str(tmp_path), CacheSpec("m", 1))
    with cache.writer(["x", "y"]) as w:
        w.add(0, caps[0])
        with pytest.raises(CacheError, match="given twice"):
            w.add(0, caps[0])
        with pytest.raises(CacheError, match="1 samples never captured.*'y'"):
            w.finish()
    assert not list(tmp_path.rglob("*.done.json"))


def test_cache_record_shard_stores_only_the_residual_sample(adapter, tmp_path):
    import pyarrow.parquet as pq

    from saev_core.data import ingest
    from saev_core.pipeline import stages
    from saev_core.pipeline.residual_sample import ResidualSample
    from saev_core.toyworld.generator import write_preference_dataset

    data = write_preference_dataset(tmp_path / "toy", 40, corruption_rate=0.0, seed=2)
    ingest.ingest_to_storage(str(data["parquet"]), str(tmp_path / "ingest"), shard_rows=40)
    uri = ingest.list_record_shards(str(tmp_path / "ingest"))[0]
    cache = ActivationCache(str(tmp_path / "cache"), CacheSpec("m", 1))
    sample = ResidualSample(0.3, seed=5)
    out = stages.cache_record_shard(adapter, uri, cache, batch_size=8, sample=sample)
    ids = pq.read_table(uri, columns=["sample_id"]).column(0).to_pylist()
    want = [s for s in ids if sample.keeps(s)]
    assert 0 < out["samples"] == len(want) < 40 and out["rows"] == 40
    assert cache.index(out["key"]).column("sample_id").to_pylist() == want  # record order
    assert out["record_key"] == stages.record_key(uri) != out["key"]
    again = stages.cache_record_shard(adapter, uri, cache, batch_size=8, sample=sample)
    assert again["reused"] and again["key"] == out["key"]


# ---- issue 20: one input pass per sample, lengths estimated without the image processor
@pytest.mark.parametrize("family", sorted(__import__("tiny_mllms").BUILDERS))
def test_batching_lengths_are_within_a_few_tokens_of_the_processor(family, tmp_path):
    """Estimates where the adapter's estimate matched the processor on a first sample, measured
    lengths where it did not (Idefics3's markup is counted differently by transformers 5.25)."""
    from saev_core.model.budget import ESTIMATE_SLACK, estimated_length, stream_lengths
    from tiny_mllms import BUILDERS

    ad = MLLMAdapter.from_pretrained(str(BUILDERS[family](tmp_path / family)), layer=1, device="cpu")
    images = [random_image(i, 32).resize(size) for i, size in enumerate([(32, 32), (64, 32), (40, 90), (200, 120)])]
    assert estimated_length(ad, images[0], PROMPTS[0]) is not None, family  # every family can estimate
    got = stream_lengths(ad, 4, lambda i: (images[i], PROMPTS[i], None))
    exact = [sample_lengths(ad, [images[i]], [PROMPTS[i]])[0] for i in range(4)]
    assert all(abs(g - e) <= ESTIMATE_SLACK for g, e in zip(got, exact)), (family, got, exact)
    assert isinstance(ad._length_estimates_ok, bool)


def test_an_estimate_that_misses_on_the_first_sample_is_not_used(adapter, monkeypatch):
    from saev_core.model import budget

    monkeypatch.setattr(budget, "estimated_length", lambda *a, **k: 5)  # far from the real lengths
    monkeypatch.delattr(adapter, "_length_estimates_ok", raising=False)
    got = budget.stream_lengths(adapter, 6, _load)
    assert got == [sample_lengths(adapter, [im], [p])[0] for im, p, _ in map(_load, range(6))]
    assert adapter._length_estimates_ok is False


def test_inputs_are_built_once_per_batch(adapter, monkeypatch):
    adapter._length_estimates_ok = True  # (checked on a first sample: one processor call, then none)
    calls = []
    real = adapter.build_inputs

    def spy(images, *args, **kwargs):
        calls.append(len(images))
        return real(images, *args, **kwargs)

    monkeypatch.setattr(adapter, "build_inputs", spy)
    n_batches = 0
    for _ in capture_stream(adapter, 6, _load, batch_size=2, batch_tokens=10_000, prefetch=False):
        n_batches += 1
    assert calls == [2, 2, 2]  # no per-sample length pass through the processor


def test_an_estimate_too_low_splits_the_batch_within_budget(adapter, monkeypatch):
    from saev_core.model import budget

    lengths = [sample_lengths(adapter, [im], [p])[0] for im, p, _ in map(_load, range(6))]
    reference = dict(capture_stream(adapter, 6, _load, batch_size=1, batch_tokens=10_000, prefetch=False))
    monkeypatch.setattr(budget, "estimated_length", lambda *a, **k: 1)  # everything looks tiny
    seen = []
    real = adapter.capture

    def spy(images, prompts, responses=None, on_device=False, batch=None, **kw):
        seen.append(int(batch["attention_mask"].shape[0]) * int(batch["attention_mask"].shape[1]))
        return real(images, prompts, responses, on_device=on_device, batch=batch, **kw)

    monkeypatch.setattr(adapter, "capture", spy)
    budget_tokens = 2 * max(lengths)
    got = dict(capture_stream(adapter, 6, _load, batch_size=6, batch_tokens=budget_tokens, workers=2))
    assert sorted(got) == list(range(6)) and all(t <= budget_tokens for t in seen) and len(seen) > 1
    for i in range(6):
        torch.testing.assert_close(got[i].acts, reference[i].acts, atol=1e-5, rtol=1e-4)


def test_several_prefetch_workers_change_nothing_but_timing(adapter):
    a = dict(capture_stream(adapter, 6, _load, batch_size=2, batch_tokens=10_000, workers=3))
    b = dict(capture_stream(adapter, 6, _load, batch_size=2, batch_tokens=10_000, prefetch=False))
    for i in range(6):
        assert torch.equal(a[i].acts, b[i].acts) and torch.equal(a[i].content, b[i].content)
