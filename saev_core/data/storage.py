"""One code path for local folders and object storage, addressed by URI through fsspec.

A URI is either a local path (``runs/x``, ``/abs/x``, ``file:///abs/x``) or a remote URL such as
``s3://bucket/prefix``. ``storage_options`` are the fsspec options of the remote filesystem, e.g.
``{"endpoint_url": "http://127.0.0.1:9000", "key": ..., "secret": ...}`` for s3fs. They are
ignored for local paths, so callers can pass the same options everywhere.

Writes of single objects are atomic for readers: a local file is written to a hidden temporary
name in the same folder and renamed into place; an S3 object only appears when its upload
completes (and a failed upload is aborted, never committed). Credentials never leave this module
in clear: use :func:`redact_storage_options` / :func:`redact_secrets` before logging or writing
options anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from typing import Any, Iterator, Mapping

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = [
    "StorageOptions",
    "normalize_storage_options",
    "redact_storage_options",
    "redact_secrets",
    "is_remote",
    "get_fs",
    "join",
    "parent",
    "basename",
    "exists",
    "is_dir",
    "makedirs",
    "read_bytes",
    "write_bytes",
    "read_json",
    "write_json",
    "list_files",
    "open_input",
    "atomic_output",
    "remove",
]

StorageOptions = Mapping[str, Any] | None

REDACTED = "***"
# Option / field names whose values are secrets wherever they appear (compared lower-cased).
_SECRET_NAMES = {
    "key",
    "secret",
    "token",
    "password",
    "passwd",
    "session_token",
    "security_token",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "access_key",
    "secret_key",
    "secret_access_key",
    "access_key_id",
    "api_key",
    "authorization",
    "credentials",
}


def _is_secret_name(name: str) -> bool:
    low = str(name).lower()
    return low in _SECRET_NAMES or low.endswith(("_secret", "_password", "_token"))


def normalize_storage_options(storage_options: StorageOptions) -> dict[str, Any]:
    """Copy the options into the shape s3fs expects against S3-compatible servers.

    ``endpoint_url`` is passed top-level (moved there if given in ``client_kwargs``); no
    ``region_name`` is ever added (servers such as moto and SeaweedFS reject bucket creation
    with a location constraint).
    """
    opts = dict(storage_options or {})
    ck = opts.get("client_kwargs")
    if isinstance(ck, Mapping) and "endpoint_url" in ck:
        ck = dict(ck)
        endpoint = ck.pop("endpoint_url")
        opts.setdefault("endpoint_url", endpoint)
        if ck:
            opts["client_kwargs"] = ck
        else:
            opts.pop("client_kwargs")
    return opts


def redact_secrets(obj: Any) -> Any:
    """Deep copy of ``obj`` with the value of every secret-looking key replaced by ``***``."""
    if isinstance(obj, Mapping):
        return {
            k: (REDACTED if _is_secret_name(k) and v is not None else redact_secrets(v))
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return [redact_secrets(v) for v in obj]
    return obj


def redact_storage_options(storage_options: StorageOptions) -> dict[str, Any]:
    """Storage options safe to log or to record in a manifest (secrets replaced by ``***``)."""
    return redact_secrets(normalize_storage_options(storage_options))


def is_remote(uri: str) -> bool:
    """True for ``proto://...`` URIs other than ``file://`` (and ``local://``)."""
    uri = str(uri)
    if "://" not in uri:
        return False
    proto = uri.split("://", 1)[0].lower()
    return proto not in ("file", "local")


def get_fs(uri: str, storage_options: StorageOptions = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and filesystem-native path for ``uri``; options are used only for remote URIs."""
    uri = os.fspath(uri)
    if is_remote(uri):
        opts = normalize_storage_options(storage_options)
        protocol = uri.split("://", 1)[0].lower()
        # datasets.load_dataset(storage_options=d) adds d["hf"] = {...} to the caller's dict in
        # place; nested per-protocol entries for other protocols are not options of this one.
        for name in [k for k, v in opts.items() if isinstance(v, Mapping) and k in fsspec.available_protocols()]:
            if name != protocol:
                opts.pop(name)
        fs, path = fsspec.core.url_to_fs(uri, **opts)
    else:
        fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _uri_of(fs: fsspec.AbstractFileSystem, path: str, like: str) -> str:
    """Turn a filesystem path back into a URI in the style of ``like``."""
    if isinstance(fs, LocalFileSystem):
        return path if not str(like).startswith("file://") else "file://" + path
    return fs.unstrip_protocol(path)


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a URI (``/`` for remote URIs, ``os.path`` for local paths)."""
    uri = os.fspath(uri)
    clean = [str(p).strip("/") for p in parts if str(p).strip("/")]
    if "://" in uri:
        base = uri.rstrip("/")
        return "/".join([base, *clean]) if clean else base
    return os.path.join(uri, *clean)


def parent(uri: str) -> str:
    uri = os.fspath(uri).rstrip("/")
    if "://" in uri:
        proto, rest = uri.split("://", 1)
        head = posixpath.dirname(rest)
        return f"{proto}://{head}" if head else f"{proto}://{rest}"
    return os.path.dirname(uri) or "."


def basename(uri: str) -> str:
    uri = os.fspath(uri).rstrip("/")
    return posixpath.basename(uri) if "://" in uri else os.path.basename(uri)


def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Drop listing caches (s3fs caches listings; another writer may have changed them)."""
    try:
        fs.invalidate_cache(path)
        fs.invalidate_cache(fs._parent(path))
    except Exception:  # pragma: no cover - best effort
        pass


def exists(uri: str, storage_options: StorageOptions = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    _fresh(fs, path)
    return fs.exists(path)


def is_dir(uri: str, storage_options: StorageOptions = None) -> bool:
    fs, path = get_fs(uri, storage_options)
    _fresh(fs, path)
    return fs.isdir(path)


def makedirs(uri: str, storage_options: StorageOptions = None) -> None:
    """Create a local folder (no-op for object storage, where prefixes need no creation)."""
    fs, path = get_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path, exist_ok=True)


def read_bytes(uri: str, storage_options: StorageOptions = None) -> bytes:
    fs, path = get_fs(uri, storage_options)
    _fresh(fs, path)
    return fs.cat_file(path)


def open_input(uri: str, storage_options: StorageOptions = None, mode: str = "rb", ranged: bool = False):
    """Open ``uri`` for reading (a file object usable as a context manager). ``ranged``: the
    caller reads known byte ranges (a cached sample's rows), so an object store is asked for
    exactly those bytes instead of a 50 MiB read-ahead block per seek (s3fs's default)."""
    if "r" not in mode:
        raise ValueError("open_input is read-only; use atomic_output to write")
    fs, path = get_fs(uri, storage_options)
    _fresh(fs, path)
    if ranged and is_remote(uri):
        return fs.open(path, mode, cache_type="none")
    return fs.open(path, mode)


def _local_commit(tmp: str, final: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, final)
        return
    # Exclusive publish: link() fails atomically when the target exists.
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise FileExistsError(f"refusing to overwrite existing file: {final}") from None
    except OSError:  # filesystems without hard links: best-effort check then rename
        if os.path.exists(final):
            raise FileExistsError(f"refusing to overwrite existing file: {final}") from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


@contextlib.contextmanager
def atomic_output(
    uri: str, storage_options: StorageOptions = None, *, overwrite: bool = True
) -> Iterator[Any]:
    """Context manager yielding a binary file; the object appears at ``uri`` only on success.

    Local: a hidden temporary file next to the target, fsync'ed and renamed into place.
    S3: a (multipart) upload that is committed on success and aborted on error.
    ``overwrite=False`` refuses (``FileExistsError``) to replace an existing object; on S3 this
    uses a conditional put (``If-None-Match: *``) after a prior existence check.
    """
    fs, path = get_fs(uri, storage_options)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        if not overwrite and os.path.exists(path):
            raise FileExistsError(f"refusing to overwrite existing file: {path}")
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            _local_commit(tmp, path, overwrite)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return

    _fresh(fs, path)
    if not overwrite and fs.exists(path):
        raise FileExistsError(f"refusing to overwrite existing object: {_uri_of(fs, path, uri)}")
    mode = "wb" if overwrite else "xb"
    try:
        fh = fs.open(path, mode)
    except (NotImplementedError, ValueError):
        if overwrite:
            raise
        fh = fs.open(path, "wb")  # filesystem without exclusive mode: the check above stands
    try:
        yield fh
    except BaseException:
        # Abort: never commit a partial object.
        with contextlib.suppress(Exception):
            fh.discard()
        fh.closed = True
        raise
    else:
        fh.close()
    finally:
        _fresh(fs, path)


def write_bytes(
    uri: str, data: bytes, storage_options: StorageOptions = None, *, overwrite: bool = True
) -> None:
    with atomic_output(uri, storage_options, overwrite=overwrite) as fh:
        fh.write(data)


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):  # numpy scalars / arrays
        return o.tolist()
    if hasattr(o, "isoformat"):
        return o.isoformat()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(
    uri: str,
    obj: Any,
    storage_options: StorageOptions = None,
    *,
    overwrite: bool = True,
    indent: int | None = 2,
) -> None:
    data = json.dumps(obj, indent=indent, sort_keys=False, default=_json_default, allow_nan=False)
    write_bytes(uri, (data + "\n").encode("utf-8"), storage_options, overwrite=overwrite)


def read_json(uri: str, storage_options: StorageOptions = None) -> Any:
    return json.loads(read_bytes(uri, storage_options).decode("utf-8"))


def list_files(
    uri: str,
    storage_options: StorageOptions = None,
    *,
    suffixes: tuple[str, ...] | str | None = None,
    recursive: bool = True,
) -> list[str]:
    """Sorted URIs of the files under ``uri`` (a folder or prefix), optionally by suffix.

    Hidden names (``.``-prefixed, e.g. in-flight temporary files) and ``_``-prefixed names
    (``_SUCCESS`` and similar markers) are skipped, like pyarrow's dataset discovery does.
    """
    fs, path = get_fs(uri, storage_options)
    _fresh(fs, path.rstrip("/") + "/x")
    if isinstance(suffixes, str):
        suffixes = (suffixes,)
    if not fs.exists(path):
        return []
    if fs.isfile(path):
        found = [path]
    elif recursive:
        found = fs.find(path)
    else:
        found = [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
    out = []
    for p in found:
        rel = p[len(path.rstrip("/")) :].lstrip("/") if p != path else posixpath.basename(p)
        if any(part.startswith((".", "_")) for part in rel.split("/") if part):
            continue
        if suffixes and not p.lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        out.append(_uri_of(fs, p, uri))
    return sorted(out)


def remove(uri: str, storage_options: StorageOptions = None, *, recursive: bool = False) -> None:
    fs, path = get_fs(uri, storage_options)
    _fresh(fs, path)
    if fs.exists(path):
        fs.rm(path, recursive=recursive)
    _fresh(fs, path)
