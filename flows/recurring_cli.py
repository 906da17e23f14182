"""`saev-curate promote RUN --name NAME`, `saev-curate runs <dataset>` and
`saev-curate diff RUN_A RUN_B`: the commands of recurring curation (issue 22)."""

from __future__ import annotations

import argparse
import json

COMMANDS = ("promote", "runs", "diff")


def _storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// URIs (credentials from the "
                   "environment)")


def add_recurring_parsers(subparsers) -> None:
    p = subparsers.add_parser("promote", help="copy a finished run's curation model (SAE, weights, delta, scoring "
                              "spec, keep threshold) to <output>/_models/NAME/v<N>/")
    p.add_argument("run", help="run folder/URI: <output>/<dataset>/<run_id>")
    p.add_argument("--name", required=True, help="curation model name; each promotion adds a version")
    p.add_argument("--keep-percent", type=int, default=None, help="the absolute keep threshold is the run's "
                   "lowest score in this top-p%% subset (default: 50 when published, else the smallest)")
    p.add_argument("--output", default=None, help="output root holding _models/ (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the curation model card as JSON")
    _storage_args(p)
    r = subparsers.add_parser("runs", help="the published runs of a dataset: date, curation model, rows, kept, "
                              "canary win rate, flags")
    r.add_argument("dataset", help="dataset folder <output>/<dataset>, or a dataset name with --output")
    r.add_argument("--output", default=None, help="output root (when `dataset` is a name)")
    r.add_argument("--json", action="store_true")
    _storage_args(r)
    d = subparsers.add_parser("diff", help="what differs between two published runs (rows, decisions, parameters)")
    d.add_argument("run_a")
    d.add_argument("run_b", help="a run URI, or a run id of run_a's dataset")
    d.add_argument("--row-key", default=None, help="source column that identifies a row (default: row_index)")
    d.add_argument("--limit", type=int, default=20, help="flipped rows listed (default 20)")
    _storage_args(d)


def run_recurring(args) -> int:
    from saev_core.data import storage
    from saev_core.pipeline import history

    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    if args.cmd == "promote":
        from saev_core.pipeline.curation_model import promote_run

        card = promote_run(args.run, args.name, args.output, args.keep_percent, options)
        if args.json:
            print(card.model_dump_json(indent=2))
        else:
            print(f"promoted {args.run}\n  as {card.ref} at {card.uri}\n  keep threshold {card.threshold:.6g} "
                  f"(the run's top-{card.keep_threshold['percent']}%), {len(card.files)} files checksummed\n"
                  f"use it: --set scoring.curation_model={card.name}  (or {card.ref} to pin this version)")
        return 0
    if args.cmd == "runs":
        uri = storage.join(args.output, args.dataset) if args.output else args.dataset
        rows = history.history_rows(uri, options)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
        elif not rows:
            print(f"no published runs under {uri}")
        else:
            print(history.format_history(rows))
        return 0
    run_b = args.run_b if ("/" in args.run_b or "://" in args.run_b) else \
        storage.join(storage.parent(args.run_a), args.run_b)
    print(history.format_diff(history.diff_runs(args.run_a, run_b, options, args.row_key), args.limit))
    return 0
