"""Ingest tasks: build the embedded toy dataset, and turn any source into canonical shards."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from saev_core.data import storage
from saev_core.data.ingest import PARQUET_SUFFIXES, JSON_SUFFIXES, ingest_to_storage, read_ingest_summary

from .common import digest, retry_unless_permanent

TRANSIENT_RETRIES = dict(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=retry_unless_permanent)


@task(name="prepare-toy-dataset")
def prepare_toy_dataset(uri: str, work_uri: str, n: int, corruption_rate: float, seed: int) -> dict:
    """Write the toy world's preference set (and its separate truth table) under the work folder.
    Deterministic in (layout, n, rate, seed), so it is reused when already there."""
    from saev_core.toyworld.generator import LAYOUTS, write_preference_dataset

    layout = uri.removeprefix("toy://") or "rlaif-v"
    if layout not in LAYOUTS:
        raise ValueError(f"unknown toy layout in {uri!r}: use toy://{' or toy://'.join(LAYOUTS)}")
    if storage.is_remote(work_uri):
        raise ValueError("the toy dataset is built on local disk: give a local work_uri or a real dataset")
    folder = Path(work_uri) / "toy-data" / f"{layout}-n{n}-r{corruption_rate}-s{seed}"
    data, truth = folder / "data" / "train.parquet", folder / "truth" / "truth.parquet"
    if not (folder / "meta.json").exists():
        get_run_logger().info("building toy dataset: %d %s samples, %.0f%% corrupted", n, layout, 100 * corruption_rate)
        write_preference_dataset(folder, n, layout=layout, corruption_rate=corruption_rate, seed=seed)
    return {"source": str(data), "truth": str(truth), "layout": layout}


def source_fingerprint(source: str, storage_options: dict | None) -> str:
    """Names, sizes and modification stamps of the source files: a cheap change detector."""
    fs, path = storage.get_fs(source, storage_options)
    if fs.isfile(path):
        files = [path]
    else:
        files = [storage.get_fs(u, storage_options)[1]
                 for u in storage.list_files(source, storage_options, suffixes=PARQUET_SUFFIXES + JSON_SUFFIXES)]
    info = []
    for f in sorted(files):
        meta = fs.info(f)
        stamp = meta.get("ETag") or meta.get("mtime") or meta.get("LastModified") or meta.get("created")
        info.append([f, int(meta.get("size") or 0), str(stamp)])
    return digest(info)


@task(name="ingest", **TRANSIENT_RETRIES)
def ingest(source: str, fmt: str, mapping: dict | None, shard_rows: int, work_uri: str,
           source_options: dict | None, work_options: dict | None) -> dict:
    """Canonical record shards + quarantine under <work>/ingest/<hash of source and settings>.

    A finished ingest of the same source files (same sizes and stamps) is reused."""
    logger = get_run_logger()
    key = digest([source_fingerprint(source, source_options), fmt, mapping, shard_rows])
    out = storage.join(work_uri, "ingest", key)
    try:
        summary = read_ingest_summary(out, work_options)
        logger.info("reusing finished ingest %s (%d kept, %d quarantined)", out, summary["kept"],
                    summary["quarantined"])
        return summary
    except FileNotFoundError:
        pass

    def progress(shard):
        logger.info("ingested shard %d: %d records, %d quarantined", shard.index, shard.records.num_rows,
                    shard.quarantine.num_rows)

    summary = ingest_to_storage(source, out, fmt, shard_rows=shard_rows, mapping=mapping,
                                storage_options=source_options, out_storage_options=work_options,
                                progress=progress)
    logger.info("ingest: %d rows in, %d kept, %d quarantined %s", summary["rows_in"], summary["kept"],
                summary["quarantined"], summary["by_reason"])
    return summary
