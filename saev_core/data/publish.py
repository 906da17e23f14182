"""The run folder: ``<output>/<dataset>/<run_id>/`` on a local folder or object storage, from
staging to a published run (or a failed run's evidence).

Layout::

    scores.parquet                     sample_id, score (+ optional extra score columns)
    subsets/top-<p>/part-00000.parquet TRL-ready subsets (:mod:`saev_core.data.subsets`)
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

Every object is written atomically (see :mod:`saev_core.data.storage`). A run directory that
already has a manifest is never written to again: every writer raises :class:`RunAlreadyPublished`.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import secrets
import time
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.parquet as pq

from saev_core.data import storage
from saev_core.data.records import QUARANTINE_SCHEMA, QuarantineEntry

__all__ = [
    "SCORES_FILE",
    "QUARANTINE_FILE",
    "VALIDATION_FILE",
    "MANIFEST_FILE",
    "RunAlreadyPublished",
    "RunIncomplete",
    "run_uri",
    "ensure_unpublished",
    "write_scores",
    "read_scores",
    "write_quarantine",
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
]

SCORES_FILE = "scores.parquet"
QUARANTINE_FILE = "quarantine.parquet"
VALIDATION_FILE = "validation.json"
MANIFEST_FILE = "manifest.json"
STAGING_DIR = "_staging"
FAILED_DIR = "_failed"
FAILED_FILE = "FAILED.json"
FAILED_MAX_AGE_DAYS = 30.0

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
