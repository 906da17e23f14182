"""Each score variant and baseline on a small example computed by hand, and selection."""

import math

import pytest
import torch

from saev_core.sae.scoring import (METHODS, SCORERS, SampleStats, ScoreContext, random_score, sample_stats, score,
                                   score_all, score_shard_methods)
from saev_core.data.selection import (n_keep, prompt_clusters, quantile_bands, ranked, top_percent,
                                     top_percent_within)
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
    content = torch.tensor([True, False, False, False])  # row 1 is chat template
    st = sample_stats("s1", z, acts, is_image, content)
    st.logp = {"logp_chosen": -0.5, "logp_rejected": -2.0}
    return st, weights


def test_stats(example):
    st, _ = example
    assert st.text_max.tolist() == [2.0, 1.5, 0.5, 0.0, 3.0]
    assert st.image_max.tolist() == pytest.approx([1.5, 2.0, 0.2, 4.0, 0.0])
    assert st.l0 == pytest.approx((3 + 1 + 2 + 2) / 4)
    # mean image (0.5, 1) vs mean text (1, 0): cos = 0.5 / |(0.5,1)| = 0.4472
    assert st.raw_cosine == pytest.approx(0.5 / math.sqrt(1.25))
    assert (st.n_positions, st.n_image) == (4, 2)
    assert st.content_max.tolist() == [2.0, 0.0, 0.5, 0.0, 3.0]  # row 0 only


def test_content_mask_never_counts_image_positions_and_may_be_empty():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 3.0]])
    is_image = torch.tensor([False, True, True])
    st = sample_stats("s", z, torch.ones(3, 2), is_image, torch.tensor([False, True, True]))
    assert st.content_max.tolist() == [0.0, 0.0]
    assert sample_stats("s", z, torch.ones(3, 2), is_image).content_max is None


def test_coverage(example):
    st, w = example
    # delta=1: weighted features on a content token above 1: {0 (2.0), 4 (3.0)} -> 0.5 + 0.3;
    # of those also on an image token above 1: {0 (1.5)} -> 0.5 / 0.8
    assert score(st, "coverage", w, delta=1.0) == pytest.approx(0.625)
    # delta=0.1: content {0, 2, 4} -> 0.925; with image {0 (1.5), 2 (0.2)} -> 0.625 / 0.925
    assert score(st, "coverage", w, delta=0.1) == pytest.approx(0.625 / 0.925)
    assert score(st, "coverage", w, delta=10.0) == 0.0  # nothing on the text: no evidence
    st.content_max = None
    with pytest.raises(ValueError, match="needs a content mask"):
        score(st, "coverage", w, delta=1.0)


def _stats(sid, text, image):
    t, i = torch.tensor(text), torch.tensor(image)
    return SampleStats(sid, t, i, 0.0, 0.0, 2, 1)


def test_null_z_by_hand():
    # delta 0.5; features weighted [1, 2, none]
    stats = [_stats("A", [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]), _stats("B", [0.0, 1.0, 1.0], [0.0, 1.0, 1.0]),
             _stats("C", [1.0, 0.0, 1.0], [1.0, 1.0, 1.0])]
    w = CrossModalWeights(torch.tensor([1.0, 2.0, NAN]), torch.zeros(3), torch.zeros(3), 30, 5)
    # s_ij = sum of weights over text_i & image_j: A: (1, 2, 3); B: (0, 2, 2); C: (1, 0, 1)
    # z_A = (1 - 2.5) / 0.5 = -3; z_B = (2 - 1) / 1 = 1; z_C = (1 - 0.5) / 0.5 = 1
    out = score_shard_methods(stats, ["null_z", "reference"], ScoreContext(w, delta=0.5))
    assert list(out) == ["null_z"]
    assert out["null_z"] == pytest.approx([-3.0, 1.0, 1.0])
    # every feature counts 1: A: (1, 1, 2) -> -1; B: (0, 2, 2) -> 1; C: (1, 1, 2) -> sd 0, floored at 1e-6
    assert score_shard_methods(stats, ["null_z_cooccur"], ScoreContext(None, 0.5))["null_z_cooccur"] == pytest.approx(
        [-1.0, 1.0, 1e6])
    with pytest.raises(ValueError, match="at least 3 samples"):
        score_shard_methods(stats[:2], ["null_z_cooccur"], ScoreContext(None, 0.5))
    with pytest.raises(ValueError, match="scores a whole shard"):
        score(stats[0], "null_z", w, 0.5)


def test_null_z_draws_a_seeded_subset_of_the_shard():
    g = torch.Generator().manual_seed(0)
    stats = [_stats(f"s{i}", torch.rand(6, generator=g).tolist(), torch.rand(6, generator=g).tolist())
             for i in range(8)]
    a = score_shard_methods(stats, ["null_z_cooccur"], ScoreContext(None, 0.5, null_samples=3))["null_z_cooccur"]
    assert a == score_shard_methods(stats, ["null_z_cooccur"], ScoreContext(None, 0.5, null_samples=3))["null_z_cooccur"]
    # sample 0's z is one of the values a 3-sample null can give
    from itertools import combinations

    text = torch.stack([s.text_max > 0.5 for s in stats]).double()
    image = torch.stack([s.image_max > 0.5 for s in stats]).double()
    pair = text @ image.T
    possible = []
    for js in combinations(range(1, 8), 3):
        null = pair[0, list(js)]
        possible.append(float((pair[0, 0] - null.mean()) / max(float(null.std(unbiased=False)), 1e-6)))
    assert any(a[0] == pytest.approx(p) for p in possible)
    full = score_shard_methods(stats, ["null_z_cooccur"], ScoreContext(None, 0.5, null_samples=7))["null_z_cooccur"]
    assert full != a  # a different null


def test_logp_methods(example):
    st, _ = example
    assert score(st, "logp_chosen") == -0.5
    assert score(st, "logp_margin") == pytest.approx(1.5)
    st.logp = None
    with pytest.raises(ValueError, match="has no logp_chosen"):
        score(st, "logp_chosen")


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
    out = score_all(st, list(METHODS), ScoreContext(w, delta=1.0))
    assert set(out) == {m for m in METHODS if not SCORERS[m].shard_level}
    assert all(math.isfinite(v) for v in out.values())
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


def test_stratified_selection_by_hand():
    ids = ["a", "b", "c", "d", "e", "f"]
    scores = [9.0, 8.0, 7.0, 3.0, 2.0, 1.0]
    groups = ["x", "x", "x", "y", "y", "y"]
    assert top_percent(ids, scores, 50) == [0, 1, 2]  # a global cut drops group y entirely
    assert top_percent_within(ids, scores, groups, 50) == [0, 1, 3, 4]  # 2 of 3 per group (round half up)
    assert top_percent_within(ids, scores, groups, 34) == [0, 3]
    with pytest.raises(ValueError, match="6 samples but 2 group labels"):
        top_percent_within(ids, scores, ["x", "y"], 50)


def test_prompt_clusters_group_question_types():
    prompts = ["what color is the circle?", "what color is the square?", "what colour is the cross?",
               "how many objects are there?", "how many objects are in the image?", "how many shapes?"]
    labels = prompt_clusters(prompts, 2, seed=0)
    assert labels[0] == labels[1] and labels[3] == labels[4] and labels[0] != labels[3]
    assert labels == prompt_clusters(prompts, 2, seed=0)
    assert prompt_clusters(["same", "same"], 5) == [0, 0]
