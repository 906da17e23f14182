"""The canonical record contract shared by every stage of the pipeline.

A canonical record is one usable preference sample:

=============  ===========  ==========================================================
column         Arrow type   meaning
=============  ===========  ==========================================================
``sample_id``  string       stable content hash, see :func:`compute_sample_id`
``row_index``  int64        position of the row in the source (0-based, across files)
``prompt``     string       the question / prompt text (non-empty)
``image``      binary       the encoded image exactly as stored in the source
``chosen``     string       preferred response (non-empty)
``rejected``   string       dispreferred response (non-empty, != chosen)
``extra``      string       JSON object with the source's other columns, untouched
=============  ===========  ==========================================================

Why ``extra`` is one JSON column rather than passthrough Arrow columns: the canonical schema then
stays identical for every source format, for every file of a multi-file source and for every
JSON-lines chunk (whose inferred types can drift from chunk to chunk), so canonical shards from
any dataset concatenate and any stage can rely on the schema. Source columns cannot collide
with canonical names (RLAIF-V's ``image_path``, a source's own ``sample_id`` column), and
nothing downstream computes on them: they are carried for traceability and reports. Values are
kept as they are; only types JSON lacks are tagged (bytes as ``{"__bytes_b64__": ...}``,
timestamps/dates as ISO strings, decimals as strings). Keys starting with ``_saev_`` are notes
the adapters add (e.g. how many extra images a TRL row had).

A quarantine entry records one source row that could not be used: its row index, its
``sample_id`` when computable, a stable reason code and a human-readable detail.
"""

from __future__ import annotations

import base64
import datetime as _dt
import decimal
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

import pyarrow as pa

__all__ = [
    "SAMPLE_ID_HEX_CHARS",
    "RECORD_SCHEMA",
    "QUARANTINE_SCHEMA",
    "Reason",
    "REASONS",
    "CanonicalRecord",
    "QuarantineEntry",
    "compute_sample_id",
    "encode_extra",
    "decode_extra",
    "records_to_table",
    "quarantine_to_table",
    "empty_records_table",
    "empty_quarantine_table",
]

SAMPLE_ID_HEX_CHARS = 32  # 128 bits of sha256: collisions are not a practical concern
_SAMPLE_ID_DOMAIN = b"saev-curate/sample-id/v1\x00"

RECORD_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("row_index", pa.int64(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("extra", pa.string(), nullable=False),
    ],
    metadata={b"saev_schema": b"canonical-record/v1"},
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("row_index", pa.int64(), nullable=False),
        pa.field("sample_id", pa.string(), nullable=True),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=True),
    ],
    metadata={b"saev_schema": b"quarantine/v1"},
)


class Reason:
    """Stable quarantine reason codes (values are what lands in ``quarantine.parquet``).

    Each names one defect so that a user can fix the source: an image that cannot be read is
    told apart from one that may not be read (remote, outside the dataset folder) and from one
    that is too large."""

    MISSING_IMAGE = "missing_image"  # no image given (null, empty list, empty bytes)
    IMAGE_NOT_FOUND = "image_not_found"  # a path was given, no file is there
    REMOTE_IMAGE_NOT_ALLOWED = "remote_image_not_allowed"  # http(s)://, s3://... outside the dataset
    UNSAFE_IMAGE_PATH = "unsafe_image_path"  # resolves outside the dataset folder (../, absolute)
    IMAGE_TOO_LARGE = "image_too_large"  # bytes or pixels above the ingest limits
    IMAGE_DECODE_ERROR = "image_decode_error"  # PIL cannot decode it
    INVALID_TYPE = "invalid_type"  # a field of the wrong type (never coerced)
    TEXT_TOO_LONG = "text_too_long"  # prompt or response above the ingest's character limit
    EMPTY_PROMPT = "empty_prompt"
    EMPTY_CHOSEN = "empty_chosen"
    EMPTY_REJECTED = "empty_rejected"
    IDENTICAL_RESPONSES = "identical_responses"
    DUPLICATE = "duplicate_sample_id"
    BAD_PREFERENCE_INDEX = "bad_preference_index"
    MULTIPLE_IMAGES = "multiple_images"  # only with ingest(multi_image="quarantine")
    MALFORMED_ROW = "malformed_row"  # unparseable JSON line, a line that is not an object
    INVALID_ENCODING = "invalid_encoding"  # bytes that are not UTF-8, a lone surrogate: never replaced
    ROW_ERROR = "row_error"  # any other exception while handling the row (detail has it)


REASONS: tuple[str, ...] = tuple(
    v for k, v in vars(Reason).items() if k.isupper() and isinstance(v, str)
)


def _field_bytes(value: bytes | str) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    return len(data).to_bytes(8, "big") + data


def compute_sample_id(image: bytes, prompt: str, chosen: str, rejected: str) -> str:
    """Stable content hash of one sample: first 32 hex chars of a sha256.

    Every field is length-prefixed (8-byte big-endian) so field boundaries matter:
    ``("ab", "c")`` and ``("a", "bc")`` hash differently. Text is hashed as UTF-8 exactly as
    given (no normalisation), the image as its stored encoded bytes.
    """
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(f"image must be bytes, got {type(image).__name__}")
    for name, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be str, got {type(value).__name__}")
    h = hashlib.sha256(_SAMPLE_ID_DOMAIN)
    for part in (image, prompt, chosen, rejected):
        h.update(_field_bytes(part))
    return h.hexdigest()[:SAMPLE_ID_HEX_CHARS]


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return {"__float__": repr(value)}  # nan / inf: JSON has no literal for them
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"__bytes_b64__": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    return str(value)


def encode_extra(extra: Mapping[str, Any] | None) -> str:
    """Serialise passthrough columns to the canonical ``extra`` JSON string."""
    return json.dumps(_jsonable(dict(extra or {})), ensure_ascii=False, allow_nan=False)


def _untag(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__bytes_b64__"}:
            return base64.b64decode(value["__bytes_b64__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag(v) for v in value]
    return value


def decode_extra(extra: str | None) -> dict[str, Any]:
    """Inverse of :func:`encode_extra` (bytes and non-finite floats restored)."""
    return _untag(json.loads(extra)) if extra else {}


@dataclass(frozen=True)
class CanonicalRecord:
    sample_id: str
    row_index: int
    prompt: str
    image: bytes
    chosen: str
    rejected: str
    extra: str = "{}"

    @classmethod
    def build(
        cls,
        row_index: int,
        prompt: str,
        image: bytes,
        chosen: str,
        rejected: str,
        extra: Mapping[str, Any] | None = None,
    ) -> "CanonicalRecord":
        return cls(
            sample_id=compute_sample_id(image, prompt, chosen, rejected),
            row_index=int(row_index),
            prompt=prompt,
            image=bytes(image),
            chosen=chosen,
            rejected=rejected,
            extra=encode_extra(extra),
        )

    def extra_dict(self) -> dict[str, Any]:
        return decode_extra(self.extra)


@dataclass(frozen=True)
class QuarantineEntry:
    row_index: int
    sample_id: str | None
    reason: str
    detail: str
    source_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RowProblem(Exception):
    """Why one source row cannot be used (a :class:`Reason` code and a detail): raised while the
    row is read, parsed or its image resolved, and made that row's quarantine entry by ingest."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def records_to_table(records: Iterable[CanonicalRecord]) -> pa.Table:
    rows = [asdict(r) for r in records]
    return pa.Table.from_pylist(rows, schema=RECORD_SCHEMA)


def quarantine_to_table(entries: Iterable[QuarantineEntry | Mapping[str, Any]]) -> pa.Table:
    rows = [e.to_dict() if isinstance(e, QuarantineEntry) else dict(e) for e in entries]
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def empty_records_table() -> pa.Table:
    return RECORD_SCHEMA.empty_table()


def empty_quarantine_table() -> pa.Table:
    return QUARANTINE_SCHEMA.empty_table()
