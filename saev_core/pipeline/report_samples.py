"""Which samples a run's report explains: the lowest-scored, chosen once here for the flow (which
captures the residuals of those outside the residual sample) and for `explain` (which reads them)."""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

REPORT_SAMPLES = 6  # lowest-scored samples a run's report explains


def lowest_scored(sample_ids: Sequence[str], scores: Sequence[float], n: int = REPORT_SAMPLES) -> list[str]:
    """The n lowest-scored samples, ties by sample_id: the ones a run's report explains."""
    return [sample_ids[i] for i in sorted(range(len(sample_ids)), key=lambda i: (scores[i], sample_ids[i]))[:n]]


def uncached_report_samples(scores: pa.Table, method: str, cached=None) -> list[str]:
    """The report's samples whose residuals the run did not cache (`cached(sample_id)`: whether
    the residual sample kept it; None: nothing cached), to be captured before the report."""
    ids = lowest_scored(scores.column("sample_id").to_pylist(), scores.column(method).to_pylist())
    return [s for s in ids if cached is None or not cached(s)]
