"""`saev-curate explain feature <id> --run <run uri>` and `saev-curate explain sample <id> --run <run uri>`.

Both read the published run (manifest, scores) and its work folder (activation cache, SAE,
weights, record shards), and write a static HTML page with PNGs to a local or remote folder
(default: ./explain/<run_id>/); a published run folder itself is never written to.
"""

from __future__ import annotations

import argparse
import sys


def add_explain_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("explain", help="feature dashboard or sample explanation of a published run")
    sub = p.add_subparsers(dest="what", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", required=True, help="run folder/URI: <output>/<dataset>/<run_id>")
    common.add_argument("--work", default=None, help="work folder of the run (default: <run>/../../_work, "
                        "else the manifest's output.work_uri)")
    common.add_argument("--out", default=None, help="where to write the page (default: ./explain/<run_id>)")
    common.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// URIs (credentials from the "
                        "environment)")
    f = sub.add_parser("feature", parents=[common], help="dashboard of one SAE feature")
    f.add_argument("feature", type=int)
    f.add_argument("--max-samples", type=int, default=1000, help="samples scanned for top examples (default 1000)")
    f.add_argument("--examples", type=int, default=8, help="top text positions / images shown (default 8)")
    s = sub.add_parser("sample", parents=[common], help="why one sample scored what it scored")
    s.add_argument("sample_id", help="full sample id or a unique prefix")
    s.add_argument("--features", type=int, default=6, help="top contributing features shown (default 6)")
    return p


def run_explain(args) -> int:
    from saev_core.data import storage
    from saev_core.interp.explain import (ExplainError, RunModel, collect_dashboards, dashboard_images,
                                          explain_run_sample)
    from saev_core.interp.render import write_report
    from saev_core.model.image_geometry import GeometryError
    from saev_core.pipeline.run_sources import RunSourceError, RunSources

    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    try:
        sources = RunSources.from_run(args.run, args.work, options)
    except (FileNotFoundError, RunSourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_id = storage.basename(args.run)
    out = args.out or storage.join("explain", run_id)
    meta = {"run": args.run, "model": sources.model_id, "sae": sources.sae_uri, "method": sources.method,
            "delta": sources.delta}
    try:
        rm = RunModel.load(sources)
        if args.what == "feature":
            d_sae = int(rm.sae.cfg.d_sae)
            if not 0 <= args.feature < d_sae:
                raise ExplainError(f"feature {args.feature} does not exist: the SAE has features 0..{d_sae - 1}")
            dashboards = collect_dashboards(rm, [args.feature], args.max_samples, n_text=args.examples,
                                            n_images=args.examples)
            images = dashboard_images(rm, dashboards)
            name = f"feature-{args.feature}.html"
            write_report(out, dashboards, [], images, meta, [args.feature], options,
                         title=f"SAE-V feature {args.feature}", index_name=name)
            d = dashboards[args.feature]
            words = ", ".join(dict.fromkeys(w.strip() for w in d.top_words[:8])) or "-"
            print(f"feature {args.feature}: weight {d.weight if d.weight is not None else '-'}; density text "
                  f"{d.density_text:.3%}, image {d.density_image:.3%}; top text tokens: {words}")
        else:
            ex = explain_run_sample(rm, args.sample_id, top_n=args.features)
            name = f"sample-{ex.sample_id[:12]}.html"
            write_report(out, {}, [ex], {}, meta, [], options, title=f"SAE-V sample {ex.sample_id[:12]}",
                         index_name=name)
            print(f"sample {ex.sample_id}: score ({ex.method}) {ex.score:.4g} from {ex.n_contributing} "
                  "cross-modal features")
            for fc in ex.features:
                print(f"  feature {fc.feature:>6}: weight {fc.weight:.4g}  contribution {fc.contribution:+.4g}  "
                      f"max text {fc.text_max:.3g}  max image {fc.image_max:.3g}")
    except (RunSourceError, GeometryError) as exc:  # ExplainError is a RunSourceError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"written: {storage.join(out, name)}")
    return 0
