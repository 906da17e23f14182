"""Rendering of feature dashboards and sample explanations: PNG views and a static HTML report.

No computation of activations happens here (see `saev_core.interp.dashboard` / `saev_core.interp.explain`);
this module only turns them into pictures. The report is one `index.html` with its images as
PNG files in `img/` beside it: no script, no stylesheet or font from the network, so it opens
offline from a laptop, a run folder or object storage.
"""

from __future__ import annotations

import html
import io
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from saev_core.data import storage
from saev_core.data.images import normalize_image

DISPLAY = 144  # longest side of an image panel, pixels
_POS = np.array([[255, 255, 160], [255, 200, 40], [240, 90, 20], [170, 0, 30]], dtype=np.float64)
_NEG = np.array([[170, 220, 255], [60, 140, 240], [20, 40, 170]], dtype=np.float64)


# ---------------------------------------------------------------- pictures
def _ramp(t: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0) * (len(anchors) - 1)
    i = np.minimum(t.astype(int), len(anchors) - 2)
    f = (t - i)[..., None]
    return anchors[i] * (1 - f) + anchors[i + 1] * f


def display_size(width: int, height: int, longest: int = DISPLAY) -> tuple[int, int]:
    s = longest / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def overlay(image: Image.Image, heat: np.ndarray | None, vmax: float | None = None, longest: int = DISPLAY,
            alpha: float = 0.6) -> Image.Image:
    """The image at display size with `heat` ([H, W], the image's own pixel grid) blended over it:
    warm colours for positive values, blue for negative, transparent at 0."""
    image = normalize_image(image)
    size = display_size(image.width, image.height, longest)
    up = size[0] >= image.width
    base = image.resize(size, Image.NEAREST if up else Image.BILINEAR)
    if heat is None:
        return base
    h = np.asarray(heat, dtype=np.float64)
    if h.shape != (image.height, image.width):
        raise ValueError(f"heatmap shape {h.shape} is not the image's {(image.height, image.width)}")
    scale = vmax if vmax and vmax > 0 else float(np.abs(h).max())
    if scale <= 0:
        return base
    t = Image.fromarray(np.clip(h / scale * 127.5 + 127.5, 0, 255).astype(np.uint8)).resize(size, Image.NEAREST)
    v = (np.asarray(t, dtype=np.float64) - 127.5) / 127.5
    colour = np.where(v[..., None] >= 0, _ramp(v, _POS), _ramp(-v, _NEG))
    a = (alpha * np.clip(np.abs(v), 0, 1) ** 0.7)[..., None]
    out = np.asarray(base, dtype=np.float64) * (1 - a) + colour * a
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def strip(panels: Sequence[tuple[Image.Image, str]], title: str = "") -> Image.Image:
    """Panels side by side with a caption under each and an optional title: one PNG view."""
    font = ImageFont.load_default()
    pad, cap, top = 6, 14, 16 if title else 0
    w = sum(p.width for p, _ in panels) + pad * (len(panels) + 1)
    h = max((p.height for p, _ in panels), default=0) + cap + 2 * pad + top
    canvas = Image.new("RGB", (max(w, 120), h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
    x = pad
    for p, text in panels:
        canvas.paste(p, (x, top + pad))
        draw.text((x, top + pad + p.height + 2), text[: max(4, p.width // 6)], fill=(40, 40, 40), font=font)
        x += p.width + pad
    return canvas


# --------------------------------------------------------------------- text
def _clean(tok: str) -> str:
    return tok.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", "\n")


def _spaced(tokens: Sequence[str]) -> bool:
    """True when tokens carry their own spaces (SentencePiece / byte-level BPE)."""
    return any(t.startswith(("\u2581", "\u0120")) for t in tokens)


def highlight(tokens: Sequence[str], values: Sequence[float], is_image: Sequence[bool], vmax: float | None = None,
              center: int | None = None) -> str:
    """HTML of a token sequence with each text token's background set by its value (warm for
    positive, blue for negative); a run of image positions becomes one [image xN] chip coloured
    by its largest value."""
    vals = np.asarray(values, dtype=np.float64)
    scale = vmax if vmax and vmax > 0 else (float(np.abs(vals).max()) if vals.size else 0.0)
    sep = "" if _spaced(tokens) else " "
    out, i, n = [], 0, len(tokens)

    def bg(v: float) -> str:
        if scale <= 0 or v == 0:
            return "transparent"
        a = min(1.0, abs(v) / scale)
        return f"rgba(240,110,20,{a:.2f})" if v > 0 else f"rgba(40,90,230,{a:.2f})"

    while i < n:
        if is_image[i]:
            j = i
            while j < n and is_image[j]:
                j += 1
            m = float(vals[i:j].max()) if (vals[i:j] > 0).any() else float(vals[i:j].min())
            out.append(f'<span class="img" style="background:{bg(m)}" title="{j - i} image positions, '
                       f'max {m:.3g}">[image &times;{j - i}]</span>')
            i = j
            continue
        tok = tokens[i]
        if tok == "":
            i += 1
            continue
        cls = ' class="top"' if center is not None and i == center else ""
        out.append(f'<span{cls} style="background:{bg(float(vals[i]))}" title="{float(vals[i]):.3g}">'
                   f"{html.escape(_clean(tok))}</span>")
        i += 1
    return f'<span class="toks">{sep.join(out)}</span>'


# --------------------------------------------------------------------- html
STYLE = """
body{font-family:system-ui,-apple-system,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}figure{display:inline-block;margin:4px 8px 8px 0;text-align:center}
figure img{display:block;image-rendering:pixelated;border:1px solid #ccc}figcaption{font-size:12px;color:#555}
.toks span{border-radius:3px;padding:0 1px}.toks .top{outline:2px solid #a00}.img{font-size:11px;color:#333}
.card{border-top:2px solid #eee;padding-top:.5em;margin-top:1.5em}code{font-size:12px}ol li{margin:3px 0}
.meta td:first-child{color:#666}
"""


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _short(sample_id: str) -> str:
    return sample_id[:12]


class ReportFiles:
    """Collects the PNG files of a report (relative path -> bytes)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}

    def add(self, rel: str, image: Image.Image) -> str:
        self.files[rel] = png(image)
        return rel


def feature_section(d, images: Mapping[str, tuple], files: ReportFiles) -> str:
    """One feature dashboard. `images`: sample_id -> (PIL image, ImageGeometry)."""
    f = d.feature
    stats = [("cross-modal weight", _fmt(d.weight)), ("density (all positions)", f"{d.density:.4%}"),
             ("density on text", f"{d.density_text:.4%}"), ("density on image", f"{d.density_image:.4%}"),
             ("top pool: text / image positions", f"{_fmt(d.n_text_pool)} / {_fmt(d.n_image_pool)}")]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>" for k, v in stats)
    texts = "".join(
        f"<li>{highlight(ex.tokens or [str(t) for t in ex.token_ids], ex.acts, ex.is_image, center=ex.center)} "
        f"<small>act {ex.activation:.3g} &middot; <code>{_short(ex.sample_id)}</code></small></li>"
        for ex in d.top_text) or "<li>never active on a text position</li>"
    figs, panels = [], []
    vmax = max((ex.activation for ex in d.top_images), default=0.0)
    for k, ex in enumerate(d.top_images):
        if ex.sample_id not in images:
            continue
        im, geo = images[ex.sample_id]
        pic = overlay(im, geo.heatmap(ex.token_acts), vmax)
        rel = files.add(f"img/feature-{f}-{k}.png", pic)
        figs.append(f'<figure><img src="{rel}" width="{pic.width}" height="{pic.height}" alt="feature {f} on '
                    f'{_short(ex.sample_id)}"><figcaption>max {ex.activation:.3g}<br><code>{_short(ex.sample_id)}'
                    f"</code></figcaption></figure>")
        panels.append((pic, f"{ex.activation:.3g}"))
    strip_link = ""
    if panels:
        rel = files.add(f"img/feature-{f}.png", strip(panels, f"feature {f}: top images"))
        strip_link = f' &middot; <a href="{rel}">PNG</a>'
    return (f'<div class="card" id="feature-{f}"><h3>Feature {f}{strip_link}</h3><table class="meta">{rows}</table>'
            f"<h4>Top text positions</h4><ol>{texts}</ol><h4>Top images (heatmap: activation per patch, "
            f"shared scale)</h4>{''.join(figs) or '<p>never active on an image position</p>'}</div>")


def sample_section(ex, files: ReportFiles, linked: set[int] | None = None) -> str:
    """One sample explanation: score, contributing features, heatmaps, highlighted prompt."""
    sid = _short(ex.sample_id)
    figs, panels = [], []
    if ex.image is not None and ex.geometry is not None:
        views = [("image", None, None), ("weighted sum", ex.geometry.heatmap(ex.image_weighted), None)]
        vmax_f = max((float(np.abs(fc.acts[ex.is_image]).max()) for fc in ex.features), default=0.0)
        views += [(f"feature {fc.feature}", ex.geometry.heatmap(fc.acts[ex.is_image]), vmax_f) for fc in ex.features]
        for k, (name, heat, vmax) in enumerate(views):
            pic = overlay(ex.image, heat, vmax)
            rel = files.add(f"img/sample-{sid}-{k}.png", pic)
            figs.append(f'<figure><img src="{rel}" width="{pic.width}" height="{pic.height}" alt="{name}">'
                        f"<figcaption>{html.escape(name)}</figcaption></figure>")
            panels.append((pic, name))
    strip_link = ""
    if panels:
        rel = files.add(f"img/sample-{sid}.png", strip(panels, f"sample {sid}: score {ex.score:.4g}"))
        strip_link = f' &middot; <a href="{rel}">PNG</a>'
    text_pos = ~ex.is_image
    rows = []
    for fc in ex.features:
        name = (f'<a href="#feature-{fc.feature}">{fc.feature}</a>' if linked and fc.feature in linked
                else str(fc.feature))
        fired = [(t, float(a)) for t, a, m in zip(ex.tokens, fc.acts, text_pos) if m and a > 0]
        fired.sort(key=lambda p: -p[1])
        words = ", ".join(f"{html.escape(_clean(t).strip())} ({a:.2g})" for t, a in fired[:5]) or "-"
        rows.append(f"<tr><td>{name}</td><td>{fc.weight:.4g}</td><td>{fc.contribution:+.4g}</td>"
                    f"<td>{fc.text_max:.3g}</td><td>{fc.image_max:.3g}</td><td>{words}</td></tr>")
    table = ("<table><tr><th>feature</th><th>weight</th><th>contribution</th><th>max on text</th>"
             "<th>max on image</th><th>top text tokens</th></tr>" + "".join(rows) + "</table>") if rows else \
        "<p>no cross-modal feature is active on both modalities of this sample</p>"
    lone = ""
    if ex.one_sided:
        lone_rows = "".join(
            f"<tr><td>{fc.feature}</td><td>{fc.weight:.4g}</td><td>{fc.text_max:.3g}</td><td>{fc.image_max:.3g}</td>"
            f"<td>{'text' if fc.text_max > ex.delta else 'image'}</td></tr>" for fc in ex.one_sided)
        lone = ("<h4>Cross-modal features active on one side only (their partner modality stayed below delta, "
                "so they add nothing)</h4><table><tr><th>feature</th><th>weight</th><th>max on text</th>"
                f"<th>max on image</th><th>active on</th></tr>{lone_rows}</table>")
    others = ""
    if ex.other_scores:
        others = " &middot; " + ", ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in sorted(ex.other_scores.items()))
    return (f'<div class="card" id="sample-{sid}"><h3>Sample <code>{html.escape(ex.sample_id)}</code>{strip_link}</h3>'
            f"<p>score ({html.escape(ex.method)}) <b>{ex.score:.4g}</b> from {ex.n_contributing} cross-modal features "
            f"(delta {ex.delta:.3g}){others}</p>{''.join(figs)}"
            f"<h4>Prompt, highlighted by the weighted sum of the contributing features</h4>"
            f"<p>{highlight(ex.tokens, ex.weighted, ex.is_image)}</p>"
            f"<h4>Top contributing features</h4>{table}{lone}</div>")


def page(title: str, body: str, meta: Mapping[str, object] | None = None) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(_fmt(v))}</td></tr>"
                   for k, v in (meta or {}).items())
    return (f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'{f"<table class=meta>{rows}</table>" if rows else ""}{body}</body></html>\n')


def render_report(dashboards: Mapping[int, object], explanations: Sequence, images: Mapping[str, tuple],
                  meta: Mapping[str, object], feature_order: Sequence[int] | None = None,
                  title: str = "SAE-V interpretability") -> tuple[str, dict[str, bytes]]:
    """(index.html text, {relative path: PNG bytes})."""
    files = ReportFiles()
    order = [f for f in (feature_order or list(dashboards)) if f in dashboards]
    linked = set(order)
    summary = "".join(
        f'<tr><td><a href="#feature-{f}">{f}</a></td><td>{_fmt(dashboards[f].weight)}</td>'
        f"<td>{dashboards[f].density_text:.3%}</td><td>{dashboards[f].density_image:.3%}</td>"
        f"<td>{html.escape(', '.join(dict.fromkeys(_clean(w).strip() for w in dashboards[f].top_words[:5])))}</td></tr>"
        for f in order)
    sample_links = "".join(f'<li><a href="#sample-{_short(e.sample_id)}"><code>{_short(e.sample_id)}</code></a> '
                           f"score {e.score:.4g}</li>" for e in explanations)
    body = (
        "<h2>Features</h2><table><tr><th>feature</th><th>weight</th><th>density text</th><th>density image</th>"
        f"<th>top text tokens</th></tr>{summary}</table>"
        f"<h2>Lowest-scored samples</h2><ul>{sample_links or '<li>none</li>'}</ul>"
        + "".join(sample_section(e, files, linked) for e in explanations)
        + "<h2>Feature dashboards</h2>"
        + "".join(feature_section(dashboards[f], images, files) for f in order))
    return page(title, body, meta), files.files


def write_report(out_uri: str, dashboards, explanations, images, meta, feature_order=None,
                 storage_options=None, title: str = "SAE-V interpretability", index_name: str = "index.html") -> list[str]:
    """Write `index_name` and img/*.png under `out_uri` (PNGs first, the page last)."""
    text, files = render_report(dashboards, explanations, images, meta, feature_order, title)
    written = []
    for rel, data in files.items():
        uri = storage.join(out_uri, rel)
        storage.write_bytes(uri, data, storage_options)
        written.append(uri)
    index = storage.join(out_uri, index_name)
    storage.write_bytes(index, text.encode("utf-8"), storage_options)
    return written + [index]


def link_html(rel_path: str) -> str:
    """A section for the run's main report.html linking the interpretability report."""
    return (f'<h2>Interpretability</h2><p><a href="{html.escape(rel_path)}">Feature dashboards and explanations '
            "of the lowest-scored samples</a> (what fired where).</p>")
