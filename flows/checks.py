"""The curate flow's preflight: CurateParams -> saev_core.pipeline.preflight, before any work.

Called by the CLI before Prefect starts (a bad config costs a second, not a server start) and as
the flow's first stage (runs started from the UI or a deployment are checked the same way)."""

from __future__ import annotations

import os

from saev_core.data import publish, storage
from saev_core.pipeline.preflight import preflight


def run_uri(params, run_id: str | None = None) -> str | None:
    """The run folder for ``run_id`` (default: the configured one; None when unset)."""
    from .curate import _dataset_name

    run_id = run_id or params.output.run_id
    if not run_id:
        return None
    output = params.output.uri if storage.is_remote(params.output.uri) else os.path.abspath(params.output.uri)
    return publish.run_uri(output, _dataset_name(params), run_id)


def preflight_params(params) -> dict:
    """Raise saev_core.pipeline.preflight.ConfigError on the first problem of the run."""
    return preflight(
        dataset_uri=params.dataset.uri, dataset_format=params.dataset.format, mapping=params.dataset.mapping,
        model_id=params.model.model_id, layer=params.model.layer, revision=params.model.revision,
        trust_remote_code=params.model.trust_remote_code, output_uri=params.output.uri,
        work_uri=params.output.work_uri, run=run_uri(params), sae_checkpoint=params.sae.checkpoint,
        storage_options=params.storage.options())
