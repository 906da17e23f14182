"""Choosing what to keep: the top p% by score, or quantile bands. Deterministic under ties:
samples are ordered by score descending, then by sample_id ascending."""

from __future__ import annotations

import math
from typing import Sequence


def ranked(sample_ids: Sequence[str], scores: Sequence[float]) -> list[int]:
    """Indices from best to worst. NaN scores are refused, not silently ranked."""
    if len(sample_ids) != len(scores):
        raise ValueError(f"{len(sample_ids)} ids but {len(scores)} scores")
    bad = [sample_ids[i] for i, s in enumerate(scores) if s is None or math.isnan(s)]
    if bad:
        raise ValueError(f"{len(bad)} samples have no finite score, e.g. {bad[:3]}")
    return sorted(range(len(scores)), key=lambda i: (-scores[i], sample_ids[i]))


def n_keep(n: int, percent: float) -> int:
    """How many samples the top `percent`% holds: round half up, at least one of a non-empty set."""
    if not 0 < percent <= 100:
        raise ValueError(f"keep percent must be in (0, 100], got {percent}")
    return 0 if n == 0 else max(1, math.floor(n * percent / 100 + 0.5))


def top_percent(sample_ids: Sequence[str], scores: Sequence[float], percent: float) -> list[int]:
    """Indices of the kept samples, best first."""
    return ranked(sample_ids, scores)[: n_keep(len(sample_ids), percent)]


def quantile_bands(sample_ids: Sequence[str], scores: Sequence[float], n_bands: int) -> list[int]:
    """Band per sample: 0 = highest scores, n_bands-1 = lowest; band sizes differ by at most one."""
    if n_bands < 1:
        raise ValueError("n_bands must be >= 1")
    order = ranked(sample_ids, scores)
    n = len(order)
    band = [0] * n
    for rank, i in enumerate(order):
        band[i] = rank * n_bands // n
    return band


def top_percent_within(sample_ids: Sequence[str], scores: Sequence[float], groups: Sequence,
                       percent: float) -> list[int]:
    """Stratified top p%: the top `percent`% of each group (n_keep of the group's size), so a
    ranking whose scale differs by question type cannot drop whole types. Best first overall."""
    if len(groups) != len(sample_ids):
        raise ValueError(f"{len(sample_ids)} samples but {len(groups)} group labels")
    order = ranked(sample_ids, scores)
    size: dict = {}
    for g in groups:
        size[g] = size.get(g, 0) + 1
    left = {g: n_keep(n, percent) for g, n in size.items()}
    kept = []
    for i in order:
        if left[groups[i]] > 0:
            left[groups[i]] -= 1
            kept.append(i)
    return kept


def prompt_clusters(prompts: Sequence[str], n_clusters: int, seed: int = 0, n_buckets: int = 1 << 10) -> list[int]:
    """Cluster label per prompt: k-means (scipy) on L2-normalised hashed word counts, so prompts
    of one question type share a group. Deterministic for a seed; at most `n_clusters` labels."""
    import hashlib
    import re

    import numpy as np
    from scipy.cluster.vq import kmeans2

    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    x = np.zeros((len(prompts), n_buckets), dtype=np.float64)
    for i, p in enumerate(prompts):
        for w in re.findall(r"\w+", p.lower()):
            x[i, int.from_bytes(hashlib.blake2b(w.encode(), digest_size=4).digest(), "big") % n_buckets] += 1
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = min(n_clusters, len({tuple(r) for r in x}))
    if k <= 1:
        return [0] * len(prompts)
    _, labels = kmeans2(x, k, minit="++", seed=seed)
    return [int(v) for v in labels]


def keep_sets(sample_ids: Sequence[str], scores: Sequence[float], keep_percents: Sequence[int]) -> dict[int, dict[str, float]]:
    """For each keep percentage, the kept samples' {sample_id: score}, chosen by `ranked`."""
    order = ranked(sample_ids, scores)
    return {p: {sample_ids[i]: scores[i] for i in order[: n_keep(len(sample_ids), p)]} for p in keep_percents}
