import pytest
import torch

from saev_core.data import storage
from saev_core.model.activation_cache import ActivationCache, CacheError, CacheSpec, shard_key
from saev_core.model.mllm import SampleActivations


def _sample(n, n_img, seed):
    g = torch.Generator().manual_seed(seed)
    is_image = torch.zeros(n, dtype=torch.bool)
    is_image[1:1 + n_img] = True
    return SampleActivations(torch.randn(n, 8, generator=g), is_image, torch.arange(n))


def test_roundtrip_and_reuse(tmp_path):
    cache = ActivationCache(str(tmp_path), CacheSpec("m", 2))
    samples = [("a", _sample(5, 2, 0)), ("b", _sample(7, 3, 1))]
    key = cache.write_shard(samples)
    assert key == shard_key(["a", "b"]) and cache.is_finished(key)
    shard = cache.read_shard(key)
    assert shard.sample_ids == ["a", "b"] and shard.lengths() == [5, 7]
    sid, acts, img = shard.sample(1)
    assert sid == "b" and torch.equal(acts, samples[1][1].acts) and torch.equal(img, samples[1][1].is_image)
    # a finished shard is not rewritten
    stamp = (tmp_path / cache.spec.key() / f"{key}.safetensors").stat().st_mtime_ns
    assert cache.write_shard(samples) == key
    assert (tmp_path / cache.spec.key() / f"{key}.safetensors").stat().st_mtime_ns == stamp


def test_key_depends_on_what_produced_it():
    base = CacheSpec("m", 2)
    assert len({base.key(), CacheSpec("m", 3).key(), CacheSpec("m2", 2).key(),
                CacheSpec("m", 2, revision="r").key(), CacheSpec("m", 2, response="chosen").key()}) == 5


def test_unfinished_shard_is_never_read(tmp_path):
    cache = ActivationCache(str(tmp_path), CacheSpec("m", 0))
    key = cache.write_shard([("a", _sample(4, 1, 0))])
    storage.remove(storage.join(cache.uri, f"{key}.done.json"))
    with pytest.raises(CacheError, match="not finished"):
        cache.read_shard(key)


def test_half_precision_storage(tmp_path):
    cache = ActivationCache(str(tmp_path), CacheSpec("m", 0, storage_dtype="float16"))
    s = _sample(6, 2, 3)
    shard = cache.read_shard(cache.write_shard([("a", s)]))
    torch.testing.assert_close(shard.acts, s.acts, atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_file_is_standard_safetensors_and_reads_by_sample(tmp_path, dtype):
    """The shard is written sample by sample with a hand-built header: the official reader must
    accept it, and ranged per-sample reads must equal the whole-shard read."""
    from safetensors.torch import load_file

    cache = ActivationCache(str(tmp_path), CacheSpec("m", 0, storage_dtype=dtype))
    samples = [(f"s{i}", _sample(3 + i, 1 + i % 2, i)) for i in range(5)]
    key = cache.write_shard(samples)
    official = load_file(str(tmp_path / cache.spec.key() / f"{key}.safetensors"))
    want = torch.cat([s.acts for _, s in samples]).to(getattr(torch, dtype))
    assert torch.equal(official["acts"], want) and official["offsets"].tolist() == [0, 3, 7, 12, 18, 25]
    shard = cache.read_shard(key)
    assert torch.equal(shard.acts, want.float()) and shard.lengths() == [3, 4, 5, 6, 7]
    picked = list(cache.iter_samples(key, [3, 1]))
    assert [p[0] for p in picked] == ["s3", "s1"]
    for (sid, acts, img), i in zip(picked, [3, 1]):
        assert torch.equal(acts, want[shard.offsets[i]:shard.offsets[i + 1]].float())
        assert torch.equal(img, samples[i][1].is_image)
    assert sum(a.shape[0] for a in cache.token_chunks([key])) == 25


def test_ranged_reads_on_s3(s3_bucket):
    cache = ActivationCache(s3_bucket.uri("cache"), CacheSpec("m", 0), s3_bucket.storage_options)
    samples = [(f"s{i}", _sample(4 + i, 2, i)) for i in range(3)]
    key = cache.write_shard(samples)
    sid, acts, img = next(cache.iter_samples(key, [2]))
    assert sid == "s2" and torch.equal(acts, samples[2][1].acts) and torch.equal(img, samples[2][1].is_image)


def test_truncated_shard_is_named(tmp_path):
    cache = ActivationCache(str(tmp_path), CacheSpec("m", 0))
    key = cache.write_shard([("a", _sample(6, 2, 0))])
    path = tmp_path / cache.spec.key() / f"{key}.safetensors"
    path.write_bytes(path.read_bytes()[:-60])
    with pytest.raises(CacheError, match=f"{key}.safetensors: truncated"):
        cache.read_shard(key)


def test_content_mask_roundtrip(tmp_path):
    cache = ActivationCache(str(tmp_path), CacheSpec("m", 2))
    a, b = _sample(5, 2, 0), _sample(4, 1, 1)
    a.content = torch.tensor([False, False, False, True, True])
    b.content = torch.tensor([False, False, True, False])
    shard = cache.read_shard(cache.write_shard([("a", a), ("b", b)]))
    assert torch.equal(shard.sample_content(0), a.content) and torch.equal(shard.sample_content(1), b.content)
    b.content = None  # a shard whose samples lack the mask stores none
    assert cache.read_shard(cache.write_shard([("c", b)])).sample_content(0) is None


def test_cache_dtype_defaults_to_bfloat16_on_gpu_and_float32_on_cpu(tmp_path):
    """auto: the forward's own precision on a GPU (half the bytes), lossless float32 on the CPU;
    an explicit dtype wins. Decided where the run is planned, from the device the spec names."""
    from saev_core.pipeline.specs import ModelSpec

    gpu = CacheSpec.for_model(ModelSpec(device="cuda"))
    assert (gpu.storage_dtype, gpu.compute_dtype) == ("bfloat16", "bfloat16")
    cpu = CacheSpec.for_model(ModelSpec(device="cpu"))
    assert (cpu.storage_dtype, cpu.compute_dtype) == ("float32", "float32")
    assert CacheSpec.for_model(ModelSpec(device="cuda", cache_dtype="float32")).storage_dtype == "float32"
    # a GPU run in full precision stores full precision; aliases name the same dtype
    assert CacheSpec.for_model(ModelSpec(device="cuda", dtype="float32")).storage_dtype == "float32"
    assert CacheSpec.for_model(ModelSpec(device="cuda", dtype="bf16")) == gpu
    assert gpu.key() != cpu.key()
    # bfloat16 rows are stored at 2 bytes and read back widened
    size = {}
    for spec in (gpu, cpu):
        cache = ActivationCache(str(tmp_path), spec)
        key = cache.write_shard([("a", _sample(6, 2, 0))])
        size[spec.storage_dtype] = (tmp_path / spec.key() / f"{key}.safetensors").stat().st_size
        assert cache.read_shard(key).acts.dtype == torch.float32
    assert size["float32"] - size["bfloat16"] == 6 * 8 * 2
