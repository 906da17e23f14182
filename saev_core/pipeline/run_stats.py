"""Per-stage timings and counts of one run, collected in one place (datatrove-style stats): the
flow wraps each stage in `timed_stage`, and the manifest, report and Prefect artifact read
`RunStats.stages`."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Iterator


@dataclass
class StageRecord:
    stage: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class RunStats:
    logger: logging.Logger | logging.LoggerAdapter = field(default_factory=lambda: logging.getLogger(__name__))
    stages: list[dict] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    current: str | None = None  # the stage running now, or the last one begun (named in a failure)

    @contextlib.contextmanager
    def timed_stage(self, name: str) -> Iterator[StageRecord]:
        """Time the block; the block sets `record.detail` (counts, what was reused)."""
        record = StageRecord(name)
        self.current = name
        start = time.perf_counter()
        yield record
        record.seconds = round(time.perf_counter() - start, 2)
        self.stages.append({"stage": record.stage, "seconds": record.seconds, "detail": record.detail})
        self.logger.info("stage %s done in %.1fs %s", name, record.seconds, record.detail)

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.t0, 1)
