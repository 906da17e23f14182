"""Detection quality against known labels (the toy world's truth table): AUROC of
"low score => corrupted", per corruption type and overall."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half
    (the Mann-Whitney statistic). NaN when either class is empty."""
    s = np.asarray(scores, dtype=float)
    y = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def detection_auroc(scores: Sequence[float], labels: Sequence[str], clean: str = "clean") -> dict[str, float]:
    """AUROC that a LOW score flags a corrupted sample: overall and per corruption type
    (each type against the clean samples only)."""
    s = -np.asarray(scores, dtype=float)  # low score => positive
    lab = np.asarray(labels)
    out = {"overall": auroc(s, lab != clean)}
    for kind in sorted(set(lab) - {clean}):
        keep = (lab == kind) | (lab == clean)
        out[kind] = auroc(s[keep], lab[keep] == kind)
    return out


def detection_table(score_columns: Mapping[str, Sequence[float]], labels: Sequence[str]) -> dict[str, dict]:
    return {name: detection_auroc(vals, labels) for name, vals in score_columns.items()}


# ---------------------------------------------------------------- canaries
def paired_win_rate(canary_scores: Sequence[float], source_scores: Sequence[float]) -> float:
    """P(score(canary) < score(its source)), ties counting one half: immune to what kind of
    prompt a pair has, since both members share it. NaN with no pairs."""
    c = np.asarray(canary_scores, dtype=float)
    s = np.asarray(source_scores, dtype=float)
    if c.shape != s.shape:
        raise ValueError(f"{c.size} canary scores but {s.size} source scores")
    if c.size == 0:
        return float("nan")
    return float(((c < s) + 0.5 * (c == s)).mean())


def canary_auroc(canary_scores: Sequence[float], real_scores: Sequence[float]) -> float:
    """Unpaired AUROC that a LOW score flags a canary among all real samples."""
    c = np.asarray(canary_scores, dtype=float)
    r = np.asarray(real_scores, dtype=float)
    return auroc(-np.concatenate([c, r]), np.r_[np.ones(c.size, bool), np.zeros(r.size, bool)])


def canary_recall(canary_scores: Sequence[float], real_scores: Sequence[float],
                  percents: Sequence[float]) -> dict[float, float]:
    """Share of canaries the top-p% subset would exclude, for each p: a canary ranked among the
    real samples is excluded when its score is below the subset's lowest kept score, and half
    excluded when equal to it (a tie). Chance level = 1 - p/100."""
    from saev_core.data.selection import n_keep

    c = np.asarray(canary_scores, dtype=float)
    r = np.sort(np.asarray(real_scores, dtype=float))[::-1]
    out = {}
    for p in percents:
        if c.size == 0 or r.size == 0:
            out[p] = float("nan")
            continue
        threshold = r[n_keep(r.size, p) - 1]
        out[p] = float(((c < threshold) + 0.5 * (c == threshold)).mean())
    return out


def canary_table(scores: Mapping[str, Mapping[str, float]], canaries: Sequence[Mapping],
                 real_ids: Sequence[str], percents: Sequence[float] = (25, 50, 75)) -> list[dict]:
    """One row per (method, kind): n, paired win rate, unpaired AUROC, recall at each keep %.

    scores: method -> {sample_id: score} over real samples and canaries; canaries: rows with
    canary_id, source_id, kind; real_ids: the real samples a subset is chosen from."""
    rows = []
    kinds = sorted({c["kind"] for c in canaries})
    for method, by_id in scores.items():
        missing = [c["canary_id"] for c in canaries if c["canary_id"] not in by_id]
        missing += [c["source_id"] for c in canaries if c["source_id"] not in by_id]
        if missing:
            raise ValueError(f"method {method!r} has no score for {len(missing)} canaries/sources, e.g. {missing[:2]}")
        real = [by_id[i] for i in real_ids]
        for kind in kinds:
            mine = [c for c in canaries if c["kind"] == kind]
            cs = [by_id[c["canary_id"]] for c in mine]
            row = {"method": method, "kind": kind, "n": len(mine),
                   "paired_win_rate": paired_win_rate(cs, [by_id[c["source_id"]] for c in mine]),
                   "auroc": canary_auroc(cs, real)}
            row.update({f"recall_top{p:g}": v for p, v in canary_recall(cs, real, percents).items()})
            rows.append(row)
    return rows


def truth_labels(truth_uri: str, row_index: Sequence[int]) -> list[str]:
    """Labels of a truth table (`row`, `corruption`, e.g. the toy world's) in the given row order."""
    import pyarrow.parquet as pq

    t = pq.read_table(truth_uri, columns=["row", "corruption"])
    label = dict(zip(t.column("row").to_pylist(), t.column("corruption").to_pylist()))
    return [label[r] for r in row_index]


def detection_from_truth(truth_uri: str, scores, columns: Sequence[str]) -> dict[str, dict]:
    """AUROC table of the score columns `columns` (one per method, by its name) against a truth
    table: the optional evaluation stage of datasets whose labels are known."""
    labels = truth_labels(truth_uri, scores.column("row_index").to_pylist())
    return detection_table({m: scores.column(m).to_pylist() for m in columns}, labels)
