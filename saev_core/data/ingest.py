"""Ingest: any common preference-data layout -> canonical records + quarantine, streamed and sharded.

The parts it joins: the layouts and the texts of a row (:mod:`saev_core.data.formats`), the image
of a row (:mod:`saev_core.data.image_resolver`) and the files of a source
(:mod:`saev_core.data.source_files`).

Per-row isolation: whatever goes wrong while resolving, decoding or validating one row becomes
that row's quarantine entry with a specific reason (:class:`saev_core.data.records.Reason`);
only faults of the store itself (a dropped connection) propagate, so that a retry can succeed.

Everything streams: only one batch of rows (plus the kept sample ids, 16 bytes each with their row index,
for duplicate detection) is held in memory. Every source row ends up either as a kept record or
as a quarantine entry: ``rows_in == kept + quarantined`` holds for every batch and overall.

Sharding: kept record number ``i`` (0-based, in source order) belongs to shard
``i // shard_rows``. The assignment depends only on the source content and the ingest options,
so later stages can map over shards and a rerun produces the same shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saev_core.data import storage
from saev_core.data.formats import ColumnMapping, check_text, parse_row, resolve_mapping
from saev_core.data.image_resolver import ImagePolicy, ImageResolver, check_image
from saev_core.data.records import (
    QUARANTINE_SCHEMA,
    RECORD_SCHEMA,
    QuarantineEntry,
    Reason,
    RowProblem,
    compute_sample_id,
    encode_extra,
)
from saev_core.data.source_files import SourceFile, columns_of, discover_files, file_batches, is_transient
from saev_core.refusal import Refusal

__all__ = [
    "NoUsableRows",
    "IngestBatch",
    "IngestStats",
    "IngestStream",
    "Shard",
    "iter_ingest",
    "iter_shards",
    "shard_index",
    "shard_name",
    "ingest_to_storage",
    "read_ingest_summary",
    "list_record_shards",
    "read_record_shard",
]

MULTI_IMAGE_POLICIES = ("first", "quarantine")
DEFAULT_MAX_TEXT_CHARS = 32_000  # far above real prompts and answers; a 50k-char field is a defect


class NoUsableRows(Refusal):
    """A source with no row at all, or whose every row was quarantined: nothing to score."""

    def __init__(self, source: str, summary: Mapping[str, Any]):
        rows, by_reason = summary.get("rows_in", 0), dict(summary.get("by_reason") or {})
        files = list(summary.get("files") or [])
        if not rows:
            found = f"holds no rows ({len(files)} data file(s) read: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''})"
            fix = "Point dataset.uri at the files that hold the samples"
        else:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]))
            found = f"none of its {rows} rows is usable, every one was quarantined ({reasons})"
            fix = ("quarantine.parquet gives each row's reason and detail (row_index, source_file): fix those rows, or "
                   "dataset.format / dataset.mapping when every row fails the same way, and run again")
        super().__init__("ingest", source, found, fix, {"rows_in": rows, "by_reason": by_reason, "files": files})


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


@dataclass
class IngestStats:
    format: str
    files: list[str]
    rows_in: int = 0
    kept: int = 0
    quarantined: int = 0
    by_reason: Counter = field(default_factory=Counter)
    _fp: Any = field(default_factory=lambda: hashlib.sha256(b"saev-curate/dataset/v1\x00"), repr=False)

    @property
    def fingerprint(self) -> str:
        """Hash of the kept sample ids in order: identifies the canonical dataset."""
        h = self._fp.copy()
        h.update(self.kept.to_bytes(8, "big"))
        return h.hexdigest()[:32]

    @property
    def quarantine_rate(self) -> float:
        return self.quarantined / self.rows_in if self.rows_in else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "files": list(self.files),
            "rows_in": self.rows_in,
            "kept": self.kept,
            "quarantined": self.quarantined,
            "quarantine_rate": self.quarantine_rate,
            "by_reason": dict(sorted(self.by_reason.items())),
            "fingerprint": self.fingerprint,
        }


@dataclass
class IngestBatch:
    """Canonical records (``RECORD_SCHEMA``) and quarantine entries of ``rows_in`` source rows."""

    records: pa.Table
    quarantine: pa.Table
    rows_in: int
    source_file: str


@dataclass
class Shard:
    """Kept records ``[index * shard_rows, index * shard_rows + records.num_rows)``.

    ``quarantine`` holds the entries of the source rows between the previous shard's last
    record and this shard's last record (the last shard also takes trailing ones), so
    ``rows_in == records + quarantine``. A source with no usable row yields one empty shard 0
    that carries the whole quarantine.
    """

    index: int
    start: int
    records: pa.Table
    quarantine: pa.Table

    @property
    def rows_in(self) -> int:
        return self.records.num_rows + self.quarantine.num_rows

    @property
    def name(self) -> str:
        return shard_name(self.index)


class IngestStream:
    """A re-iterable stream over a source; format detection happens at construction.

    ``iter(stream)`` yields :class:`IngestBatch` objects; ``stream.stats`` is updated as they
    are produced (and restarted by a new iteration).
    """

    def __init__(
        self,
        source: str,
        format: str = "auto",
        *,
        mapping: ColumnMapping | Mapping[str, Any] | None = None,
        storage_options: storage.StorageOptions = None,
        batch_rows: int = 256,
        multi_image: str = "first",
        decode_images: bool = True,
        image_policy: ImagePolicy | Mapping[str, Any] | None = None,
        max_text_chars: int | None = DEFAULT_MAX_TEXT_CHARS,
    ):
        if batch_rows < 1:
            raise ValueError("batch_rows must be >= 1")
        if multi_image not in MULTI_IMAGE_POLICIES:
            raise ValueError(f"multi_image must be one of {MULTI_IMAGE_POLICIES}")
        if isinstance(mapping, Mapping):
            mapping = ColumnMapping.from_dict(mapping)
        self.source = os.fspath(source)
        self.storage_options = storage_options
        self.batch_rows = batch_rows
        self.multi_image = multi_image
        self.decode_images = decode_images
        if isinstance(image_policy, Mapping):
            image_policy = ImagePolicy(**image_policy)
        self.image_policy = image_policy or ImagePolicy()
        if max_text_chars is not None and max_text_chars < 1:
            raise ValueError("max_text_chars must be >= 1 (or None for no limit)")
        self.max_text_chars = max_text_chars
        self.files = discover_files(self.source, storage_options)
        # images named by path must lie under this folder (a single file: its own folder)
        self.root = storage.parent(self.files[0].uri) if self.files == [SourceFile(self.source, self.files[0].kind)] \
            else self.source
        first_cols = columns_of(self.files[0], storage_options, batch_rows)
        self.columns = first_cols
        self.format, self.mapping = resolve_mapping(format, first_cols, mapping, self.files[0].uri)
        self._requested_format = format
        self.stats = IngestStats(self.format, [f.uri for f in self.files])

    # -- rows ---------------------------------------------------------------------------
    def __iter__(self) -> Iterator[IngestBatch]:
        self.stats = stats = IngestStats(self.format, [f.uri for f in self.files])
        seen: dict[bytes, int] = {}  # sample id of each kept record -> its row_index
        resolver = ImageResolver(self.storage_options, self.root, self.image_policy)
        m = self.mapping
        consumed = frozenset(m.columns())
        index = 0
        for f in self.files:
            base = storage.parent(f.uri)
            rel_file = f.uri if len(self.files) == 1 else self._relative(f.uri)
            positions = [0]
            file_start = index
            for rows in file_batches(f, file_start, positions, columns=m.columns(), format=self.format,
                                     detected_from=self.files[0].uri, batch_rows=self.batch_rows,
                                     storage_options=self.storage_options):
                kept: list[dict[str, Any]] = []
                quarantined: list[dict[str, Any]] = []
                for row_index, row, parse_error in rows:
                    rec, q = self._one(row_index, row, parse_error, m, consumed, base, resolver, seen)
                    if rec is not None:
                        kept.append(rec)
                        stats._fp.update(rec["sample_id"].encode("ascii") + b"\n")
                    else:
                        q["source_file"] = rel_file
                        quarantined.append(q)
                        stats.by_reason[q["reason"]] += 1
                stats.rows_in += len(rows)
                stats.kept += len(kept)
                stats.quarantined += len(quarantined)
                assert len(kept) + len(quarantined) == len(rows)
                yield IngestBatch(
                    records=pa.Table.from_pylist(kept, schema=RECORD_SCHEMA),
                    quarantine=pa.Table.from_pylist(quarantined, schema=QUARANTINE_SCHEMA),
                    rows_in=len(rows),
                    source_file=f.uri,
                )
            index = file_start + positions[0]

    def _relative(self, uri: str) -> str:
        """A file's path under the source folder (``a/train.jsonl``): its base name alone would be
        ambiguous in a folder with ``a/train.jsonl`` and ``b/train.jsonl``."""
        root = storage.get_fs(self.source, self.storage_options)[1].rstrip("/")
        path = storage.get_fs(uri, self.storage_options)[1]
        return path[len(root) + 1:] if path.startswith(root + "/") else storage.basename(uri)

    def _one(self, row_index, row, parse_error, m, consumed, base, resolver, seen):
        """(record, None) or (None, quarantine entry) for one row: nothing raised here stops a run."""
        try:
            return self._one_checked(row_index, row, parse_error, m, consumed, base, resolver, seen)
        except RowProblem as p:
            return None, QuarantineEntry(row_index, None, p.reason, p.detail).to_dict()
        except Exception as exc:  # noqa: BLE001 - per-row isolation: a defect of one row is that row's outcome
            if is_transient(exc):
                raise
            detail = f"{type(exc).__name__}: {exc}"[:500]
            return None, QuarantineEntry(row_index, None, Reason.ROW_ERROR, detail).to_dict()

    def _one_checked(self, row_index, row, parse_error, m, consumed, base, resolver, seen):
        def quarantine(reason: str, detail: str, sid: str | None = None):
            return None, QuarantineEntry(row_index, sid, reason, detail).to_dict()

        if row is None:
            if isinstance(parse_error, RowProblem):
                return quarantine(parse_error.reason, parse_error.detail)
            return quarantine(Reason.MALFORMED_ROW, parse_error or "unreadable row")
        try:
            parsed = parse_row(row, m, consumed)
            for name in ("prompt", "chosen", "rejected"):
                check_text(parsed.labels.get(name, name), getattr(parsed, name))
        except RowProblem as p:
            return quarantine(p.reason, p.detail)
        if self.max_text_chars is not None:
            for name in ("prompt", "chosen", "rejected"):
                n = len(getattr(parsed, name))
                if n > self.max_text_chars:
                    return quarantine(
                        Reason.TEXT_TOO_LONG,
                        f"{parsed.labels.get(name, name)} has {n} characters, above max_text_chars={self.max_text_chars}",
                    )

        notes: dict[str, Any] = {}
        image: bytes | None = None
        image_problem: RowProblem | None = None
        try:
            image = resolver.resolve(parsed.image_value, base, self.multi_image, notes)
        except RowProblem as p:
            image_problem = p
        sid = (
            compute_sample_id(image, parsed.prompt, parsed.chosen, parsed.rejected)
            if image is not None
            else None
        )
        for role, reason in (("prompt", Reason.EMPTY_PROMPT), ("chosen", Reason.EMPTY_CHOSEN),
                             ("rejected", Reason.EMPTY_REJECTED)):
            if not getattr(parsed, role).strip():
                return quarantine(reason, parsed.why_empty(role), sid)
        if parsed.chosen.strip() == parsed.rejected.strip():
            return quarantine(
                Reason.IDENTICAL_RESPONSES, f"{parsed.labels['chosen']} and {parsed.labels['rejected']} are identical "
                "(ignoring outer whitespace)", sid
            )
        if image_problem is not None:
            label = parsed.labels.get("image", "image")
            detail = image_problem.detail if label == "image" else f"{label}: {image_problem.detail}"
            return quarantine(image_problem.reason, detail, sid)
        key = bytes.fromhex(sid)
        if key in seen:
            return quarantine(Reason.DUPLICATE, f"same image, prompt, chosen and rejected as row {seen[key]} "
                              "(kept)", sid)
        try:
            notes.update(check_image(image, full_decode=self.decode_images, max_pixels=self.image_policy.max_image_pixels))
        except RowProblem as p:
            return quarantine(p.reason, p.detail, sid)
        extra = dict(parsed.extra)
        extra.update(notes)
        try:
            extra_json = encode_extra(extra)
        except (TypeError, ValueError) as exc:
            return quarantine(Reason.MALFORMED_ROW, f"passthrough columns not serialisable: {exc}", sid)
        try:
            extra_json.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in a passthrough column (name or value)
            bad = [k for k, v in parsed.extra.items()
                   if not _utf8(k) or not _utf8(json.dumps(v, ensure_ascii=False, default=str))]
            return quarantine(Reason.INVALID_ENCODING, f"column(s) {[ascii(k) for k in bad]}: a lone surrogate "
                              "(not valid Unicode text)", sid)
        seen[key] = row_index  # only a kept row: a later copy of a quarantined one is not a duplicate
        return {
            "sample_id": sid,
            "row_index": row_index,
            "prompt": parsed.prompt,
            "image": image,
            "chosen": parsed.chosen,
            "rejected": parsed.rejected,
            "extra": extra_json,
        }, None

    def shards(self, shard_rows: int) -> Iterator[Shard]:
        return iter_shards(self, shard_rows)


def iter_ingest(source: str, format: str = "auto", **kwargs: Any) -> Iterator[IngestBatch]:
    """Stream :class:`IngestBatch` objects from ``source`` (see :class:`IngestStream`)."""
    return iter(IngestStream(source, format, **kwargs))


# --------------------------------------------------------------------------------------------
# Shards


def shard_index(position: int, shard_rows: int) -> int:
    """Shard of the kept record at ``position`` (0-based, source order)."""
    if shard_rows < 1:
        raise ValueError("shard_rows must be >= 1")
    return position // shard_rows


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def iter_shards(batches: Iterable[IngestBatch], shard_rows: int) -> Iterator[Shard]:
    """Re-chunk a stream of ingest batches into shards of exactly ``shard_rows`` kept records
    (the last one may be shorter); see :class:`Shard`.

    Quarantine entries go to the shard whose records surround them in source order (entry rows
    before a shard's last record and after the previous shard's), trailing ones to the last
    shard, so ``shard.rows_in == records + quarantine`` for every shard. A full shard is held
    back until a later record shows it is not the last one.
    """
    if shard_rows < 1:
        raise ValueError("shard_rows must be >= 1")
    records = RECORD_SCHEMA.empty_table()
    quarantine = QUARANTINE_SCHEMA.empty_table()
    index = 0
    for batch in batches:
        if batch.records.num_rows:
            records = pa.concat_tables([records, batch.records])
        if batch.quarantine.num_rows:
            quarantine = pa.concat_tables([quarantine, batch.quarantine])
        while records.num_rows > shard_rows:
            head = records.slice(0, shard_rows).combine_chunks()
            records = records.slice(shard_rows)
            last_row = head.column("row_index")[-1]
            before = pc.less(quarantine.column("row_index"), last_row)
            yield Shard(index, index * shard_rows, head, quarantine.filter(before).combine_chunks())
            quarantine = quarantine.filter(pc.invert(before))
            index += 1
    if records.num_rows or quarantine.num_rows or index == 0:
        yield Shard(index, index * shard_rows, records.combine_chunks(), quarantine.combine_chunks())


# --------------------------------------------------------------------------------------------
# Canonical shards on storage

INGEST_SUMMARY = "ingest.json"


def ingest_to_storage(
    source: str,
    out_uri: str,
    format: str = "auto",
    *,
    shard_rows: int = 1024,
    storage_options: storage.StorageOptions = None,
    out_storage_options: storage.StorageOptions = None,
    progress: Callable[[Shard], None] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Ingest ``source`` into ``out_uri``: ``records/shard-NNNNN.parquet`` (canonical records),
    ``quarantine.parquet`` and ``ingest.json`` (counts, fingerprint, shard list), written last.

    Returns the summary dict. Each object is written atomically; ``ingest.json`` present means
    the ingest finished.
    """
    out_so = storage_options if out_storage_options is None else out_storage_options
    stream = IngestStream(source, format, storage_options=storage_options, **kwargs)
    shards: list[dict[str, Any]] = []
    q_uri = storage.join(out_uri, "quarantine.parquet")
    with storage.atomic_output(q_uri, out_so) as q_fh:
        with pq.ParquetWriter(q_fh, QUARANTINE_SCHEMA) as q_writer:
            for shard in stream.shards(shard_rows):
                uri = storage.join(out_uri, "records", f"{shard.name}.parquet")
                with storage.atomic_output(uri, out_so) as fh:
                    pq.write_table(shard.records, fh, row_group_size=min(shard_rows, 256))
                if shard.quarantine.num_rows:
                    q_writer.write_table(shard.quarantine)
                shards.append({"index": shard.index, "start": shard.start, "rows": shard.records.num_rows, "uri": uri})
                if progress is not None:
                    progress(shard)
    summary = stream.stats.to_dict()
    summary.update(
        source=source,
        requested_format=format,
        shard_rows=shard_rows,
        shards=shards,
        quarantine_uri=q_uri,
        options={
            "multi_image": stream.multi_image,
            "decode_images": stream.decode_images,
            "image_policy": dict(stream.image_policy.__dict__),
            "max_text_chars": stream.max_text_chars,
            "mapping": None if stream.format != "mapping" else stream.mapping.__dict__,
            "storage_options": storage.redact_storage_options(storage_options),
        },
    )
    storage.write_json(storage.join(out_uri, INGEST_SUMMARY), summary, out_so)
    return summary


def read_ingest_summary(out_uri: str, storage_options: storage.StorageOptions = None) -> dict[str, Any]:
    uri = storage.join(out_uri, INGEST_SUMMARY)
    if not storage.exists(uri, storage_options):
        raise FileNotFoundError(f"no finished ingest at {out_uri} ({INGEST_SUMMARY} missing)")
    return storage.read_json(uri, storage_options)


def list_record_shards(out_uri: str, storage_options: storage.StorageOptions = None) -> list[str]:
    """URIs of the canonical shards of a finished ingest, in shard order."""
    return [s["uri"] for s in read_ingest_summary(out_uri, storage_options)["shards"]]


def read_record_shard(uri: str, storage_options: storage.StorageOptions = None, columns=None) -> pa.Table:
    with storage.open_input(uri, storage_options) as fh:
        return pq.read_table(fh, columns=columns)
