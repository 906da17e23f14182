"""Command line: `saev-curate demo` (the toy world, no services),
`saev-curate run --config run.yaml` (any dataset; YAML in the shape of CurateParams) and
`saev-curate failed` (the failed runs' evidence folders).

A failure ends in one paragraph on stderr: a refusal of the input or the configuration (wherever
it was raised: preflight, ingest, the ranking gate, validation, publish) says where, what was
found and what to do, and exits 2; anything else is an internal error, exit 1. The traceback,
with every log line of the run, goes to a log file whose path is printed (`--debug` prints it
instead); Prefect's own tracebacks are kept off the terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from typing import Iterator

from saev_core.pipeline.run_tables import (CANARY_CAPTION, DETECTION_CAPTION, canary_lines, detection_lines,
                                           subset_line)

# The demo publishes only what it can rank on the toy world (benchmarks/RESULTS.md, issue 12): the
# paper's `reference` sum ties on most toy samples and has too few cross-modal features there, so
# the ranking gate would (rightly) refuse it. The demo ranks by the model's own log-probability
# and shows every SAE-V variant beside it, on the canaries as on the real samples.
DEMO_SETTINGS = [
    "scoring.method=logp_chosen",
    "scoring.baselines=[reference, coverage, null_z, null_z_cooccur, cooccur_l0, raw_cosine, logp_margin, random]",
]


SERVER_START_TIMEOUT_S = 180.0  # Prefect's default of 20 s fails on a busy machine (issue 24)


def _quiet_env() -> None:
    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
                 "GX_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


class ServerStartError(RuntimeError):
    """Prefect's temporary API server did not answer in time, twice."""


@contextlib.contextmanager
def _child_output_to(path: str | None) -> Iterator[None]:
    """While the block runs, file descriptors 1 and 2 point at `path` (os.devnull when None), so
    a child process started in it writes there: the temporary server's own tracebacks (a SQLite
    'database is locked' under load) belong in the run's log, not on the terminal."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    target = os.open(path or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, target):
            os.close(fd)


def _start_api_server(log_path: str | None = None) -> None:
    """Start Prefect's temporary API server once, before the flow, with time to spare.

    Without PREFECT_API_URL every CLI run needs one (the flow and its tasks then reuse it). Its
    start takes 3-7 s on an idle machine but can pass Prefect's 20 s limit when other jobs keep the
    cores busy; here it gets `SAEV_SERVER_START_TIMEOUT` seconds (default 180, never less than
    Prefect's own setting) and a second attempt on a fresh port. The server's own output goes to
    `log_path`."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    from prefect.server.api.server import SubprocessASGIServer

    timeout = max(float(os.environ.get("SAEV_SERVER_START_TIMEOUT", SERVER_START_TIMEOUT_S)),
                  float(settings.server.ephemeral.startup_timeout_seconds))
    log = logging.getLogger("saev_curate.cli")
    for attempt in (1, 2):
        server = SubprocessASGIServer()
        started = time.perf_counter()
        try:
            with _child_output_to(log_path):
                server.start(timeout=timeout)
        except RuntimeError as exc:
            server.stop()
            log.warning("the temporary Prefect server did not start in %.0f s (attempt %d): %s",
                        time.perf_counter() - started, attempt, str(exc).splitlines()[0][:300])
            if attempt == 2:
                raise ServerStartError(
                    f"Prefect's temporary API server did not start within {timeout:.0f} s, twice (a very busy "
                    "machine?): set SAEV_SERVER_START_TIMEOUT higher, or start a server (`prefect server start`) and "
                    "set PREFECT_API_URL") from exc
        else:
            log.info("temporary Prefect server up in %.1f s (attempt %d)", time.perf_counter() - started, attempt)
            return


class _ConsoleFilter(logging.Filter):
    """On the terminal, a log record is one line without its traceback (the log file keeps both),
    and the echoes of the final failure (task, sub-flow, flow: each repeats the same error) are
    left out: the CLI prints that failure once, as one paragraph."""

    ECHOES = ("Finished in state Failed", "Finished in state Crashed", "Encountered exception during execution",
              "Retries are exhausted")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(e in message for e in self.ECHOES) or ("Task run failed with" in message and "will start" not in message) \
                or message.startswith("Stopping temporary server"):
            return False
        if record.exc_info or record.exc_text or "\n" in message:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            first = message.strip().splitlines()[0] if message.strip() else ""
            record.msg, record.args = first[:300] + (" [...]" if "\n" in message.strip() else ""), ()
        return True


class _RunLog:
    """Every log record of the run (tracebacks included) in a file, the terminal kept readable."""

    def __init__(self, debug: bool):
        self.folder = os.environ.get("SAEV_CURATE_LOG_DIR") or os.path.join(tempfile.gettempdir(), "saev-curate")
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.path: str | None = os.path.join(self.folder, f"run-{stamp}-{os.getpid()}.log")
        self.handler: logging.Handler | None = None
        self.filter = None if debug else _ConsoleFilter()
        self.consoles: list[logging.Handler] = []

    def attach(self) -> None:
        """Once Prefect has set up its logging: the file takes every record first, then the
        terminal's handlers get the filter."""
        if not self._folder_ok():
            return
        self.handler = logging.FileHandler(self.path, encoding="utf-8", delay=True)
        self.handler.setLevel(logging.DEBUG)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.handlers.insert(0, self.handler)  # before the console's filter trims a record
        logging.getLogger("saev_curate").setLevel(logging.DEBUG)
        self.consoles = [h for h in root.handlers if h is not self.handler and isinstance(h, logging.StreamHandler)
                         and not isinstance(h, logging.FileHandler)]
        for h in self.consoles if self.filter else ():
            h.addFilter(self.filter)

    def _folder_ok(self) -> bool:
        try:
            os.makedirs(self.folder, exist_ok=True)
            return self.path is not None
        except OSError:  # no log file then: --debug still prints the traceback
            self.path = None
            return False

    def write_traceback(self, exc: BaseException) -> None:
        if not self._folder_ok():
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("".join(traceback.format_exception(exc)))
        except OSError:
            self.path = None

    def close(self, keep: bool) -> None:
        root = logging.getLogger()
        for h in self.consoles if self.filter else ():
            h.removeFilter(self.filter)
        if self.handler is not None:
            if self.handler in root.handlers:
                root.handlers.remove(self.handler)
            self.handler.close()
        if not keep and self.path and os.path.exists(self.path):
            os.remove(self.path)


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
            from saev_core.pipeline.preflight import ConfigError

            raise ConfigError(f"--set {item}", "is not of the form key=value", "Write --set section.key=value, "
                              "e.g. --set output.run_id=x")
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
        print(f"Kept {subset_line(f'{name:>7}', info)}")
    w = result["weights"]
    print(f"Cross-modal features: {w['n_cross_modal']} of {w['d_sae']} (delta {w['delta']:.4g})")
    if result.get("canaries"):
        _print_canaries(result["canaries"])
    for flag in result.get("flags") or []:
        print(f"WARNING: {flag}")
    if result.get("detection"):
        _print_table(DETECTION_CAPTION, detection_lines(result["detection"]))
    print(f"Wall time:    {seconds:.1f} s")


def _print_canaries(rows: list[dict]) -> None:
    _print_table(CANARY_CAPTION, canary_lines(rows))


def _print_table(caption: str, lines: list[str]) -> None:
    print(caption)
    for line in lines:
        print("  " + line)


def _report_error(exc: BaseException, log_path: str | None = None) -> int:
    """One paragraph on stderr: what failed, where, the evidence, what to do. Exit 2 for a refusal
    of the input or the configuration (a permanent error), 1 for an internal error."""
    import textwrap

    from saev_core.pipeline.preflight import is_permanent
    from saev_core.refusal import Refusal

    permanent = is_permanent(exc)
    if isinstance(exc, Refusal):
        if exc.evidence.get("canaries"):
            _print_canaries(exc.evidence["canaries"])
        text = f"{exc.stage} refused the run. {exc.paragraph()}"
    else:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 800 else detail[:800] + " [...]"
        kept = getattr(exc, "kept_at", None)
        text = f"{type(exc).__name__}: {detail}" + (f" Evidence kept in {kept}." if kept else "")
        if not permanent and not isinstance(exc, ServerStartError):
            text = (f"internal error, not a problem of the input: {text} Please report it with the log file"
                    + ("." if log_path else " (run again with --debug for the traceback)."))
    print("saev-curate: error: " + textwrap.fill(text, width=100, subsequent_indent="  ",
                                                        break_on_hyphens=False, break_long_words=False),
          file=sys.stderr)
    if log_path:
        print(f"(traceback and the run's log: {log_path}; --debug prints the traceback)", file=sys.stderr)
    else:
        print("(run again with --debug for the traceback)", file=sys.stderr)
    return 2 if permanent else 1


def main(argv: list[str] | None = None) -> int:
    _quiet_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    log = _RunLog(debug)
    try:
        rc = _main(argv, log)
    except Exception as exc:  # noqa: BLE001 - every failure ends in one paragraph (or, with --debug, raised)
        log.write_traceback(exc)
        log.close(keep=True)
        if debug:
            raise
        return _report_error(exc, log.path)
    log.close(keep=False)
    return rc


def _list_failed(args) -> int:
    from saev_core.data import publish, storage

    options = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    root = args.output
    datasets = [storage.join(root, args.dataset)] if args.dataset else [
        d for d in publish._subfolders(root, options) if not storage.basename(d).startswith((".", "_"))]
    found = 0
    for ds in datasets:
        if args.clean_older_than is not None:
            for uri in publish.clean_failed(ds, options, args.clean_older_than):
                print(f"removed {uri}")
        for info in publish.list_failed(ds, options):
            found += 1
            reason = " ".join(str(info.get("reason") or "").split())
            print(f"{info.get('run_id')}  {info.get('failed_at', '?')}  stage={info.get('stage')}  {info['uri']}")
            print(f"    {reason[:300]}{' [...]' if len(reason) > 300 else ''}")
    if not found:
        print(f"no failed runs under {root}")
    return 0


def _main(argv: list[str], log: _RunLog | None = None) -> int:
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
    failed = sub.add_parser("failed", help="list the failed runs (their evidence: <output>/<dataset>/_failed/<run_id>/)")
    failed.add_argument("--output", default="runs", help="output root (default: ./runs)")
    failed.add_argument("--dataset", help="only this dataset's folder")
    failed.add_argument("--endpoint-url", help="S3 endpoint for an s3:// output")
    failed.add_argument("--clean-older-than", type=float, metavar="DAYS", help="first remove those older than DAYS")
    from .explain_cli import add_explain_parser, run_explain

    add_explain_parser(sub)
    from .recurring_cli import COMMANDS as RECURRING, add_recurring_parsers, run_recurring

    add_recurring_parsers(sub)  # promote, runs, diff (issue 22)
    args = parser.parse_args(argv)
    if args.cmd == "explain":
        return run_explain(args)
    if args.cmd in RECURRING:
        return run_recurring(args)

    if args.cmd == "failed":
        return _list_failed(args)
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
    t0 = time.perf_counter()
    from .curate import curate

    if log is not None:
        log.attach()
    _start_api_server(log.path if log is not None else None)
    result = curate(params)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_summary(result, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
