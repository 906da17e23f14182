"""Streaming cross-modal weights against the definition computed over all tokens at once."""

import pytest
import torch

from saev_core.sae.weights import CrossModalWeights, CrossModalWeightsBuilder, brute_force_weights


def _stream(n_tokens=600, d_in=16, d_sae=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(n_tokens, d_in, generator=g)
    is_image = torch.rand(n_tokens, generator=g) < 0.6
    # sparse non-negative codes: some features text-only, some image-only, most mixed
    z = torch.relu(torch.randn(n_tokens, d_sae, generator=g) - 0.8)
    z[is_image, :5] = 0  # features 0-4 never fire on image tokens
    z[~is_image, 5:10] = 0  # features 5-9 never fire on text tokens
    z[:, 10] = 0  # a dead feature
    return z, acts, is_image


def _streamed(z, acts, is_image, cuts, pool_size=30, k=5):
    b = CrossModalWeightsBuilder(z.shape[1], pool_size=pool_size, k=k)
    bounds = [0, *cuts, z.shape[0]]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        b.observe(z[lo:hi], is_image[lo:hi])
    b.plan()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        b.gather(acts[lo:hi])
    return b.result()


@pytest.mark.parametrize("cuts", [[], [1, 2, 3], [7, 100, 101, 350], list(range(13, 600, 13))])
def test_streaming_equals_brute_force(cuts):
    z, acts, is_image = _stream()
    expected = brute_force_weights(z, acts, is_image)
    got = _streamed(z, acts, is_image, cuts)
    assert torch.equal(torch.isnan(got.weights), torch.isnan(expected))
    torch.testing.assert_close(got.weights[~torch.isnan(expected)], expected[~torch.isnan(expected)],
                               atol=1e-6, rtol=1e-5)
    # pure-modality and dead features get no weight; most mixed ones do
    assert torch.isnan(got.weights[:11]).all()
    assert got.n_cross_modal >= 20


def test_other_pool_and_k():
    z, acts, is_image = _stream(seed=3)
    expected = brute_force_weights(z, acts, is_image, pool_size=12, k=3)
    got = _streamed(z, acts, is_image, [50, 51, 300], pool_size=12, k=3)
    torch.testing.assert_close(got.weights.nan_to_num(9.0), expected.float().nan_to_num(9.0), atol=1e-6, rtol=1e-5)


def test_hand_computed_weight():
    """One feature, 5 text + 5 image tokens: w = mean of the 25 pairwise cosines."""
    t = torch.tensor([[1.0, 0.0]] * 5)
    v = torch.tensor([[1.0, 1.0]] * 5)
    acts = torch.cat([t, v])
    is_image = torch.tensor([False] * 5 + [True] * 5)
    z = torch.ones(10, 1)
    got = _streamed(z, acts, is_image, [3])
    assert got.weights[0].item() == pytest.approx(2 ** -0.5, abs=1e-6)
    # one image token fewer: below k=5, no weight
    got = _streamed(z[:9], acts[:9], is_image[:9], [])
    assert torch.isnan(got.weights[0])


def test_memory_does_not_grow_with_tokens():
    b = CrossModalWeightsBuilder(64, pool_size=30, k=5, reservoir=1000)
    for i in range(50):
        z, _, img = _stream(n_tokens=200, d_sae=64, seed=i)
        b.observe(z, img)
    assert b.pool_act.shape == (30, 64) and b.pool_idx.shape == (30, 64)
    assert b._reservoir.numel() <= 1000 * 1.2
    assert b.n_tokens == 50 * 200


def test_pass_mismatch_is_detected():
    z, acts, is_image = _stream()
    b = CrossModalWeightsBuilder(z.shape[1])
    b.observe(z, is_image)
    b.plan()
    b.gather(acts[:100])
    with pytest.raises(RuntimeError, match="streams differ"):
        b.result()


def test_pool_locations_map_back_to_samples():
    z = torch.zeros(7, 2)
    z[5, 0] = 3.0  # sample 1 (lengths 4, 3), position 1
    b = CrossModalWeightsBuilder(2, pool_size=3, k=1)
    b.observe(z, torch.tensor([0, 1, 1, 0, 0, 1, 1], dtype=torch.bool), sample_lengths=[4, 3])
    assert b.pool_locations(0) == [(3.0, 1, 1, True)]


def test_save_and_load(tmp_path):
    z, acts, is_image = _stream()
    w = _streamed(z, acts, is_image, [300])
    w.save(str(tmp_path / "w.safetensors"))
    back = CrossModalWeights.load(str(tmp_path / "w.safetensors"))
    assert torch.equal(back.weights.nan_to_num(7), w.weights.nan_to_num(7)) and back.k == 5


def test_activation_quantile():
    b = CrossModalWeightsBuilder(4, sample_rate=1.0)
    b.observe(torch.tensor([[1.0, 2.0, 0.0, 3.0], [4.0, 0.0, 0.0, 5.0]]), torch.tensor([True, False]))
    assert b.activation_quantile(0.5) == pytest.approx(3.0)


def test_sampled_quantile_is_close_to_exact():
    g = torch.Generator().manual_seed(0)
    z = torch.relu(torch.randn(4000, 64, generator=g))
    b = CrossModalWeightsBuilder(64)  # looks at 1/64 of the activations
    for chunk in z.split(500):
        b.observe(chunk, torch.zeros(len(chunk), dtype=torch.bool))
    exact = float(torch.quantile(z[z > 0][:100_000], 0.5))
    assert abs(b.activation_quantile(0.5) - exact) < 0.05 * exact


def test_ties_keep_token_order_like_the_definition():
    """Identical activations (shared chat-template prefixes) are common: chunking must not change
    which tied tokens enter a feature's pool."""
    g = torch.Generator().manual_seed(1)
    n, d_sae = 500, 12
    z = torch.randint(0, 4, (n, d_sae), generator=g).float()  # 4 levels: many ties
    acts = torch.randn(n, 8, generator=g)
    is_image = torch.rand(n, generator=g) < 0.5
    expected = brute_force_weights(z, acts, is_image)
    for cuts in ([400], [37, 74, 111], list(range(7, n, 7))):
        got = _streamed(z, acts, is_image, cuts)
        torch.testing.assert_close(got.weights.nan_to_num(9.0), expected.float().nan_to_num(9.0), atol=1e-6,
                                   rtol=1e-5)


def test_reservoir_weighs_every_chunk_equally():
    b = CrossModalWeightsBuilder(1, reservoir=1000, sample_rate=1.0)
    for v in range(1, 21):  # chunk v holds 500 copies of the value v
        b.observe(torch.full((500, 1), float(v)), torch.zeros(500, dtype=torch.bool))
    assert 9.0 <= b.activation_quantile(0.5) <= 12.0  # true median 10.5


@pytest.mark.parametrize("levels", [3, 0])
def test_pool_is_the_brute_force_pool_in_order(levels):
    """The per-feature pool (activation, token, modality), row for row, equals a stable sort of
    each feature's column over all tokens, for any batching: ties (few activation levels),
    negative codes, chunks shorter than the pool, and features that never fill their pool."""
    g = torch.Generator().manual_seed(5)
    n, d_sae, pool = 300, 24, 10
    z = (torch.randint(-1, levels, (n, d_sae), generator=g).float() if levels
         else torch.randn(n, d_sae, generator=g))
    z[:, 3] = 0
    z[:290, 4] = 0  # at most 10 positives, some of them negative: a pool that never fills
    is_image = torch.rand(n, generator=g) < 0.5
    act, idx = torch.sort(z, dim=0, descending=True, stable=True)
    act, idx = act[:pool].clamp_min(0), idx[:pool]
    idx = torch.where(act > 0, idx, -1)
    img = is_image[idx.clamp_min(0)] & (act > 0)
    for cuts in ([], [1, 2, 3, 4], [5, 150, 151], list(range(9, n, 9))):
        b = CrossModalWeightsBuilder(d_sae, pool_size=pool, k=3)
        bounds = [0, *cuts, n]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            b.observe(z[lo:hi], is_image[lo:hi])
        assert torch.equal(b.pool_act, act) and torch.equal(b.pool_idx, idx) and torch.equal(b.pool_img, img)


def _modal_stream():
    # tokens 0-2 text, 3-5 image. Feature 0 fires hard on text, weakly on images; feature 1 fires
    # on one text token only.
    z = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 1.0], [0.4, 1.0], [0.3, 1.0], [0.1, 0.0]])
    is_image = torch.tensor([False, False, False, True, True, True])
    s = 2 ** -0.5
    acts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [s, s], [0.0, 1.0]])
    return z, acts, is_image


def _modal(delta=None, delta_quantile=None):
    from saev_core.sae.weights import PerModalityWeightsBuilder

    z, acts, is_image = _modal_stream()
    b = PerModalityWeightsBuilder(2, pool_size=3, k=2, delta=delta, delta_quantile=delta_quantile, sample_rate=1.0)
    for lo, hi in ((0, 4), (4, 6)):
        b.observe(z[lo:hi], is_image[lo:hi])
    b.plan()
    for lo, hi in ((0, 4), (4, 6)):
        b.gather(acts[lo:hi])
    return b.result()


def test_per_modality_pool_by_hand():
    z, acts, is_image = _modal_stream()
    # the joint top-3 pool of feature 0 is all text: not cross-modal
    assert torch.isnan(_streamed(z, acts, is_image, [4], pool_size=3, k=2).weights).all()
    w = _modal(delta=0.2)
    # feature 0: text tokens 0, 1 and image tokens 3, 4 (0.3 > 0.2): cos pairs 1, .7071, 0, .7071
    assert w.weights[0].item() == pytest.approx((1 + 2 * 2 ** -0.5) / 4, abs=1e-6)
    assert torch.isnan(w.weights[1])  # one text token only
    assert w.n_text.tolist()[0] == 3 and w.n_image.tolist()[0] == 0  # the joint pool is still reported
    assert torch.isnan(_modal(delta=0.35).weights[0])  # the 2nd image activation 0.3 is not above delta
    # positive activations 0.1 .3 .4 1 1 1 3 4 5: median 1 -> not cross-modal; 10% quantile 0.26 -> cross-modal
    assert torch.isnan(_modal(delta_quantile=0.5).weights[0])
    assert not torch.isnan(_modal(delta_quantile=0.1).weights[0])
    # the one delta rule: a quantile overrides a fixed delta (as scoring.weights documents)
    assert torch.isnan(_modal(delta=0.2, delta_quantile=0.5).weights[0])
    with pytest.raises(ValueError, match="give delta or delta_quantile"):
        _modal()
