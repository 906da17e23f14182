"""Publishing a run: ``<output>/<dataset>/<run_id>/`` on a local folder or object storage.

Layout::

    scores.parquet                     sample_id, score (+ optional extra score columns)
    subsets/top-<p>/part-00000.parquet TRL-ready: prompt, chosen, rejected, images, sample_id, score
    quarantine.parquet                 row_index, sample_id, reason, detail, source_file
    validation.json                    the validation report
    manifest.json                      written LAST: a run with a manifest is complete

A run is written under ``<output>/<dataset>/_staging/<run_id>/`` (a name every reader of this
package and pyarrow's dataset discovery skip) and made visible by :func:`promote`: one rename on
a local disk; on object storage a copy of every file with the manifest copied last. A run folder
without ``manifest.json`` is therefore never complete; :func:`list_runs` shows only complete runs
and :func:`clean_incomplete` removes what a killed publish left behind.

A run that fails keeps its evidence in ``<output>/<dataset>/_failed/<run_id>/`` (:func:`keep_failed`):
what it had staged, its ``quarantine.parquet``, its scores and canaries when they exist, and
``FAILED.json`` (stage, reason, parameters), written last. It has no manifest and lives under a
``_`` name, so it never looks like a published run; :func:`list_failed` lists such folders and
:func:`clean_failed` removes them once older than ``FAILED_MAX_AGE_DAYS`` (or a given age).

Every subset and ``scores.parquet`` also carry the source's own columns (``ds_name``, ``idx``,
``origin_*``, ratings, any other column; see :func:`passthrough_table`), renamed
``source_<name>`` only where a name is already taken by the pipeline's columns.

Subset files carry the Arrow schema of :data:`SUBSET_FEATURES` (a ``datasets.Features``), so
the file embeds the ``huggingface`` schema metadata and ``datasets.load_dataset("parquet", ...)``
decodes ``images`` to PIL images. Subsets are written in streaming fashion, one row group per
``write`` call (images are large). Every object is written atomically (see
:mod:`saev_core.data.storage`). A run directory that already has a manifest is never written to
again: every writer here raises :class:`RunAlreadyPublished`.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value

from saev_core.data import storage
from saev_core.data.records import QUARANTINE_SCHEMA, QuarantineEntry, decode_extra

__all__ = [
    "SCORES_FILE",
    "QUARANTINE_FILE",
    "VALIDATION_FILE",
    "MANIFEST_FILE",
    "SUBSETS_DIR",
    "SUBSET_FEATURES",
    "SUBSET_SCHEMA",
    "SUBSET_COLUMNS",
    "RunAlreadyPublished",
    "RunIncomplete",
    "run_uri",
    "subset_name",
    "subset_uri",
    "ensure_unpublished",
    "write_scores",
    "read_scores",
    "write_quarantine",
    "SubsetWriter",
    "SubsetInfo",
    "iter_subset_batches",
    "write_subset",
    "list_subsets",
    "write_validation",
    "write_manifest",
    "read_manifest",
    "is_complete",
    "run_files",
    "STAGING_DIR",
    "new_run_id",
    "staging_uri",
    "begin_run",
    "promote",
    "list_runs",
    "clean_incomplete",
    "FAILED_DIR",
    "FAILED_FILE",
    "failed_uri",
    "keep_failed",
    "list_failed",
    "clean_failed",
    "passthrough_schema",
    "passthrough_table",
    "subset_schema",
    "add_passthrough",
]

SCORES_FILE = "scores.parquet"
QUARANTINE_FILE = "quarantine.parquet"
VALIDATION_FILE = "validation.json"
MANIFEST_FILE = "manifest.json"
SUBSETS_DIR = "subsets"
STAGING_DIR = "_staging"
FAILED_DIR = "_failed"
FAILED_FILE = "FAILED.json"
FAILED_MAX_AGE_DAYS = 30.0

SUBSET_FEATURES = Features(
    {
        "prompt": Value("string"),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "images": List(Image()),
        "sample_id": Value("string"),
        "score": Value("float64"),
    }
)
SUBSET_SCHEMA: pa.Schema = SUBSET_FEATURES.arrow_schema  # carries b"huggingface" metadata
SUBSET_COLUMNS: tuple[str, ...] = tuple(SUBSET_FEATURES)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+-]*$")


class RunAlreadyPublished(FileExistsError):
    """The run directory already holds a manifest: published outputs are never rewritten."""


class RunIncomplete(FileNotFoundError):
    """The run directory has no manifest (still being written, or failed)."""


def run_uri(output_uri: str, dataset: str, run_id: str) -> str:
    """``<output>/<dataset>/<run_id>`` after checking both names are single safe path segments."""
    for what, name in (("dataset", dataset), ("run_id", run_id)):
        if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
            raise ValueError(
                f"{what} {name!r} must be one path segment of letters, digits and ._=+- "
                "(not starting with a dot)"
            )
    return storage.join(output_uri, dataset, run_id)


def subset_name(percent: float) -> str:
    """``top-<p>`` for a keep percent in (0, 100] (the convention of
    :func:`saev_core.data.selection.n_keep`): 50 -> ``top-50``, 12.5 -> ``top-12.5``."""
    p = float(percent)
    if math.isnan(p) or not (0.0 < p <= 100.0):
        raise ValueError(f"keep percent must be in (0, 100], got {percent!r}")
    p = round(p, 6)
    text = str(int(p)) if p.is_integer() else f"{p:g}"
    return f"top-{text}"


def subset_uri(run: str, percent: float) -> str:
    return storage.join(run, SUBSETS_DIR, subset_name(percent))


def _manifest_uri(run: str) -> str:
    return storage.join(run, MANIFEST_FILE)


def is_complete(run: str, storage_options: storage.StorageOptions = None) -> bool:
    """True when the run has a readable manifest (written last, so the run is complete)."""
    try:
        read_manifest(run, storage_options)
    except (FileNotFoundError, ValueError):
        return False
    return True


def read_manifest(run: str, storage_options: storage.StorageOptions = None) -> dict[str, Any]:
    uri = _manifest_uri(run)
    if not storage.exists(uri, storage_options):
        raise RunIncomplete(f"run at {run} is incomplete: no {MANIFEST_FILE}")
    manifest = storage.read_json(uri, storage_options)
    if not isinstance(manifest, dict):
        raise ValueError(f"{uri}: manifest is not a JSON object")
    return manifest


def ensure_unpublished(run: str, storage_options: storage.StorageOptions = None) -> None:
    """Raise :class:`RunAlreadyPublished` if ``run`` already holds a manifest."""
    if storage.exists(_manifest_uri(run), storage_options):
        raise RunAlreadyPublished(
            f"run at {run} is already published ({MANIFEST_FILE} exists); published outputs are "
            "never overwritten: choose a new run_id"
        )


# ----------------------------------------------------------------------------------------------
# scores / quarantine / validation


def _as_table(data: Any) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data])
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas DataFrame
        return pa.Table.from_pandas(data, preserve_index=False)
    if isinstance(data, Mapping):
        return pa.table(dict(data))
    raise TypeError(f"expected a pyarrow Table, a pandas DataFrame or a dict of columns, got {type(data).__name__}")


def write_scores(
    run: str, scores: Any, storage_options: storage.StorageOptions = None
) -> str:
    """Write ``scores.parquet``: ``sample_id`` (string), ``score`` (float64), then any other
    columns as given (e.g. baseline scores). Returns its URI."""
    ensure_unpublished(run, storage_options)
    table = _as_table(scores)
    missing = [c for c in ("sample_id", "score") if c not in table.column_names]
    if missing:
        raise ValueError(f"scores table lacks required columns {missing}; has {table.column_names}")
    others = [c for c in table.column_names if c not in ("sample_id", "score")]
    table = table.select(["sample_id", "score", *others])
    table = table.set_column(0, "sample_id", table.column("sample_id").cast(pa.string()))
    table = table.set_column(1, "score", table.column("score").cast(pa.float64()))
    table = table.replace_schema_metadata(None)
    uri = storage.join(run, SCORES_FILE)
    with storage.atomic_output(uri, storage_options) as fh:
        pq.write_table(table, fh)
    return uri


def read_scores(run: str, storage_options: storage.StorageOptions = None, columns=None) -> pa.Table:
    with storage.open_input(storage.join(run, SCORES_FILE), storage_options) as fh:
        return pq.read_table(fh, columns=columns)


def write_quarantine(
    run: str,
    quarantine: pa.Table | Iterable[pa.Table | QuarantineEntry | Mapping[str, Any]],
    storage_options: storage.StorageOptions = None,
) -> str:
    """Write ``quarantine.parquet`` from a table, tables, or entries (streamed per table)."""
    ensure_unpublished(run, storage_options)
    uri = storage.join(run, QUARANTINE_FILE)
    items: Iterable[Any] = [quarantine] if isinstance(quarantine, pa.Table) else quarantine
    with storage.atomic_output(uri, storage_options) as fh:
        with pq.ParquetWriter(fh, QUARANTINE_SCHEMA) as writer:
            rows: list[dict[str, Any]] = []
            for item in items:
                if isinstance(item, pa.Table):
                    if item.num_rows:
                        writer.write_table(item.select(QUARANTINE_SCHEMA.names).cast(QUARANTINE_SCHEMA))
                else:
                    rows.append(item.to_dict() if isinstance(item, QuarantineEntry) else dict(item))
            if rows:
                writer.write_table(pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA))
    return uri


def write_validation(
    run: str, result: Any, storage_options: storage.StorageOptions = None
) -> str:
    """Write ``validation.json`` from a dict or any object with ``to_dict()``."""
    ensure_unpublished(run, storage_options)
    payload = result.to_dict() if hasattr(result, "to_dict") else result
    uri = storage.join(run, VALIDATION_FILE)
    storage.write_json(uri, payload, storage_options)
    return uri


# ----------------------------------------------------------------------------------------------
# subsets


@dataclass
class SubsetInfo:
    name: str
    uri: str
    files: list[str]
    rows: int


class SubsetWriter:
    """Stream rows of one ``top-<p>`` subset into ``part-NNNNN.parquet`` files.

    Use as a context manager; each :meth:`write` / :meth:`write_records` call becomes one or
    more row groups of ``row_group_rows`` rows, so memory holds one batch of images at a time.
    ``rows_per_part`` (optional) rolls over to a new part file. Files appear only on a clean
    exit (an error aborts the current part).
    """

    def __init__(
        self,
        run: str,
        percent: float,
        storage_options: storage.StorageOptions = None,
        *,
        row_group_rows: int = 64,
        rows_per_part: int | None = None,
        passthrough: pa.Schema | None = None,
    ):
        ensure_unpublished(run, storage_options)
        self.passthrough = passthrough if passthrough is not None else pa.schema([])
        self.schema = subset_schema(self.passthrough)
        self.run = run
        self.name = subset_name(percent)
        self.uri = subset_uri(run, percent)
        self.storage_options = storage_options
        self.row_group_rows = max(1, int(row_group_rows))
        self.rows_per_part = rows_per_part
        self.rows = 0
        self.files: list[str] = []
        self._part_rows = 0
        self._ctx = None
        self._fh = None
        self._writer: pq.ParquetWriter | None = None

    # -- part files -------------------------------------------------------------------------
    def _open_part(self) -> None:
        uri = storage.join(self.uri, f"part-{len(self.files):05d}.parquet")
        self._ctx = storage.atomic_output(uri, self.storage_options)
        self._fh = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._fh, self.schema)
        self._part_rows = 0
        self.files.append(uri)

    def _close_part(self, exc: BaseException | None = None) -> None:
        if self._ctx is None:
            return
        ctx, writer = self._ctx, self._writer
        self._ctx = self._fh = self._writer = None
        if exc is None:
            writer.close()
            ctx.__exit__(None, None, None)
        else:
            try:
                writer.close()
            except Exception:
                pass
            ctx.__exit__(type(exc), exc, exc.__traceback__)

    def __enter__(self) -> "SubsetWriter":
        return self

    def __exit__(self, et, ev, tb) -> None:
        if ev is not None:
            self._close_part(ev)
            return
        if not self.files:  # an empty subset is still a valid, readable file
            self._open_part()
        self._close_part()

    # -- writing ----------------------------------------------------------------------------
    def write_table(self, table: pa.Table) -> None:
        """Write a table with (at least) the subset columns and this writer's passthrough
        columns (missing ones are null); cast to :attr:`schema`."""
        for f in self.passthrough:
            if f.name not in table.column_names:
                table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
        table = table.select(self.schema.names).cast(self.schema)
        offset = 0
        while offset < table.num_rows:
            if self._writer is None:
                self._open_part()
            room = table.num_rows - offset
            if self.rows_per_part:
                room = min(room, self.rows_per_part - self._part_rows)
            chunk = table.slice(offset, room)
            self._writer.write_table(chunk, row_group_size=self.row_group_rows)
            self._part_rows += chunk.num_rows
            self.rows += chunk.num_rows
            offset += chunk.num_rows
            if self.rows_per_part and self._part_rows >= self.rows_per_part:
                self._close_part()

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Write row dicts with ``prompt``, ``chosen``, ``rejected``, ``sample_id``, ``score`` and
        either ``image`` (bytes) or ``images`` (list of bytes / ``{bytes, path}``)."""
        out = []
        for r in rows:
            if "images" in r:
                images = [
                    {"bytes": bytes(im), "path": None} if isinstance(im, (bytes, bytearray)) else dict(im)
                    for im in r["images"]
                ]
            else:
                images = [{"bytes": bytes(r["image"]), "path": None}]
            out.append(
                {
                    "prompt": r["prompt"],
                    "chosen": r["chosen"],
                    "rejected": r["rejected"],
                    "images": images,
                    "sample_id": r["sample_id"],
                    "score": float(r["score"]),
                }
            )
        if out:
            self.write_table(pa.Table.from_pylist(out, schema=SUBSET_SCHEMA))


    def write_records(self, records: pa.Table, scores: Mapping[str, float]) -> int:
        """Write the canonical records whose ``sample_id`` is in ``scores`` (the selected ids,
        mapped to their score). Returns how many rows were written."""
        if records.num_rows == 0:
            return 0
        ids = records.column("sample_id").to_pylist()
        keep = [i for i, sid in enumerate(ids) if sid in scores]
        if not keep:
            return 0
        sel = records.take(pa.array(keep, pa.int64()))
        image_structs = pa.StructArray.from_arrays(
            [sel.column("image").combine_chunks(), pa.nulls(sel.num_rows, pa.string())],
            names=["bytes", "path"],
        )
        offsets = pa.array(range(sel.num_rows + 1), pa.int32())
        images = pa.ListArray.from_arrays(offsets, image_structs)
        table = pa.table(
            {
                "prompt": sel.column("prompt"),
                "chosen": sel.column("chosen"),
                "rejected": sel.column("rejected"),
                "images": images,
                "sample_id": sel.column("sample_id"),
                "score": pa.array([float(scores[ids[i]]) for i in keep], pa.float64()),
            }
        )
        if len(self.passthrough) and "extra" in sel.column_names:
            extra = passthrough_table(sel, self.passthrough, reserved=SUBSET_COLUMNS)
            for name in self.passthrough.names:
                table = table.append_column(name, extra.column(name))
        self.write_table(table)
        return len(keep)

    def info(self) -> SubsetInfo:
        return SubsetInfo(self.name, self.uri, list(self.files), self.rows)


def write_subset(
    run: str,
    percent: float,
    record_batches: Iterable[pa.Table],
    selected_scores: Mapping[str, float],
    storage_options: storage.StorageOptions = None,
    **writer_kwargs: Any,
) -> SubsetInfo:
    """Stream canonical record batches (e.g. the ingest shards) into ``subsets/top-<p>/``,
    keeping the rows whose ``sample_id`` is in ``selected_scores`` (id -> score)."""
    with SubsetWriter(run, percent, storage_options, **writer_kwargs) as w:
        for batch in record_batches:
            w.write_records(batch, selected_scores)
    return w.info()


def list_subsets(run: str, storage_options: storage.StorageOptions = None) -> dict[str, list[str]]:
    """``{"top-50": [part URIs...], ...}`` for the subsets present in ``run``."""
    out: dict[str, list[str]] = {}
    base = storage.join(run, SUBSETS_DIR)
    for uri in storage.list_files(base, storage_options, suffixes=".parquet"):
        rel = uri[len(base.rstrip("/")) :].lstrip("/").replace("\\", "/")
        name = rel.split("/", 1)[0]
        out.setdefault(name, []).append(uri)
    return out


# ----------------------------------------------------------------------------------------------
# manifest


def run_files(run: str, storage_options: storage.StorageOptions = None) -> list[dict[str, Any]]:
    """Relative path and size of every file in the run directory (manifest excluded)."""
    fs, base = storage.get_fs(run, storage_options)
    files = []
    for uri in storage.list_files(run, storage_options):
        _, path = storage.get_fs(uri, storage_options)
        rel = path[len(base.rstrip("/")) :].lstrip("/").replace("\\", "/")
        if rel == MANIFEST_FILE:
            continue
        files.append({"path": rel, "size": int(fs.size(path))})
    return files


def write_manifest(
    run: str,
    manifest: Mapping[str, Any],
    storage_options: storage.StorageOptions = None,
    *,
    require_files: Iterable[str] = (SCORES_FILE,),
) -> str:
    """Write ``manifest.json`` LAST, exclusively (never replacing an existing one).

    Secret-looking keys anywhere in ``manifest`` are redacted. Unless the manifest already has
    a ``files`` entry, one is added listing every file of the run with its size. Raises
    :class:`RunAlreadyPublished` if a manifest exists, ``FileNotFoundError`` if a file in
    ``require_files`` is missing.
    """
    ensure_unpublished(run, storage_options)
    for rel in require_files:
        if not storage.exists(storage.join(run, rel), storage_options):
            raise FileNotFoundError(f"cannot publish {run}: {rel} has not been written")
    body = storage.redact_secrets(dict(manifest))
    if "files" not in body:
        body["files"] = run_files(run, storage_options)
    try:
        storage.write_json(_manifest_uri(run), body, storage_options, overwrite=False)
    except FileExistsError:
        raise RunAlreadyPublished(
            f"run at {run} was published concurrently ({MANIFEST_FILE} appeared); not overwritten"
        ) from None
    return _manifest_uri(run)


def iter_subset_batches(
    uri: str, storage_options: storage.StorageOptions = None, columns=None, batch_rows: int = 256
) -> Iterator[pa.RecordBatch]:
    """Stream record batches of every part of a subset folder (or one part file)."""
    files = storage.list_files(uri, storage_options, suffixes=".parquet")
    for f in files:
        with storage.open_input(f, storage_options) as fh:
            pf = pq.ParquetFile(fh)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


# ----------------------------------------------------------------------------------------------
# source columns carried through


def _source_columns(extra_json: str | None) -> dict[str, Any]:
    """The source's own columns of one record (the adapters' ``_saev_`` notes left out)."""
    return {k: v for k, v in decode_extra(extra_json).items() if not k.startswith("_saev_")}


def _published_name(name: str, reserved: Iterable[str]) -> str:
    return f"source_{name}" if name in set(reserved) else name


def _column(values: list[Any], type_: pa.DataType | None = None) -> pa.Array:
    try:
        return pa.array(values, type=type_)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # mixed types across rows (JSON lines): kept as their JSON text rather than coerced
        return pa.array([None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values],
                        pa.string())


def passthrough_table(records: pa.Table, schema: pa.Schema | None = None,
                      reserved: Iterable[str] = ("sample_id", "score", "row_index")) -> pa.Table:
    """``sample_id`` + one column per source column of the canonical ``records`` (decoded from
    their ``extra`` JSON), named as in the source unless the name is in ``reserved``, typed as
    ``schema`` says when given (see :func:`passthrough_schema`)."""
    reserved = tuple(reserved)
    rows = [_source_columns(e) for e in records.column("extra").to_pylist()]
    names = list(dict.fromkeys(k for r in rows for k in r))
    cols: dict[str, pa.Array] = {"sample_id": records.column("sample_id").combine_chunks()}
    for name in names:
        out = _published_name(name, reserved)
        want = schema.field(out).type if schema is not None and out in schema.names else None
        col = _column([r.get(name) for r in rows], want)
        if want is not None and col.type != want:
            col = col.cast(want) if pa.types.is_null(col.type) else _column(
                [None if v is None else json.dumps(v, default=str) for v in col.to_pylist()], pa.string())
        cols[out] = col
    if schema is not None:
        for f in schema:
            if f.name not in cols:
                cols[f.name] = pa.nulls(records.num_rows, f.type)
        return pa.table({"sample_id": cols["sample_id"], **{f.name: cols[f.name] for f in schema}})
    return pa.table(cols)


def passthrough_schema(record_tables: Iterable[pa.Table],
                       reserved: Iterable[str] = ("sample_id", "score", "row_index")) -> pa.Schema:
    """One Arrow schema for the source columns of all ``record_tables`` (e.g. every ingest shard,
    read with ``columns=["sample_id", "extra"]``): types promoted across tables (null -> int ->
    float), a column whose types cannot be unified becomes its JSON text."""
    reserved = tuple(reserved)
    fields: dict[str, pa.DataType] = {}
    for t in record_tables:
        if t.num_rows == 0:
            continue
        for f in passthrough_table(t, reserved=reserved).schema:
            if f.name == "sample_id":
                continue
            old = fields.get(f.name)
            if old is None or pa.types.is_null(old):
                fields[f.name] = f.type
            elif not pa.types.is_null(f.type) and f.type != old:
                try:
                    fields[f.name] = pa.unify_schemas([pa.schema([pa.field(f.name, old)]), pa.schema([f])],
                                                      promote_options="permissive").field(f.name).type
                except (pa.ArrowInvalid, pa.ArrowTypeError, NotImplementedError):
                    fields[f.name] = pa.string()
    return pa.schema([pa.field(n, pa.string() if pa.types.is_null(t) else t) for n, t in fields.items()])


def add_passthrough(scores: pa.Table, record_tables: Iterable[pa.Table], schema: pa.Schema | None = None) -> pa.Table:
    """``scores`` with the source columns of its samples appended (matched on ``sample_id``;
    ``record_tables`` need only ``sample_id`` and ``extra``). Names taken by ``scores``'s own
    columns get the ``source_`` prefix."""
    reserved = tuple(scores.column_names)
    tables = [t for t in record_tables if t.num_rows]
    schema = passthrough_schema(tables, reserved) if schema is None else schema
    if not tables or len(schema) == 0:
        return scores
    table = pa.concat_tables([passthrough_table(t, schema, reserved=reserved) for t in tables])
    where = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    take = pa.array([where.get(s) for s in scores.column("sample_id").to_pylist()], pa.int64())
    for name in table.column_names[1:]:
        scores = scores.append_column(name, table.column(name).take(take))
    return scores


def subset_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """:data:`SUBSET_SCHEMA` plus passthrough columns, with matching ``huggingface`` features
    metadata (so ``datasets`` still decodes ``images``)."""
    if passthrough is None or len(passthrough) == 0:
        return SUBSET_SCHEMA
    features = Features({**SUBSET_FEATURES, **Features.from_arrow_schema(passthrough)})
    return features.arrow_schema


# ----------------------------------------------------------------------------------------------
# run ids, staging and promotion


def new_run_id(tag: str = "") -> str:
    """``<UTC time>-<tag>-<random>``: sortable by start time and unique even for identical runs
    started in the same second (48 random bits)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return "-".join(p for p in (stamp, tag, secrets.token_hex(6)) if p)


def staging_uri(run: str) -> str:
    """Where ``run`` is written before :func:`promote`: ``<output>/<dataset>/_staging/<run_id>``."""
    return storage.join(storage.parent(run), STAGING_DIR, storage.basename(run))


def begin_run(run: str, storage_options: storage.StorageOptions = None) -> str:
    """Check ``run`` is not published, clear a leftover staging folder of the same run id (a
    failed attempt) and return the staging folder to write the run into."""
    ensure_unpublished(run, storage_options)
    staging = staging_uri(run)
    storage.remove(staging, storage_options, recursive=True)
    return staging


def _is_local(uri: str, storage_options: storage.StorageOptions) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(storage.get_fs(uri, storage_options)[0], LocalFileSystem)


def _copy_object(fs, src: str, dst: str) -> None:
    fs.copy(src, dst)  # server-side on object storage


def promote(staging: str, run: str, storage_options: storage.StorageOptions = None) -> str:
    """Make the staged run visible at ``run``. The staged folder must hold its manifest.

    Local: one atomic rename of the folder. Object storage: every file copied, the manifest
    last (exclusively), then the staging prefix removed; an interruption leaves a folder without
    a manifest, which readers skip and :func:`clean_incomplete` removes.
    """
    manifest = _manifest_uri(staging)
    if not storage.exists(manifest, storage_options):
        raise RunIncomplete(f"cannot promote {staging}: it has no {MANIFEST_FILE}")
    ensure_unpublished(run, storage_options)
    if storage.exists(run, storage_options):  # a manifest-less leftover of an interrupted promote
        storage.remove(run, storage_options, recursive=True)
    if _is_local(run, storage_options):
        _, src = storage.get_fs(staging)
        _, dst = storage.get_fs(run)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            os.rename(src, dst)
        except OSError as exc:
            if os.path.exists(os.path.join(dst, MANIFEST_FILE)):
                raise RunAlreadyPublished(f"run at {run} was published concurrently; not overwritten") from exc
            raise
        try:  # the staging parent, once no other run is staged there
            os.rmdir(os.path.dirname(src.rstrip("/")))
        except OSError:
            pass
        return run
    fs, src = storage.get_fs(staging, storage_options)
    _, dst = storage.get_fs(run, storage_options)
    src = src.rstrip("/")
    files = [p for p in fs.find(src) if p != storage.get_fs(manifest, storage_options)[1]]
    for p in files:
        _copy_object(fs, p, dst.rstrip("/") + p[len(src):])
    storage.write_bytes(_manifest_uri(run), storage.read_bytes(manifest, storage_options), storage_options,
                        overwrite=False)
    storage.remove(staging, storage_options, recursive=True)
    return run


def _subfolders(uri: str, storage_options: storage.StorageOptions) -> list[str]:
    fs, path = storage.get_fs(uri, storage_options)
    storage._fresh(fs, path.rstrip("/") + "/x")
    if not fs.exists(path):
        return []
    return sorted(storage.join(uri, _name(p)) for p in fs.ls(path, detail=False) if fs.isdir(p))


def _name(p: str) -> str:
    return p.rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]


def list_runs(dataset_uri: str, storage_options: storage.StorageOptions = None) -> list[str]:
    """The complete runs (with a manifest) under ``<output>/<dataset>``, oldest id first."""
    return [r for r in _subfolders(dataset_uri, storage_options)
            if not _name(r).startswith((".", "_")) and is_complete(r, storage_options)]


def _newest_change(uri: str, storage_options: storage.StorageOptions) -> float:
    fs, path = storage.get_fs(uri, storage_options)
    newest = 0.0
    for p in fs.find(path) or [path]:
        try:
            m = fs.modified(p)
        except Exception:  # noqa: BLE001 - a store without modification times: treat as new
            return time.time()
        newest = max(newest, m.timestamp() if hasattr(m, "timestamp") else float(m))
    return newest


def clean_incomplete(dataset_uri: str, storage_options: storage.StorageOptions = None,
                     min_age_seconds: float = 3600.0) -> list[str]:
    """Remove run folders without a manifest, and staging folders, unchanged for
    ``min_age_seconds`` (younger ones may belong to a run publishing right now). Returns them."""
    candidates = [r for r in _subfolders(dataset_uri, storage_options)
                  if not _name(r).startswith((".", "_")) and not is_complete(r, storage_options)]
    candidates += _subfolders(storage.join(dataset_uri, STAGING_DIR), storage_options)
    removed = []
    now = time.time()
    for uri in candidates:
        if now - _newest_change(uri, storage_options) >= min_age_seconds:
            storage.remove(uri, storage_options, recursive=True)
            removed.append(uri)
    return removed


# ----------------------------------------------------------------------------------------------
# failed runs: the evidence of a refusal


def failed_uri(run: str) -> str:
    """Where the evidence of a failed ``run`` is kept: ``<output>/<dataset>/_failed/<run_id>``."""
    return storage.join(storage.parent(run), FAILED_DIR, storage.basename(run))


def _move_folder(src: str, dst: str, storage_options: storage.StorageOptions) -> None:
    if _is_local(src, storage_options):
        _, a = storage.get_fs(src)
        _, b = storage.get_fs(dst)
        os.makedirs(os.path.dirname(b.rstrip("/")), exist_ok=True)
        os.rename(a, b)
        try:  # the staging parent, once no other run is staged there
            os.rmdir(os.path.dirname(a.rstrip("/")))
        except OSError:
            pass
        return
    fs, a = storage.get_fs(src, storage_options)
    _, b = storage.get_fs(dst, storage_options)
    a = a.rstrip("/")
    for p in fs.find(a):
        _copy_object(fs, p, b.rstrip("/") + p[len(a):])
    storage.remove(src, storage_options, recursive=True)


def keep_failed(run: str, record: Mapping[str, Any], storage_options: storage.StorageOptions = None, *,
                files: Mapping[str, str | None] | None = None, tables: Mapping[str, pa.Table | None] | None = None,
                files_options: storage.StorageOptions = None) -> str:
    """Keep the evidence of a failed ``run`` in :func:`failed_uri` and return that folder.

    What the run staged (``_staging/<run_id>``: canaries, a partly written publish) is moved there;
    ``files`` (name -> URI, e.g. the ingest's quarantine in the work folder, read with
    ``files_options``) are copied and ``tables`` (name -> Table, e.g. the scores) written, each
    unless the staged run already held that name; ``FAILED.json`` (``record`` plus the file list
    and the time) is written last. An earlier failure of the same run id is replaced."""
    dest = failed_uri(run)
    storage.remove(dest, storage_options, recursive=True)
    staging = staging_uri(run)
    if storage.exists(staging, storage_options):
        _move_folder(staging, dest, storage_options)
    src_options = storage_options if files_options is None else files_options
    for name, uri in (files or {}).items():
        target = storage.join(dest, name)
        if uri and not storage.exists(target, storage_options) and storage.exists(uri, src_options):
            storage.write_bytes(target, storage.read_bytes(uri, src_options), storage_options)
    for name, table in (tables or {}).items():
        target = storage.join(dest, name)
        if table is not None and not storage.exists(target, storage_options):
            with storage.atomic_output(target, storage_options) as fh:
                pq.write_table(table, fh)
    fs, path = storage.get_fs(dest, storage_options)
    storage._fresh(fs, path.rstrip("/") + "/x")
    kept = sorted(p[len(path.rstrip("/")):].lstrip("/") for p in fs.find(path)) if fs.exists(path) else []
    now = _dt.datetime.now(_dt.timezone.utc)
    storage.write_json(storage.join(dest, FAILED_FILE),
                       {"run_id": storage.basename(run), "run": run, **dict(record),
                        "failed_at": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "files": kept}, storage_options)
    return dest


def list_failed(dataset_uri: str, storage_options: storage.StorageOptions = None) -> list[dict[str, Any]]:
    """The failed runs under ``<output>/<dataset>``, oldest id first: ``FAILED.json`` of each
    (``run_id``, ``stage``, ``reason``, ``failed_at``, ...) plus ``uri``, its folder."""
    out = []
    for uri in _subfolders(storage.join(dataset_uri, FAILED_DIR), storage_options):
        info_uri = storage.join(uri, FAILED_FILE)
        try:
            info = storage.read_json(info_uri, storage_options)
        except (FileNotFoundError, ValueError):  # being written, or not ours
            info = {"run_id": _name(uri), "stage": None, "reason": f"no readable {FAILED_FILE}"}
        out.append({**(info if isinstance(info, dict) else {}), "uri": uri})
    return out


def clean_failed(dataset_uri: str, storage_options: storage.StorageOptions = None,
                 max_age_days: float = FAILED_MAX_AGE_DAYS) -> list[str]:
    """Remove the failed runs' folders under ``<output>/<dataset>`` unchanged for
    ``max_age_days``. Returns them."""
    removed = []
    now = time.time()
    for uri in _subfolders(storage.join(dataset_uri, FAILED_DIR), storage_options):
        if now - _newest_change(uri, storage_options) >= max_age_days * 86400.0:
            storage.remove(uri, storage_options, recursive=True)
            removed.append(uri)
    return removed
