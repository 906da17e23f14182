"""Typed specs of a curation run: what the CLI reads, the Prefect UI renders, the stages take,
and the manifest records. Pydantic models, no Prefect: each stage is handed only its own spec,
so a cached stage keys on exactly what changes its output (a new baseline column does not
recompute the weights).

    DatasetSpec  -> ingest            ModelSpec  -> activations (CacheSpec.for_model)
    SAESpec      -> train or load     ScoringSpec.weights -> weights, ScoringSpec.score -> scores
    OutputSpec, ValidationSpec -> publish
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from saev_core.data.canaries import KINDS, CanaryConfig
from saev_core.data.formats import FORMATS
from saev_core.refusal import Refusal
from saev_core.sae.scoring import METHODS, ScoreContext
from saev_core.sae.training import ARCHITECTURES, SAEV_RECIPE, SAETrainConfig
from saev_core.sae.weights import CrossModalWeights

TOY_DATASET = "toy://rlaif-v"
TOY_MODEL = "toy"

ScoreMethod = Literal[METHODS]  # derived from the scorer registry (saev_core.sae.scoring)
Architecture = Literal[ARCHITECTURES]
DatasetFormat = Literal[("auto", *FORMATS)]
CanaryKind = Literal[KINDS]


class Spec(BaseModel):
    """Unknown keys are errors, never silently ignored (a typo would run with defaults)."""

    model_config = ConfigDict(extra="forbid")


class DatasetSpec(Spec):
    uri: str = Field(TOY_DATASET, description="Parquet/JSONL file or folder, local or s3://. "
                     "'toy://rlaif-v' or 'toy://align-anything' builds the embedded toy world.")
    format: DatasetFormat = "auto"
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

    def dataset_name(self) -> str:
        """The folder name of the dataset in the output: `name`, else the last part of the URI."""
        if self.name:
            return self.name
        base = self.uri.rstrip("/").split("/")[-1].split("?")[0]
        if self.uri.startswith("toy://"):
            base = f"toy-{base}"
        for suffix in (".parquet", ".jsonl", ".json", ".pq", ".gz"):
            base = base.removesuffix(suffix)
        return re.sub(r"[^A-Za-z0-9_.-]", "-", base) or "dataset"


class ModelSpec(Spec):
    model_id: str = Field(TOY_MODEL, description="Hub id or local folder; 'toy' = the shipped toy LLaVA")
    revision: str | None = None
    layer: int = Field(2, description="Decoder layer whose output is hooked (0-based)")
    device: str = Field("auto", description="cuda, cuda:N, cpu, or auto (cuda when the worker has one). "
                        "Capture, SAE encode, weights and scoring all run here.")
    dtype: str | None = Field(None, description="bfloat16 on GPU, float32 on CPU when unset")
    batch_size: int = Field(16, ge=1)
    batch_tokens: int = Field(8192, ge=1, description="Most padded tokens in one forward pass (batch size x "
                              "longest sample): a long sample gets a smaller batch, never more memory")
    max_tokens: int | None = Field(None, ge=16, description="Longest input in tokens; longer text is cut "
                                   "(image tokens kept whole). Default: the model's context length")
    trust_remote_code: bool = False
    cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="Dtype of cached residuals: auto = the forward's own dtype when it is half "
        "precision (bfloat16 by default on a GPU: half the storage, nothing lost), else float32")

    sae_dtype: Literal["model", "float32"] = Field(
        "float32", description="Dtype of the SAE when it encodes for the weights and the scores: 'float32', or "
        "'model' = the forward's dtype (bfloat16 on a GPU, about 5x faster to encode; its score drift, "
        "measured by benchmarks/gpu_check.py, missed the 0.999 Spearman target for cooccur_l0 on the CPU check)")

    def encode_key(self) -> str:
        """What decides the SAE's encode dtype, as written (resolved only on the worker, which is
        where the device is): part of the weights' and statistics' cache keys."""
        return "float32" if self.sae_dtype == "float32" else f"model:{self.dtype}:{self.device}"

    def uses_gpu(self) -> bool:
        """Whether tasks of this model must go to a GPU worker: anything but an explicit CPU.
        ('auto' is decided on the worker, which is where the GPU is.)"""
        return self.device != "cpu"


class SAESpec(Spec):
    """Demo-scale defaults; the paper's recipe is `saev_core.sae.training.SAEV_RECIPE`
    (lr 5e-5, 30,000 steps x 4,096 tokens). Fields not listed here come from the recipe."""

    checkpoint: str | None = Field(None, description="SAELens checkpoint folder/URI to load; train when unset")
    architecture: Architecture = "standard"
    expansion_factor: int = Field(16, ge=1)
    l1_coefficient: float = SAEV_RECIPE.l1_coefficient
    k: int = SAEV_RECIPE.k
    lr: float = Field(1e-3, description=f"The paper used {SAEV_RECIPE.lr:g} over {SAEV_RECIPE.steps:,} steps "
                      f"of {SAEV_RECIPE.batch_size:,} tokens; short runs need a larger rate")
    steps: int = Field(1500, ge=1)
    batch_size: int = Field(512, ge=8, description="Tokens per training step")
    train_samples: int | None = Field(None, description="Train on a seeded sample of at most this many samples, "
                                      "drawn across the whole dataset; residuals are cached for these (and the "
                                      "weight samples) only. Unset: every sample's residuals are cached")
    max_tokens: int | None = Field(None, ge=1, description="Train on at most this many positions (drawn with "
                                   f"the samples); the paper's recipe: {SAEV_RECIPE.steps * SAEV_RECIPE.batch_size:,}")
    seed: int = 0
    precision: Literal["auto", "float32", "tf32", "bf16"] = Field(
        "auto", description="SAE training arithmetic: bf16 autocast (SAELens's switch; weights and optimiser "
        "stay float32), TF32 matmuls, or float32; auto = bf16 on a GPU, float32 on the CPU")

    def to_train_config(self, device: str) -> SAETrainConfig:
        """The SAELens-facing training config, in the way SAELens has `to_sae_trainer_config`."""
        return dataclasses.replace(SAEV_RECIPE, architecture=self.architecture,
                                   expansion_factor=self.expansion_factor, l1_coefficient=self.l1_coefficient,
                                   k=self.k, lr=self.lr, steps=self.steps, batch_size=self.batch_size,
                                   seed=self.seed, device=device, max_samples=self.train_samples,
                                   max_tokens=self.max_tokens, precision=self.precision)


class WeightsSpec(Spec):
    """`scoring.weights`: what the cross-modal weights and delta depend on (and nothing else)."""

    weight_samples: int = Field(1000, ge=1, description="Samples used to compute cross-modal weights")
    pool_size: int = 30
    k: int = 5
    delta_quantile: float | None = Field(
        0.5, ge=0, le=1, description="delta = this quantile of positive SAE activations (overrides delta)")
    delta: float = Field(1.0, description="Absolute activation threshold, used when delta_quantile is unset")
    pool: Literal["joint", "per_modality"] = Field(
        "joint", description="joint: the paper's top-pool_size pool over all tokens; per_modality: top-k text "
        "and top-k image positions from separate pools, both above delta")

    def fixed(self, delta: float) -> "WeightsSpec":
        """The same weights with `delta` fixed (a run's resolved delta: what a pinned curation model
        or a rebuilt run scores with)."""
        return self.model_copy(update={"delta_quantile": None, "delta": float(delta)})


class ScoreSpec(Spec):
    """`scoring.score`: what the per-sample score columns depend on, beside the weights, delta and methods."""

    top_k: int = 10
    seed: int = 0
    null_samples: int = Field(16, ge=2, description="null_z: other images of the same shard per sample")

    def context(self, weights: CrossModalWeights | None, delta: float) -> ScoreContext:
        """What every scorer reads beside a sample's statistics."""
        return ScoreContext(weights, float(delta), self.top_k, self.seed, self.null_samples)


class CanarySpec(BaseModel):
    """Known-bad copies of the run's own records, scored beside them and never published, never
    used for SAE training or weights: every run measures whether its ranking works on its data."""

    enabled: bool = True
    fraction: float = Field(0.05, ge=0, le=1, description="Share of the kept records used as sources")
    min_count: int = Field(200, ge=0, description="At least this many canaries when there are that many records")
    cap: int = Field(2000, ge=0, description="At most this many canaries")
    kinds: list[CanaryKind] = Field(default_factory=lambda: list(KINDS))
    seed: int = 0

    def config(self) -> CanaryConfig:
        return CanaryConfig(enabled=self.enabled, fraction=self.fraction, min_count=self.min_count, cap=self.cap,
                            kinds=tuple(self.kinds), seed=self.seed)


# keys of `scoring` that moved into its parts (issue 23): an old config is told where they went
_MOVED = {**{k: "weights" for k in WeightsSpec.model_fields}, **{k: "score" for k in ScoreSpec.model_fields}}


def nest_scoring_params(scoring: dict) -> dict:
    """Parameters' `scoring` as written before the parts were nested (flat delta_quantile, top_k,
    ...) in today's layout, so runs from either side compare key by key."""
    out = {k: v for k, v in scoring.items() if k not in _MOVED}
    for k in scoring.keys() & _MOVED.keys():
        out[_MOVED[k]] = {**(out.get(_MOVED[k]) or {}), k: scoring[k]}
    return out


class ScoringSpec(Spec):
    """The scoring methods and their two parts: `weights` (the cross-modal weights and delta) and
    `score` (the per-sample columns), each handed alone to its stage and recorded as it is in the
    manifest (`ScoringRecord`)."""

    method: ScoreMethod = "reference"
    baselines: list[ScoreMethod] = Field(default_factory=lambda: ["raw_cosine", "l0", "cooccur_l0", "length",
                                                                 "random"])
    weights: WeightsSpec = Field(default_factory=WeightsSpec)
    score: ScoreSpec = Field(default_factory=ScoreSpec)
    canaries: CanarySpec = Field(default_factory=CanarySpec)
    curation_model: str | None = Field(
        None, description="Score with a promoted curation model as it is (NAME, NAME@vN, or its folder URI under "
        "<output>/_models/): no SAE training, no weights, no delta; rows scored before under it reuse their "
        "scores, so only new rows are forwarded. Its scoring spec replaces method/baselines here")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """A key of the flat layout before issue 23 is refused with its new name, not as unknown."""
        moved = [k for k in data if k in _MOVED] if isinstance(data, dict) else []
        if moved:  # a refusal of the preflight stage (preflight.ConfigError's, which imports these specs)
            new = [f"scoring.{_MOVED[k]}.{k}" for k in moved]
            import json

            parts: dict[str, dict] = {}
            for k in moved:
                parts.setdefault(_MOVED[k], {})[k] = data[k]
            raise Refusal("preflight", ", ".join(f"scoring.{k}" for k in moved),
                          f"moved: {'it is' if len(moved) == 1 else 'they are'} now {', '.join(new)} (the "
                          "weights' and the scores' parameters are parts of scoring)",
                          "Write, in YAML, scoring: " + json.dumps(parts) + ", or on the command line "
                          + " ".join(f"--set {n}={json.dumps(data[k])}" for n, k in zip(new, moved)))
        return data

    def columns(self) -> list[str]:
        """The chosen method first, then each baseline once."""
        return [self.method] + [b for b in dict.fromkeys(self.baselines) if b != self.method]


class OutputSpec(Spec):
    uri: str = Field("runs", description="Output root: local folder or s3://bucket/prefix")
    keep_percents: list[int] = Field(default_factory=lambda: [25, 50, 75])
    run_id: str | None = Field(None, description="Default: UTC timestamp + parameter hash")
    work_uri: str | None = Field(None, description="Caches and intermediates; default <uri>/_work")
    stratify_by: str | None = Field(
        None, description="Keep the top p% within each group: 'prompt_clusters' (k-means of the prompt "
        "words) or the name of a source column (kept in the record's extra JSON)")
    stratify_clusters: int = Field(8, ge=1, description="Groups for stratify_by=prompt_clusters")
    keep_failed_days: float = Field(
        30, ge=0, description="A failed run's evidence (<uri>/<dataset>/_failed/<run_id>/) is removed by later "
        "runs once this many days old")
    parent_run: str | None = Field(
        None, description="The run this one is compared with (changes.parquet): a run URI or run id of the same "
        "dataset, or 'none'. Default: the newest published run of the dataset scored by the same curation model")
    row_key: str | None = Field(
        None, description="Source column that identifies a row across runs (a changed row keeps its key and gets "
        "a new content hash); default: row_index, the row's position in the source")

    @field_validator("keep_percents")
    @classmethod
    def _percents(cls, v: list[int]) -> list[int]:
        if not v or any(not 1 <= p <= 100 for p in v):
            raise ValueError("keep_percents must be a non-empty list of integers in 1..100")
        return sorted(set(v))


class ValidationSpec(Spec):
    max_quarantine_rate: float = Field(0.5, ge=0, le=1)
    max_tie_share: float = Field(
        0.05, ge=0, le=1, description="Fail when more than this share of a subset was picked by sample_id "
        "order from a tie at its keep threshold")
    min_cross_modal_features: int = Field(
        10, ge=0, description="Fail when a weight-based method has fewer cross-modal features")
    min_canary_win_rate: float | None = Field(
        None, ge=0, le=1, description="Fail when the method's paired win rate on image_swap canaries is below "
        "this (unset: a rate not clearly above 0.5 is only flagged)")
