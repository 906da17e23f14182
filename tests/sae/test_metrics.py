"""Reconstruction metrics, with an SAE whose reconstruction is exact by construction."""

import pytest
import torch

from saev_core.sae.metrics import ReconstructionStats, spliced_ce
from saev_core.model.mllm import MLLMAdapter
from tiny_mllms import build_llava, random_image


def exact_sae(d_in: int):
    """z = ReLU([x, -x]), x_hat = ReLU(x) - ReLU(-x) = x: a lossless 'SAE' with L0 = d_in."""
    from sae_lens import StandardSAE, StandardSAEConfig

    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=2 * d_in, apply_b_dec_to_input=False))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return MLLMAdapter.from_pretrained(str(build_llava(tmp_path_factory.mktemp("llava"))), layer=1, device="cpu")


def test_exact_sae_matches_clean_and_zero_ablation_does_not(adapter):
    sae = exact_sae(adapter.hidden_size)
    images = [random_image(i) for i in range(2)]
    out = spliced_ce(adapter, sae, images, ["what colour is the circle ?"] * 2, ["red circle .", "blue square ."])
    for part in ("all", "image", "text"):
        assert out[f"sae_{part}"] == pytest.approx(out["clean"], abs=1e-4)
        assert abs(out[f"zero_{part}"] - out["clean"]) > 1e-3
    assert set(out) == {"clean", "sae_all", "sae_image", "sae_text", "zero_all", "zero_image", "zero_text"}


def test_reconstruction_stats(adapter):
    samples = adapter.capture([random_image(i) for i in range(3)], ["describe the image ."] * 3)
    stats = ReconstructionStats(2 * adapter.hidden_size)
    for s in samples:
        stats.add(exact_sae(adapter.hidden_size), s.acts, s.is_image)
    rep = stats.report()
    assert rep["all"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    assert rep["all"]["mse"] < 1e-10
    assert rep["image"]["n_positions"] == sum(s.n_image for s in samples)
    assert rep["text"]["n_positions"] + rep["image"]["n_positions"] == rep["all"]["n_positions"]
    assert 0 < rep["all"]["l0"] <= adapter.hidden_size
    assert 0 <= rep["dead_fraction"] < 0.5

    # a zero 'SAE' explains nothing: EV = 1 - sum||x||^2 / sum||x - mean||^2 < 0
    zero = exact_sae(adapter.hidden_size)
    with torch.no_grad():
        zero.W_dec.zero_()
    bad = ReconstructionStats(2 * adapter.hidden_size)
    for s in samples:
        bad.add(zero, s.acts, s.is_image)
    assert bad.report()["all"]["explained_variance"] < 0.5


def test_response_logprob_matches_manual_sum(adapter):
    from saev_core.model.logprobs import response_logprob

    img = [random_image(0)]
    got = response_logprob(adapter, img, ["what colour is the circle ?"], ["red circle ."])[0]
    batch = adapter.build_inputs(img, ["what colour is the circle ?"], ["red circle ."])
    n_prompt = int(adapter.build_inputs(img, ["what colour is the circle ?"])["attention_mask"].sum())
    logits = adapter.logits(batch)[0]
    ids = batch["input_ids"][0]
    manual = sum(float(torch.log_softmax(logits[t - 1], -1)[ids[t]]) for t in range(n_prompt, len(ids)))
    assert got == pytest.approx(manual, rel=1e-5)
    assert got < 0
    # per-token mean, batched with a longer response beside it (padding must not count)
    mean = response_logprob(adapter, img * 2, ["what colour is the circle ?"] * 2, ["red circle .", "a b c d e f"],
                            mean=True)[0]
    assert mean == pytest.approx(manual / (len(ids) - n_prompt), rel=1e-5)


def test_logprob_shard_is_cached_and_read_back(adapter, tmp_path):
    from saev_core.data.records import CanonicalRecord, records_to_table
    from saev_core.model.activation_cache import ActivationCache, CacheSpec
    from saev_core.pipeline import score_stages, stages
    from saev_core.model.logprobs import response_logprob

    def png(i):
        import io

        buf = io.BytesIO()
        random_image(i).save(buf, format="PNG")
        return buf.getvalue()

    recs = [CanonicalRecord.build(i, "what colour is the circle ?", png(i), "red circle .", "blue square .")
            for i in range(3)]
    uri = stages.write_table(records_to_table(recs), str(tmp_path / "r.parquet"))
    cache = ActivationCache(str(tmp_path / "cache"), CacheSpec("m", 0))
    out = score_stages.logprob_record_shard(adapter, uri, cache, batch_size=2)
    assert out["samples"] == 3 and not out["reused"]
    assert score_stages.logprob_record_shard(adapter, uri, cache)["reused"]
    got = score_stages.read_logp(cache, out["key"])
    images = [stages._image(r.image) for r in recs]
    want = response_logprob(adapter, images, [r.prompt for r in recs], [r.rejected for r in recs], mean=True)
    assert [got[r.sample_id]["logp_rejected"] for r in recs] == pytest.approx(want, rel=1e-5)
    with pytest.raises(FileNotFoundError, match="no log-probs for shard nope"):
        score_stages.read_logp(cache, "nope")
