"""Per-sample statistics survive the sparse store exactly, so scores computed from stored stats
equal scores computed from the stats in memory."""

import pytest
import torch

from saev_core.sae.scoring import SCORERS, ScoreContext, sample_stats, score_all
from saev_core.sae.stats_store import StatsError, read_stats, stats_bytes, stats_from_bytes, write_stats
from saev_core.sae.weights import CrossModalWeights


def _stats(n=5, d_sae=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        t = 20 + i
        z = torch.relu(torch.randn(t, d_sae, generator=g) - 2.5)  # SAE-like: few features fire
        acts = torch.randn(t, 16, generator=g)
        st = sample_stats(f"s{i}", z, acts, torch.arange(t) % 3 == 0, content=torch.arange(t) % 3 == 1)
        st.logp = {"logp_chosen": -1.5 - i, "logp_rejected": -2.0}  # optional fields travel too
        out.append(st)
    return out


def test_roundtrip_is_exact_and_scores_match(tmp_path):
    stats = _stats()
    write_stats(str(tmp_path / "x.safetensors"), stats)
    back = read_stats(str(tmp_path / "x.safetensors"))
    w = torch.full((300,), float("nan"))
    w[::3] = torch.linspace(-0.2, 0.9, 100)
    weights = CrossModalWeights(w, torch.zeros(300), torch.zeros(300), 30, 5)
    for a, b in zip(stats, back):
        assert a.sample_id == b.sample_id and torch.equal(a.text_max, b.text_max)
        assert torch.equal(a.image_max, b.image_max) and a.l0 == b.l0 and a.n_image == b.n_image
        assert torch.equal(a.content_max, b.content_max) and a.logp == b.logp
        methods = [m for m, s in SCORERS.items() if not s.shard_level]
        assert score_all(a, methods, ScoreContext(weights, 0.5)) == score_all(b, methods, ScoreContext(weights, 0.5))
    # sparse: far smaller than two dense float32 vectors per sample
    assert (tmp_path / "x.safetensors").stat().st_size < 0.5 * len(stats) * 2 * 300 * 4


def test_bad_files_are_named():
    with pytest.raises(StatsError, match="where.bin: not a sample-statistics file"):
        stats_from_bytes(b"nonsense-bytes", "where.bin")
    from safetensors.torch import save

    with pytest.raises(StatsError, match="other.bin: no sample-statistics metadata"):
        stats_from_bytes(save({"x": torch.zeros(2)}), "other.bin")
    with pytest.raises(StatsError, match="no sample statistics"):
        stats_bytes([])
