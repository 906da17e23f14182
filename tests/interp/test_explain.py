"""Sample explanations, the run-level report (task + CLI), and the report in headless Chromium."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from tiny_mllms import build_llava

from saev_core.data import publish
from saev_core.data import storage
from saev_core.model.activation_cache import ActivationCache, CacheSpec
from saev_core.interp.explain import contributions, explain_sample, patch_scores
from saev_core.model.mllm import MLLMAdapter
from saev_core.data.records import CanonicalRecord, records_to_table
from saev_core.sae.training import encode, save_sae
from saev_core.sae.scoring import sample_stats, score
from saev_core.pipeline.manifest import ModelRecord, RunManifest, SAERecord, ScoringRecord, SourceRecord
from saev_core.pipeline.specs import ScoreSpec, WeightsSpec
from saev_core.sae.weights import CrossModalWeights

D_SAE = 48
RED, GREEN, BLUE = (220, 40, 30), (40, 200, 40), (30, 60, 220)
PROMPTS = ["what colour is the shape ?", "is there a red circle ?", "describe the image .",
           "what shape is the blue square ?", "is there a green square ?", "what is the shape ?"]


def synthetic_weights(d: int = D_SAE, seed: int = 0) -> CrossModalWeights:
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(d, generator=g) * 2 - 0.5
    w[::4] = float("nan")
    return CrossModalWeights(w, torch.full((d,), 10), torch.full((d,), 10), 30, 5)


def test_contributions_add_up_to_the_score():
    g = torch.Generator().manual_seed(1)
    z = torch.relu(torch.randn(40, D_SAE, generator=g))
    acts = torch.randn(40, 16, generator=g)
    is_image = torch.zeros(40, dtype=torch.bool)
    is_image[3:27] = True
    w = synthetic_weights()
    st = sample_stats("s", z, acts, is_image)
    for method in ("reference", "paper", "weighted"):
        feats, c = contributions(st, w, 0.5, method, top_k=5)
        assert float(c.sum()) == pytest.approx(score(st, method, w, 0.5, 5), abs=1e-9)
        assert bool(w.has_weight[feats].all())
    ex = explain_sample("s", "p", z, acts, is_image, w, 0.5, "reference", top_n=4)
    assert len(ex.features) == 4
    assert abs(ex.features[0].contribution) >= abs(ex.features[-1].contribution)
    # at delta 0.5 every weighted feature here is active on both sides; at 2.0 some are on one side only
    high = explain_sample("s", "p", z, acts, is_image, w, 2.0, "reference", top_n=4)
    assert high.one_sided
    for e, delta in ((ex, 0.5), (high, 2.0)):
        for fc in e.one_sided:  # active on exactly one modality: no contribution to the reference score
            assert (fc.text_max > delta) != (fc.image_max > delta) and fc.feature not in [f.feature for f in e.features]
    ref_feats, _ = contributions(st, w, 0.5, "reference")
    np.testing.assert_allclose(ex.weighted, (z[:, ref_feats] * w.weights[ref_feats]).sum(1).numpy(), rtol=1e-5)
    ps = patch_scores(z, acts, is_image, w, 0.5)
    assert all(v.shape == (24,) for v in ps.values())
    np.testing.assert_allclose(ps["saev"], ex.weighted[is_image.numpy()], rtol=1e-5)
    np.testing.assert_array_equal(ps["l0"], (z[is_image] > 0).sum(1).numpy())


# ------------------------------------------------------------------ fixtures
def half_image(i: int) -> Image.Image:
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:] = BLUE
    arr[:, :16] = RED if i % 2 == 0 else GREEN
    return Image.fromarray(arr)


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """A run folder laid out as the curate flow leaves it, built from the tiny LLaVA."""
    from sae_lens import StandardSAE, StandardSAEConfig

    root = tmp_path_factory.mktemp("interp")
    model_dir = build_llava(root / "model")
    adapter = MLLMAdapter.from_pretrained(str(model_dir), layer=1, device="cpu")
    work, run = root / "out" / "_work", str(root / "out" / "toy" / "run-1")
    records = records_to_table(CanonicalRecord.build(i, p, png_bytes(half_image(i)), f"good {i}", f"bad {i}")
                               for i, p in enumerate(PROMPTS))
    rec_uri = str(work / "ingest" / "abc" / "records" / "shard-00000.parquet")
    Path(rec_uri).parent.mkdir(parents=True)
    import pyarrow.parquet as pq

    pq.write_table(records, rec_uri)
    storage.write_json(str(work / "ingest" / "abc" / "ingest.json"),
                       {"fingerprint": "src-fp", "shard_rows": 128, "shards": [{"uri": rec_uri, "rows": len(PROMPTS)}]})
    ids = records.column("sample_id").to_pylist()
    caps = adapter.capture([half_image(i) for i in range(len(ids))], PROMPTS)
    spec = CacheSpec(model_id=str(model_dir), layer=1, model_fingerprint="fp")
    cache = ActivationCache(str(work / "activations"), spec)
    key = cache.write_shard(list(zip(ids, caps)))
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=adapter.hidden_size, d_sae=D_SAE, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(0.0)
    sae_uri = save_sae(sae, str(work / "sae" / "h"))
    weights = synthetic_weights()
    weights_uri = str(work / "weights" / "w.safetensors")
    Path(weights_uri).parent.mkdir(parents=True)
    weights.save(weights_uri)
    scores = []
    for sid, c in zip(ids, caps):
        scores.append(score(sample_stats(sid, encode(sae, c.acts), c.acts, c.is_image), "reference", weights, 0.5))
    publish.write_scores(run, pa.table({"sample_id": ids, "score": scores, "row_index": list(range(len(ids)))}))
    manifest = RunManifest.new(
        "run-1", parameters={"output": {"uri": str(root / "out")}},
        source=SourceRecord(uri="src", format="rlaif_v", fingerprint="src-fp"),
        model=ModelRecord(model_id=str(model_dir), layer=1, fingerprint="fp"),
        sae=SAERecord(uri=sae_uri, sha256="0" * 64, trained=False),
        scoring=ScoringRecord(method="reference", columns=["reference"], weights=WeightsSpec(delta_quantile=None, delta=0.5),
                              score=ScoreSpec(), delta=0.5, weights_uri=weights_uri,
                              n_cross_modal=int(weights.n_cross_modal), d_sae=D_SAE),
        work_uri=str(work), record_uris=[rec_uri], cache=spec.to_dict(), counts={}, stages=[]).to_json()
    return {"run": run, "manifest": manifest, "records": [rec_uri], "ids": ids, "scores": scores, "key": key,
            "root": root, "adapter": adapter}


def test_explain_run_task_writes_report(mini_run):
    from tasks.explain_tasks import explain_run

    rel = explain_run.fn(mini_run["run"], mini_run["manifest"], mini_run["records"], None, None, n_features=4,
                         n_samples=3, required=True)
    assert rel == "interp/index.html"
    index = Path(mini_run["run"]) / rel
    text = index.read_text()
    assert not re.search(r"(src|href)=\"(https?:)?//", text), "the report must not load anything from the network"
    srcs = re.findall(r'src="([^"]+)"', text)
    assert srcs and all((index.parent / s).is_file() for s in srcs)
    lowest = sorted(zip(mini_run["scores"], mini_run["ids"]))[:3]
    for _, sid in lowest:
        assert f'id="sample-{sid[:12]}"' in text
    assert text.count('class="card" id="feature-') >= 4
    assert 'src="img/feature-' in text and 'src="img/sample-' in text  # dashboards show heatmaps too


def test_cli_feature_and_sample(mini_run, tmp_path, capsys):
    from flows.explain_cli import add_explain_parser, run_explain

    if not publish.is_complete(mini_run["run"]):
        publish.write_manifest(mini_run["run"], mini_run["manifest"])
    import argparse

    parser = argparse.ArgumentParser()
    add_explain_parser(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "exp"
    args = parser.parse_args(["explain", "feature", "5", "--run", mini_run["run"], "--out", str(out)])
    assert run_explain(args) == 0
    assert (out / "feature-5.html").is_file()
    sid = mini_run["ids"][1]
    args = parser.parse_args(["explain", "sample", sid[:10], "--run", mini_run["run"], "--out", str(out)])
    assert run_explain(args) == 0
    page = (out / f"sample-{sid[:12]}.html").read_text()
    assert sid in page and "weighted sum" in page
    printed = capsys.readouterr().out
    assert f"sample {sid}: score (reference)" in printed
    args = parser.parse_args(["explain", "feature", str(D_SAE), "--run", mini_run["run"], "--out", str(out)])
    assert run_explain(args) == 2
    args = parser.parse_args(["explain", "sample", "zzzz", "--run", mini_run["run"], "--out", str(out)])
    assert run_explain(args) == 2


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_images_in_headless_chromium(mini_run, tmp_path):
    from tasks.explain_tasks import explain_run

    index = Path(mini_run["run"]) / "interp" / "index.html"
    if not index.is_file():
        explain_run.fn(mini_run["run"], mini_run["manifest"], mini_run["records"], n_features=4, n_samples=3,
                       required=True)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", "--hide-scrollbars",
           f"--screenshot={shot}", index.resolve().as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    # the unmodified sample images are shown first: their pure colours must be on screen
    hits = {c: int((np.abs(px - np.array(c)).sum(-1) < 12).sum()) for c in (RED, GREEN, BLUE)}
    assert hits[BLUE] > 2000 and hits[RED] + hits[GREEN] > 2000, f"images did not render: pixels {hits}"
    # and the overlays: strongly coloured, not blank, regions beyond the plain images
    saturated = (px.max(-1) - px.min(-1) > 80).sum()
    assert saturated > 20000, f"only {saturated} coloured pixels in the screenshot"


def test_methods_one_sample_cannot_recompute_show_the_run_score():
    from saev_core.interp.explain import ExplainError, explain_sample

    z = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    acts = torch.ones(3, 4)
    is_image = torch.tensor([False, True, True])
    w = CrossModalWeights(torch.tensor([0.5, float("nan")]), torch.zeros(2), torch.zeros(2), 30, 5)
    ex = explain_sample("s", "q", z, acts, is_image, w, 0.5, "logp_chosen", run_score=-0.25)
    assert ex.score == -0.25 and ex.method == "logp_chosen"
    with pytest.raises(ExplainError, match="cannot be recomputed from one sample"):
        explain_sample("s", "q", z, acts, is_image, w, 0.5, "null_z")
