"""The run's two small tables as text, formatted once for the command line and the flow's summary
artifact: the canary table (paired win rate per method and kind) and the detection table (AUROC
per method and corruption, datasets whose labels are known)."""

from __future__ import annotations

CANARY_CAPTION = ("Canaries (known-bad copies of this data's own samples), paired win rate P(canary < its source), "
                  "0.5 = chance; prompt+image scores cannot see response_swap or flipped by construction:")
DETECTION_CAPTION = "Detection of the dataset's known corruptions (AUROC, low score = corrupted):"


def _cell(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and v == v else "-"


def _markdown(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|---" * len(head) + "|", *("| " + " | ".join(r) + " |" for r in rows)]


def subset_line(name: str, info: dict) -> str:
    """`top-50: 500 samples (score >= 0.123)`; a subset that kept no row (a pinned model's `kept`
    when no row reaches its threshold) has no lowest score to print."""
    low = info.get("min_score")
    return f"{name}: {info['rows']} samples" + (f" (score >= {low:.4g})" if low is not None else " (no row kept)")


def canary_lines(rows: list[dict]) -> list[str]:
    """One row per method, one column per canary kind: the paired win rate (a markdown table)."""
    kinds = sorted({r["kind"] for r in rows})
    table = {(r["method"], r["kind"]): r.get("paired_win_rate") for r in rows}
    return _markdown(["method", *kinds], [[m, *(_cell(table.get((m, k))) for k in kinds)]
                                          for m in dict.fromkeys(r["method"] for r in rows)])


def detection_lines(detection: dict[str, dict[str, float]]) -> list[str]:
    """One row per method, one column per corruption (and `overall`): AUROC (a markdown table)."""
    kinds = list(next(iter(detection.values())))
    return _markdown(["method", *kinds], [[m, *(_cell(row.get(k)) for k in kinds)] for m, row in detection.items()])
