"""A run rebuilt from its manifest (`saev_core.pipeline.run_sources`): when the weights file is gone,
the weights are recomputed with the run's own scoring parameters, so the run is explained with the
weights it was scored with."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from saev_core.model.activation_cache import ActivationCache, CacheSpec
from saev_core.model.mllm import SampleActivations
from saev_core.pipeline.manifest import ModelRecord, RunManifest, SAERecord, ScoringRecord, SourceRecord
from saev_core.pipeline.run_sources import RunSources
from saev_core.pipeline.specs import ScoreSpec, WeightsSpec
from saev_core.pipeline.stages import build_weights, compute_weights
from saev_core.sae.training import save_sae
from saev_core.sae.weights import load_weights

D_IN, D_SAE = 16, 64


def _samples(prefix: str, n: int, seed: int) -> list[tuple[str, SampleActivations]]:
    """Text positions at a larger scale than image ones: a joint top-k pool is then mostly text,
    so the joint and the per-modality pools pick different tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        is_image = torch.zeros(12, dtype=torch.bool)
        is_image[2:8] = True
        acts = torch.randn(12, D_IN, generator=g) * torch.where(is_image, 1.0, 3.0)[:, None]
        out.append((f"{prefix}{i:03d}", SampleActivations(acts, is_image, torch.arange(12))))
    return out


def wspec_of(sources: RunSources) -> WeightsSpec:
    return ScoringRecord.model_validate(sources.manifest["scoring"]).weights


@pytest.fixture()
def per_modality_run(tmp_path: Path):
    from sae_lens import StandardSAE, StandardSAEConfig

    work = tmp_path / "_work"
    spec = CacheSpec(model_id="m", layer=1, model_fingerprint="fp")
    cache = ActivationCache(str(work / "activations"), spec)
    real = cache.write_shard(_samples("s", 24, 0))
    other = cache.write_shard(_samples("c", 24, 1))  # cached, but not what the weights were built from
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(-0.5)
    sae_uri = save_sae(sae, str(work / "sae" / "h"))
    wspec = WeightsSpec(pool="per_modality", delta_quantile=0.6, pool_size=8, k=3, weight_samples=20)
    weights_uri = str(work / "weights" / "w.safetensors")
    w = compute_weights(sae, cache, [real], wspec, weights_uri, None)
    manifest = RunManifest.new(
        "run-1", parameters={}, source=SourceRecord(uri="src", format="rlaif_v", fingerprint="src-fp"),
        model=ModelRecord(model_id="m", layer=1, fingerprint="fp"),
        sae=SAERecord(uri=sae_uri, sha256="0" * 64, trained=True),
        scoring=ScoringRecord(method="reference", columns=["reference"], weights=wspec, score=ScoreSpec(),
                              delta=w.delta, weights_uri=weights_uri, n_cross_modal=w.n_cross_modal, d_sae=D_SAE,
                              weight_shards=w.shard_keys),
        work_uri=str(work), record_uris=["r0", "r1"], cache=spec.to_dict(), cache_shards=[real, other], counts={},
        stages=[]).to_json()
    sources = RunSources.from_manifest(manifest, str(tmp_path / "run-1"), str(work), ["r0", "r1"])
    return sources, sae, cache, weights_uri, real, other


def test_missing_weights_file_is_recomputed_with_the_runs_pool(per_modality_run):
    sources, sae, cache, weights_uri, real, other = per_modality_run
    saved = load_weights(weights_uri)
    assert torch.equal(sources.load_weights(sae).weights.nan_to_num(-9), saved.weights.nan_to_num(-9))
    # what the run would have had with the joint pool, or with every cached shard: not the same weights
    joint, _ = build_weights(cache, [real], sae, wspec_of(sources).model_copy(update={"pool": "joint"}))
    every, _ = build_weights(cache, [real, other], sae, wspec_of(sources).fixed(sources.delta))
    for wrong in (joint, every):
        assert not torch.equal(wrong.weights.nan_to_num(-9), saved.weights.nan_to_num(-9))

    Path(weights_uri).unlink()
    rebuilt = sources.load_weights(sae)
    assert torch.equal(rebuilt.weights.nan_to_num(-9), saved.weights.nan_to_num(-9))
    assert torch.equal(rebuilt.has_weight, saved.has_weight)


def test_a_manifest_from_before_the_nested_scoring_spec_still_loads(per_modality_run, tmp_path):
    """Manifests written before issue 23 kept the weights' and scores' fields flat in `scoring`
    (and dropped delta_quantile and seed, which the run's parameters hold): they load into the
    nested parts, and a missing weights file is still rebuilt with the run's pool and delta."""
    sources, sae, cache, weights_uri, real, other = per_modality_run
    saved = load_weights(weights_uri)
    new = sources.manifest["scoring"]
    flat = {k: v for k, v in new.items() if k not in ("weights", "score")}
    flat.update({k: new["weights"][k] for k in ("pool_size", "k", "weight_samples", "pool")},
                top_k=new["score"]["top_k"], null_samples=new["score"]["null_samples"])
    asked = {"scoring": {"weight_samples": 20, "delta_quantile": 0.6, "seed": 3}}
    old = RunSources.from_manifest({**sources.manifest, "parameters": asked, "scoring": flat}, sources.run,
                                   sources.work_uri, sources.record_uris)
    assert wspec_of(old) == WeightsSpec(pool="per_modality", delta_quantile=0.6, pool_size=8, k=3, weight_samples=20)
    assert ScoringRecord.model_validate(old.manifest["scoring"]).score == ScoreSpec(seed=3)
    Path(weights_uri).unlink()
    assert torch.equal(old.load_weights(sae).weights.nan_to_num(-9), saved.weights.nan_to_num(-9))
