"""Publishing a run: ``<output>/<dataset>/<run_id>/`` on a local folder or object storage.

Layout::

    scores.parquet                     sample_id, score (+ optional extra score columns)
    subsets/top-<p>/part-00000.parquet TRL-ready: prompt, chosen, rejected, images, sample_id, score
    quarantine.parquet                 row_index, sample_id, reason, detail, source_file
    validation.json                    the validation report
    manifest.json                      written LAST: a run with a manifest is complete

Subset files carry the Arrow schema of :data:`SUBSET_FEATURES` (a ``datasets.Features``), so
the file embeds the ``huggingface`` schema metadata and ``datasets.load_dataset("parquet", ...)``
decodes ``images`` to PIL images. Subsets are written in streaming fashion, one row group per
``write`` call (images are large). Every object is written atomically (see
:mod:`saev_core.data.storage`). A run directory that already has a manifest is never written to
again: every writer here raises :class:`RunAlreadyPublished`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value

from saev_core.data import storage
from saev_core.data.records import QUARANTINE_SCHEMA, QuarantineEntry

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
]

SCORES_FILE = "scores.parquet"
QUARANTINE_FILE = "quarantine.parquet"
VALIDATION_FILE = "validation.json"
MANIFEST_FILE = "manifest.json"
SUBSETS_DIR = "subsets"

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
    :func:`saev_core.selection.n_keep`): 50 -> ``top-50``, 12.5 -> ``top-12.5``."""
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
    ):
        ensure_unpublished(run, storage_options)
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
        self._writer = pq.ParquetWriter(self._fh, SUBSET_SCHEMA)
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
        """Write a table with (at least) the subset columns; cast to :data:`SUBSET_SCHEMA`."""
        table = table.select(list(SUBSET_COLUMNS)).cast(SUBSET_SCHEMA)
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
