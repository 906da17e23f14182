"""Incremental scoring under a pinned curation model: a row's score is a function of its content
(the `sample_id` is a hash of image bytes, prompt and both responses) and of the curation model,
so a score computed once is stored under `<work>/row_scores/<curation model key>/` keyed by
`sample_id` and reused by every later run, wherever the row sits in the dataset. Only rows
never scored under the model are written to new record shards and forwarded.

The store is append-only: one Parquet part per run that scored something new. The first run of
a model seeds it from the run the model was promoted from (scored by the same SAE, weights and
delta), so that run's rows are not forwarded again either.
"""

from __future__ import annotations

import io
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saev_core.data import storage
from saev_core.data.canaries import is_canary_id
from saev_core.data.ingest import read_record_shard
from saev_core.pipeline.hashing import digest

STORE_DIR = "row_scores"
SEED_PART = "seed.parquet"
FIXED_COLUMNS = ("n_positions", "n_image_positions", "truncated_tokens")


def store_uri(work_uri: str, model_key: str) -> str:
    return storage.join(work_uri, STORE_DIR, model_key)


def store_columns(methods: Sequence[str]) -> list[str]:
    return ["sample_id", *methods, *FIXED_COLUMNS]


def read_store(work_uri: str, model_key: str, methods: Sequence[str], storage_options: dict | None = None,
               wanted: set[str] | None = None) -> pa.Table:
    """Every stored score row (only `wanted` sample ids when given), the first stored copy of a
    sample winning (a later part never overrides an earlier score)."""
    cols = store_columns(methods)
    parts = []
    for uri in storage.list_files(store_uri(work_uri, model_key), storage_options, suffixes=(".parquet",)):
        t = pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_options)))
        missing = [c for c in cols if c not in t.column_names]
        if missing:
            raise ValueError(f"stored scores {uri} lack columns {missing}: the store belongs to another scoring spec")
        t = t.select(cols)
        if wanted is not None:
            t = t.filter(pc.is_in(t.column("sample_id"), pa.array(sorted(wanted), pa.string())))
        parts.append((storage.basename(uri) != SEED_PART, uri, t))  # the seed first, then parts by name
    parts.sort(key=lambda p: (p[0], p[1]))
    seen: set[str] = set()
    keep = []
    for _, _, t in parts:
        ids = t.column("sample_id").to_pylist()
        mask = [s not in seen and not seen.add(s) for s in ids]
        keep.append(t.filter(pa.array(mask, pa.bool_())))
    if not keep:
        return pa.table({c: pa.array([], pa.string() if c == "sample_id" else pa.float64()) for c in cols})
    return pa.concat_tables(keep, promote_options="permissive")


def seed_store(work_uri: str, model_key: str, run_scores: pa.Table, method: str, methods: Sequence[str],
               storage_options: dict | None = None) -> int:
    """Seed an empty store from the promoted run's published scores (`score` is `method`)."""
    uri = storage.join(store_uri(work_uri, model_key), SEED_PART)
    if storage.exists(uri, storage_options):
        return 0
    t = run_scores.rename_columns([method if c == "score" else c for c in run_scores.column_names])
    missing = [c for c in store_columns(methods) if c not in t.column_names]
    if missing:
        raise ValueError(f"the promoted run's scores lack columns {missing}")
    t = t.select(store_columns(methods))
    t = t.filter(pa.array([not is_canary_id(s) for s in t.column("sample_id").to_pylist()], pa.bool_()))
    with storage.atomic_output(uri, storage_options, overwrite=False) as fh:
        pq.write_table(t, fh)
    return t.num_rows


def append_store(work_uri: str, model_key: str, tables: Sequence[pa.Table], methods: Sequence[str],
                 storage_options: dict | None = None) -> int:
    """Store the rows scored by this run (canaries excluded: they are made fresh each run)."""
    rows = [t.select(store_columns(methods)) for t in tables if t.num_rows]
    if not rows:
        return 0
    t = pa.concat_tables(rows)
    t = t.filter(pa.array([not is_canary_id(s) for s in t.column("sample_id").to_pylist()], pa.bool_()))
    if not t.num_rows:
        return 0
    ids = sorted(t.column("sample_id").to_pylist())
    uri = storage.join(store_uri(work_uri, model_key), f"part-{digest(ids, 20)}.parquet")
    if not storage.exists(uri, storage_options):
        with storage.atomic_output(uri, storage_options) as fh:
            pq.write_table(t.sort_by("sample_id"), fh)
    return t.num_rows


def new_row_shards(record_uris: Sequence[str], known: set[str], out_root: str, shard_rows: int,
                   storage_options: dict | None = None) -> dict:
    """Record shards (canonical schema) of the rows whose sample_id is not in `known`, written
    under `<out_root>/<hash of their ids>/shard-NNNNN.parquet` (reused when there). Returns
    {"record_uris", "rows" (new), "reused_rows" (known), "total"}."""
    new_parts, total = [], 0
    for uri in record_uris:
        t = read_record_shard(uri, storage_options)
        total += t.num_rows
        mask = pa.array([s not in known for s in t.column("sample_id").to_pylist()], pa.bool_())
        new_parts.append(t.filter(mask))
    new = pa.concat_tables(new_parts) if new_parts else None
    n_new = new.num_rows if new is not None else 0
    out = {"record_uris": [], "rows": n_new, "reused_rows": total - n_new, "total": total}
    if not n_new:
        return out
    folder = storage.join(out_root, digest(new.column("sample_id").to_pylist(), 20))
    n_shards = -(-n_new // shard_rows)
    bounds = [n_new * i // n_shards for i in range(n_shards + 1)]
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        uri = storage.join(folder, f"shard-{i:05d}.parquet")
        if not storage.exists(uri, storage_options):
            with storage.atomic_output(uri, storage_options) as fh:
                pq.write_table(new.slice(lo, hi - lo), fh)
        out["record_uris"].append(uri)
    return out


def reference_canaries(uri: str, method: str, methods: Sequence[str], real_ids: Sequence[str],
                       storage_options: dict | None = None) -> tuple[pa.Table, pa.Table]:
    """The curation model's fixed canaries whose source is among this run's rows, as (canary
    table: canary_id, source_id, donor_id, kind; scores: sample_id, one column per method).
    Their scores are those the promoted run measured: the same model scores them the same, so
    they are not forwarded, and every night's canary table shares them."""
    from saev_core.data.canaries import CANARY_TABLE_SCHEMA

    t = pq.read_table(io.BytesIO(storage.read_bytes(uri, storage_options)))
    real_ids = set(real_ids)
    t = t.filter(pa.array([s in real_ids for s in t.column("source_id").to_pylist()], pa.bool_()))
    info = pa.table({"canary_id": t.column("canary_id"), "source_id": t.column("source_id"),
                     "donor_id": pa.nulls(t.num_rows, pa.string()), "kind": t.column("kind")},
                    schema=CANARY_TABLE_SCHEMA)
    scores = pa.table({"sample_id": t.column("canary_id"), **{m: t.column(m) for m in dict.fromkeys([method, *methods])}})
    return info, scores


def write_known(table: pa.Table, uri: str, storage_options: dict | None = None) -> str:
    """The reused rows' scores as one score file, read by assemble_scores like any shard's."""
    with storage.atomic_output(uri, storage_options) as fh:
        pq.write_table(table, fh)
    return uri
