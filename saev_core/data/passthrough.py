"""The source's own columns carried through to ``scores.parquet`` and every subset.

Ingest keeps a source's other columns (``ds_name``, ``idx``, ``origin_*``, ratings, any other
column) as one JSON ``extra`` per record; publishing turns them back into typed columns, named as
in the source and renamed ``source_<name>`` only where a name is already taken by the pipeline's
columns. One schema (:func:`passthrough_schema`) serves every shard, so all subset parts agree.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import pyarrow as pa

from saev_core.data.records import decode_extra

__all__ = ["passthrough_schema", "passthrough_table", "add_passthrough"]


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
