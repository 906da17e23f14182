"""The gate on degenerate rankings: a run must not publish a subset it cannot rank.

Fails (the run publishes nothing) when
- a keep threshold sits on a tie that is cut: more than `max_tie_share` of that subset are
  rows whose score equals the threshold while other rows with the same score are left out, so
  which of them got in was decided by sample_id order, not by the score;
- the method needs cross-modal weights and fewer than `min_cross_modal` features have one.
Flags (and fails only when `min_canary_win_rate` is set) when the method's paired win rate on
`image_swap` canaries is not clearly above 0.5: the lower end of its 95% interval is <= 0.5.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from saev_core.data.selection import n_keep, ranked


def tie_picked(sample_ids: Sequence[str], scores: Sequence[float], percent: float) -> dict:
    """Rows of the top-`percent`% subset that a tie at its threshold let in by id order."""
    order = ranked(sample_ids, scores)
    k = n_keep(len(order), percent)
    if k == 0:
        return {"rows": 0, "subset": 0, "threshold": None, "tie_size": 0, "share": 0.0}
    threshold = scores[order[k - 1]]
    tie_size = sum(1 for s in scores if s == threshold)
    in_subset = sum(1 for i in order[:k] if scores[i] == threshold)
    picked = in_subset if tie_size > in_subset else 0  # a tie wholly inside the subset picked nothing
    return {"rows": picked, "subset": k, "threshold": float(threshold), "tie_size": tie_size,
            "share": picked / k}


def _tie_picked_within(sample_ids, scores, groups, percent) -> dict:
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    parts = [tie_picked([sample_ids[i] for i in idx], [scores[i] for i in idx], percent) for idx in members.values()]
    worst = max(parts, key=lambda t: t["rows"])
    rows, subset = sum(t["rows"] for t in parts), sum(t["subset"] for t in parts)
    return {"rows": rows, "subset": subset, "threshold": worst["threshold"], "tie_size": worst["tie_size"],
            "share": rows / subset if subset else 0.0}


def win_rate_interval(canary_scores: Sequence[float], source_scores: Sequence[float]) -> tuple[float, float, float]:
    """Paired win rate and its normal-approximation 95% interval over the per-pair outcomes
    (1 win, 0.5 tie, 0 loss)."""
    c, s = np.asarray(canary_scores, float), np.asarray(source_scores, float)
    if c.size == 0:
        return float("nan"), float("nan"), float("nan")
    x = (c < s) + 0.5 * (c == s)
    half = 1.96 * float(x.std(ddof=1)) / math.sqrt(x.size) if x.size > 1 else float("inf")
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


def check_ranking(sample_ids: Sequence[str], scores: Sequence[float], keep_percents: Sequence[float], *,
                  method: str, max_tie_share: float, needs_weights: bool = False, n_cross_modal: int | None = None,
                  min_cross_modal: int = 0, canary_win: tuple[float, float, float] | None = None,
                  min_canary_win_rate: float | None = None, groups: Sequence | None = None) -> dict:
    """{"failures": [...], "flags": [...], "ties": {percent: tie_picked}, "canary_image_swap": ...}.
    With `groups` (stratified selection) ties are counted within each group's own cut."""
    failures, flags = [], []
    if not all(math.isfinite(float(s)) for s in scores):
        # the scores gate (Great Expectations, at publish) fails such a run and names the expectation
        return {"failures": [], "flags": ["ties not checked: some scores are not finite"], "ties": {},
                "canary_image_swap": None}
    if groups is None:
        ties = {p: tie_picked(sample_ids, scores, p) for p in keep_percents}
    else:
        ties = {p: _tie_picked_within(sample_ids, scores, groups, p) for p in keep_percents}
    for p, t in ties.items():
        if t["share"] > max_tie_share:
            failures.append(
                f"top-{p:g}: {t['rows']} of its {t['subset']} rows ({t['share']:.1%}) were picked by sample_id "
                f"order from a tie of {t['tie_size']} rows at {method} = {t['threshold']:.6g} "
                f"(validation.max_tie_share = {max_tie_share:g}): the score cannot rank these samples")
    if needs_weights and n_cross_modal is not None and n_cross_modal < min_cross_modal:
        failures.append(f"only {n_cross_modal} cross-modal features (validation.min_cross_modal_features = "
                        f"{min_cross_modal}): method {method!r} sums weights over too few features to rank")
    canary = None
    if canary_win is not None:
        rate, lo, hi = canary_win
        canary = {"paired_win_rate": rate, "ci95": [lo, hi], "clearly_above_chance": bool(lo > 0.5)}
        if not lo > 0.5:
            flags.append(f"{method}: paired win rate on image_swap canaries {rate:.3f} (95% interval "
                         f"{lo:.3f}-{hi:.3f}) is not clearly above 0.5: this ranking may not separate matched "
                         "from mismatched image-text pairs on this data")
        if min_canary_win_rate is not None and not rate >= min_canary_win_rate:
            failures.append(f"{method}: paired win rate on image_swap canaries {rate:.3f} < "
                            f"validation.min_canary_win_rate = {min_canary_win_rate:g}")
    return {"failures": failures, "flags": flags, "ties": {str(p): t for p, t in ties.items()},
            "canary_image_swap": canary}


NOT_A_RANKING = ("random",)  # never suggested as the way out: it passes every tie check and ranks nothing


def refusal_advice(out: dict, *, method: str, sample_ids: Sequence[str], scores_by_method: dict[str, Sequence[float]],
                   keep_percents: Sequence[float], max_tie_share: float, needs_weights: dict[str, bool],
                   n_cross_modal: int | None, min_cross_modal: int, min_canary_win_rate: float | None = None,
                   canary_rows: Sequence[dict] | None = None, settings: dict | None = None,
                   groups: Sequence | None = None) -> tuple[str, str, dict]:
    """(found, fix, evidence) of a failed gate: the failures with their figures, then the settings
    that would change the outcome. Every other method this run scored is put through the same
    checks on this run's scores, so a suggested method is one that passes here, with its
    image_swap canary win rate beside it."""
    settings = dict(settings or {})
    win = {r["method"]: r["paired_win_rate"] for r in (canary_rows or []) if r.get("kind") == "image_swap"}
    alternatives = {}
    for other, values in scores_by_method.items():
        if other == method or other in NOT_A_RANKING:
            continue
        res = check_ranking(sample_ids, values, keep_percents, method=other, max_tie_share=max_tie_share,
                            needs_weights=needs_weights.get(other, False), n_cross_modal=n_cross_modal,
                            min_cross_modal=min_cross_modal, groups=groups)
        passes = not res["failures"] and all(math.isfinite(float(v)) for v in values)
        rate = win.get(other)
        alternatives[other] = {"passes": passes, "image_swap_win_rate": rate}
    passing = sorted((m for m, a in alternatives.items() if a["passes"]),
                     key=lambda m: -(alternatives[m]["image_swap_win_rate"] or 0.0))
    fixes = []
    if passing:
        shown = [f"scoring.method={m}" + (f" (image_swap canary win rate {alternatives[m]['image_swap_win_rate']:.2f})"
                                          if alternatives[m]["image_swap_win_rate"] is not None else "")
                 for m in passing[:3]]
        fixes.append("another method that passes this gate on this run's own scores: " + " or ".join(shown))
    elif alternatives:
        fixes.append(f"none of the other methods this run scored ({', '.join(alternatives)}) passes it either; "
                     "logp_chosen (the model's own log-probability) often ranks where SAE-V sums tie")
    else:
        fixes.append("another method (scoring.method; add candidates to scoring.baselines to have them checked)")
    ties = [t for t in out.get("ties", {}).values() if t["share"] > max_tie_share]
    few = needs_weights.get(method, False) and n_cross_modal is not None and n_cross_modal < min_cross_modal
    pinned = settings.get("curation_model")
    if pinned:  # the pinned model fixes the method, the weights and the SAE: only a new version changes them
        fixes[:] = [f"a new version of the curation model {pinned}: run curate unpinned with one of these changes "
                    f"({'; '.join(fixes)}), check its canary table, then saev-curate promote RUN --name "
                    f"{pinned.split('@')[0]}, which the next pinned run uses"]
    if needs_weights.get(method, False) and (ties or few) and not pinned:
        if settings.get("pool") == "joint":
            fixes.append("scoring.weights.pool=per_modality (text and image positions pooled apart, so more features count "
                         "as cross-modal)")
        if settings.get("weight_samples") is not None:
            fixes.append(f"more weight samples (scoring.weights.weight_samples, now {settings['weight_samples']})")
        if settings.get("sae_checkpoint"):
            fixes.append(f"a larger SAE than {settings['sae_checkpoint']}")
        elif settings.get("expansion_factor") is not None:
            d = f", d_sae {settings['d_sae']}" if settings.get("d_sae") else ""
            fixes.append(f"a larger SAE (sae.expansion_factor, now {settings['expansion_factor']}{d})")
    if ties:
        worst = max(t["share"] for t in ties)
        fixes.append(f"validation.max_tie_share={worst:.2f} or more accepts subsets picked by sample_id order "
                     "(not advised)")
    if few:
        fixes.append(f"validation.min_cross_modal_features at most {n_cross_modal} accepts so few features "
                     "(not advised)")
    if min_canary_win_rate is not None and any("min_canary_win_rate" in f for f in out.get("failures", [])):
        fixes.append("unset validation.min_canary_win_rate to only flag a weak canary win rate")
    weights = needs_weights.get(method, False) and n_cross_modal is not None and not few
    found = ("the ranking gate refused to publish its ranking: " + "; ".join(out.get("failures", []))
             + (f" ({n_cross_modal} cross-modal features)" if weights else ""))
    fix = "Settings that would change the outcome: " + "; ".join(fixes) + ". The canary table is in canaries.parquet"
    evidence = {"method": method, "failures": list(out.get("failures", [])), "ties": out.get("ties", {}),
                "n_cross_modal": n_cross_modal, "alternatives": alternatives, "settings": settings,
                "canaries": list(canary_rows or [])}
    return found, fix, evidence
