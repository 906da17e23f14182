"""Where a run writes and what it is called, decided once before any work."""

from __future__ import annotations

import os
from dataclasses import dataclass

from saev_core.data import publish, storage
from saev_core.pipeline.hashing import digest
from saev_core.pipeline.specs import DatasetSpec, OutputSpec


@dataclass(frozen=True)
class RunPlan:
    output: str  # output root (absolute when local: cache keys and the manifest must not depend on the cwd)
    work: str  # caches and intermediates
    run_id: str
    run: str  # <output>/<dataset>/<run_id>

    @classmethod
    def create(cls, dataset: DatasetSpec, output: OutputSpec, parameters: dict) -> "RunPlan":
        root = output.uri if storage.is_remote(output.uri) else os.path.abspath(output.uri)
        work = output.work_uri or storage.join(root, "_work")
        work = work if storage.is_remote(work) else os.path.abspath(work)
        run_id = output.run_id or publish.new_run_id(digest(parameters, 6))  # unique within a second
        return cls(root, work, run_id, publish.run_uri(root, dataset.dataset_name(), run_id))
