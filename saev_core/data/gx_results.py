"""Running a Great Expectations suite, and the plain result it gives.

Every check runs as a GX expectation in an ephemeral context (pandas data source, one
expectation suite per table); the outcome is returned as a plain, JSON-serialisable
:class:`ValidationResult` (``validation.json``) with one entry per expectation: a stable
``name`` (e.g. ``scores.score_not_null``), the GX expectation type, its arguments, success and
the observed values. :func:`raise_if_failed` turns a failed result into :class:`ValidationFailed`
whose message names the failed expectations. The suites themselves are built in
:mod:`saev_core.data.validation`.

Great Expectations is imported lazily (it takes seconds to import).
"""

from __future__ import annotations

import json
import math
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import pyarrow as pa

from saev_core.refusal import Refusal

__all__ = [
    "ExpectationOutcome",
    "ValidationResult",
    "ValidationFailed",
    "raise_if_failed",
    "load_gx",
    "run_suite",
    "to_pandas",
]

_MAX_LIST_IN_REPORT = 20


# ----------------------------------------------------------------------------------------------
# Result objects


def _plain(value: Any) -> Any:
    """JSON-safe copy: numpy -> python, non-finite floats -> strings, long lists shortened."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):
        try:
            return _plain(value.item())
        except (ValueError, TypeError):
            pass
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)) or hasattr(value, "tolist"):
        seq = list(value.tolist() if hasattr(value, "tolist") else value)
        return [_plain(v) for v in seq]
    return str(value)


def _short_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if k == "batch_id":
            continue
        if isinstance(v, (list, tuple, set, frozenset)) and len(v) > _MAX_LIST_IN_REPORT:
            out[k] = f"<{len(v)} values>"
        else:
            out[k] = _plain(v)
    return out


@dataclass
class ExpectationOutcome:
    name: str
    expectation: str
    success: bool
    kwargs: dict[str, Any] = field(default_factory=dict)
    observed: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def describe(self) -> str:
        obs = self.observed
        if self.error:
            what = f"error: {self.error}"
        elif "observed_value" in obs:
            what = f"observed {obs['observed_value']!r}"
        elif "unexpected_count" in obs:
            sample = obs.get("partial_unexpected_list") or []
            what = f"{obs['unexpected_count']} unexpected of {obs.get('element_count')}"
            if sample:
                what += f", e.g. {sample[:5]!r}"
        else:
            what = json.dumps(obs)[:200]
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.name} [{self.expectation}({args})]: {what}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expectation": self.expectation,
            "success": bool(self.success),
            "kwargs": _plain(self.kwargs),
            "observed": _plain(self.observed),
            "error": self.error,
        }


@dataclass
class ValidationResult:
    """Outcome of one or more suites; ``success`` is True when every expectation passed."""

    expectations: list[ExpectationOutcome]
    suites: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return all(e.success for e in self.expectations)

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.success]

    @property
    def failed_names(self) -> list[str]:
        return [e.name for e in self.failures]

    def __getitem__(self, name: str) -> ExpectationOutcome:
        for e in self.expectations:
            if e.name == name:
                return e
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "suites": list(self.suites),
            "n_expectations": len(self.expectations),
            "failed": self.failed_names,
            "expectations": [e.to_dict() for e in self.expectations],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ValidationResult":
        exps = [
            ExpectationOutcome(
                name=e["name"],
                expectation=e["expectation"],
                success=bool(e["success"]),
                kwargs=dict(e.get("kwargs") or {}),
                observed=dict(e.get("observed") or {}),
                error=e.get("error"),
            )
            for e in d.get("expectations", [])
        ]
        return cls(exps, list(d.get("suites", [])))

    @classmethod
    def combine(cls, *results: "ValidationResult") -> "ValidationResult":
        return cls(
            [e for r in results for e in r.expectations], [s for r in results for s in r.suites]
        )


class ValidationFailed(Refusal):
    """The validation gate failed; the paragraph names every failed expectation with what was
    observed. A :class:`Refusal` (stage ``validation``): permanent, and the command line prints it
    as one paragraph (exit 2); ``result`` is the whole :class:`ValidationResult`."""

    def __init__(self, result: ValidationResult):
        self.result = result
        self.failures = result.failures
        names = [e.name for e in self.failures]
        found = (f"validation failed: {len(self.failures)} expectation(s) not met: "
                 + "; ".join(e.describe() for e in self.failures))
        if any(n.startswith("quarantine") and n.endswith(".rate") for n in names):
            fix = ("Too many rows were quarantined: quarantine.parquet gives each row's reason (row_index, source_file); "
                   "fix those rows, or raise validation.max_quarantine_rate if that many bad rows is expected")
        else:
            fix = ("Each expectation and its observed values are in validation.json; a failure of the scores or the "
                   "subsets is not a problem of the input: report it with the run's log")
        super().__init__("validation", f"validation gate ({', '.join(result.suites) or 'suites'})", found, fix,
                         {"failed": names, "validation": result.to_dict()})


def raise_if_failed(result: ValidationResult) -> ValidationResult:
    if not result.success:
        raise ValidationFailed(result)
    return result


# ----------------------------------------------------------------------------------------------
# Great Expectations plumbing

_GX_LOCK = threading.Lock()
_GX_CONTEXT = None


def load_gx():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    return gx


def _context():
    global _GX_CONTEXT
    if _GX_CONTEXT is None:
        gx = load_gx()
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
        _GX_CONTEXT = ctx
    return _GX_CONTEXT


def _exception_message(info: Any) -> str | None:
    """GX reports errors either as one {raised_exception, exception_message} dict or as such
    dicts keyed by metric id; return the distinct messages joined, or None."""
    if not isinstance(info, Mapping):
        return None
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, Mapping)]
    msgs: list[str] = []
    for e in entries:
        if e.get("raised_exception"):
            m = str(e.get("exception_message") or "exception raised")
            if m not in msgs:
                msgs.append(m)
    return "; ".join(msgs) or None


def run_suite(suite_name: str, df, expectations: Sequence[tuple[str, Any]]) -> ValidationResult:
    """Validate ``df`` against ``[(name, gx expectation), ...]`` in an ephemeral context."""
    gx = load_gx()
    with _GX_LOCK:
        ctx = _context()
        token = uuid.uuid4().hex[:10]
        source = ctx.data_sources.add_pandas(f"saev-{suite_name}-{token}")
        try:
            asset = source.add_dataframe_asset(name=suite_name)
            batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
                batch_parameters={"dataframe": df}
            )
            suite = gx.ExpectationSuite(name=f"{suite_name}-{token}")
            for name, exp in expectations:
                exp.meta = {**(exp.meta or {}), "saev_name": name}
                suite.add_expectation(exp)
            raw = batch.validate(suite, result_format="SUMMARY")
        finally:
            ctx.data_sources.delete(source.name)
    by_name: dict[str, ExpectationOutcome] = {}
    for r in raw.results:
        cfg = r.expectation_config
        name = (cfg.meta or {}).get("saev_name", cfg.type)
        error = _exception_message(r.exception_info)
        by_name[name] = ExpectationOutcome(
            name=name,
            expectation=cfg.type,
            success=bool(r.success),
            kwargs=_short_kwargs(cfg.kwargs),
            observed=_plain(dict(r.result or {})),
            error=error,
        )
    ordered = [by_name[n] for n, _ in expectations if n in by_name]
    return ValidationResult(ordered, [suite_name])


def to_pandas(data: Any):
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, pa.Table):
        return data.to_pandas()
    if isinstance(data, Mapping):
        return pd.DataFrame(dict(data))
    raise TypeError(f"expected a pandas DataFrame or pyarrow Table, got {type(data).__name__}")
