"""Reading the data files of a source: which files, and their rows in batches.

Sources: a local path or any fsspec URI (``s3://...``) to a Parquet file, a JSON-lines file
(``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``), or a folder/prefix of such files (read in
sorted order; row indices run on across files). Parquet is read through
``ParquetFile.iter_batches``, JSON lines line by line, so only one batch is held in memory.

Row numbers: ``row_index`` runs on across the files of a folder. In a Parquet file it is the
row's position; in a JSON-lines file it is the line's 0-based number (blank lines are not rows but
keep their number), so the line of a quarantined row is ``row_index - <lines of earlier files> + 1``.
Bytes that are not UTF-8 (a JSON line, a Parquet string) make their row ``invalid_encoding``.

Unreadable files: a Parquet file that cannot be opened (truncated, not Parquet) or a row group
that cannot be decoded raises :class:`UnreadableFile` (permanent, naming the file, the row group
and its rows): the file is refused as a whole, none of its rows is used. Faults of the store
itself (a dropped connection) propagate, so that a retry can succeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from saev_core.data import storage
from saev_core.data.formats import FormatError
from saev_core.data.records import Reason, RowProblem
from saev_core.refusal import Refusal

__all__ = ["PARQUET_SUFFIXES", "JSON_SUFFIXES", "UnreadableFile", "SourceFile", "is_transient", "parquet_file",
           "discover_files", "columns_of", "file_batches"]

PARQUET_SUFFIXES = (".parquet", ".pq")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")


def is_transient(exc: BaseException) -> bool:
    """Errors of the store rather than of the row (a dropped connection, a timeout): raised so
    that the task's retry can succeed, instead of quarantining good rows."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectionError", "TimeoutError", "EndpointConnectionError", "ClientConnectionError",
                         "ConnectTimeoutError", "ReadTimeoutError"})


class UnreadableFile(Refusal):
    """A data file (or one row group of it) cannot be decoded: a truncated or damaged Parquet
    file. Permanent (a retry reads the same bytes) and refused as a whole: no row of a damaged
    file is used, so a run never publishes a silently partial dataset."""

    def __init__(self, uri: str, found: str, evidence: dict | None = None):
        super().__init__("ingest", uri, found,
                         "Replace the file with an intact copy (re-export or re-download it), or move it out of the "
                         "dataset folder; no row of a damaged file is used",
                         {"file": uri, **(evidence or {})})


def _storage_fault(exc: BaseException) -> bool:
    """A fault of the store or the disk (retryable), not of the file's bytes."""
    return is_transient(exc) or (isinstance(exc, OSError) and getattr(exc, "errno", None) is not None)


def parquet_file(fh, uri: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fh)
    except Exception as exc:  # noqa: BLE001 - sorted below: the store's faults propagate
        if _storage_fault(exc) or not isinstance(exc, (pa.ArrowException, OSError)):
            raise
        raise UnreadableFile(uri, f"is not a readable Parquet file ({_first_line(exc)}); it may be truncated "
                             "or not Parquet at all") from None


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' '.join(lines)[:300]}" if lines else type(exc).__name__

@dataclass(frozen=True)
class SourceFile:
    uri: str
    kind: str  # "parquet" | "jsonl"


def _kind_of(uri: str) -> str | None:
    low = uri.lower()
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(JSON_SUFFIXES):
        return "jsonl"
    return None


def discover_files(source: str, so: storage.StorageOptions) -> list[SourceFile]:
    fs, path = storage.get_fs(source, so)
    storage._fresh(fs, path)
    if fs.isfile(path):
        kind = _kind_of(source)
        if kind is None:
            raise FormatError(
                source, f"unsupported file type; expected Parquet ({', '.join(PARQUET_SUFFIXES)}) "
                f"or JSON lines ({', '.join(JSON_SUFFIXES)})",
                "Convert the file to Parquet or JSON lines, or give it the suffix of the format it holds")
        return [SourceFile(source, kind)]
    if not fs.exists(path):
        raise FileNotFoundError(f"dataset source not found: {source}")
    files = storage.list_files(source, so, suffixes=PARQUET_SUFFIXES + JSON_SUFFIXES)
    kinds = {_kind_of(f) for f in files}
    if not files:
        raise FormatError(source, "no Parquet or JSON-lines files found under this folder",
                          "Point dataset.uri at the folder (or file) that holds the data files")
    if len(kinds) > 1:
        raise FormatError(source, "holds both Parquet and JSON-lines files",
                          "Point dataset.uri at one kind (a single file, or a folder of one kind)")
    return [SourceFile(f, _kind_of(f)) for f in files]


def _open(uri: str, so: storage.StorageOptions):
    fs, path = storage.get_fs(uri, so)
    compression = "gzip" if uri.lower().endswith(".gz") else None
    return fs.open(path, "rb", compression=compression)


def _iter_jsonl_rows(uri: str, so, start: int, lines: list[int] | None = None
                     ) -> Iterator[tuple[int, dict | None, "str | RowProblem | None"]]:
    """(row_index, object or None, problem) per non-blank line. ``row_index`` is ``start`` plus
    the line's 0-based number: blank lines are not rows but keep their number, so a row's line
    in the file is ``row_index - start + 1``. Each line is decoded as strict UTF-8: a line that
    is not is ``invalid_encoding`` (never decoded with replacement characters). ``lines[0]``
    receives the file's line count, where the next file's numbering starts."""
    n = -1
    with _open(uri, so) as fh:
        first = True
        for n, raw in _numbered_lines(fh, uri):
            if n == 0 and raw.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):  # every line would be invalid_encoding
                raise FormatError(uri, "is UTF-16 (or UTF-32) text: it starts with that encoding's byte order mark, "
                                  "and JSON lines are read as UTF-8 only", "Save the file as UTF-8 and run again",
                                  {"bom": raw[:4].hex()})
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                first = False
                yield start + n, None, RowProblem(
                    Reason.INVALID_ENCODING,
                    f"line {n + 1}: byte 0x{raw[exc.start]:02x} at byte {exc.start} of the line is not valid UTF-8 "
                    f"({exc.reason}); the line is not used")
                continue
            if n == 0:
                line = line.removeprefix("\ufeff")  # a UTF-8 byte order mark, not part of the JSON
            stripped = line.strip()
            if not stripped:
                continue  # a blank line is not a row; it keeps its line number
            if first and stripped.startswith("["):
                raise FormatError(uri, "is a JSON array, which cannot be streamed",
                                  "Write it as JSON lines (one object per line)")
            if first and stripped == "{":  # no JSON line is a lone brace: an indented (pretty-printed) document
                raise FormatError(uri, f"is indented JSON (line {n + 1} is a lone '{{'), not JSON lines: each object "
                                  "spans several lines", "Write it as JSON lines, one object per line "
                                  "(e.g. json.dumps(obj) per line, or `jq -c '.[]'` for an array)")
            first = False
            try:
                obj = json.loads(stripped, object_pairs_hook=_unique_keys)
            except _DuplicateKey as exc:
                yield (start + n, None,
                       f"line {n + 1}: key {exc.args[0]!r} appears twice in one object (which value is meant is not known)")
            except RecursionError:
                yield start + n, None, f"line {n + 1}: invalid JSON: nested too deeply"
            except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
                yield start + n, None, f"line {n + 1}: invalid JSON: {str(exc)[:200]}"
            else:
                if isinstance(obj, dict):
                    yield start + n, obj, None
                else:
                    yield start + n, None, f"line {n + 1}: JSON line is a {type(obj).__name__}, not an object"
    if lines is not None:
        lines[0] = n + 1


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json object hook: a key given twice is refused, not silently resolved to its last value."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _numbered_lines(fh, uri: str) -> Iterator[tuple[int, bytes]]:
    """(0-based number, bytes) of each line; a compressed file that ends early or is not gzip is
    an :class:`UnreadableFile` naming the line where it broke (a retry reads the same bytes)."""
    import gzip
    import zlib

    n = -1
    lines = iter(fh)
    while True:
        try:
            raw = next(lines)
        except StopIteration:
            return
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise UnreadableFile(uri, f"cannot be decompressed after line {n + 1} ({_first_line(exc)}); it may be "
                                 "truncated", {"lines_read": n + 1, "error": _first_line(exc)}) from None
        n += 1
        yield n, raw


def _unique_columns(names: Sequence[str], uri: str) -> list[str]:
    """A Parquet file may hold two columns of one name; a row dict would keep only the last, so
    which value is meant is not known: the file is refused, naming the column."""
    seen: set[str] = set()
    dup = [n for n in names if n in seen or seen.add(n)]
    if dup:
        raise FormatError(uri, f"holds more than one column named {sorted(set(dup))} (which one is meant is not known)",
                          "Rename or drop the duplicate columns and write the file again",
                          {"duplicate_columns": sorted(set(dup))})
    return list(names)


def columns_of(f: SourceFile, so, peek_rows: int) -> list[str]:
    if f.kind == "parquet":
        with _open(f.uri, so) as fh:
            return _unique_columns(parquet_file(fh, f.uri).schema_arrow.names, f.uri)
    cols: dict[str, None] = {}
    for n, (_, obj, _err) in enumerate(_iter_jsonl_rows(f.uri, so, 0)):
        if obj is not None:
            cols.update(dict.fromkeys(obj))
        if n + 1 >= peek_rows:
            break
    return list(cols)


def _batch_rows(rb: pa.RecordBatch, index: int) -> list[tuple]:
    """Rows of a Parquet batch as dicts. A string value that is not valid UTF-8 (Parquet does not
    check) makes only its own row ``invalid_encoding``, naming the column."""
    try:
        return [(index + i, row, None) for i, row in enumerate(rb.to_pylist())]
    except UnicodeDecodeError:
        pass
    out = []
    for i in range(rb.num_rows):
        one = rb.slice(i, 1)
        try:
            out.append((index + i, one.to_pylist()[0], None))
        except UnicodeDecodeError as exc:
            bad = []
            for name in one.schema.names:
                try:
                    one.column(name).to_pylist()
                except UnicodeDecodeError:
                    bad.append(name)
            out.append((index + i, None, RowProblem(
                Reason.INVALID_ENCODING, f"column(s) {bad}: a string value is not valid UTF-8 ({exc.reason} at "
                                         f"byte {exc.start}); the row is not used")))
    return out


def file_batches(f: SourceFile, start: int, positions: list[int], *, columns: Sequence[str], format: str,
                 detected_from: str, batch_rows: int, storage_options: storage.StorageOptions
                 ) -> Iterator[list[tuple]]:
    """Batches of (row_index, row or None, problem) of one file; ``positions[0]`` receives how
    many row indices the file took (its rows; for JSON lines, its lines)."""
    if f.kind == "parquet":
        with _open(f.uri, storage_options) as fh:
            pf = parquet_file(fh, f.uri)
            names = _unique_columns(pf.schema_arrow.names, f.uri)
            missing = [c for c in columns if c not in names]
            if missing:
                raise FormatError(
                    f.uri, f"missing columns {missing} required by format {format!r} (detected from {detected_from}); "
                    f"its columns are {sorted(names)}",
                    "Give every data file of the source the same columns, or move this one out of the folder",
                    {"missing": missing, "columns": list(names)})
            index = start
            for group in range(pf.num_row_groups):  # one at a time: a damaged one is named
                batches = pf.iter_batches(batch_size=batch_rows, row_groups=[group])
                first_row = index
                while True:
                    try:
                        rb = next(batches)
                    except StopIteration:
                        break
                    except Exception as exc:  # noqa: BLE001 - sorted: the store's faults propagate
                        if _storage_fault(exc) or not isinstance(exc, (pa.ArrowException, OSError)):
                            raise
                        n = pf.metadata.row_group(group).num_rows
                        file_start = first_row - start
                        raise UnreadableFile(
                            f.uri, f"row group {group} of {pf.num_row_groups} (rows {file_start}-"
                            f"{file_start + n - 1} of the file) cannot be decoded ({_first_line(exc)})",
                            {"row_group": group, "row_groups": pf.num_row_groups,
                             "rows": [file_start, file_start + n - 1], "error": _first_line(exc)}) from None
                    rows = _batch_rows(rb, index)
                    yield rows
                    index += len(rows)
            positions[0] = index - start
    else:
        seen = columns_of(f, storage_options, batch_rows)  # as for Parquet: a file without the layout's columns
        missing = [c for c in columns if c not in seen]
        if seen and missing:
            raise FormatError(
                f.uri, f"missing columns {missing} required by format {format!r} (detected from {detected_from}): "
                f"none of its first {batch_rows} objects has them; its keys are {sorted(seen)}",
                "Give every data file of the source the same keys, or move this one (a metadata file?) out of the "
                "folder", {"missing": missing, "columns": sorted(seen)})
        buf: list[tuple] = []
        for item in _iter_jsonl_rows(f.uri, storage_options, start, positions):
            buf.append(item)
            if len(buf) >= batch_rows:
                yield buf
                buf = []
        if buf:
            yield buf
