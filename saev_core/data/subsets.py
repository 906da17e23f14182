"""The TRL-ready subsets of a run: ``subsets/top-<p>/part-NNNNN.parquet`` with ``prompt``,
``chosen``, ``rejected``, ``images``, ``sample_id``, ``score`` and the source's own columns
(:mod:`saev_core.data.passthrough`).

Subset files carry the Arrow schema of :data:`SUBSET_FEATURES` (a ``datasets.Features``), so
the file embeds the ``huggingface`` schema metadata and ``datasets.load_dataset("parquet", ...)``
decodes ``images`` to PIL images. Subsets are written in streaming fashion, one row group per
``write`` call (images are large), into a run folder that is not yet published
(:mod:`saev_core.data.publish`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image, List, Value

from saev_core.data import storage
from saev_core.data.passthrough import passthrough_table
from saev_core.data.publish import ensure_unpublished

__all__ = [
    "SUBSETS_DIR",
    "SUBSET_FEATURES",
    "SUBSET_SCHEMA",
    "SUBSET_COLUMNS",
    "subset_name",
    "subset_uri",
    "subset_schema",
    "SubsetWriter",
    "SubsetInfo",
    "iter_subset_batches",
    "write_subset",
    "list_subsets",
]

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


def iter_subset_batches(
    uri: str, storage_options: storage.StorageOptions = None, columns=None, batch_rows: int = 256
) -> Iterator[pa.RecordBatch]:
    """Stream record batches of every part of a subset folder (or one part file)."""
    files = storage.list_files(uri, storage_options, suffixes=".parquet")
    for f in files:
        with storage.open_input(f, storage_options) as fh:
            pf = pq.ParquetFile(fh)
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def subset_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """:data:`SUBSET_SCHEMA` plus passthrough columns, with matching ``huggingface`` features
    metadata (so ``datasets`` still decodes ``images``)."""
    if passthrough is None or len(passthrough) == 0:
        return SUBSET_SCHEMA
    features = Features({**SUBSET_FEATURES, **Features.from_arrow_schema(passthrough)})
    return features.arrow_schema
