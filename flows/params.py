"""Parameters of the curation flows, as pydantic models: the Prefect UI renders them as a
validated form, and the CLI reads the same shape from YAML. The stage specs themselves live in
saev_core.pipeline.specs (no Prefect there); only storage credentials, which may come from a
Prefect Secret block, are resolved here."""

from __future__ import annotations

from pydantic import Field

from saev_core.pipeline.specs import (TOY_DATASET, TOY_MODEL, DatasetSpec, ModelSpec, OutputSpec, SAESpec,
                                      ScoreMethod, ScoringSpec, Spec, ValidationSpec)

__all__ = ["TOY_DATASET", "TOY_MODEL", "CurateParams", "DatasetSpec", "ModelSpec", "OutputSpec", "SAESpec",
           "ScoreMethod", "ScoringSpec", "StorageSpec", "ValidationSpec"]


class StorageSpec(Spec):
    """Where S3-compatible storage lives. Credentials are NOT parameters: they come from the
    environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or from a Prefect Secret block."""

    endpoint_url: str | None = Field(None, description="S3 endpoint, e.g. http://127.0.0.1:8333; None = AWS")
    credentials_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding {'key': ..., 'secret': ...}")

    def options(self) -> dict:
        opts: dict = {}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.credentials_secret:
            from prefect.blocks.system import Secret

            creds = Secret.load(self.credentials_secret).get()
            opts.update({"key": creds["key"], "secret": creds["secret"]})
        return opts


class CurateParams(Spec):
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    sae: SAESpec = Field(default_factory=SAESpec)
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    dask_address: str | None = Field(None, description="tcp://host:port of an existing Dask scheduler")
