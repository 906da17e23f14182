"""The run manifest as a typed contract: the flow writes it (last), `explain`, the report and the
tests read it back through the same model, so a renamed field fails loudly instead of falling
back to a default."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from saev_core.pipeline.hashing import git_version
from saev_core.pipeline.results import IngestSummary, SAECheckpoint, Weights
from saev_core.pipeline.specs import ModelSpec, ScoreSpec, WeightsSpec


class SourceRecord(BaseModel):
    uri: str
    format: str
    fingerprint: str


class ModelRecord(ModelSpec):
    fingerprint: str


class SAERecord(BaseModel):
    uri: str
    sha256: str
    trained: bool
    metrics: dict[str, Any] | None = None
    train_shards: list[str] | None = None  # activation shards the SAE was trained on (never a canary's)


class ScoringRecord(BaseModel):
    """The run's scoring parts as asked (`weights`, `score`: the specs themselves) and what came of
    them: the resolved `delta`, the weights file and its counts."""

    method: str
    columns: list[str]
    weights: WeightsSpec
    score: ScoreSpec
    delta: float  # resolved: the weights' delta_quantile of positive activations, or their fixed delta
    weights_uri: str | None
    n_cross_modal: int
    d_sae: int
    weight_shards: list[str] | None = None  # activation shards the weights came from (never a canary's)


def nested_scoring(manifest: dict) -> Any:
    """A manifest's `scoring` in the nested layout. One written before issue 23 kept the parts'
    fields flat and left out delta_quantile and seed: read into the parts, those two from the
    run's parameters."""
    scoring = manifest.get("scoring")
    if not isinstance(scoring, dict) or "weights" in scoring:
        return scoring
    asked = (manifest.get("parameters") or {}).get("scoring") or {}
    data = dict(scoring)
    weights = {k: data.pop(k) for k in ("weight_samples", "pool_size", "k", "pool") if data.get(k) is not None}
    score = {k: data.pop(k) for k in ("top_k", "null_samples") if data.get(k) is not None}
    weights.update({k: asked[k] for k in ("delta_quantile", "delta") if k in asked})
    score.update({"seed": asked["seed"]} if "seed" in asked else {})
    return {**data, "weights": weights, "score": score}


class RunManifest(BaseModel):
    """What `manifest.json` holds. Fields after `stages` are filled at publish time."""

    model_config = ConfigDict(extra="allow")  # `files` is added by publish.write_manifest

    run_id: str
    created_at: str
    code_version: str
    parameters: dict[str, Any]
    source: SourceRecord
    model: ModelRecord
    sae: SAERecord
    scoring: ScoringRecord
    work_uri: str | None = None
    record_uris: list[str] | None = None
    cache: dict[str, Any] | None = None  # the activation cache's CacheSpec
    # activation shard of each record shard's cached rows, aligned with record_uris (None: none
    # cached); absent in runs made before the residual sample (every row cached, each shard named
    # by shard_key of its record shard)
    cache_shards: list[str | None] | None = None
    report_shards: list[str] | None = None  # activations of the report's samples outside the residual sample
    residual_sample: dict[str, Any] | None = None  # fraction, seed, needed (residual_sample.ResidualSample)
    counts: dict[str, Any]
    detection_auroc: dict[str, dict[str, float]] | None = None
    canaries: dict[str, Any] | None = None  # n, by_kind, canary_shards, file, table (one row per method and kind)
    ranking_gate: dict[str, Any] | None = None  # failures (none when published), flags, ties per keep %
    stages: list[dict[str, Any]]
    subsets: dict[str, Any] | None = None
    thresholds: dict[str, float | None] | None = None
    validation: dict[str, Any] | None = None
    report: str | None = None
    interp_report: str | None = None
    # issue 22: recurring runs
    curation_model: dict[str, Any] | None = None  # the pinned version that scored the run (name, version, key, ...)
    incremental: dict[str, Any] | None = None  # rows forwarded vs reused from earlier runs of the same model
    decisions: dict[str, Any] | None = None  # decisions.parquet: the rule (absolute threshold or top-p%), kept
    changes: dict[str, Any] | None = None  # changes.parquet against the parent run: added/removed/changed/flipped

    @model_validator(mode="before")
    @classmethod
    def _nested(cls, data: Any) -> Any:
        return {**data, "scoring": nested_scoring(data)} if isinstance(data, dict) and "scoring" in data else data

    @classmethod
    def new(cls, run_id: str, **fields: Any) -> "RunManifest":
        return cls(run_id=run_id, created_at=dt.datetime.now(dt.timezone.utc).isoformat(),
                   code_version=git_version(), **fields)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


def run_manifest(run_id: str, parameters: dict[str, Any], dataset_uri: str, ingest_summary: IngestSummary,
                 model: ModelSpec, cache: Any, sae: SAECheckpoint, scoring: Any, weights: Weights, scored_rows: int,
                 detection: dict | None, stages: list[dict], work_uri: str, record_uris: list[str],
                 **parts: Any) -> RunManifest:
    """The manifest of a scored run, before publishing adds subsets, thresholds and validation.
    `cache` is the run's CacheSpec, `scoring` its ScoringSpec; `parts`: the other fields the run
    knows by then (cache_shards, residual_sample, report_shards, canaries, ranking_gate, ...)."""
    s = ingest_summary
    return RunManifest.new(
        run_id, parameters=parameters,
        source=SourceRecord(uri=dataset_uri, format=s.format, fingerprint=s.fingerprint),
        model=ModelRecord(**model.model_dump(), fingerprint=cache.model_fingerprint),
        sae=SAERecord(**sae.model_dump()),
        scoring=ScoringRecord(method=scoring.method, columns=scoring.columns(), weights=scoring.weights,
                              score=scoring.score, delta=weights.delta, weights_uri=weights.uri,
                              n_cross_modal=weights.n_cross_modal, d_sae=weights.d_sae,
                              weight_shards=weights.shard_keys),
        work_uri=work_uri, record_uris=list(record_uris), cache=cache.to_dict(),
        counts={**s.counts(), "scored": scored_rows},
        detection_auroc=detection, stages=stages, **parts)


def canaries_entry(n: int, by_kind: dict[str, int], canary_shards: list, rows: list[dict] | None,
                   **counts: int) -> dict[str, Any]:
    """The manifest's `canaries`: how many of each kind, their shards, and the canary table
    (`rows`; canaries.parquet is in the run folder when there is one). `counts`: a pinned run's
    new and reference canaries."""
    return {"n": n, **counts, "by_kind": by_kind, "canary_shards": canary_shards,
            "file": "canaries.parquet" if rows else None, "table": rows}
