"""Typed results of the stages: what one stage hands the next, read by attribute (the flow never
looks a key up in a stage's dict). Frozen pydantic models, so a Prefect task persists them, a
Dask worker returns them and the manifest records them as JSON.

    ingest -> IngestSummary     canaries -> Canaries       activations -> CacheBuild
    sae    -> SAECheckpoint     weights  -> Weights        scores      -> Scored
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class IngestSummary(Result):
    """The ingest's summary (`ingest.json`, written by saev_core.data.ingest): the fields the run
    reads, the others (source, options, ...) kept as written."""

    model_config = ConfigDict(frozen=True, extra="allow")

    format: str
    fingerprint: str
    rows_in: int
    kept: int
    quarantined: int
    by_reason: dict[str, int] = Field(default_factory=dict)
    quarantine_uri: str | None = None
    shards: list[dict[str, Any]] = Field(default_factory=list)
    files: list[str] = Field(default_factory=list)

    @property
    def record_uris(self) -> list[str]:
        """The record shards that hold rows."""
        return [s["uri"] for s in self.shards if s["rows"] > 0]

    def counts(self) -> dict[str, Any]:
        """What FAILED.json and the manifest's counts say of the ingest."""
        return {"rows_in": self.rows_in, "kept": self.kept, "quarantined": self.quarantined,
                "by_reason": dict(self.by_reason)}

    def describe(self) -> str:
        return f"{self.rows_in} rows, {self.kept} kept, {self.quarantined} quarantined"


class Canaries(Result):
    """Canary record shards and their table (which canary copies which source, and how)."""

    record_uris: list[str]
    table_uri: str
    n: int
    by_kind: dict[str, int]


class CacheBuild(Result):
    """The activations stage: `sample_keys[i]` is the activation shard of record shard i's rows in
    the residual sample (None when none is kept), `record_keys[i]` names all of its rows. (Not
    `keys`: Prefect reads a model as a mapping, and a field named `keys` hides the method.)"""

    sample_keys: list[str | None]
    record_keys: list[str | None]
    computed: int
    reused: int
    samples: int
    rows: int

    @property
    def cached_keys(self) -> list[str]:
        return [k for k in self.sample_keys if k]


class SAECheckpoint(Result):
    """The SAE stage: a checkpoint, identified downstream by its sha256."""

    uri: str
    sha256: str
    trained: bool
    metrics: dict[str, Any] | None = None
    train_shards: list[str] | None = None  # activation shards it was trained on (never a canary's)


class Weights(Result):
    """The weights stage: the weights file, its counts and the resolved delta."""

    uri: str | None
    n_cross_modal: int
    d_sae: int
    delta: float
    tokens: int | None = None
    shard_keys: list[str] = Field(default_factory=list)  # activation shards the weights came from


class Scored(Result):
    """The scores stage: the weights used and one scores file per record shard, in order."""

    weights: Weights
    score_uris: list[str]
    methods: list[str]
