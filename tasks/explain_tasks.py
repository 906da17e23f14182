"""The interpretability report of a curation run, as a Prefect task (the work is in
saev_core.interp.explain / saev_core.interp.dashboard / saev_core.interp.render; the run's inputs
from saev_core.pipeline.run_sources)."""

from __future__ import annotations

import logging

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError

from saev_core.data import storage
from saev_core.interp.explain import REPORT_SAMPLES, build_run_report
from saev_core.pipeline.manifest import RunManifest
from saev_core.pipeline.run_sources import RunSources

INTERP_DIR = "interp"


@task(name="explain-run", cache_policy=NO_CACHE)  # it writes into the run folder: never skip it
def explain_run(run: str, manifest: "dict | RunManifest", record_uris: list[str] | None = None, work_uri: str | None = None,
                options: dict | None = None, n_features: int = 8, n_samples: int = REPORT_SAMPLES,
                max_samples: int | None = 1000,
                required: bool = False) -> str | None:
    """Write <run>/interp/index.html (+ img/*.png): dashboards of the top cross-modal features and
    explanations of the lowest-scored samples. Call it after scores.parquet is written and before
    the manifest. Returns the report's path relative to the run folder, or None when it could not
    be built and `required` is False (the run is published without it; the reason is logged)."""
    try:
        logger = get_run_logger()
    except MissingContextError:  # called as explain_run.fn(...) outside a flow
        logger = logging.getLogger(__name__)
    try:
        sources = RunSources.from_manifest(manifest, run, work_uri, record_uris, options)
        out = build_run_report(sources, storage.join(run, INTERP_DIR), n_features=n_features, n_samples=n_samples,
                               max_samples=max_samples)
    except Exception as exc:
        if required:
            raise
        logger.warning("interpretability report not written: %s: %s", type(exc).__name__, exc)
        return None
    logger.info("interpretability report %s: %d features, %d samples, %d files", out["uri"], len(out["features"]),
                len(out["samples"]), out["files"])
    return f"{INTERP_DIR}/index.html"
