"""Command line: `saev-curate demo` (the toy world, no services) and
`saev-curate run --config run.yaml` (any dataset; YAML in the shape of CurateParams)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


# The demo publishes only what it can rank on the toy world (benchmarks/RESULTS.md, issue 12): the
# paper's `reference` sum ties on most toy samples and has too few cross-modal features there, so
# the ranking gate would (rightly) refuse it. The demo ranks by the model's own log-probability
# and shows every SAE-V variant beside it, on the canaries as on the real samples.
DEMO_SETTINGS = [
    "scoring.method=logp_chosen",
    "scoring.baselines=[reference, coverage, null_z, null_z_cooccur, cooccur_l0, raw_cosine, logp_margin, random]",
]


def _quiet_env() -> None:
    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                 "GX_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


def _load_params(path: str | None, overrides: list[str]):
    import yaml

    from .params import CurateParams

    data = {}
    if path:
        from saev_core.pipeline.preflight import ConfigError

        try:
            with open(path) as fh:
                data = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(path, f"cannot read the config file ({exc.strerror or exc})",
                              "Give --config the path of a YAML file") from None
        except yaml.YAMLError as exc:
            raise ConfigError(path, f"is not valid YAML ({str(exc).splitlines()[0]})", "Fix the YAML syntax") from None
        if not isinstance(data, dict):
            raise ConfigError(path, f"holds a {type(data).__name__}, not a mapping of keys",
                              "Write the config as keys (dataset:, model:, output: ...)")
    for item in overrides:  # dotted.key=value, value parsed as YAML
        key, _, raw = item.partition("=")
        if not _:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                from saev_core.pipeline.preflight import ConfigError

                raise ConfigError(f"--set {key}", f"{part} is a value, not a group of keys",
                                  "Set a key inside a group, e.g. --set output.run_id=x")
        node[leaf] = yaml.safe_load(raw)
    from pydantic import ValidationError

    from saev_core.pipeline.preflight import config_error_from_validation

    try:
        return CurateParams.model_validate(data)
    except ValidationError as exc:
        raise config_error_from_validation(exc, CurateParams, source=path or "--set") from None


def _print_summary(result: dict, seconds: float) -> None:
    c = result["counts"]
    print()
    print(f"Run folder:   {result['run']}")
    print(f"Report:       {result['run'].rstrip('/')}/report.html")
    print(f"Samples in:   {c['rows_in']}   quarantined: {c['quarantined']}   scored: {c['scored']}")
    for name, info in result["subsets"].items():
        print(f"Kept {name:>7}: {info['rows']} samples (score >= {info['min_score']:.4g})")
    w = result["weights"]
    print(f"Cross-modal features: {w['n_cross_modal']} of {w['d_sae']} (delta {w['delta']:.4g})")
    if result.get("canaries"):
        rows = result["canaries"]
        kinds = sorted({r["kind"] for r in rows})
        cell = {(r["method"], r["kind"]): r for r in rows}
        print("Canaries (known-bad copies of this data's own samples), paired win rate P(canary < source),")
        print("0.5 = chance; prompt+image scores cannot see response_swap or flipped by construction:")
        print("  " + f"{'method':<16}" + "".join(f"{k[:15]:>17}" for k in kinds))
        for method in dict.fromkeys(r["method"] for r in rows):
            print("  " + f"{method:<16}" + "".join(f"{cell[(method, k)]['paired_win_rate']:>17.3f}" for k in kinds))
    for flag in result.get("flags") or []:
        print(f"WARNING: {flag}")
    if result.get("detection"):
        print("Detection of the toy world's known corruptions (AUROC, low score = corrupted):")
        kinds = [k for k in next(iter(result["detection"].values()))]
        print("  " + f"{'method':<16}" + "".join(f"{k[:14]:>16}" for k in kinds))
        for method, row in result["detection"].items():
            print("  " + f"{method:<16}" + "".join(f"{row[k]:>16.3f}" for k in kinds))
    print(f"Wall time:    {seconds:.1f} s")


def _report_error(exc: BaseException) -> int:
    """One paragraph on stderr for a permanent error: what, where, what to do."""
    import textwrap

    from saev_core.pipeline.preflight import ConfigError

    if isinstance(exc, ConfigError):
        text = f"{exc.where}: {exc.found}. {exc.fix}."
    else:
        text = f"{type(exc).__name__}: {exc}"
    print("saev-curate: error: " + textwrap.fill(text.replace("..", "."), width=100, subsequent_indent="  "),
          file=sys.stderr)
    print("(run again with --debug for the traceback)", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    _quiet_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv)
    except Exception as exc:
        from saev_core.pipeline.preflight import is_permanent

        if debug or not is_permanent(exc):
            raise
        return _report_error(exc)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="saev-curate", description="SAE-V curation of multimodal preference data",
                                     epilog="--debug (anywhere): show the traceback of an error")
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="run the curate flow on the embedded toy world (no services needed)")
    demo.add_argument("--output", default="runs", help="output folder (default: ./runs)")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    run = sub.add_parser("run", help="run the curate flow with a YAML config")
    run.add_argument("--config", help="YAML file in the shape of CurateParams")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a parameter")
    run.add_argument("--json", action="store_true", help="print the flow's result as JSON")
    sub.add_parser("schema", help="print the JSON schema of the flow parameters")
    from .explain_cli import add_explain_parser, run_explain

    add_explain_parser(sub)
    from .recurring_cli import COMMANDS as RECURRING, add_recurring_parsers, run_recurring

    add_recurring_parsers(sub)  # promote, runs, diff (issue 22)
    args = parser.parse_args(argv)
    if args.cmd == "explain":
        return run_explain(args)
    if args.cmd in RECURRING:
        return run_recurring(args)

    if args.cmd == "schema":
        from .params import CurateParams

        print(json.dumps(CurateParams.model_json_schema(), indent=2))
        return 0
    if args.cmd == "demo":
        params = _load_params(None, [*DEMO_SETTINGS, *args.set])
        params.output.uri = args.output
    else:
        params = _load_params(args.config, args.set)

    from .checks import preflight_params

    preflight_params(params)  # before Prefect starts: a bad config fails in a second, in one paragraph
    from .curate import curate

    t0 = time.perf_counter()
    result = curate(params)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
