"""Parameters of the curation flows, as pydantic models: the Prefect UI renders them as a
validated form, and the CLI reads the same shape from YAML."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from saev_core.sae.scoring import METHODS

TOY_DATASET = "toy://rlaif-v"
TOY_MODEL = "toy"

class Spec(BaseModel):
    """Unknown keys are errors, never silently ignored (a typo would run with defaults)."""

    model_config = ConfigDict(extra="forbid")


ScoreMethod = Literal["reference", "paper", "weighted", "random", "l0", "cooccur_l0", "raw_cosine", "length"]


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


class DatasetSpec(Spec):
    uri: str = Field(TOY_DATASET, description="Parquet/JSONL file or folder, local or s3://. "
                     "'toy://rlaif-v' or 'toy://align-anything' builds the embedded toy world.")
    format: Literal["auto", "rlaif_v", "align_anything", "trl", "mapping"] = "auto"
    mapping: dict[str, Any] | None = Field(
        None, description="For format=mapping: {'prompt': col, 'image': col, 'chosen': col, 'rejected': col}")
    name: str | None = Field(None, description="Dataset name in the output path (default: from the URI)")
    shard_rows: int = Field(128, ge=1, description="Samples per shard: the unit of parallel work")
    toy_samples: int = Field(400, ge=10, description="Size of the toy dataset (toy:// only)")
    toy_corruption_rate: float = Field(0.3, ge=0, le=1)
    toy_seed: int = 0
    allow_remote_images: bool = Field(
        False, description="Fetch images given as http(s):// or other-store URLs; off: such rows are "
        "quarantined as remote_image_not_allowed and no network call is made")
    max_text_chars: int = Field(32_000, ge=1, description="Rows whose prompt or response is longer are "
                                "quarantined as text_too_long")
    max_image_bytes: int = Field(64 * 2**20, ge=1, description="Larger image files are quarantined as "
                                 "image_too_large before they are read")


class ModelSpec(Spec):
    model_id: str = Field(TOY_MODEL, description="Hub id or local folder; 'toy' = the shipped toy LLaVA")
    revision: str | None = None
    layer: int = Field(2, description="Decoder layer whose output is hooked (0-based)")
    device: str = "auto"
    dtype: str | None = Field(None, description="bfloat16 on GPU, float32 on CPU when unset")
    batch_size: int = Field(16, ge=1)
    batch_tokens: int = Field(8192, ge=1, description="Most padded tokens in one forward pass (batch size x "
                              "longest sample): a long sample gets a smaller batch, never more memory")
    max_tokens: int | None = Field(None, ge=16, description="Longest input in tokens; longer text is truncated "
                                   "(image tokens kept whole). Default: the model's context length")
    trust_remote_code: bool = False
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class SAESpec(Spec):
    checkpoint: str | None = Field(None, description="SAELens checkpoint folder/URI to load; train when unset")
    architecture: Literal["standard", "topk", "batchtopk"] = "standard"
    expansion_factor: int = Field(16, ge=1)
    l1_coefficient: float = 5.0
    k: int = 32
    lr: float = Field(1e-3, description="The paper used 5e-5 over 30,000 steps of 4,096 tokens; short runs "
                      "need a larger rate")
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(512, ge=8, description="Tokens per training step")
    train_samples: int | None = Field(None, description="Use at most this many samples for training")
    seed: int = 0


class ScoringSpec(Spec):
    method: ScoreMethod = "reference"
    baselines: list[ScoreMethod] = Field(default_factory=lambda: ["raw_cosine", "l0", "cooccur_l0", "length",
                                                                 "random"])
    weight_samples: int = Field(1000, ge=1, description="Samples used to compute cross-modal weights")
    pool_size: int = 30
    k: int = 5
    delta_quantile: float | None = Field(
        0.5, ge=0, le=1, description="delta = this quantile of positive SAE activations (overrides delta)")
    delta: float = Field(1.0, description="Absolute activation threshold, used when delta_quantile is unset")
    top_k: int = 10
    seed: int = 0

    @field_validator("baselines")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}")
        return v


class OutputSpec(Spec):
    uri: str = Field("runs", description="Output root: local folder or s3://bucket/prefix")
    keep_percents: list[int] = Field(default_factory=lambda: [25, 50, 75])
    run_id: str | None = Field(None, description="Default: UTC timestamp + parameter hash")
    work_uri: str | None = Field(None, description="Caches and intermediates; default <uri>/_work")

    @field_validator("keep_percents")
    @classmethod
    def _percents(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= p <= 100 for p in v):
            raise ValueError("keep_percents must be a non-empty list of integers in 1..100")
        return sorted(set(v))


class ValidationSpec(Spec):
    max_quarantine_rate: float = Field(0.5, ge=0, le=1)


class CurateParams(Spec):
    dataset: DatasetSpec = Field(default_factory=DatasetSpec)
    model: ModelSpec = Field(default_factory=ModelSpec)
    sae: SAESpec = Field(default_factory=SAESpec)
    scoring: ScoringSpec = Field(default_factory=ScoringSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    dask_address: str | None = Field(None, description="tcp://host:port of an existing Dask scheduler")
