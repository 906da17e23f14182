"""Preference-data layouts: which source column plays which canonical role, and the texts of a row.

Formats (``format=``):

* ``"rlaif_v"``: ``question``, ``image`` (``{bytes, path}`` struct), ``chosen``, ``rejected``.
* ``"align_anything"``: ``question``, ``image``, ``response_1``, ``response_2``,
  ``overall_response`` in {1, 2}: chosen = ``response_{overall_response}``, rejected = the other.
* ``"trl"``: ``prompt``, ``chosen``, ``rejected`` (strings or message lists) and ``images``
  (a list; a single ``image`` column is accepted too).
* ``"mapping"``: an explicit :class:`ColumnMapping`.
* ``"auto"``: detected from the columns (:func:`detect_format`).

Types are checked, never coerced: a list where text belongs is ``invalid_type``; a lone surrogate
is ``invalid_encoding``, never replaced (each raised as a :class:`RowProblem`, which the stream
turns into the row's quarantine entry).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from saev_core.data.records import Reason, RowProblem
from saev_core.refusal import Refusal

__all__ = ["FORMATS", "FormatError", "ColumnMapping", "ParsedRow", "detect_format", "required_columns",
           "resolve_mapping", "parse_row", "check_text"]

FORMATS = ("rlaif_v", "align_anything", "trl", "mapping")


class FormatError(Refusal):
    """The source does not have the columns the requested (or any known) format needs, or is not a
    kind of file ingest reads. A :class:`Refusal` (stage ``ingest``): permanent, one paragraph
    naming the file and its columns, exit 2 on the command line."""

    def __init__(self, where: str, found: str, fix: str, evidence: dict[str, Any] | None = None):
        super().__init__("ingest", where, found, fix, evidence)


_FORMAT_FIX = ("Set dataset.format to the layout of the data (rlaif_v, align_anything or trl), or dataset.format=mapping "
               "with dataset.mapping naming the prompt, image, chosen and rejected columns")


def _squash(name: str) -> str:
    return "".join(name.split()).lower()


def near_misses(wanted: Sequence[str], columns: Sequence[str]) -> dict[str, str]:
    """Wanted column -> the source column that differs from it only in case or whitespace
    (``"Question"``, ``" chosen"``). Never used to match silently: which column is meant is the
    user's call, but a refusal can name it."""
    have = set(columns)
    out: dict[str, str] = {}
    for w in wanted:
        if w in have:
            continue
        hits = [c for c in columns if _squash(c) == _squash(w)]
        if len(hits) == 1:
            out[w] = hits[0]
    return out


def _hint(wanted: Sequence[str], columns: Sequence[str]) -> str:
    nm = near_misses(wanted, columns)
    if not nm:
        return ""
    pairs = ", ".join(f"{have!r} for {w!r}" for w, have in nm.items())
    return (f"; the source has {pairs}, which differ only in case or spaces (not matched silently: map them "
            "with dataset.format=mapping, or rename the columns)")


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


def detect_format(columns: Sequence[str], where: str = "the source") -> str:
    """Name the built-in format whose columns are all present, or raise :class:`FormatError`."""
    for fmt in _DETECT_ORDER:
        if not _missing_for(fmt, columns):
            return fmt
    missing = {fmt: _missing_for(fmt, columns) for fmt in _DETECT_ORDER}
    wanted = [c for cols in missing.values() for c in cols]
    raise FormatError(
        where,
        f"the dataset format cannot be detected from its columns {sorted(columns)} ("
        + "; ".join(f"{fmt}: missing {cols}" for fmt, cols in missing.items()) + ")" + _hint(wanted, columns),
        _FORMAT_FIX,
        {"columns": list(columns), "missing": missing},
    )


def resolve_mapping(fmt: str, columns: Sequence[str], mapping: ColumnMapping | None, where: str):
    if fmt == "auto":
        if not columns:
            raise FormatError(where, "no row to detect the format from (the file is empty, not UTF-8, or none of its "
                              "first lines is a JSON object)", "Check that the file holds the samples as JSON "
                              "lines or Parquet rows, or set dataset.format explicitly")
        fmt = detect_format(columns, where)
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
            where, f"format {fmt!r} needs columns {missing} that are missing; its columns are {sorted(columns)}"
            + _hint(missing, columns),
            _FORMAT_FIX if fmt != "mapping" else "Correct dataset.mapping to name columns the source has",
            {"columns": list(columns), "missing": missing, "format": fmt},
        )
    return fmt, m


# --------------------------------------------------------------------------------------------
# Field extraction


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


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
        raise RowProblem(Reason.INVALID_TYPE, f"{field_name}: expected text or messages, got "
                         f"{type(value).__name__} {_short(value)} (not converted to text)")
    texts: list[str] = []
    for msg in value:
        if not isinstance(msg, Mapping) or "content" not in msg:
            raise RowProblem(
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
            raise RowProblem(Reason.INVALID_TYPE, f"{field_name}: message content of type {type(content).__name__}")
        parts = []
        for part in content:
            if not isinstance(part, Mapping):
                raise RowProblem(Reason.INVALID_TYPE, f"{field_name}: content part of type {type(part).__name__}")
            if part.get("type", "text") != "text":
                if part.get("text") is not None:  # e.g. {"type": "input_text", "text": ...}: not dropped unseen
                    raise RowProblem(Reason.INVALID_TYPE, f"{field_name}: a part of type {part.get('type')!r} holds "
                                     "text; only parts of type 'text' are read as text")
                continue  # {"type": "image"} placeholders carry no text; the image comes from images
            if "text" not in part:  # {"type": "text", "content": ...}: its words would vanish without a trace
                raise RowProblem(Reason.INVALID_TYPE, f"{field_name}: a text part without a 'text' key (its keys: "
                                 f"{sorted(map(str, part))})")
            text = part["text"]
            if text is None:
                continue
            if not isinstance(text, str):
                raise RowProblem(Reason.INVALID_TYPE, f"{field_name}: text part of type {type(text).__name__}")
            parts.append(text)
        texts.append("\n".join(parts))
    return "\n\n".join(t for t in texts if t)


def _preferred_index(value: Any, base: int, column: str) -> int:
    """0 or 1 for responses[0] / responses[1]. An integer (or an integral float, as Parquet
    stores an int column with nulls) is required: a string is ``invalid_type``, not parsed."""
    if value is None:
        raise RowProblem(Reason.BAD_PREFERENCE_INDEX, f"{column} is null: expected {base} or {base + 1}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
        raise RowProblem(
            Reason.INVALID_TYPE, f"{column}={value!r} ({type(value).__name__}): expected the integer {base} or {base + 1}"
        )
    idx = int(value)
    if idx - base not in (0, 1):
        raise RowProblem(Reason.BAD_PREFERENCE_INDEX, f"{column}={value!r}: expected {base} or {base + 1}")
    return idx - base


def _label(role: str, column: str) -> str:
    """How a detail names a field: the source column, with its role when they differ."""
    return column if role == column else f"{role} (column {column!r})"


@dataclass
class ParsedRow:
    prompt: str
    chosen: str
    rejected: str
    image_value: Any
    extra: dict[str, Any]
    labels: dict[str, str] = field(default_factory=dict)  # role -> how details name it
    raw: dict[str, Any] = field(default_factory=dict)  # role -> the source value (or _ABSENT)

    def why_empty(self, role: str) -> str:
        """Detail for an empty prompt/response: absent key, null, or text that is blank."""
        value, label = self.raw.get(role, _ABSENT), self.labels.get(role, role)
        if value is _ABSENT:
            return f"{label} is missing from this row"
        if value is None:
            return f"{label} is null"
        if isinstance(value, str):
            return f"{label} is empty" if not value else f"{label} holds only whitespace"
        return f"{label} holds no text (messages without text content)"


_ABSENT = object()


def parse_row(row: Mapping[str, Any], m: ColumnMapping, consumed: frozenset[str]) -> ParsedRow:
    labels = {"prompt": _label("prompt", m.prompt), "image": _label("image", m.image)}
    raw = {"prompt": row.get(m.prompt, _ABSENT)}
    prompt = _message_text(row.get(m.prompt), labels["prompt"])
    if m.responses is not None:
        pref = _preferred_index(row.get(m.preferred), m.preferred_base, m.preferred)
        a, b = m.responses
        first = _message_text(row.get(a), _label("chosen" if pref == 0 else "rejected", a))
        second = _message_text(row.get(b), _label("rejected" if pref == 0 else "chosen", b))
        chosen, rejected = (first, second) if pref == 0 else (second, first)
        cols = {"chosen": a, "rejected": b} if pref == 0 else {"chosen": b, "rejected": a}
    else:
        cols = {"chosen": m.chosen, "rejected": m.rejected}
        chosen = _message_text(row.get(m.chosen), _label("chosen", m.chosen))
        rejected = _message_text(row.get(m.rejected), _label("rejected", m.rejected))
    for role, col in cols.items():
        labels[role] = _label(role, col)
        raw[role] = row.get(col, _ABSENT)
    extra = {k: v for k, v in row.items() if k not in consumed}
    return ParsedRow(prompt, chosen, rejected, row.get(m.image), extra, labels, raw)


def check_text(name: str, text: str) -> None:
    """Text must be valid Unicode (a JSON ``\\ud800`` escape decodes to a lone surrogate, which
    no UTF-8 file can hold): quarantined as ``invalid_encoding``, never replaced."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RowProblem(Reason.INVALID_ENCODING,
                         f"{name}: lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start} "
                         "(not valid Unicode text)") from None
