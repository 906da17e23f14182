"""The run's report.html: one self-contained page (inline SVG and base64 images, no network),
so it opens from object storage, a laptop, or an air-gapped cluster alike."""

from __future__ import annotations

import base64
import html
from typing import Mapping, Sequence

import numpy as np


def _histogram_svg(scores: Sequence[float], threshold: float | None, width: int = 560, height: int = 180,
                   bins: int = 40) -> str:
    s = np.asarray(scores, dtype=float)
    if s.size == 0:
        return "<p>no scores</p>"
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    kept = s >= threshold if threshold is not None else np.ones_like(s, dtype=bool)
    h_keep, _ = np.histogram(s[kept], edges)
    h_drop, _ = np.histogram(s[~kept], edges)
    top = max(1, int((h_keep + h_drop).max()))
    bw = width / bins
    bars = []
    for i in range(bins):
        x = i * bw
        for count, base, colour in ((h_drop[i], 0, "#c44e52"), (h_keep[i], h_drop[i], "#4c72b0")):
            if count:
                y0 = height - 20 - (base + count) / top * (height - 30)
                bars.append(f'<rect x="{x:.1f}" y="{y0:.1f}" width="{bw - 1:.1f}" '
                            f'height="{count / top * (height - 30):.1f}" fill="{colour}"/>')
    axis = (f'<text x="0" y="{height - 4}" font-size="11">{lo:.3g}</text>'
            f'<text x="{width - 40}" y="{height - 4}" font-size="11">{hi:.3g}</text>')
    legend = ('<text x="8" y="12" font-size="11" fill="#4c72b0">kept</text>'
              '<text x="48" y="12" font-size="11" fill="#c44e52">dropped</text>')
    return f'<svg width="{width}" height="{height}" role="img" aria-label="score histogram">{"".join(bars)}{axis}{legend}</svg>'


def _example_rows(examples: Sequence[Mapping]) -> str:
    rows = []
    for ex in examples:
        img = base64.b64encode(ex["image"]).decode()
        rows.append(
            "<tr>"
            f'<td><img src="data:image/png;base64,{img}" width="96" height="96" style="image-rendering:pixelated"></td>'
            f"<td>{ex['score']:.4f}</td><td>{html.escape(ex['prompt'])}</td>"
            f"<td>{html.escape(ex['chosen'])}</td><td>{html.escape(ex['rejected'])}</td>"
            f"<td><code>{html.escape(ex['sample_id'][:12])}</code></td></tr>")
    head = "<tr><th>image</th><th>score</th><th>prompt</th><th>chosen</th><th>rejected</th><th>id</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _kv_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _win_rate_svg(rows: Sequence[Mapping], method: str, width: int = 560, bar_h: int = 12) -> str:
    """Paired win rate per (method, kind) as horizontal bars from 0 to 1, a line at chance (0.5);
    the run's method drawn darker."""
    if not rows:
        return ""
    label_w, plot_w = 260, width - 270
    items = []
    for i, r in enumerate(rows):
        y = 8 + i * (bar_h + 4)
        v = r.get("paired_win_rate")
        colour = "#4c72b0" if r["method"] == method else "#a6bddb"
        items.append(f'<text x="0" y="{y + bar_h - 2}" font-size="11">{html.escape(r["method"])} / '
                     f'{html.escape(r["kind"])}</text>')
        if v is not None and v == v:
            items.append(f'<rect x="{label_w}" y="{y}" width="{v * plot_w:.1f}" height="{bar_h}" fill="{colour}"/>'
                         f'<text x="{label_w + v * plot_w + 3:.1f}" y="{y + bar_h - 2}" font-size="10">{v:.2f}</text>')
    height = 16 + len(rows) * (bar_h + 4)
    chance = label_w + 0.5 * plot_w
    items.append(f'<line x1="{chance}" y1="0" x2="{chance}" y2="{height}" stroke="#c44e52" stroke-dasharray="4"/>')
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="canary paired win rates">'
            f'{"".join(items)}</svg>')


def canary_html(rows: Sequence[Mapping], method: str, flags: Sequence[str] = ()) -> str:
    """The run's canary table (one row per method and kind) with a plot of the paired win rates."""
    if not rows:
        return ""
    cols = ["method", "kind", "n", "paired_win_rate", "auroc", *[c for c in rows[0] if c.startswith("recall_")]]
    warn = "".join(f'<p style="color:#c44e52"><b>Warning:</b> {html.escape(f)}</p>' for f in flags)
    return ("<h2>Canaries: known-bad copies of this dataset's own samples</h2>"
            "<p>Paired win rate = P(score of the canary &lt; score of its source), 0.5 = chance; AUROC = canaries "
            "against all real samples; recall_topP = share of canaries the top-P% subset would exclude "
            "(chance 1 - P/100). Scores of the prompt and image alone cannot see response_swap or "
            "flipped canaries by construction.</p>" + warn + _win_rate_svg(rows, method) + _kv_table(rows, cols))


def render_report(*, title: str, method: str, scores: Sequence[float], threshold: float | None,
                  counts: Mapping[str, object], stages: Sequence[Mapping], lowest: Sequence[Mapping],
                  highest: Sequence[Mapping], detection: Mapping[str, Mapping[str, float]] | None = None,
                  extra_html: str = "", canaries: Sequence[Mapping] | None = None,
                  flags: Sequence[str] = ()) -> str:
    """`lowest`/`highest`: dicts with sample_id, score, prompt, chosen, rejected, image (PNG bytes);
    `canaries`: rows of saev_core.sae.evaluation.canary_table; `flags`: warnings of the ranking gate."""
    det = canary_html(canaries or [], method, flags)
    if detection:
        kinds = sorted({k for v in detection.values() for k in v})
        det += ("<h2>Detection of known corruptions (AUROC, low score = corrupted)</h2>"
               + _kv_table([{"method": m, **v} for m, v in detection.items()], ["method", *kinds]))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ddd;padding:4px 8px;"
             "text-align:left;vertical-align:top}th{background:#f4f4f4}")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{style}</style></head>
<body><h1>{html.escape(title)}</h1>
<h2>Counts</h2>{_kv_table([{"what": k, "value": v} for k, v in counts.items()], ["what", "value"])}
<h2>Scores ({html.escape(method)}): kept vs dropped at the smallest keep fraction</h2>
{_histogram_svg(scores, threshold)}
{det}
<h2>Lowest-scored samples</h2>{_example_rows(lowest)}
<h2>Highest-scored samples</h2>{_example_rows(highest)}
<h2>Stages</h2>{_kv_table(stages, ["stage", "seconds", "detail"])}
{extra_html}
</body></html>"""


def report_examples(scores, record_uris: Sequence[str], storage_options: dict | None = None,
                    n: int = 6) -> tuple[list, list]:
    """The n lowest- and n highest-scored samples with their images, for the report."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from saev_core.data.ingest import read_record_shard
    from saev_core.data.selection import ranked

    ids = scores.column("sample_id").to_pylist()
    vals = scores.column("score").to_pylist()
    order = ranked(ids, vals)
    want = {ids[i]: vals[i] for i in order[:n] + order[-n:]}
    found = {}
    for uri in record_uris:
        t = read_record_shard(uri, storage_options, columns=["sample_id", "prompt", "image", "chosen", "rejected"])
        t = t.filter(pc.is_in(t.column("sample_id"), pa.array(list(want))))
        for r in t.to_pylist():
            found[r["sample_id"]] = {**r, "score": want[r["sample_id"]]}
    # `order` is best first
    high = [found[ids[i]] for i in order[:n] if ids[i] in found]
    low = [found[ids[i]] for i in order[::-1][:n] if ids[i] in found]
    return low, high
