"""The validation gate: the Great Expectations suites over the scores, quarantine and subsets
(run by :mod:`saev_core.data.gx_results` into a plain :class:`ValidationResult`).

Suites:

* scores: required columns present; row count == ingested minus quarantined; ``sample_id`` not
  null and unique; ``score`` not null (NaN counts as null) and finite (within +-1e30, which also
  rejects +-inf).
* quarantine: rate = quarantined / ingested <= threshold (and, given ``kept``, the counts add up).
* subset ``top-<p>``: exactly the TRL columns; row count == the expected count for the fraction;
  ``sample_id`` not null, unique and all present in the scores; ``score`` not null; one image
  per row; and (for files) the ``huggingface`` features metadata declaring ``images`` as a
  list of ``Image`` (a plain check recorded like an expectation, GX has no schema-metadata
  expectation).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from saev_core.data import storage
from saev_core.data.gx_results import ExpectationOutcome, ValidationResult, load_gx, run_suite, to_pandas

__all__ = [
    "FINITE_BOUND",
    "validate_scores",
    "validate_quarantine",
    "validate_subset",
    "validate_run",
    "subset_frame",
]

FINITE_BOUND = 1e30


# ----------------------------------------------------------------------------------------------
# Suites


def validate_scores(
    scores: Any,
    expected_rows: int,
    *,
    required_columns: Sequence[str] = ("sample_id", "score"),
    score_columns: Sequence[str] = ("score",),
    suite_name: str = "scores",
) -> ValidationResult:
    """Validate the scores table (a DataFrame or Arrow table) against ``expected_rows``
    (= ingested rows minus quarantined rows)."""
    gx = load_gx()
    df = to_pandas(scores)
    E = gx.expectations
    p = suite_name
    exps: list[tuple[str, Any]] = [
        (f"{p}.required_columns", E.ExpectTableColumnsToMatchSet(column_set=list(required_columns), exact_match=False)),
        (f"{p}.row_count", E.ExpectTableRowCountToEqual(value=int(expected_rows))),
        (f"{p}.sample_id_not_null", E.ExpectColumnValuesToNotBeNull(column="sample_id")),
        (f"{p}.sample_id_unique", E.ExpectColumnValuesToBeUnique(column="sample_id")),
    ]
    for col in score_columns:
        suffix = "score" if col == "score" else col
        exps += [
            (f"{p}.{suffix}_not_null", E.ExpectColumnValuesToNotBeNull(column=col)),
            (
                f"{p}.{suffix}_finite",
                E.ExpectColumnValuesToBeBetween(column=col, min_value=-FINITE_BOUND, max_value=FINITE_BOUND),
            ),
        ]
    return run_suite(suite_name, df, exps)


def validate_quarantine(
    rows_in: int,
    quarantined: int,
    max_rate: float,
    *,
    kept: int | None = None,
    suite_name: str = "quarantine",
) -> ValidationResult:
    """Quarantine rate (quarantined / rows_in) <= ``max_rate``; with ``kept``, also
    rows_in == kept + quarantined (nothing silently dropped)."""
    import pandas as pd

    gx = load_gx()
    E = gx.expectations
    rate = quarantined / rows_in if rows_in else 0.0
    row = {"rows_in": int(rows_in), "quarantined": int(quarantined), "quarantine_rate": float(rate)}
    exps: list[tuple[str, Any]] = [
        (f"{suite_name}.rate", E.ExpectColumnMaxToBeBetween(column="quarantine_rate", min_value=0.0, max_value=float(max_rate))),
    ]
    if kept is not None:
        row["unaccounted_rows"] = int(rows_in) - int(kept) - int(quarantined)
        exps.append(
            (f"{suite_name}.counts_balance", E.ExpectColumnMaxToBeBetween(column="unaccounted_rows", min_value=0, max_value=0))
        )
    return run_suite(suite_name, pd.DataFrame([row]), exps)


def subset_frame(uri: str, storage_options: storage.StorageOptions = None, batch_rows: int = 256):
    """A light pandas view of a subset (folder or part file): every column as written except
    ``images``, which holds the number of images per row. Streams, so image bytes are never all
    in memory. Returns ``(frame, arrow_schema_of_first_part)``."""
    import pandas as pd
    import pyarrow.parquet as pq

    files = storage.list_files(uri, storage_options, suffixes=".parquet")
    if not files:
        raise FileNotFoundError(f"no subset Parquet files under {uri}")
    tables = []
    schema = None
    for f in files:
        with storage.open_input(f, storage_options) as fh:
            pf = pq.ParquetFile(fh)
            if schema is None:
                schema = pf.schema_arrow
            names = pf.schema_arrow.names
            for rb in pf.iter_batches(batch_size=batch_rows):
                cols = {}
                for n in names:
                    col = rb.column(n)
                    if n == "images" and pa.types.is_list(col.type):
                        col = pc.fill_null(pc.list_value_length(col), 0)
                    cols[n] = col
                tables.append(pa.table(cols))
    table = pa.concat_tables(tables) if tables else pa.table({})
    if table.num_rows == 0 and schema is not None:
        return pd.DataFrame({n: pd.Series(dtype="object") for n in schema.names}), schema
    return table.to_pandas(), schema


def _hf_features_check(name: str, schema: pa.Schema | None) -> ExpectationOutcome:
    from datasets import Features, Image

    expectation = "saev_expect_huggingface_image_features"
    if schema is None:
        return ExpectationOutcome(name, expectation, False, {}, {}, "no Arrow schema available")
    meta = schema.metadata or {}
    raw = meta.get(b"huggingface")
    if raw is None:
        return ExpectationOutcome(
            name, expectation, False, {}, {"observed_value": None}, "no 'huggingface' schema metadata"
        )
    try:
        feats = Features.from_dict(json.loads(raw)["info"]["features"])
        images = feats.get("images")
        inner = getattr(images, "feature", None)
        ok = isinstance(inner, Image)
        observed = {"observed_value": {k: type(v).__name__ for k, v in feats.items()}}
        return ExpectationOutcome(
            name,
            expectation,
            ok,
            {"column": "images", "feature": "List(Image())"},
            observed,
            None if ok else f"images feature is {images!r}",
        )
    except Exception as exc:  # malformed metadata
        return ExpectationOutcome(name, expectation, False, {}, {}, f"{type(exc).__name__}: {exc}")


def validate_subset(
    subset: Any,
    expected_rows: int,
    score_ids: Iterable[str],
    *,
    name: str = "subset",
    storage_options: storage.StorageOptions = None,
    schema: pa.Schema | None = None,
) -> ValidationResult:
    """Validate one subset: a URI (folder or part file, read with :func:`subset_frame`) or a
    frame in the :func:`subset_frame` shape. ``expected_rows`` is the row count the keep
    fraction implies (computed by the selection step); ``score_ids`` the ids in the scores."""
    from saev_core.data.subsets import SUBSET_COLUMNS

    gx = load_gx()
    E = gx.expectations
    if isinstance(subset, (str, os.PathLike)):
        df, schema = subset_frame(os.fspath(subset), storage_options)
    else:
        df = to_pandas(subset)
    import pandas as pd

    p = f"subset[{name}]"
    exps: list[tuple[str, Any]] = [
        # the TRL columns must all be there; the source's pass-through columns may follow them
        (f"{p}.columns", E.ExpectTableColumnsToMatchSet(column_set=list(SUBSET_COLUMNS), exact_match=False)),
        (f"{p}.row_count", E.ExpectTableRowCountToEqual(value=int(expected_rows))),
        (f"{p}.sample_id_not_null", E.ExpectColumnValuesToNotBeNull(column="sample_id")),
        (f"{p}.sample_id_unique", E.ExpectColumnValuesToBeUnique(column="sample_id")),
        (f"{p}.score_not_null", E.ExpectColumnValuesToNotBeNull(column="score")),
        (f"{p}.one_image_per_row", E.ExpectColumnValuesToBeBetween(column="images", min_value=1, max_value=1)),
    ]
    result = run_suite(f"subset-{name}", df, exps)
    # Membership in the scores: GX re-serialises an expectation's arguments many times per run,
    # so ExpectColumnValuesToBeInSet with every scored id is quadratic-ish in practice (20 s for
    # 100k rows). Instead a column holds each sample_id that is NOT in the scores (null when it
    # is) and GX expects it to be all null: same verdict, offending ids as unexpected values.
    ids = set(score_ids)
    sample_ids = df["sample_id"].tolist() if "sample_id" in df.columns else []
    membership = pd.DataFrame(
        {"sample_id_not_in_scores": pd.Series([None if s in ids else s for s in sample_ids], dtype="object")}
    )
    result = ValidationResult.combine(
        result,
        run_suite(
            f"subset-{name}-membership",
            membership,
            [(f"{p}.sample_ids_in_scores", E.ExpectColumnValuesToBeNull(column="sample_id_not_in_scores"))],
        ),
    )
    result.suites = [f"subset-{name}"]
    if schema is not None:
        result.expectations.append(_hf_features_check(f"{p}.hf_image_features", schema))
    return result


def validate_run(
    run: str,
    *,
    expected_rows: int,
    rows_in: int,
    quarantined: int,
    max_quarantine_rate: float,
    keep_percents: Sequence[float] = (),
    expected_subset_rows: Mapping[str, int] | None = None,
    kept: int | None = None,
    score_columns: Sequence[str] = ("score",),
    storage_options: storage.StorageOptions = None,
) -> ValidationResult:
    """Validate a (not yet published) run directory: ``scores.parquet``, the quarantine counts
    and every subset: one per keep percent (expected size ``selection.n_keep(expected_rows, p)``)
    plus any named in ``expected_subset_rows`` (``{"top-50": 123, ...}``). A subset that is
    expected but missing fails ``subset[<name>].exists``."""
    from saev_core.data.publish import SCORES_FILE, read_scores
    from saev_core.data.subsets import SUBSETS_DIR, subset_name
    from saev_core.data.selection import n_keep

    wanted = {subset_name(p): n_keep(int(expected_rows), p) for p in keep_percents}
    wanted.update(expected_subset_rows or {})

    if not storage.exists(storage.join(run, SCORES_FILE), storage_options):
        missing = ExpectationOutcome("scores.exists", "saev_expect_file_exists", False, {"path": SCORES_FILE}, {}, "scores.parquet not found")
        parts = [ValidationResult([missing], ["scores"])]
        score_ids: list[str] = []
    else:
        scores = read_scores(run, storage_options)
        parts = [validate_scores(scores, expected_rows, score_columns=score_columns)]
        score_ids = [s for s in scores.column("sample_id").to_pylist() if s is not None]
    parts.append(validate_quarantine(rows_in, quarantined, max_quarantine_rate, kept=kept))
    for name, n in wanted.items():
        uri = storage.join(run, SUBSETS_DIR, name)
        if not storage.list_files(uri, storage_options, suffixes=".parquet"):
            parts.append(
                ValidationResult(
                    [ExpectationOutcome(f"subset[{name}].exists", "saev_expect_file_exists", False, {"path": f"{SUBSETS_DIR}/{name}"}, {}, "subset not written")],
                    [f"subset-{name}"],
                )
            )
            continue
        parts.append(validate_subset(uri, n, score_ids, name=name, storage_options=storage_options))
    return ValidationResult.combine(*parts)
