"""Refusals: the run's input or configuration cannot give a result, and retrying will not change that.

A :class:`Refusal` says which stage refused (preflight, ingest, ranking-gate, validation, publish),
where (a file, a row group, a key), what was found (with the figures), what to do, and carries the
evidence as plain data (counts, row ranges, the canary table) for the run's ``FAILED.json``. It
is *permanent*: the Prefect tasks do not retry it (``tasks.common.retry_unless_permanent``), and
the command line prints :meth:`Refusal.paragraph` (exit 2) instead of a traceback. ``str()`` of a
refusal is that paragraph too, so a Prefect flow run that ends on one shows the same text as its
state message.

Kept free of every other module of the package, so that any layer (data, sae, pipeline) can raise
one.
"""

from __future__ import annotations

import textwrap
from typing import Any

__all__ = ["Refusal"]


def _rebuild(cls, state: dict):
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    Exception.__init__(obj, obj.paragraph())
    return obj


class Refusal(ValueError):
    """A permanent refusal of the run's input or configuration.

    ``stage``: the pipeline stage that refused; ``where``: the file, row group, column or key;
    ``found``: what is wrong, with its figures; ``fix``: what to do; ``evidence``: JSON-able
    details (kept in ``FAILED.json``). ``kept_at`` is set by the flow once the evidence is written.
    """

    def __init__(self, stage: str, where: str, found: str, fix: str, evidence: dict[str, Any] | None = None):
        self.stage, self.where, self.found, self.fix = stage, where, found, fix
        self.evidence = dict(evidence or {})
        self.kept_at: str | None = None
        super().__init__(self.paragraph())

    def paragraph(self) -> str:
        """One paragraph: where, what was found, what to do (and where the evidence is kept)."""
        text = f"{self.where}: {_sentence(self.found)} {_sentence(self.fix)}"
        if self.kept_at:
            text += f" Evidence kept in {self.kept_at}."
        return text

    def __str__(self) -> str:
        return self.paragraph()

    def wrapped(self, width: int = 100) -> str:
        return textwrap.fill(self.paragraph(), width=width, subsequent_indent="  ", break_on_hyphens=False,
                             break_long_words=False)

    def __reduce__(self):  # pickled through Dask and Prefect's result store with every field
        return _rebuild, (type(self), dict(self.__dict__))


def _sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if text.endswith((".", "!", "?")) else text + "."
