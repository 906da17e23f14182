"""Where a run's data and model come from. A dataset URI with a registered scheme is built by its
reader before ingest (the embedded toy world is one: `toy://rlaif-v`), a model id may be an alias
(`toy`); everything else is read as it is. The pipeline itself has no special cases for either."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from saev_core.data import storage
from saev_core.pipeline.specs import DatasetSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedSource:
    uri: str  # what the ingest adapters read: a local path or an s3:// URI
    truth_uri: str | None = None  # labels known by construction, for the evaluation stage


DatasetReader = Callable[[DatasetSpec, str], ResolvedSource]
DATASET_SCHEMES: dict[str, DatasetReader] = {}
MODEL_ALIASES: dict[str, Callable[[], str]] = {}


def dataset_scheme(scheme: str):
    def wrap(reader: DatasetReader) -> DatasetReader:
        DATASET_SCHEMES[scheme] = reader
        return reader

    return wrap


def resolve_dataset(dataset: DatasetSpec, work_uri: str) -> ResolvedSource:
    scheme = dataset.uri.split("://", 1)[0] if "://" in dataset.uri else ""
    reader = DATASET_SCHEMES.get(scheme)
    return reader(dataset, work_uri) if reader else ResolvedSource(dataset.uri)


def resolve_model_id(model_id: str) -> str:
    """An alias names a folder (e.g. "toy", the shipped toy LLaVA); any other id is itself."""
    alias = MODEL_ALIASES.get(model_id)
    return alias() if alias else model_id


@dataset_scheme("toy")
def toy_dataset(dataset: DatasetSpec, work_uri: str) -> ResolvedSource:
    """The toy world's preference set and its separate truth table, written under the work
    folder. Deterministic in (layout, n, rate, seed), so it is reused when already there."""
    from saev_core.toyworld.generator import LAYOUTS, write_preference_dataset

    layout = dataset.uri.removeprefix("toy://") or "rlaif-v"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown toy layout in {dataset.uri!r}: use toy://{' or toy://'.join(LAYOUTS)}")
    if storage.is_remote(work_uri):
        raise ValueError("toy:// datasets are built on local disk: set output.work_uri to a local folder")
    n, rate, seed = dataset.toy_samples, dataset.toy_corruption_rate, dataset.toy_seed
    folder = Path(work_uri) / "toy-data" / f"{layout}-n{n}-r{rate}-s{seed}"
    if not (folder / "meta.json").exists():
        log.info("building toy dataset: %d %s samples, %.0f%% corrupted", n, layout, 100 * rate)
        write_preference_dataset(folder, n, layout=layout, corruption_rate=rate, seed=seed)
    return ResolvedSource(str(folder / "data" / "train.parquet"), str(folder / "truth" / "truth.parquet"))


def _toy_model() -> str:
    from saev_core.toyworld import toy_model_path

    return str(toy_model_path())


MODEL_ALIASES["toy"] = _toy_model
