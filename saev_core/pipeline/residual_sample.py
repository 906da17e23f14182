"""Which samples' residuals are stored: only what the SAE's training sample and the weight subset
need, drawn across the whole dataset.

Every other sample is scored by the fused pass (forward -> SAE encode -> per-sample statistics,
saev_core.pipeline.score_stages.record_stats), which stores no residuals. The choice is a seeded hash of
the sample id, so each record shard decides its own rows without seeing the others (one task per
shard, in any order, on any worker), the cached sample is spread evenly over the dataset, and a
rerun with the same settings caches the same rows.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from saev_core.pipeline.specs import SAESpec, WeightsSpec

# The hash draw keeps a binomial number of rows (standard deviation about sqrt(needed)): ask for
# four standard deviations more than needed, so the sample falls short about once in 30,000 runs.
MARGIN_SD = 4.0


def with_margin(needed: int) -> float:
    return needed + MARGIN_SD * needed ** 0.5


@dataclass(frozen=True)
class ResidualSample:
    """`fraction` of the samples (by a hash of seed and sample id) have their residuals cached."""

    fraction: float = 1.0
    seed: int = 0
    needed: int | None = None  # samples the SAE and the weights read (None: every sample)

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"residual sample fraction must be in (0, 1], got {self.fraction}")

    @property
    def everything(self) -> bool:
        return self.fraction >= 1

    def keeps(self, sample_id: str) -> bool:
        if self.everything:
            return True
        h = int.from_bytes(hashlib.sha256(f"{self.seed}:{sample_id}".encode()).digest()[:8], "big")
        return h / 2**64 < self.fraction

    @classmethod
    def plan(cls, sae: SAESpec, weights: WeightsSpec, kept: int) -> "ResidualSample":
        """Enough samples for the weights (`weight_samples`) and, when the SAE is trained here, for
        its training sample (`sae.train_samples`; unset means the SAE may read every sample, so
        everything is cached). `kept`: samples after ingest."""
        needs = [weights.weight_samples]
        if not sae.checkpoint:
            if sae.train_samples is None:
                return cls(1.0, sae.seed, None)
            needs.append(sae.train_samples)
        needed = max(needs)
        return cls(min(1.0, with_margin(needed) / max(kept, 1)), sae.seed, needed)

    def describe(self) -> str:
        if self.everything:
            return "every sample's residuals cached"
        return f"residuals of {self.fraction:.1%} of samples cached (the SAE and weights need {self.needed})"
