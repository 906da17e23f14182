"""A pinned run's `kept` subset can be empty (no row reaches the curation model's threshold): the
run is published, so its summary, on the command line and in the flow's artifact, and the DPO
example that reads the run must not fail on it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from flows import cli
from saev_core.pipeline.run_tables import subset_line

ROOT = Path(__file__).resolve().parents[2]


def test_subset_line_with_and_without_a_lowest_score():
    assert subset_line("top-50", {"rows": 3, "min_score": 0.25}) == "top-50: 3 samples (score >= 0.25)"
    assert subset_line("kept", {"rows": 0, "min_score": None}) == "kept: 0 samples (no row kept)"


def test_cli_summary_prints_an_empty_kept_subset(capsys):
    result = {"run": "runs/x/r1", "counts": {"rows_in": 4, "quarantined": 0, "scored": 4},
              "subsets": {"top-50": {"rows": 2, "min_score": 0.5}, "kept": {"rows": 0, "min_score": None}},
              "weights": {"n_cross_modal": 12, "d_sae": 64, "delta": 0.1}}
    cli._print_summary(result, 1.0)
    out = capsys.readouterr().out
    assert "kept: 0 samples (no row kept)" in out
    assert "top-50: 2 samples (score >= 0.5)" in out


def test_dpo_example_defaults_to_the_smallest_top_subset_beside_kept(tmp_path):
    run = tmp_path / "run"
    subsets = {"kept": {"rows": 1}, "top-50": {"rows": 2}, "top-25": {"rows": 1}}
    for name, info in subsets.items():
        (run / "subsets" / name).mkdir(parents=True)
        pq.write_table(pa.table({"sample_id": [f"{name}-{i}" for i in range(info["rows"])]}),
                       run / "subsets" / name / "part-0.parquet")
    (run / "manifest.json").write_text(json.dumps({"subsets": subsets}))
    spec = importlib.util.spec_from_file_location("dpo_train", ROOT / "examples" / "dpo_train.py")
    dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dpo)
    ds, _, name = dpo.load_subset(str(run), None, {})
    assert (name, ds["sample_id"]) == ("top-25", ["top-25-0"])
    ds, _, name = dpo.load_subset(str(run), "kept", {})
    assert (name, ds["sample_id"]) == ("kept", ["kept-0"])
