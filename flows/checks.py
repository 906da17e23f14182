"""The curate flow's preflight: CurateParams -> saev_core.pipeline.preflight, before any work.

Called by the CLI before Prefect starts (a bad config costs a second, not a server start) and as
the flow's first stage (runs started from the UI or a deployment are checked the same way)."""

from __future__ import annotations

from saev_core.pipeline.plan import RunPlan
from saev_core.pipeline.preflight import preflight


def preflight_params(params, run: str | None = None, curation_model: bool = True) -> dict:
    """Raise saev_core.pipeline.preflight.ConfigError on the first problem of the run. `run`: the
    run folder when already planned; else the configured run id's folder (if one is set).
    `curation_model`: also load a pinned curation model and verify its checksums (the flow's own
    load task does it again, so the flow passes False)."""
    if run is None and params.output.run_id:
        run = RunPlan.create(params.dataset, params.output, {}).run
    if curation_model and params.scoring.curation_model:
        from saev_core.pipeline import curation_model as cmodel

        root = RunPlan.create(params.dataset, params.output, {}).output
        cmodel.load(params.scoring.curation_model, root, params.storage.options())
    return preflight(
        dataset_uri=params.dataset.uri, dataset_format=params.dataset.format, mapping=params.dataset.mapping,
        model_id=params.model.model_id, layer=params.model.layer, revision=params.model.revision,
        trust_remote_code=params.model.trust_remote_code, output_uri=params.output.uri,
        work_uri=params.output.work_uri, run=run, sae_checkpoint=params.sae.checkpoint,
        storage_options=params.storage.options())
