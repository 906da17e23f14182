"""A dataset's run history: per-row decisions, what changed against a parent run, the list of
published runs, the diff of two runs, the report's history chart and the Hugging Face dataset
card of a run folder.

Decisions. A row is `kept` when its score reaches the curation model's absolute
`keep_threshold` (fixed at promotion, so a kept row stays kept unless its content or the model
changes); a run without one keeps its top-p% (p = 50 when published, else the smallest keep
percent), which moves with the other rows. Rows are matched across runs by a row key (the
source's `row_index`, or `output.row_key`, a source column): the same key with another
`sample_id` (content hash) is a changed row, a key only in one run an added or removed row.
"""

from __future__ import annotations

import html
import io
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from saev_core.data import publish, storage
from saev_core.data.passthrough import passthrough_schema
from saev_core.data.subsets import SUBSET_COLUMNS, SUBSETS_DIR, SubsetWriter
from saev_core.pipeline.preflight import ConfigError
from saev_core.pipeline.specs import nest_scoring_params

DECISIONS_FILE = "decisions.parquet"
CHANGES_FILE = "changes.parquet"
CARD_FILE = "README.md"
KEPT_SUBSET = "kept"  # subsets/kept/: the rows a pinned run's absolute keep_threshold keeps


# --------------------------------------------------------------------------------- decisions
def decision_rule(keep_percents: Sequence[int], threshold: float | None) -> dict:
    if threshold is not None:
        return {"kind": "threshold", "threshold": float(threshold)}
    p = 50 if 50 in keep_percents else min(keep_percents)
    return {"kind": "top_percent", "percent": int(p)}


def row_keys(scores: pa.Table, row_key: str | None) -> list[str]:
    """The key that matches a row across runs: `row_index` (the default) or a source column."""
    col = row_key or "row_index"
    if col not in scores.column_names:
        have = [c for c in scores.column_names if c not in ("score",)]
        raise ConfigError(f"output.row_key={col!r}", f"the scores have no such column (they have {have})",
                          "Name a source column that identifies a row, or leave row_key unset (row_index)")
    return [None if v is None else str(v) for v in scores.column(col).to_pylist()]


def decisions_table(scores: pa.Table, subsets: dict[str, set[str]], rule: dict, row_key: str | None = None) -> pa.Table:
    """One row per scored sample: sample_id, row_key, score, kept, then in_<subset> per subset."""
    ids = scores.column("sample_id").to_pylist()
    vals = scores.column("score").to_pylist()
    if rule["kind"] == "threshold":
        kept = [v is not None and v >= rule["threshold"] for v in vals]
    else:
        members = subsets[f"top-{rule['percent']}"]
        kept = [s in members for s in ids]
    cols = {"sample_id": pa.array(ids, pa.string()), "row_key": pa.array(row_keys(scores, row_key), pa.string()),
            "score": pa.array(vals, pa.float64()), "kept": pa.array(kept, pa.bool_())}
    for name, members in sorted(subsets.items()):
        cols[f"in_{name}"] = pa.array([s in members for s in ids], pa.bool_())
    return pa.table(cols)


class _NamedSubsetWriter(SubsetWriter):
    """A subset folder named other than `top-<p>` (SubsetWriter names it by keep percent)."""

    def __init__(self, run: str, name: str, storage_options: dict | None = None, **kwargs):
        super().__init__(run, 100, storage_options, **kwargs)
        self.name, self.uri = name, storage.join(run, SUBSETS_DIR, name)


def write_kept_subset(run: str, record_uris: Sequence[str], decisions: pa.Table,
                      storage_options: dict | None = None) -> dict:
    """subsets/kept/: the rows whose decision is `kept` (a pinned run: score >= the curation
    model's keep_threshold, so the subset only grows while the data does), in the same layout as
    the top-p% subsets and validated like them (ValidationFailed when not). Returns its manifest
    entry."""
    from saev_core.data.ingest import read_record_shard
    from saev_core.data.gx_results import ValidationFailed
    from saev_core.data.validation import validate_subset

    picked = {s: v for s, v, k in zip(decisions.column("sample_id").to_pylist(), decisions.column("score").to_pylist(),
                                      decisions.column("kept").to_pylist()) if k}
    passthrough = passthrough_schema(
        (read_record_shard(u, storage_options, columns=["sample_id", "extra"]) for u in record_uris),
        reserved=SUBSET_COLUMNS)
    with _NamedSubsetWriter(run, KEPT_SUBSET, storage_options, passthrough=passthrough) as writer:
        for uri in record_uris:
            writer.write_records(read_record_shard(uri, storage_options), picked)
    result = validate_subset(writer.uri, len(picked), decisions.column("sample_id").to_pylist(), name=KEPT_SUBSET,
                             storage_options=storage_options)
    if not result.success:
        raise ValidationFailed(result)
    return {"rows": writer.rows, "min_score": min(picked.values()) if picked else None, "files": len(writer.files)}


def read_decisions(run: str, storage_options: dict | None = None, row_key: str | None = None) -> pa.Table:
    """A run's decisions: its decisions.parquet, or (runs made before it existed) rebuilt from
    scores.parquet and the manifest's threshold of its first subset."""
    uri = storage.join(run, DECISIONS_FILE)
    if storage.exists(uri, storage_options):
        return pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_options)))
    manifest = publish.read_manifest(run, storage_options)
    scores = publish.read_scores(run, storage_options)
    rule = (manifest.get("decisions") or {}).get("rule")
    subsets = {}
    for name, info in (manifest.get("subsets") or {}).items():
        t = info.get("min_score")
        subsets[name] = {s for s, v in zip(scores.column("sample_id").to_pylist(), scores.column("score").to_pylist())
                         if t is not None and v is not None and v >= t}
    if rule is None:
        percents = [int(n.removeprefix("top-")) for n in subsets if n.removeprefix("top-").isdigit()]
        rule = decision_rule(percents or [50], None)
    return decisions_table(scores, subsets, rule, row_key)


# ----------------------------------------------------------------------------------- changes
def _scored_by(manifest: dict | None) -> str | None:
    cm = (manifest or {}).get("curation_model")
    return cm["ref"] if cm else None


def compare(before: pa.Table, after: pa.Table, before_manifest: dict | None = None,
            after_manifest: dict | None = None) -> tuple[pa.Table, dict]:
    """What changed from `before` to `after` (decision tables). Returns the changes table (one
    row per added, removed or changed row, and per unchanged row whose decision flipped) and a
    summary with counts and flips by reason."""
    b = {r["row_key"]: r for r in before.to_pylist()}
    a = {r["row_key"]: r for r in after.to_pylist()}
    rule_b = (before_manifest or {}).get("decisions", {}).get("rule")
    rule_a = (after_manifest or {}).get("decisions", {}).get("rule")
    model_b, model_a = _scored_by(before_manifest), _scored_by(after_manifest)
    rows, counts, reasons = [], {"added": 0, "removed": 0, "changed": 0, "unchanged": 0}, {}
    flipped = flipped_unchanged = 0
    for key in sorted(set(a) | set(b), key=lambda k: (k is None, k)):
        ra, rb = a.get(key), b.get(key)
        if rb is None:
            change = "added"
        elif ra is None:
            change = "removed"
        elif ra["sample_id"] != rb["sample_id"]:
            change = "changed"
        else:
            change = "unchanged"
        counts[change] += 1
        flip = ra is not None and rb is not None and ra["kept"] != rb["kept"]
        reason = None
        if flip:
            flipped += 1
            if change == "changed":
                reason = "content changed"
            elif ra["score"] != rb["score"]:
                reason = (f"score changed: scored by {model_b or 'a trained run'}, now by {model_a or 'a trained run'}"
                          if model_a != model_b else "score changed")
            elif rule_a != rule_b:
                reason = f"decision rule changed: {rule_b} -> {rule_a}"
            else:
                reason = "rank moved: the top-p% cut moved with the other rows"
            reasons[reason] = reasons.get(reason, 0) + 1
            flipped_unchanged += change == "unchanged"
        if change != "unchanged" or flip:
            rows.append({"row_key": key, "change": change,
                         "sample_id_before": rb and rb["sample_id"], "sample_id_after": ra and ra["sample_id"],
                         "score_before": rb and rb["score"], "score_after": ra and ra["score"],
                         "kept_before": rb and rb["kept"], "kept_after": ra and ra["kept"],
                         "flipped": flip, "reason": reason})
    schema = pa.schema([("row_key", pa.string()), ("change", pa.string()), ("sample_id_before", pa.string()),
                        ("sample_id_after", pa.string()), ("score_before", pa.float64()),
                        ("score_after", pa.float64()), ("kept_before", pa.bool_()), ("kept_after", pa.bool_()),
                        ("flipped", pa.bool_()), ("reason", pa.string())])
    summary = {**counts, "flipped": flipped, "flipped_unchanged": flipped_unchanged, "by_reason": reasons}
    return pa.Table.from_pylist(rows, schema=schema), summary


# ------------------------------------------------------------------------------------ parents
def run_manifests(dataset_uri: str, storage_options: dict | None = None) -> list[tuple[str, dict]]:
    """(run URI, manifest) of every published run of a dataset, oldest first (by created_at)."""
    out = [(r, publish.read_manifest(r, storage_options)) for r in publish.list_runs(dataset_uri, storage_options)]
    return sorted(out, key=lambda rm: (rm[1].get("created_at") or "", rm[0]))


def find_parent(dataset_uri: str, parent_run: str | None, model: dict | None, storage_options: dict | None = None,
                exclude: str | None = None) -> str | None:
    """The parent run: `parent_run` (a run URI, or a run id of this dataset; 'none' = no parent),
    else the newest published run of this dataset scored by the same curation model (or, for the
    first run of a model, the run it was promoted from; for a run that trains, the newest run
    that trained too)."""
    if parent_run:
        if parent_run.lower() == "none":
            return None
        uri = parent_run if ("/" in parent_run or "://" in parent_run) else storage.join(dataset_uri, parent_run)
        if not publish.is_complete(uri, storage_options):
            raise ConfigError(f"output.parent_run={parent_run!r}", f"{uri} is not a published run",
                              "Name a published run of this dataset (saev-curate runs <dataset> lists them) or 'none'")
        return uri
    key = model["identity"] if model else None
    source = model.get("source_run") if model else None
    best = None
    for uri, m in run_manifests(dataset_uri, storage_options):
        if exclude and storage.basename(uri) == storage.basename(exclude):
            continue
        theirs = (m.get("curation_model") or {}).get("identity")
        if theirs == key or (source and storage.basename(uri) == storage.basename(source)):
            best = uri
    return best


# ------------------------------------------------------------------------------------ history
def _image_swap_win(manifest: dict) -> float | None:
    method = (manifest.get("scoring") or {}).get("method")
    for r in (manifest.get("canaries") or {}).get("table") or []:
        if r.get("kind") == "image_swap" and r.get("method") == method:
            return r.get("paired_win_rate")
    return None


def history_row(uri: str, m: dict) -> dict:
    """One run's line of the history, from its manifest."""
    counts, subsets = m.get("counts") or {}, m.get("subsets") or {}
    dec = m.get("decisions") or {}
    scored = counts.get("scored") or 0
    return {"run_id": m.get("run_id") or storage.basename(uri), "created_at": m.get("created_at"),
            "curation_model": _scored_by(m) or "(trained)", "rows": scored,
            "kept": {n: i.get("rows") for n, i in sorted(subsets.items())},
            "kept_share": (dec.get("kept") / scored) if dec.get("kept") is not None and scored else None,
            "canary_win_rate": _image_swap_win(m),
            "flags": len((m.get("ranking_gate") or {}).get("flags") or []),
            "forwarded": (m.get("incremental") or {}).get("forwarded"),
            "parent": (m.get("changes") or {}).get("parent_run_id")}


def history_rows(dataset_uri: str, storage_options: dict | None = None) -> list[dict]:
    """One row per published run, oldest first: what `saev-curate runs` prints and the report charts."""
    return [history_row(uri, m) for uri, m in run_manifests(dataset_uri, storage_options)]


def format_history(rows: list[dict]) -> str:
    head = f"{'run_id':<40} {'created (UTC)':<20} {'curation model':<18} {'rows':>6} {'kept':>6} {'canary':>7} " \
           f"{'flags':>5}  subsets"
    lines = [head]
    for r in rows:
        kept = "-" if r["kept_share"] is None else f"{r['kept_share']:.1%}"
        win = "-" if r["canary_win_rate"] is None else f"{r['canary_win_rate']:.3f}"
        subsets = ", ".join(f"{n}={v}" for n, v in r["kept"].items())
        lines.append(f"{r['run_id']:<40} {(r['created_at'] or '')[:19]:<20} {r['curation_model']:<18} {r['rows']:>6} "
                     f"{kept:>6} {win:>7} {r['flags']:>5}  {subsets}")
    return "\n".join(lines)


def history_svg(rows: list[dict], current: str | None = None, width: int = 520, height: int = 160) -> str:
    """A small inline chart: kept share and canary win rate (image_swap, the run's method) over
    the dataset's runs, the current run marked."""
    if not rows:
        return ""
    n = len(rows)
    pad, w, h = 30, width - 40, height - 50

    def x(i: int) -> float:
        return pad + (w * i / max(n - 1, 1))

    def y(v: float) -> float:
        return 10 + h * (1 - v)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<line x1="{pad}" y1="{y(0)}" x2="{pad + w}" y2="{y(0)}" stroke="#999"/>',
             f'<line x1="{pad}" y1="{y(0.5)}" x2="{pad + w}" y2="{y(0.5)}" stroke="#ddd" stroke-dasharray="3"/>',
             f'<text x="2" y="{y(1) + 4}" font-size="10">1</text><text x="2" y="{y(0) + 4}" font-size="10">0</text>']
    for key, colour in (("kept_share", "#1f77b4"), ("canary_win_rate", "#d62728")):
        pts = [(x(i), y(r[key])) for i, r in enumerate(rows) if r[key] is not None]
        if len(pts) > 1:
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="'
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>' for a, b in pts]
    for i, r in enumerate(rows):
        if r["run_id"] == current:
            parts.append(f'<line x1="{x(i):.1f}" y1="{y(1)}" x2="{x(i):.1f}" y2="{y(0)}" stroke="#333" '
                         'stroke-dasharray="2"/>')
    parts.append(f'<text x="{pad}" y="{height - 18}" font-size="11" fill="#1f77b4">kept share</text>'
                 f'<text x="{pad + 90}" y="{height - 18}" font-size="11" fill="#d62728">canary win rate '
                 f'(image_swap)</text><text x="{pad}" y="{height - 4}" font-size="10">{n} runs, oldest left; '
                 'dashed: this run</text></svg>')
    return "".join(parts)


def history_html(rows: list[dict], current: str | None = None) -> str:
    if not rows:
        return ""
    def pct(v: float | None, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    table = "".join(f"<tr><td>{html.escape(str(r['run_id']))}</td><td>{html.escape(r['curation_model'])}</td>"
                    f"<td>{r['rows']}</td><td>{pct(r['kept_share'], '.1%')}</td>"
                    f"<td>{pct(r['canary_win_rate'], '.3f')}</td></tr>" for r in rows[-10:])
    return (f"<h2>History of this dataset</h2>{history_svg(rows, current)}<table><tr><th>run</th>"
            f"<th>curation model</th><th>rows</th><th>kept</th><th>canary win rate</th></tr>{table}</table>")


def diff_runs(run_a: str, run_b: str, storage_options: dict | None = None, row_key: str | None = None) -> dict:
    """What differs from run A to run B: parameters, curation model, counts, subsets, and the
    row-level changes (compare)."""
    ma, mb = publish.read_manifest(run_a, storage_options), publish.read_manifest(run_b, storage_options)
    da, db = read_decisions(run_a, storage_options, row_key), read_decisions(run_b, storage_options, row_key)
    table, summary = compare(da, db, ma, mb)

    def flat(d: Any, prefix: str = "") -> dict:
        if isinstance(d, dict):
            out = {}
            for k, v in d.items():
                out.update(flat(v, f"{prefix}{k}."))
            return out
        return {prefix[:-1]: d}

    def parameters(m: dict) -> dict:  # runs from before the scoring keys were nested compare key by key
        p = dict(m.get("parameters") or {})
        if isinstance(p.get("scoring"), dict):
            p["scoring"] = nest_scoring_params(p["scoring"])
        return p

    pa_, pb = flat(parameters(ma)), flat(parameters(mb))
    params = {k: (pa_.get(k), pb.get(k)) for k in sorted(set(pa_) | set(pb))
              if pa_.get(k) != pb.get(k) and not k.startswith("output.run_id")}
    subsets = {n: ((ma.get("subsets") or {}).get(n, {}).get("rows"), (mb.get("subsets") or {}).get(n, {}).get("rows"))
               for n in sorted(set(ma.get("subsets") or {}) | set(mb.get("subsets") or {}))}
    return {"a": run_a, "b": run_b, "curation_model": (_scored_by(ma), _scored_by(mb)), "parameters": params,
            "subsets": subsets, "rows": (ma["counts"].get("scored"), mb["counts"].get("scored")),
            "changes": summary, "changed_rows": table}


def format_diff(d: dict, limit: int = 20) -> str:
    c = d["changes"]
    lines = [f"A: {d['a']}", f"B: {d['b']}",
             f"curation model: {d['curation_model'][0] or '(trained)'} -> {d['curation_model'][1] or '(trained)'}",
             f"rows scored: {d['rows'][0]} -> {d['rows'][1]}",
             f"rows: {c['added']} added, {c['removed']} removed, {c['changed']} changed, {c['unchanged']} unchanged",
             f"decisions flipped: {c['flipped']} ({c['flipped_unchanged']} on unchanged rows)"]
    lines += [f"  {n}: {reason}" for reason, n in sorted(c["by_reason"].items(), key=lambda kv: -kv[1])]
    lines += [f"subset {n}: {a} -> {b}" for n, (a, b) in d["subsets"].items()]
    lines += [f"parameter {k}: {a!r} -> {b!r}" for k, (a, b) in d["parameters"].items()]
    flips = [r for r in d["changed_rows"].to_pylist() if r["flipped"]][:limit]
    if flips:
        lines.append("flipped rows (first %d):" % len(flips))
        lines += [f"  row {r['row_key']}: {'kept' if r['kept_before'] else 'dropped'} -> "
                  f"{'kept' if r['kept_after'] else 'dropped'} ({r['reason']})" for r in flips]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ dataset card
def dataset_card(run_id: str, subsets: dict[str, Any], manifest: dict, extra_configs: Sequence[str] = ()) -> str:
    """README.md of a run folder: the YAML `configs:` header that names each subset (so
    `datasets.load_dataset(run_folder, "top-50")` loads it), then what made it."""
    names = sorted(subsets, key=lambda n: float(n.removeprefix("top-")) if n.startswith("top-") else 1e9)
    head = ["---", "configs:"]
    for i, name in enumerate([*names, *extra_configs]):
        head += [f"- config_name: {name}", "  data_files:", "  - split: train", f"    path: subsets/{name}/*.parquet"]
        if i == 0:
            head.append("  default: true")
    head += ["tags:", "- dpo", "- preference", "- saev-curate", "---", ""]
    cm = manifest.get("curation_model")
    sc = manifest.get("scoring") or {}
    body = [f"# Curated preference data: run `{run_id}`", "",
            f"Made by saev-curate from `{(manifest.get('source') or {}).get('uri')}`, scored by "
            f"`{sc.get('method')}` ({'curation model ' + cm['ref'] if cm else 'an SAE trained in this run'}).", "",
            "| subset | rows | lowest kept score |", "|---|---|---|"]
    body += [f"| {n} | {subsets[n].get('rows')} | {subsets[n].get('min_score')} |" for n in names]
    rule = (manifest.get("decisions") or {}).get("rule")
    if rule:
        body += ["", f"Per-row decisions (`decisions.parquet`) follow {rule}."]
    if KEPT_SUBSET in subsets:
        body += ["", f"`{KEPT_SUBSET}`: every row scoring at least the curation model's keep threshold "
                 f"({subsets[KEPT_SUBSET].get('threshold')}), fixed when the model was promoted, so a row stays in it "
                 "from run to run unless its content changes; the `top-<p>` subsets are relative to each run."]
    table = (manifest.get("canaries") or {}).get("table") or []
    if table:
        kinds = sorted({r["kind"] for r in table})
        body += ["", "Canaries, paired win rate P(score(canary) < score(its source)), 0.5 = chance:", "",
                 "| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
        cell = {(r["method"], r["kind"]): r["paired_win_rate"] for r in table}
        for m in dict.fromkeys(r["method"] for r in table):
            body.append(f"| {m} | " + " | ".join(f"{cell.get((m, k), float('nan')):.3f}" for k in kinds) + " |")
    body += ["", "```python", "from datasets import load_dataset", f'ds = load_dataset("<this folder>", "{names[0]}")',
             "```", ""]
    return "\n".join(head + body)
