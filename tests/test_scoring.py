"""Each score variant and baseline on a small example computed by hand, and selection."""

import math

import pytest
import torch

from saev_core.sae.scoring import METHODS, random_score, sample_stats, score, score_all
from saev_core.sae.selection import n_keep, quantile_bands, ranked, top_percent
from saev_core.sae.weights import CrossModalWeights

NAN = float("nan")


@pytest.fixture
def example():
    # 4 positions: 2 text (rows 0,1), 2 image (rows 2,3); 5 features
    z = torch.tensor([
        [2.0, 0.0, 0.5, 0.0, 3.0],
        [0.0, 1.5, 0.0, 0.0, 0.0],
        [1.5, 0.0, 0.0, 4.0, 0.0],
        [0.0, 2.0, 0.2, 0.0, 0.0],
    ])
    acts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    is_image = torch.tensor([False, False, True, True])
    weights = CrossModalWeights(torch.tensor([0.5, 0.25, 0.125, NAN, 0.3]), torch.zeros(5), torch.zeros(5), 30, 5)
    return sample_stats("s1", z, acts, is_image), weights


def test_stats(example):
    st, _ = example
    assert st.text_max.tolist() == [2.0, 1.5, 0.5, 0.0, 3.0]
    assert st.image_max.tolist() == pytest.approx([1.5, 2.0, 0.2, 4.0, 0.0])
    assert st.l0 == pytest.approx((3 + 1 + 2 + 2) / 4)
    # mean image (0.5, 1) vs mean text (1, 0): cos = 0.5 / |(0.5,1)| = 0.4472
    assert st.raw_cosine == pytest.approx(0.5 / math.sqrt(1.25))
    assert (st.n_positions, st.n_image) == (4, 2)


def test_reference(example):
    st, w = example
    # delta=1: features on both text and image above 1 -> {0, 1}; w = 0.5 + 0.25
    assert score(st, "reference", w, delta=1.0) == pytest.approx(0.75)
    # delta=0.1: feature 2 joins (0.5 text, 0.2 image) -> + 0.125
    assert score(st, "reference", w, delta=0.1) == pytest.approx(0.875)


def test_paper(example):
    st, w = example
    # any token above 1 and weighted: {0, 1, 4} (3 has no weight) -> 0.5 + 0.25 + 0.3
    assert score(st, "paper", w, delta=1.0) == pytest.approx(1.05)


def test_weighted(example):
    st, w = example
    # x = max per feature = [2, 2, 0.5, 4, 3]; weighted & > delta=1: {0,1,4}; top_k=2 by x: {4 (3.0), 0 or 1 (2.0)}
    assert score(st, "weighted", w, delta=1.0, top_k=3) == pytest.approx((0.5 * 2 + 0.25 * 2 + 0.3 * 3) / 7)
    assert score(st, "weighted", w, delta=10.0) == 0.0


def test_baselines(example):
    st, w = example
    assert score(st, "cooccur_l0", w, delta=1.0) == 2.0
    assert score(st, "l0") == pytest.approx(2.0)
    assert score(st, "length") == 4.0
    assert score(st, "raw_cosine") == pytest.approx(0.4472, abs=1e-4)
    r = score(st, "random", seed=1)
    assert 0 <= r < 1 and r == random_score("s1", 1) != random_score("s1", 2)


def test_score_all_and_unknown(example):
    st, w = example
    out = score_all(st, list(METHODS), w, delta=1.0)
    assert set(out) == set(METHODS) and all(math.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match="unknown scoring method 'bogus'"):
        score(st, "bogus", w)
    with pytest.raises(ValueError, match="needs cross-modal weights"):
        score(st, "reference", None)


def test_sample_without_image_positions_is_refused():
    with pytest.raises(ValueError, match="needs both image and text"):
        sample_stats("x", torch.ones(2, 3), torch.ones(2, 2), torch.tensor([False, False]))


def test_selection_deterministic_under_ties():
    ids = ["d", "b", "a", "c", "e"]
    scores = [1.0, 2.0, 1.0, 2.0, 0.0]
    assert ranked(ids, scores) == [1, 3, 2, 0, 4]  # b, c (tie -> id order), a, d (tie), e
    assert top_percent(ids, scores, 40) == [1, 3]
    assert top_percent(ids[::-1], scores[::-1], 40) == [3, 1]  # same samples: b, c
    assert n_keep(1000, 50) == 500 and n_keep(5, 50) == 3 and n_keep(3, 10) == 1 and n_keep(0, 50) == 0
    assert quantile_bands(ids, scores, 2) == [1, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="no finite score"):
        ranked(["a", "b"], [1.0, NAN])
    with pytest.raises(ValueError, match="keep percent"):
        n_keep(10, 0)


def test_auroc_by_hand():
    from saev_core.sae.evaluation import auroc, detection_auroc

    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auroc([1, 1, 1], [True, False, True]) == pytest.approx(0.5)
    assert math.isnan(auroc([1, 2], [True, True]))
    d = detection_auroc([0.9, 0.8, 0.1, 0.85], ["clean", "clean", "swap", "flip"])
    assert d["swap"] == 1.0 and d["flip"] == 0.5 and d["overall"] == pytest.approx(0.75)
