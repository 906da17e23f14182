"""Image resolution: the bytes of a row's image, from whatever the data names, read safely.

Images may be bytes, ``{bytes, path}`` structs, ``data:`` URIs or paths relative to the folder of
the data file that names them (resolved through the same filesystem, so relative paths work on S3
too). A path must resolve inside the dataset folder (``unsafe_image_path`` otherwise, checked
before anything is opened) and a URL is not fetched unless :class:`ImagePolicy` allows it
(``remote_image_not_allowed``). A control character (NUL, newline, a bidi override) in an image
path is ``unsafe_image_path``. This is the module a dataset could use to make ingest read what it
should not: every check is made on the resolved path, before any open.
"""

from __future__ import annotations

import base64
import binascii
import os
import posixpath
import re
import stat
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping

from fsspec.implementations.local import LocalFileSystem

from saev_core.data import storage
from saev_core.data.images import ImageError, inspect_image
from saev_core.data.records import Reason, RowProblem

__all__ = ["ImagePolicy", "ImageResolver", "check_image"]

def _b64(data: str, what: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RowProblem(Reason.IMAGE_DECODE_ERROR, f"{what} is neither bytes nor valid base64") from None


_BASE64_LIKE = re.compile(r"[A-Za-z0-9+/]{200,}={0,2}")


def _show(path: str, limit: int = 120) -> str:
    """A path as details quote it: repr, cut to ``limit`` characters (a quarantine detail stays
    short even when the value is a megabyte of base64)."""
    text = repr(path)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(path)} characters)"


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


class ImageResolver:
    def __init__(self, storage_options: storage.StorageOptions, root: str, policy: ImagePolicy):
        self.storage_options = storage_options
        self.policy = policy
        self.root_uri = root
        self.root_fs, root_path = storage.get_fs(root, storage_options)
        self.root_local = isinstance(self.root_fs, LocalFileSystem)
        self.root = os.path.realpath(root_path) if self.root_local else posixpath.normpath(root_path)
        self.root_protocol = root.split("://", 1)[0].lower() if storage.is_remote(root) else None

    def _locate(self, path: str, base_folder: str) -> tuple[Any, str]:
        """(filesystem, path) of an image reference, or a RowProblem saying why not."""
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
                raise RowProblem(
                    Reason.REMOTE_IMAGE_NOT_ALLOWED,
                    f"image {_show(path)} is a remote URL; not fetched (set allow_remote_images to fetch remote images)",
                )
            return storage.get_fs(path, self.storage_options)
        if self.root_local:
            full = path if os.path.isabs(path) else os.path.join(storage.get_fs(base_folder)[1], path)
            resolved = os.path.realpath(full)
            if not _inside(resolved, self.root, os.sep):
                raise RowProblem(
                    Reason.UNSAFE_IMAGE_PATH,
                    f"image path {_show(path)} resolves outside the dataset folder {self.root}; not opened",
                )
            return self.root_fs, resolved
        _, base = storage.get_fs(base_folder, self.storage_options)
        resolved = posixpath.normpath(path if path.startswith("/") else posixpath.join(base, path))
        if path.startswith("/") or not _inside(resolved, self.root, "/"):
            raise RowProblem(
                Reason.UNSAFE_IMAGE_PATH,
                f"image path {_show(path)} resolves outside the dataset prefix {self.root_uri}; not opened",
            )
        return self.root_fs, resolved

    def _read_path(self, path: str, base_folder: str) -> bytes:
        _check_path_text(path)
        fs, p = self._locate(path, base_folder)
        limit = self.policy.max_image_bytes
        try:
            # a FIFO or a device file would block the read or never end
            if isinstance(fs, LocalFileSystem) and not stat.S_ISREG(os.stat(p).st_mode):
                raise RowProblem(Reason.IMAGE_NOT_FOUND, f"image path {_show(path)} is not a regular file; not read")
            size = fs.size(p)
            if size is not None and size > limit:
                raise RowProblem(Reason.IMAGE_TOO_LARGE, f"image file {_show(path)} is {size} bytes, above the limit of {limit}")
            with fs.open(p, "rb") as fh:
                data = fh.read(limit + 1)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise RowProblem(Reason.IMAGE_NOT_FOUND, f"image file not found: {_show(path)}") from None
        except RowProblem:
            raise
        except OSError as exc:
            if fs.exists(p) and not fs.isdir(p):
                raise  # a store that is there but failing: not this row's fault, let the task retry
            raise RowProblem(Reason.IMAGE_NOT_FOUND,
                             f"image file not found: {_show(path)} ({exc.strerror or type(exc).__name__})") from None
        if len(data) > limit:
            raise RowProblem(Reason.IMAGE_TOO_LARGE, f"image file {_show(path)} is above the limit of {limit} bytes")
        if not data:
            raise RowProblem(Reason.MISSING_IMAGE, f"image file is empty: {_show(path)}")
        return data

    def resolve(self, value: Any, base_folder: str, multi_image: str, notes: dict) -> bytes:
        if isinstance(value, (list, tuple)):
            items = list(value)
            if not items:
                raise RowProblem(Reason.MISSING_IMAGE, "images list is empty")
            if len(items) > 1:
                if multi_image == "quarantine":
                    raise RowProblem(
                        Reason.MULTIPLE_IMAGES, f"{len(items)} images; one per sample is supported"
                    )
                notes["_saev_images_dropped"] = len(items) - 1
                if items[0] is None:
                    raise RowProblem(Reason.MISSING_IMAGE, f"the first of {len(items)} images is null (the first "
                                     "image of a list is the one used)")
            value = items[0]
        if value is None:
            raise RowProblem(Reason.MISSING_IMAGE, "image is null")
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
        elif isinstance(value, Mapping):
            data, path = value.get("bytes"), value.get("path")
            if isinstance(data, str) and data:
                data = _b64(data, "image.bytes")
            elif isinstance(data, (bytes, bytearray, memoryview)) and len(data):
                data = bytes(data)
            elif data not in (None, b"", ""):
                raise RowProblem(Reason.INVALID_TYPE, f"image.bytes of type {type(data).__name__}")
            elif isinstance(path, str) and path.strip():
                data = self._read_path(path, base_folder)
            elif path not in (None, ""):
                raise RowProblem(Reason.INVALID_TYPE, f"image.path of type {type(path).__name__}")
            elif any(v is not None for k, v in value.items() if k not in ("bytes", "path")):
                other = sorted(str(k) for k, v in value.items() if k not in ("bytes", "path") and v is not None)
                raise RowProblem(Reason.INVALID_TYPE, f"image struct with keys {other} and neither bytes nor path; "
                                 "expected {bytes, path}, bytes, a path or a data: URI (a URL key is not fetched)")
            else:
                raise RowProblem(Reason.MISSING_IMAGE, "image struct has neither bytes nor path")
        elif isinstance(value, str):
            if not value.strip():
                raise RowProblem(Reason.MISSING_IMAGE, "image path is empty")
            if value.startswith("data:"):
                head, _, payload = value.partition(",")
                if ";base64" not in head:
                    raise RowProblem(Reason.IMAGE_DECODE_ERROR, "data: URI is not base64")
                data = _b64(payload, "data: URI")
            else:
                try:
                    data = self._read_path(value, base_folder)
                except RowProblem as p:
                    if p.reason == Reason.IMAGE_NOT_FOUND and _BASE64_LIKE.fullmatch(value):
                        raise RowProblem(p.reason, p.detail + "; the value looks like base64 image data, which is "
                                         "read only as a data:image/...;base64, URI or as the bytes of an "
                                         "{bytes, path} struct") from None
                    raise
        else:
            raise RowProblem(Reason.INVALID_TYPE, f"image value of unsupported type {type(value).__name__}")
        if not data:
            raise RowProblem(Reason.MISSING_IMAGE, "image bytes are empty")
        if len(data) > self.policy.max_image_bytes:
            raise RowProblem(
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
            raise RowProblem(Reason.UNSAFE_IMAGE_PATH,
                             f"image path {_show(path)} holds the control character U+{ord(ch):04X} at "
                             f"position {i}; not opened")
        if 0xD800 <= ord(ch) <= 0xDFFF:
            raise RowProblem(Reason.INVALID_ENCODING,
                             f"image path {_show(path)} holds a lone surrogate U+{ord(ch):04X} at position {i} "
                             "(not valid Unicode text); not opened")


def check_image(data: bytes, *, full_decode: bool = True, max_pixels: int | None = None) -> dict[str, Any]:
    """Raise ``RowProblem`` (``image_decode_error`` / ``image_too_large``) unless the image
    decodes within the pixel limit; return notes on what normalisation will change."""
    try:
        return inspect_image(data, max_pixels=max_pixels, full_decode=full_decode)
    except ImageError as exc:
        raise RowProblem(exc.reason, exc.detail) from None
