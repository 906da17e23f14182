"""A run folder in the published layout (subsets/top-100/ + manifest.json) from given rows, for
tests of what reads a published run (examples/dpo_train.py, the DPO benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path


def published_run(folder: Path, rows: list[dict], run_id: str = "t") -> str:
    """`rows` hold prompt, chosen, rejected, images ([{bytes, path}]), sample_id and score."""
    import datasets

    feats = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                               "rejected": datasets.Value("string"), "images": datasets.Sequence(datasets.Image()),
                               "sample_id": datasets.Value("string"), "score": datasets.Value("float64")})
    sub = folder / "subsets" / "top-100"
    sub.mkdir(parents=True)
    datasets.Dataset.from_list(rows, features=feats).to_parquet(str(sub / "part-00000.parquet"))
    (folder / "manifest.json").write_text(json.dumps({"run_id": run_id, "subsets": {"top-100": {"rows": len(rows)}}}))
    return str(folder)
