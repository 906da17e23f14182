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


def truth_labels(truth_uri: str, row_index: Sequence[int]) -> list[str]:
    """Labels of a truth table (`row`, `corruption`, e.g. the toy world's) in the given row order."""
    import pyarrow.parquet as pq

    t = pq.read_table(truth_uri, columns=["row", "corruption"])
    label = dict(zip(t.column("row").to_pylist(), t.column("corruption").to_pylist()))
    return [label[r] for r in row_index]


def detection_from_truth(truth_uri: str, scores, columns: Sequence[str]) -> dict[str, dict]:
    """AUROC table of a scores table (`score` = the chosen method, then the other columns)
    against a truth table: the optional evaluation stage of datasets whose labels are known."""
    labels = truth_labels(truth_uri, scores.column("row_index").to_pylist())
    cols = {"score": scores.column("score").to_pylist()}
    cols.update({m: scores.column(m).to_pylist() for m in columns[1:]})
    return detection_table(cols, labels)
