"""Scoring parameters declared once (issue 23): the manifest records `ScoringSpec`'s own parts,
delta_quantile included, and a curation model promoted before the nested layout still loads and
pins the same scoring."""

from __future__ import annotations

import json

from flows.params import CurateParams
from flows.recurring import pinned_params
from saev_core.model.activation_cache import CacheSpec
from saev_core.pipeline.curation_model import CurationModel, card_scoring
from saev_core.pipeline.manifest import RunManifest, run_manifest
from saev_core.pipeline.results import IngestSummary, SAECheckpoint, Weights
from saev_core.pipeline.specs import ScoreSpec, WeightsSpec

# curation_model.json of a version promoted before issue 23 (its `scoring` as promote wrote it)
OLD_CARD = json.loads("""{
  "format": "saev-curation-model/1", "name": "nightly", "version": 1, "created_at": "2026-11-30T02:00:00+00:00",
  "code_version": "cd3cdc8", "source_run": "runs/toy-rlaif-v/base", "dataset": "toy-rlaif-v",
  "model": {"model_id": "toy", "revision": null, "layer": 2, "dtype": null, "max_tokens": null,
            "trust_remote_code": false, "cache_dtype": "auto", "sae_dtype": "float32", "fingerprint": "fp"},
  "cache": {"layer": 2, "compute_dtype": "float32", "response": "none", "max_tokens": null},
  "scoring": {"method": "reference", "columns": ["reference", "l0"], "top_k": 7, "null_samples": 9,
              "delta": 0.375, "n_cross_modal": 12, "d_sae": 64, "pool": "per_modality", "pool_size": 30, "k": 5,
              "weight_samples": 40, "seed": 3},
  "sae_sha256": "00", "keep_threshold": {"percent": 50, "score": 0.25}, "files": {"sae/sae_weights.safetensors": "00"}
}""")


def _manifest(params: CurateParams) -> RunManifest:
    summary = IngestSummary(format="rlaif_v", fingerprint="f", rows_in=4, kept=4, quarantined=0)
    weights = Weights(delta=0.25, uri="w.safetensors", n_cross_modal=3, d_sae=64, shard_keys=["a"])
    sae = SAECheckpoint(uri="sae", sha256="0" * 64, trained=True)
    return run_manifest("r", params.model_dump(mode="json"), "data", summary, params.model,
                        CacheSpec(model_id="toy", layer=2, model_fingerprint="fp"), sae, params.scoring, weights, 4,
                        None, [], "work", ["r0"])


def test_the_manifest_records_the_scoring_parts_as_asked():
    params = CurateParams.model_validate({"scoring": {"weights": {"delta_quantile": 0.7, "pool": "per_modality"},
                                                      "score": {"seed": 5}}})
    m = RunManifest.model_validate(_manifest(params).to_json())  # read back as explain and the tests read it
    assert m.scoring.weights == params.scoring.weights and m.scoring.weights.delta_quantile == 0.7
    assert m.scoring.score == ScoreSpec(seed=5)
    assert m.scoring.delta == 0.25  # the resolved delta beside what was asked


def test_a_curation_model_promoted_before_the_nested_layout_still_pins_its_scoring():
    cm = CurationModel.model_validate(OLD_CARD)
    key = cm.key
    params = pinned_params(CurateParams.model_validate({"scoring": {"curation_model": "nightly"}}), cm)
    sc = params.scoring
    assert sc.method == "reference" and sc.baselines == ["l0"]
    assert sc.score == ScoreSpec(top_k=7, seed=3, null_samples=9)
    assert sc.weights == WeightsSpec(pool="per_modality", pool_size=30, k=5, weight_samples=40, delta_quantile=None,
                                     delta=0.375)  # as the weights were made, not as this run asked
    assert cm.key == key  # its stored scores stay its own
    # a version promoted now writes the card's scoring in the same layout, from the nested record
    rec = _manifest(params).scoring.model_copy(update={"delta": 0.375, "n_cross_modal": 12, "columns": ["reference", "l0"]})
    assert card_scoring(rec) == OLD_CARD["scoring"]  # promoting the pinned run again gives the same card
