"""Ingest adapters: any common preference-data layout -> canonical records + quarantine.

Formats (``format=``):

* ``"rlaif_v"``: ``question``, ``image`` (``{bytes, path}`` struct), ``chosen``, ``rejected``.
* ``"align_anything"``: ``question``, ``image``, ``response_1``, ``response_2``,
  ``overall_response`` in {1, 2}: chosen = ``response_{overall_response}``, rejected = the other.
* ``"trl"``: ``prompt``, ``chosen``, ``rejected`` (strings or message lists) and ``images``
  (a list; a single ``image`` column is accepted too).
* ``"mapping"``: an explicit :class:`ColumnMapping`.
* ``"auto"``: detected from the columns (:func:`detect_format`).

Sources: a local path or any fsspec URI (``s3://...``) to a Parquet file, a JSON-lines file
(``.jsonl``/``.json``/``.ndjson``, optionally ``.gz``), or a folder/prefix of such files (read in
sorted order; row indices run on across files). Images may be bytes, ``{bytes, path}`` structs,
``data:`` URIs or paths relative to the folder of the data file that names them (resolved through
the same filesystem, so relative paths work on S3 too). A path must resolve inside the dataset
folder (``unsafe_image_path`` otherwise, checked before anything is opened) and a URL is not
fetched unless :class:`ImagePolicy` allows it (``remote_image_not_allowed``).

Per-row isolation: whatever goes wrong while resolving, decoding or validating one row becomes
that row's quarantine entry with a specific reason (:class:`saev_core.data.records.Reason`);
only faults of the store itself (a dropped connection) propagate, so that a retry can succeed.
Types are checked, never coerced: a list where text belongs is ``invalid_type``; bytes that are
not UTF-8 (a JSON line, a Parquet string) or a lone surrogate are ``invalid_encoding``, never
replaced; a control character (NUL, newline, a bidi override) in an image path is
``unsafe_image_path``.

Row numbers: ``row_index`` runs on across the files of a folder. In a Parquet file it is the
row's position; in a JSON-lines file it is the line's 0-based number (blank lines are not rows but
keep their number), so the line of a quarantined row is ``row_index - <lines of earlier files> + 1``.

Unreadable files: a Parquet file that cannot be opened (truncated, not Parquet) or a row group
that cannot be decoded raises :class:`UnreadableFile` (permanent, naming the file, the row group
and its rows): the file is refused as a whole, none of its rows is used.

Everything streams: Parquet through ``ParquetFile.iter_batches``, JSON lines in chunks of
``batch_rows`` lines; only one batch of rows (plus the set of kept sample ids, 16 bytes each,
for duplicate detection) is held in memory. Every source row ends up either as a kept record or
as a quarantine entry: ``rows_in == kept + quarantined`` holds for every batch and overall.

Sharding: kept record number ``i`` (0-based, in source order) belongs to shard
``i // shard_rows``. The assignment depends only on the source content and the ingest options,
so later stages can map over shards and a rerun produces the same shards.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import posixpath
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from saev_core.data import storage
from saev_core.data.images import ImageError, inspect_image
from saev_core.data.records import (
    QUARANTINE_SCHEMA,
    RECORD_SCHEMA,
    QuarantineEntry,
    Reason,
    compute_sample_id,
    encode_extra,
)
from saev_core.refusal import Refusal

__all__ = [
    "FORMATS",
    "FormatError",
    "UnreadableFile",
    "NoUsableRows",
    "parquet_file",
    "ColumnMapping",
    "ImagePolicy",
    "IngestBatch",
    "IngestStats",
    "IngestStream",
    "Shard",
    "detect_format",
    "required_columns",
    "iter_ingest",
    "iter_shards",
    "shard_index",
    "shard_name",
    "ingest_to_storage",
    "read_ingest_summary",
    "list_record_shards",
    "read_record_shard",
]

FORMATS = ("rlaif_v", "align_anything", "trl", "mapping")
PARQUET_SUFFIXES = (".parquet", ".pq")
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz", ".json.gz")
MULTI_IMAGE_POLICIES = ("first", "quarantine")
DEFAULT_MAX_TEXT_CHARS = 32_000  # far above real prompts and answers; a 50k-char field is a defect


def _is_transient(exc: BaseException) -> bool:
    """Errors of the store rather than of the row (a dropped connection, a timeout): raised so
    that the task's retry can succeed, instead of quarantining good rows."""
    names = {c.__name__ for c in type(exc).__mro__}
    return bool(names & {"ConnectionError", "TimeoutError", "EndpointConnectionError", "ClientConnectionError",
                         "ConnectTimeoutError", "ReadTimeoutError"})


class FormatError(ValueError):
    """The source does not have the columns the requested (or any known) format needs."""


class UnreadableFile(Refusal):
    """A data file (or one row group of it) cannot be decoded: a truncated or damaged Parquet
    file. Permanent (a retry reads the same bytes) and refused as a whole: no row of a damaged
    file is used, so a run never publishes a silently partial dataset."""

    def __init__(self, uri: str, found: str, evidence: dict | None = None):
        super().__init__("ingest", uri, found,
                         "Replace the file with an intact copy (re-export or re-download it), or move it out of the "
                         "dataset folder; no row of a damaged file is used",
                         {"file": uri, **(evidence or {})})


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


def _storage_fault(exc: BaseException) -> bool:
    """A fault of the store or the disk (retryable), not of the file's bytes."""
    return _is_transient(exc) or (isinstance(exc, OSError) and getattr(exc, "errno", None) is not None)


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


class _RowProblem(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Column mappings and format detection


@dataclass(frozen=True)
class ColumnMapping:
    """Which source column plays which canonical role.

    Either ``chosen`` + ``rejected`` name the two responses directly, or ``responses`` names
    two response columns and ``preferred`` the column holding the preferred one's index, where
    ``preferred_base`` is the value that means ``responses[0]`` (1 for Align-Anything's
    ``overall_response``; 0 for 0-based labels). The image column may hold bytes, a
    ``{bytes, path}`` struct, a path/``data:`` URI, or a list of those (first one used).
    """

    prompt: str
    image: str
    chosen: str | None = None
    rejected: str | None = None
    responses: tuple[str, str] | None = None
    preferred: str | None = None
    preferred_base: int = 1

    def __post_init__(self) -> None:
        direct = self.chosen is not None or self.rejected is not None
        indexed = self.responses is not None or self.preferred is not None
        if direct == indexed:
            raise ValueError(
                "ColumnMapping needs either chosen= and rejected=, or responses=(a, b) and "
                "preferred= (not both)"
            )
        if direct and (self.chosen is None or self.rejected is None):
            raise ValueError("ColumnMapping: give both chosen= and rejected=")
        if indexed:
            if self.responses is None or self.preferred is None or len(self.responses) != 2:
                raise ValueError(
                    "ColumnMapping: responses= must name exactly two columns and preferred= "
                    "the column with the preferred index"
                )
            object.__setattr__(self, "responses", tuple(self.responses))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ColumnMapping":
        return cls(**dict(d))

    def columns(self) -> tuple[str, ...]:
        cols = [self.prompt, self.image]
        if self.responses is not None:
            cols += [*self.responses, self.preferred]
        else:
            cols += [self.chosen, self.rejected]
        return tuple(c for c in cols if c is not None)


_BUILTIN_MAPPINGS: dict[str, ColumnMapping] = {
    "rlaif_v": ColumnMapping(prompt="question", image="image", chosen="chosen", rejected="rejected"),
    "align_anything": ColumnMapping(
        prompt="question",
        image="image",
        responses=("response_1", "response_2"),
        preferred="overall_response",
        preferred_base=1,
    ),
    "trl": ColumnMapping(prompt="prompt", image="images", chosen="chosen", rejected="rejected"),
}
# Detection order: the most specific layout first.
_DETECT_ORDER = ("align_anything", "trl", "rlaif_v")


def _trl_mapping(columns: Sequence[str]) -> ColumnMapping:
    if "images" not in columns and "image" in columns:
        return ColumnMapping(prompt="prompt", image="image", chosen="chosen", rejected="rejected")
    return _BUILTIN_MAPPINGS["trl"]


def required_columns(fmt: str, mapping: ColumnMapping | None = None) -> tuple[str, ...]:
    if fmt == "mapping":
        if mapping is None:
            raise ValueError("format='mapping' needs mapping=ColumnMapping(...)")
        return mapping.columns()
    if fmt not in _BUILTIN_MAPPINGS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS} or 'auto'")
    return _BUILTIN_MAPPINGS[fmt].columns()


def _missing_for(fmt: str, columns: Sequence[str]) -> list[str]:
    cols = set(columns)
    if fmt == "trl" and "images" not in cols and "image" in cols:
        cols.add("images")
    return [c for c in required_columns(fmt) if c not in cols]


def detect_format(columns: Sequence[str]) -> str:
    """Name the built-in format whose columns are all present, or raise :class:`FormatError`."""
    for fmt in _DETECT_ORDER:
        if not _missing_for(fmt, columns):
            return fmt
    lines = [f"  {fmt}: missing {_missing_for(fmt, columns)}" for fmt in _DETECT_ORDER]
    raise FormatError(
        "could not detect the dataset format from its columns "
        f"{sorted(columns)}:\n" + "\n".join(lines) + "\n"
        "pass format= explicitly, or format='mapping' with a ColumnMapping naming the prompt, "
        "image, chosen and rejected columns"
    )


def _resolve_mapping(fmt: str, columns: Sequence[str], mapping: ColumnMapping | None, where: str):
    if fmt == "auto":
        if not columns:
            raise FormatError(f"{where}: no row to detect the format from (the file is empty, not UTF-8, or none of "
                              "its first lines is a JSON object); set the format explicitly")
        fmt = detect_format(columns)
    if fmt == "mapping":
        if mapping is None:
            raise ValueError("format='mapping' needs mapping=ColumnMapping(...)")
        if isinstance(mapping, Mapping):
            mapping = ColumnMapping.from_dict(mapping)
        m = mapping
    elif fmt in _BUILTIN_MAPPINGS:
        m = _trl_mapping(columns) if fmt == "trl" else _BUILTIN_MAPPINGS[fmt]
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS} or 'auto'")
    missing = [c for c in m.columns() if c not in set(columns)]
    if missing and columns:  # no columns at all: an empty file, whose (no) rows end the run at ingest
        raise FormatError(
            f"format {fmt!r} needs columns {missing} that are missing from {where}; "
            f"its columns are {sorted(columns)}"
        )
    return fmt, m


# --------------------------------------------------------------------------------------------
# Field extraction


def _message_text(value: Any, field_name: str) -> str:
    """Text of a string, a message, or a list of messages (content str or typed parts).

    The texts of all messages are joined with a blank line (a system turn in a TRL prompt thus
    becomes part of the prompt text), text parts within one message with a newline;
    ``{"type": "image"}`` placeholders are dropped (the image comes from the image column).
    Anything else (a number, a bare list of strings, a non-string text part) is
    ``invalid_type``: it is never coerced into text.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _RowProblem(Reason.INVALID_TYPE, f"{field_name}: expected text or messages, got {type(value).__name__}")
    texts: list[str] = []
    for msg in value:
        if not isinstance(msg, Mapping) or "content" not in msg:
            raise _RowProblem(
                Reason.INVALID_TYPE,
                f"{field_name}: expected a string or a list of {{role, content}} messages, got a list "
                f"item of type {type(msg).__name__}",
            )
        content = msg["content"]
        if content is None:
            continue
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, (list, tuple)):
            raise _RowProblem(Reason.INVALID_TYPE, f"{field_name}: message content of type {type(content).__name__}")
        parts = []
        for part in content:
            if not isinstance(part, Mapping):
                raise _RowProblem(Reason.INVALID_TYPE, f"{field_name}: content part of type {type(part).__name__}")
            if part.get("type", "text") != "text":
                continue  # {"type": "image"} placeholders carry no text; the image comes from images
            text = part.get("text")
            if text is None:
                continue
            if not isinstance(text, str):
                raise _RowProblem(Reason.INVALID_TYPE, f"{field_name}: text part of type {type(text).__name__}")
            parts.append(text)
        texts.append("\n".join(parts))
    return "\n\n".join(t for t in texts if t)


def _preferred_index(value: Any, base: int, column: str) -> int:
    """0 or 1 for responses[0] / responses[1]. An integer (or an integral float, as Parquet
    stores an int column with nulls) is required: a string is ``invalid_type``, not parsed."""
    if value is None:
        raise _RowProblem(Reason.BAD_PREFERENCE_INDEX, f"{column} is null: expected {base} or {base + 1}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise _RowProblem(
            Reason.INVALID_TYPE, f"{column}={value!r} ({type(value).__name__}): expected the integer {base} or {base + 1}"
        )
    idx = int(value)
    if idx - base not in (0, 1):
        raise _RowProblem(Reason.BAD_PREFERENCE_INDEX, f"{column}={value!r}: expected {base} or {base + 1}")
    return idx - base


@dataclass
class _Parsed:
    prompt: str
    chosen: str
    rejected: str
    image_value: Any
    extra: dict[str, Any]


def _parse_row(row: Mapping[str, Any], m: ColumnMapping, consumed: frozenset[str]) -> _Parsed:
    prompt = _message_text(row.get(m.prompt), "prompt")
    if m.responses is not None:
        pref = _preferred_index(row.get(m.preferred), m.preferred_base, m.preferred)
        a, b = m.responses
        first = _message_text(row.get(a), a)
        second = _message_text(row.get(b), b)
        chosen, rejected = (first, second) if pref == 0 else (second, first)
    else:
        chosen = _message_text(row.get(m.chosen), "chosen")
        rejected = _message_text(row.get(m.rejected), "rejected")
    extra = {k: v for k, v in row.items() if k not in consumed}
    return _Parsed(prompt, chosen, rejected, row.get(m.image), extra)


# --------------------------------------------------------------------------------------------
# Images


def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise _RowProblem(Reason.IMAGE_DECODE_ERROR, f"{what} is neither bytes nor valid base64") from None


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: "C:" is a drive


def _inside(path: str, root: str, sep: str) -> bool:
    root = root.rstrip(sep)
    return path == root or path.startswith(root + sep)


@dataclass(frozen=True)
class ImagePolicy:
    """What ingest may read for an image given by path or URL, and how much.

    ``allow_remote_images``: fetch ``http(s)://`` (and other-store) URLs named in the data; off
    by default, so a dataset cannot make ingest contact a host. Paths always resolve against the
    folder of the data file that names them and must stay inside the dataset root (the source
    folder, or the folder of a single source file), checked on the resolved path (symlinks
    followed) before anything is opened. ``max_image_bytes`` / ``max_image_pixels`` bound the
    memory one row can take (``image_too_large`` above them).
    """

    allow_remote_images: bool = False
    max_image_bytes: int = 64 * 2**20
    max_image_pixels: int | None = None  # None: PIL's decompression-bomb limit


class _ImageResolver:
    def __init__(self, storage_options: storage.StorageOptions, root: str, policy: ImagePolicy):
        self.storage_options = storage_options
        self.policy = policy
        self.root_uri = root
        self.root_fs, root_path = storage.get_fs(root, storage_options)
        self.root_local = isinstance(self.root_fs, LocalFileSystem)
        self.root = os.path.realpath(root_path) if self.root_local else posixpath.normpath(root_path)
        self.root_protocol = root.split("://", 1)[0].lower() if storage.is_remote(root) else None

    def _locate(self, path: str, base_folder: str) -> tuple[Any, str]:
        """(filesystem, path) of an image reference, or a _RowProblem saying why not."""
        m = _SCHEME.match(path)
        scheme = m.group(1).lower() if m else None
        if scheme in ("file", "local"):
            path, scheme = path.split(":", 1)[1].removeprefix("//"), None
        if scheme is not None:
            if scheme == self.root_protocol:  # same store as the data: must lie inside it too
                fs, p = storage.get_fs(path, self.storage_options)
                p = posixpath.normpath(p)
                if _inside(p, self.root, "/"):
                    return fs, p
            if not self.policy.allow_remote_images:
                raise _RowProblem(
                    Reason.REMOTE_IMAGE_NOT_ALLOWED,
                    f"image {path!r} is a remote URL; not fetched (set allow_remote_images to fetch remote images)",
                )
            return storage.get_fs(path, self.storage_options)
        if self.root_local:
            full = path if os.path.isabs(path) else os.path.join(storage.get_fs(base_folder)[1], path)
            resolved = os.path.realpath(full)
            if not _inside(resolved, self.root, os.sep):
                raise _RowProblem(
                    Reason.UNSAFE_IMAGE_PATH,
                    f"image path {path!r} resolves outside the dataset folder {self.root}; not opened",
                )
            return self.root_fs, resolved
        _, base = storage.get_fs(base_folder, self.storage_options)
        resolved = posixpath.normpath(path if path.startswith("/") else posixpath.join(base, path))
        if path.startswith("/") or not _inside(resolved, self.root, "/"):
            raise _RowProblem(
                Reason.UNSAFE_IMAGE_PATH,
                f"image path {path!r} resolves outside the dataset prefix {self.root_uri}; not opened",
            )
        return self.root_fs, resolved

    def _read_path(self, path: str, base_folder: str) -> bytes:
        _check_path_text(path)
        fs, p = self._locate(path, base_folder)
        limit = self.policy.max_image_bytes
        try:
            size = fs.size(p)
            if size is not None and size > limit:
                raise _RowProblem(Reason.IMAGE_TOO_LARGE, f"image file {path!r} is {size} bytes, above the limit of {limit}")
            with fs.open(p, "rb") as fh:
                data = fh.read(limit + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise _RowProblem(Reason.IMAGE_NOT_FOUND, f"image file not found: {path}") from None
        except _RowProblem:
            raise
        except OSError as exc:
            if fs.exists(p) and not fs.isdir(p):
                raise  # a store that is there but failing: not this row's fault, let the task retry
            raise _RowProblem(Reason.IMAGE_NOT_FOUND, f"image file not found: {path} ({exc})") from None
        if len(data) > limit:
            raise _RowProblem(Reason.IMAGE_TOO_LARGE, f"image file {path!r} is above the limit of {limit} bytes")
        if not data:
            raise _RowProblem(Reason.MISSING_IMAGE, f"image file is empty: {path}")
        return data

    def resolve(self, value: Any, base_folder: str, multi_image: str, notes: dict) -> bytes:
        if isinstance(value, (list, tuple)):
            items = list(value)
            if not items:
                raise _RowProblem(Reason.MISSING_IMAGE, "images list is empty")
            if len(items) > 1:
                if multi_image == "quarantine":
                    raise _RowProblem(
                        Reason.MULTIPLE_IMAGES, f"{len(items)} images; one per sample is supported"
                    )
                notes["_saev_images_dropped"] = len(items) - 1
            value = items[0]
        if value is None:
            raise _RowProblem(Reason.MISSING_IMAGE, "image is null")
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, Mapping):
            data, path = value.get("bytes"), value.get("path")
            if isinstance(data, str) and data:
                data = _b64(data, "image.bytes")
            elif isinstance(data, (bytes, bytearray, memoryview)) and len(data):
                data = bytes(data)
            elif data not in (None, b"", ""):
                raise _RowProblem(Reason.INVALID_TYPE, f"image.bytes of type {type(data).__name__}")
            elif isinstance(path, str) and path.strip():
                data = self._read_path(path, base_folder)
            elif path not in (None, ""):
                raise _RowProblem(Reason.INVALID_TYPE, f"image.path of type {type(path).__name__}")
            else:
                raise _RowProblem(Reason.MISSING_IMAGE, "image struct has neither bytes nor path")
        elif isinstance(value, str):
            if not value.strip():
                raise _RowProblem(Reason.MISSING_IMAGE, "image path is empty")
            if value.startswith("data:"):
                head, _, payload = value.partition(",")
                if ";base64" not in head:
                    raise _RowProblem(Reason.IMAGE_DECODE_ERROR, "data: URI is not base64")
                data = _b64(payload, "data: URI")
            else:
                data = self._read_path(value, base_folder)
        else:
            raise _RowProblem(Reason.INVALID_TYPE, f"image value of unsupported type {type(value).__name__}")
        if not data:
            raise _RowProblem(Reason.MISSING_IMAGE, "image bytes are empty")
        if len(data) > self.policy.max_image_bytes:
            raise _RowProblem(
                Reason.IMAGE_TOO_LARGE, f"image is {len(data)} bytes, above the limit of {self.policy.max_image_bytes}"
            )
        return data


_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


def _check_path_text(path: str) -> None:
    """A path with a control character (NUL, newline, DEL, C1, a bidi override that makes it read
    differently than it resolves) is refused before any lookup: no real file needs one, and NUL
    ends the name at the OS boundary."""
    for i, ch in enumerate(path):
        if unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS:
            raise _RowProblem(Reason.UNSAFE_IMAGE_PATH,
                              f"image path {path[:200]!r} holds the control character U+{ord(ch):04X} at "
                              f"position {i}; not opened")
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise _RowProblem(Reason.INVALID_ENCODING,
                              f"image path {path[:200]!r} holds a lone surrogate U+{ord(ch):04X} at position {i} "
                              "(not valid Unicode text); not opened")


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _check_text(name: str, text: str) -> None:
    """Text must be valid Unicode (a JSON ``\\ud800`` escape decodes to a lone surrogate, which
    no UTF-8 file can hold): quarantined as ``invalid_encoding``, never replaced."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _RowProblem(Reason.INVALID_ENCODING,
                          f"{name}: lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start} "
                          "(not valid Unicode text)") from None


def check_image(data: bytes, *, full_decode: bool = True, max_pixels: int | None = None) -> dict[str, Any]:
    """Raise ``_RowProblem`` (``image_decode_error`` / ``image_too_large``) unless the image
    decodes within the pixel limit; return notes on what normalisation will change."""
    try:
        return inspect_image(data, max_pixels=max_pixels, full_decode=full_decode)
    except ImageError as exc:
        raise _RowProblem(exc.reason, exc.detail) from None


# --------------------------------------------------------------------------------------------
# Source reading


@dataclass(frozen=True)
class _File:
    uri: str
    kind: str  # "parquet" | "jsonl"


def _kind_of(uri: str) -> str | None:
    low = uri.lower()
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.endswith(JSON_SUFFIXES):
        return "jsonl"
    return None


def _discover(source: str, so: storage.StorageOptions) -> list[_File]:
    fs, path = storage.get_fs(source, so)
    storage._fresh(fs, path)
    if fs.isfile(path):
        kind = _kind_of(source)
        if kind is None:
            raise FormatError(
                f"{source}: unsupported file type; expected Parquet ({', '.join(PARQUET_SUFFIXES)}) "
                f"or JSON lines ({', '.join(JSON_SUFFIXES)})"
            )
        return [_File(source, kind)]
    if not fs.exists(path):
        raise FileNotFoundError(f"dataset source not found: {source}")
    files = storage.list_files(source, so, suffixes=PARQUET_SUFFIXES + JSON_SUFFIXES)
    kinds = {_kind_of(f) for f in files}
    if not files:
        raise FormatError(f"{source}: no Parquet or JSON-lines files found under this folder")
    if len(kinds) > 1:
        raise FormatError(
            f"{source}: holds both Parquet and JSON-lines files; point at one kind "
            "(a single file or a folder of one kind)"
        )
    return [_File(f, _kind_of(f)) for f in files]


def _open(uri: str, so: storage.StorageOptions):
    fs, path = storage.get_fs(uri, so)
    compression = "gzip" if uri.lower().endswith(".gz") else None
    return fs.open(path, "rb", compression=compression)


def _iter_jsonl_rows(uri: str, so, start: int, lines: list[int] | None = None
                     ) -> Iterator[tuple[int, dict | None, "str | _RowProblem | None"]]:
    """(row_index, object or None, problem) per non-blank line. ``row_index`` is ``start`` plus
    the line's 0-based number: blank lines are not rows but keep their number, so a row's line
    in the file is ``row_index - start + 1``. Each line is decoded as strict UTF-8: a line that
    is not is ``invalid_encoding`` (never decoded with replacement characters). ``lines[0]``
    receives the file's line count, where the next file's numbering starts."""
    n = -1
    with _open(uri, so) as fh:
        first = True
        for n, raw in _numbered_lines(fh, uri):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                first = False
                yield start + n, None, _RowProblem(
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
                raise FormatError(
                    f"{uri}: is a JSON array, which cannot be streamed; write it as JSON lines "
                    "(one object per line)"
                )
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


def _columns_of(f: _File, so, peek_rows: int) -> list[str]:
    if f.kind == "parquet":
        with _open(f.uri, so) as fh:
            return list(parquet_file(fh, f.uri).schema_arrow.names)
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
            out.append((index + i, None, _RowProblem(
                Reason.INVALID_ENCODING, f"column(s) {bad}: a string value is not valid UTF-8 ({exc.reason} at "
                                         f"byte {exc.start}); the row is not used")))
    return out


# --------------------------------------------------------------------------------------------
# The stream


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
        self.files = _discover(self.source, storage_options)
        # images named by path must lie under this folder (a single file: its own folder)
        self.root = storage.parent(self.files[0].uri) if self.files == [_File(self.source, self.files[0].kind)] \
            else self.source
        first_cols = _columns_of(self.files[0], storage_options, batch_rows)
        self.columns = first_cols
        self.format, self.mapping = _resolve_mapping(format, first_cols, mapping, self.files[0].uri)
        self._requested_format = format
        self.stats = IngestStats(self.format, [f.uri for f in self.files])

    # -- rows ---------------------------------------------------------------------------
    def _file_batches(self, f: _File, start: int, positions: list[int]) -> Iterator[list[tuple]]:
        """Batches of (row_index, row or None, problem) of one file; ``positions[0]`` receives how
        many row indices the file took (its rows; for JSON lines, its lines)."""
        if f.kind == "parquet":
            with _open(f.uri, self.storage_options) as fh:
                pf = parquet_file(fh, f.uri)
                names = pf.schema_arrow.names
                missing = [c for c in self.mapping.columns() if c not in names]
                if missing:
                    raise FormatError(
                        f"{f.uri}: missing columns {missing} required by format {self.format!r} "
                        f"(detected from {self.files[0].uri})"
                    )
                index = start
                for group in range(pf.num_row_groups):  # one at a time: a damaged one is named
                    batches = pf.iter_batches(batch_size=self.batch_rows, row_groups=[group])
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
            buf: list[tuple] = []
            for item in _iter_jsonl_rows(f.uri, self.storage_options, start, positions):
                buf.append(item)
                if len(buf) >= self.batch_rows:
                    yield buf
                    buf = []
            if buf:
                yield buf

    def __iter__(self) -> Iterator[IngestBatch]:
        self.stats = stats = IngestStats(self.format, [f.uri for f in self.files])
        seen: set[bytes] = set()
        resolver = _ImageResolver(self.storage_options, self.root, self.image_policy)
        m = self.mapping
        consumed = frozenset(m.columns())
        index = 0
        for f in self.files:
            base = storage.parent(f.uri)
            rel_file = f.uri if len(self.files) == 1 else storage.basename(f.uri)
            positions = [0]
            file_start = index
            for rows in self._file_batches(f, file_start, positions):
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

    def _one(self, row_index, row, parse_error, m, consumed, base, resolver, seen):
        """(record, None) or (None, quarantine entry) for one row: nothing raised here stops a run."""
        try:
            return self._one_checked(row_index, row, parse_error, m, consumed, base, resolver, seen)
        except _RowProblem as p:
            return None, QuarantineEntry(row_index, None, p.reason, p.detail).to_dict()
        except Exception as exc:  # noqa: BLE001 - per-row isolation: a defect of one row is that row's outcome
            if _is_transient(exc):
                raise
            detail = f"{type(exc).__name__}: {exc}"[:500]
            return None, QuarantineEntry(row_index, None, Reason.ROW_ERROR, detail).to_dict()

    def _one_checked(self, row_index, row, parse_error, m, consumed, base, resolver, seen):
        def quarantine(reason: str, detail: str, sid: str | None = None):
            return None, QuarantineEntry(row_index, sid, reason, detail).to_dict()

        if row is None:
            if isinstance(parse_error, _RowProblem):
                return quarantine(parse_error.reason, parse_error.detail)
            return quarantine(Reason.MALFORMED_ROW, parse_error or "unreadable row")
        try:
            parsed = _parse_row(row, m, consumed)
            for name in ("prompt", "chosen", "rejected"):
                _check_text(name, getattr(parsed, name))
        except _RowProblem as p:
            return quarantine(p.reason, p.detail)
        if self.max_text_chars is not None:
            for name in ("prompt", "chosen", "rejected"):
                n = len(getattr(parsed, name))
                if n > self.max_text_chars:
                    return quarantine(
                        Reason.TEXT_TOO_LONG,
                        f"{name} has {n} characters, above max_text_chars={self.max_text_chars}",
                    )

        notes: dict[str, Any] = {}
        image: bytes | None = None
        image_problem: _RowProblem | None = None
        try:
            image = resolver.resolve(parsed.image_value, base, self.multi_image, notes)
        except _RowProblem as p:
            image_problem = p
        sid = (
            compute_sample_id(image, parsed.prompt, parsed.chosen, parsed.rejected)
            if image is not None
            else None
        )
        if not parsed.prompt.strip():
            return quarantine(Reason.EMPTY_PROMPT, "prompt is empty", sid)
        if not parsed.chosen.strip():
            return quarantine(Reason.EMPTY_CHOSEN, "chosen response is empty", sid)
        if not parsed.rejected.strip():
            return quarantine(Reason.EMPTY_REJECTED, "rejected response is empty", sid)
        if parsed.chosen.strip() == parsed.rejected.strip():
            return quarantine(
                Reason.IDENTICAL_RESPONSES, "chosen and rejected are identical (ignoring outer whitespace)", sid
            )
        if image_problem is not None:
            return quarantine(image_problem.reason, image_problem.detail, sid)
        key = bytes.fromhex(sid)
        if key in seen:
            return quarantine(Reason.DUPLICATE, "same image, prompt, chosen and rejected as an earlier row", sid)
        try:
            notes.update(check_image(image, full_decode=self.decode_images, max_pixels=self.image_policy.max_image_pixels))
        except _RowProblem as p:
            return quarantine(p.reason, p.detail, sid)
        seen.add(key)
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
