"""A short curate run per model family through the real flow (Prefect test harness, local
storage): ingest -> activations -> SAE -> weights -> scores -> validation -> publish, with the
interpretability report (patch geometry, re-tokenised inputs) built for each family."""

import json

import pytest
from tiny_mllms import BUILDERS

from flows.params import CurateParams
from saev_core.data import publish

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("family", sorted(set(BUILDERS) - {"llava"}))  # LLaVA: test_flow.py
def test_curate_runs_for_every_family(prefect_harness, family, tmp_path):
    from flows.curate import curate

    model_dir = BUILDERS[family](tmp_path / "model")
    params = CurateParams.model_validate({
        "dataset": {"uri": "toy://rlaif-v", "toy_samples": 12, "shard_rows": 12},
        "model": {"model_id": str(model_dir), "layer": 1, "device": "cpu", "batch_size": 6},
        "sae": {"steps": 10, "batch_size": 64, "expansion_factor": 2, "lr": 1e-3},
        "scoring": {"weights": {"weight_samples": 12}, "baselines": ["raw_cosine", "length"], "canaries": {"min_count": 4}},
        "output": {"uri": str(tmp_path / "out"), "work_uri": str(tmp_path / "work"), "run_id": family,
                   "keep_percents": [50]},
        # a random tiny model cannot rank anything: the ranking gate is opened (as in test_flow.py)
        "validation": {"max_tie_share": 1.0, "min_cross_modal_features": 0},
    })
    result = curate(params)
    run = result["run"]
    assert publish.is_complete(run)
    manifest = publish.read_manifest(run)
    assert manifest["counts"]["scored"] == 12 - manifest["counts"]["quarantined"] > 0
    assert manifest["validation"]["success"]
    assert json.loads((tmp_path / "out" / "toy-rlaif-v" / family / "manifest.json").read_text())["model"]
    assert (tmp_path / "out" / "toy-rlaif-v" / family / "subsets" / "top-50").is_dir()
