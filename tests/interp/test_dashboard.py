"""Streaming dashboard collection: right answers, and memory that does not grow with the data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saev_core.interp.dashboard import DashboardCollector
from saev_core.sae.weights import CrossModalWeights

D_SAE, N_POS, N_IMG = 40, 30, 12
FEATURES = [0, 3, 7, 21, 39]


def make_sample(i: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed * 100_003 + i)
    z = torch.relu(torch.randn(N_POS, D_SAE, generator=g) - 1.0)
    is_image = torch.zeros(N_POS, dtype=torch.bool)
    is_image[2:2 + N_IMG] = True
    ids = torch.randint(5, 50, (N_POS,), generator=g)
    return f"sample-{i:06d}", z, is_image, ids


def feed(col: DashboardCollector, start: int, stop: int) -> None:
    for i in range(start, stop):
        col.observe(*make_sample(i))


def test_state_does_not_grow_with_samples_scanned():
    col = DashboardCollector(D_SAE, FEATURES, n_text=5, n_images=4, context=3)
    feed(col, 0, 100)
    after_n = col.state_nbytes()
    feed(col, 100, 1000)
    after_10n = col.state_nbytes()
    assert col.n_samples == 1000
    assert after_10n == after_n, (after_n, after_10n)
    assert len(col.sample_ids()) <= len(FEATURES) * (5 + 4)


def test_matches_brute_force():
    n = 120
    col = DashboardCollector(D_SAE, FEATURES, n_text=5, n_images=4, context=3)
    samples = [make_sample(i) for i in range(n)]
    for s in samples:
        col.observe(*s)
    w = torch.full((D_SAE,), float("nan"))
    w[3] = 0.25
    weights = CrossModalWeights(w, torch.zeros(D_SAE, dtype=torch.long), torch.zeros(D_SAE, dtype=torch.long), 30, 5)
    tok = type("Tok", (), {"convert_ids_to_tokens": staticmethod(lambda i: f"t{i}")})()
    boards = col.result(weights, tok)
    assert boards[3].weight == pytest.approx(0.25) and boards[0].weight is None
    all_z = torch.cat([s[1] for s in samples])
    all_img = torch.cat([s[2] for s in samples])
    for f in FEATURES:
        d = boards[f]
        act = all_z[:, f] > 0
        assert d.density == pytest.approx(float(act.float().mean()))
        assert d.density_image == pytest.approx(float(act[all_img].float().mean()))
        assert d.density_text == pytest.approx(float(act[~all_img].float().mean()))
        # text: the 5 samples with the largest text activation, one position each
        text_best = sorted(((float(s[1][~s[2], f].max()), s[0]) for s in samples), key=lambda p: -p[0])[:5]
        assert [ex.sample_id for ex in d.top_text] == [sid for _, sid in text_best]
        for ex in d.top_text:
            sid, z, img, ids = samples[int(ex.sample_id.split("-")[1])]
            assert not img[ex.position] and float(z[ex.position, f]) == pytest.approx(ex.activation)
            assert ex.tokens[ex.center] == f"t{int(ids[ex.position])}"
            assert ex.acts[ex.center] == pytest.approx(ex.activation)
            lo = ex.position - 3
            for k, t in enumerate(ex.token_ids):
                assert t == (int(ids[lo + k]) if 0 <= lo + k < N_POS else -1)
        # images: the 4 samples with the largest image activation, with every image position
        img_best = sorted(((float(s[1][s[2], f].max()), s[0]) for s in samples), key=lambda p: -p[0])[:4]
        assert [ex.sample_id for ex in d.top_images] == [sid for _, sid in img_best]
        for ex in d.top_images:
            sid, z, img, _ = samples[int(ex.sample_id.split("-")[1])]
            np.testing.assert_allclose(ex.token_acts, z[img, f].numpy())


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        DashboardCollector(10, [3, 10])
    col = DashboardCollector(10, [1])
    with pytest.raises(ValueError, match="shapes"):
        col.observe("x", torch.zeros(4, 9), torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.long))
