"""The SAE feed: a seeded training sample across the whole cache, and batches that are the same
for the same seed whatever the background threads' timing."""

import pytest
import torch

from saev_core.model.activation_cache import ActivationCache, CacheSpec
from saev_core.model.mllm import SampleActivations
from saev_core.sae.feed import CacheFeed, batch_provider, draw_training_sample


def _cache(tmp_path, n_shards=6, per_shard=5, d=4, dtype="float32"):
    """Row r of sample s holds the unique value 1000 * s + r in every column."""
    cache = ActivationCache(str(tmp_path), CacheSpec("m", 0, storage_dtype=dtype))
    keys = []
    for sh in range(n_shards):
        samples = []
        for j in range(per_shard):
            s = sh * per_shard + j
            n = 3 + s % 4
            acts = (1000 * s + torch.arange(n, dtype=torch.float32))[:, None].repeat(1, d)
            img = torch.arange(n) < 2
            samples.append((f"s{s}", SampleActivations(acts, img, torch.arange(n))))
        keys.append(cache.write_shard(samples))
    return cache, keys


def test_sample_is_drawn_across_the_whole_cache(tmp_path):
    cache, keys = _cache(tmp_path)
    a = draw_training_sample(cache, keys, max_tokens=40, seed=1)
    assert 40 <= a.n_tokens < 40 + 7 and len(set(a.sample_ids)) == len(a.sample_ids)
    assert len(set(a.keys)) >= 4  # not the first shards: 40 tokens would fit in the first two
    assert draw_training_sample(cache, keys, max_tokens=40, seed=1) == a
    assert draw_training_sample(cache, keys, max_tokens=40, seed=2).sample_ids != a.sample_ids
    assert len(draw_training_sample(cache, keys, seed=1, max_samples=7).sample_ids) == 7
    everything = draw_training_sample(cache, keys)
    assert sorted(everything.sample_ids) == sorted(f"s{s}" for s in range(30))
    with pytest.raises(ValueError, match="position_fraction"):
        draw_training_sample(cache, keys, position_fraction=0)


def _epoch_values(feed) -> list[float]:
    return sorted(float(v) for chunk in feed() for v in chunk[:, 0])


def test_every_epoch_reads_exactly_the_drawn_positions(tmp_path):
    cache, keys = _cache(tmp_path)
    sample = draw_training_sample(cache, keys, max_tokens=50, seed=0)
    want = sorted(float(1000 * int(sid[1:]) + r) for sid, n in zip(sample.sample_ids, sample.lengths)
                  for r in range(n))
    feed = CacheFeed(cache, sample, read_threads=3, read_ahead=2)
    first = [chunk[0, 0].item() for chunk in feed()]
    assert _epoch_values(feed) == want
    assert [chunk[0, 0].item() for chunk in feed()] != first  # a new order each epoch
    half = CacheFeed(cache, draw_training_sample(cache, keys, seed=0, position_fraction=0.5))
    kept = [chunk.shape[0] for chunk in half()]
    assert sum(kept) == half.sample.n_tokens < sum(half.sample.lengths)
    assert _epoch_values(half) == _epoch_values(CacheFeed(cache, half.sample))  # same positions every epoch


def _batches(cache, keys, seed, prefetch, n=12):
    feed = CacheFeed(cache, draw_training_sample(cache, keys, seed=seed))
    it = batch_provider(feed, batch_size=8, buffer_tokens=24, seed=seed, prefetch=prefetch)
    out = [next(it) for _ in range(n)]
    it.close()
    return torch.stack(out)


def test_batches_are_deterministic_and_cover_an_epoch_once(tmp_path):
    cache, keys = _cache(tmp_path)
    total = sum(3 + s % 4 for s in range(30))  # 135 positions: 16 batches of 8 per epoch
    a = _batches(cache, keys, seed=3, prefetch=4, n=total // 8)
    assert a.dtype == torch.float32 and a.shape[1:] == (8, 4)
    assert torch.equal(a, _batches(cache, keys, seed=3, prefetch=4, n=total // 8))  # with the thread
    assert torch.equal(a, _batches(cache, keys, seed=3, prefetch=0, n=total // 8))  # and without
    assert not torch.equal(a, _batches(cache, keys, seed=4, prefetch=4, n=total // 8))
    bf16_cache, bf16_keys = _cache(tmp_path / "bf16", dtype="bfloat16")  # half storage, float32 batches
    assert _batches(bf16_cache, bf16_keys, seed=3, prefetch=2, n=2).dtype == torch.float32
    values = a[:, :, 0].flatten()
    assert values.unique().numel() == values.numel()  # no position twice within the first epoch
    # mixed: consecutive positions of one sample rarely share a batch
    same_sample = [len(set((b // 1000).tolist())) for b in a[:, :, 0]]
    assert sum(same_sample) / len(same_sample) > 4


def test_feed_errors_reach_the_consumer():
    def broken():
        yield torch.zeros(4, 2)
        raise OSError("disk gone")

    it = batch_provider(broken, batch_size=2, buffer_tokens=4, prefetch=2)
    with pytest.raises(OSError, match="disk gone"):
        for _ in range(10):
            next(it)
    with pytest.raises(ValueError, match="activation source is empty"):
        next(batch_provider(lambda: iter([]), batch_size=4, prefetch=2))
