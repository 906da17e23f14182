"""Identities: content digests for cache keys, the library's source hash (a fix anywhere in the
algorithm invalidates cached results) and the git version recorded in manifests."""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]


def digest(obj: Any, n: int = 16) -> str:
    """Stable short hash of any JSON-able object (pydantic models via their JSON dump)."""
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """Hash of the library and task sources: part of every cached stage's key (Prefect's
    TASK_SOURCE sees only a task's own body, not the saev_core code it calls)."""
    h = hashlib.sha256()
    for f in sorted([*(_ROOT / "saev_core").rglob("*.py"), *(_ROOT / "tasks").glob("*.py")]):
        h.update(f.relative_to(_ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def package_hash(package: str) -> str:
    """Hash of one saev_core package's sources (e.g. "data"): part of the key of a stage whose
    output only that package's code decides (ingest), so a fix there is not hidden by reuse while
    a change elsewhere does not redo it."""
    h = hashlib.sha256()
    for f in sorted((_ROOT / "saev_core" / package).rglob("*.py")):
        h.update(f.relative_to(_ROOT).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def git_version() -> str:
    """`git describe --always --dirty` of the checkout, for the manifest; "unknown" outside git."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=_ROOT, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"
