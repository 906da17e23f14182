"""Why did a sample score what it scored, and what fired where.

- `explain_sample`: a sample's score (any method of `saev_core.sae.scoring`), the cross-modal features
  that made it up with their contributions (they add up to the score for `reference`, `paper`
  and `weighted`), each feature's activation over the image positions and the text positions,
  and the weighted sum over the contributing features, per position.
- `patch_scores`: per image position scores used to rank patches (the SAE-V cross-modal patch
  score, the L0 of the position, and a non-SAE cosine), e.g. for the patch-masking experiment.
- (`RunSources`, everything a run used found from its manifest, is in `saev_core.pipeline.run_sources`.)
- `collect_dashboards`, `explain_run_sample(s)` and `build_run_report`: the streaming dashboard pass
  over a run's cached activations and the run's interpretability report (rendered by
  `saev_core.interp.render`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow.compute as pc
import torch
from PIL import Image

from saev_core.data import storage
from saev_core.data.images import normalize_image
from saev_core.interp.dashboard import DashboardCollector, FeatureDashboard
from saev_core.model.image_geometry import ImageGeometry
from saev_core.model.mllm import MLLMAdapter
from saev_core.model.patches import PatchGeometry
from saev_core.pipeline.report_samples import REPORT_SAMPLES, lowest_scored  # noqa: F401 (explain_tasks reads it)
from saev_core.pipeline.run_sources import RunSourceError, RunSources
from saev_core.sae.scoring import SCORERS, SampleStats, sample_stats, score
from saev_core.sae.weights import CrossModalWeights

EXPLAINED_METHODS = ("reference", "paper", "weighted")


class ExplainError(RunSourceError):
    """A run, sample or feature that cannot be explained, with the reason."""


# --------------------------------------------------------------------- tokens
class _NoWeights(torch.nn.Module):
    """Stands in for the model: the adapter's constructor needs only its config and a layer list."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.layers = torch.nn.ModuleList([torch.nn.Identity()])


class InputTokenizer(MLLMAdapter):
    """The adapter's exact input building (chat template, processor, right padding) without a
    model: token ids of a sample, e.g. to spell cached activations. No weights are loaded."""

    def __init__(self, config, processor):
        super().__init__(_NoWeights(config), processor, layer=0, device="cpu", dtype=torch.float32)
        self.tokenizer = getattr(processor, "tokenizer", None)

    def input_ids(self, image: Image.Image, prompt: str, response: str | None = None) -> torch.Tensor:
        batch = self.build_inputs([image], [prompt], None if response is None else [response])
        return batch["input_ids"][0][batch["attention_mask"][0].bool()].cpu()

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(i))


# ------------------------------------------------------------- contributions
def contributions(stats: SampleStats, weights: CrossModalWeights, delta: float, method: str = "reference",
                  top_k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, contribution to the score) for the three SAE-V methods; the contributions sum
    to `scoring.score(stats, method, ...)`. Baseline methods are explained with the reference set."""
    w, has_w = weights.weights, weights.has_weight
    if method not in ("paper", "weighted"):
        feats = torch.nonzero((stats.text_max > delta) & (stats.image_max > delta) & has_w).flatten()
        return feats, w[feats].double()
    x = torch.maximum(stats.text_max, stats.image_max)
    feats = torch.nonzero((x > delta) & has_w).flatten()
    if method == "paper" or feats.numel() == 0:
        return feats, w[feats].double()
    xs = x[feats].double()
    top = torch.topk(xs, min(top_k, xs.numel())).indices
    feats, xs = feats[top], xs[top]
    return feats, w[feats].double() * xs / xs.sum()


@dataclass
class FeatureContribution:
    feature: int
    weight: float
    contribution: float
    text_max: float
    image_max: float
    acts: np.ndarray  # [n_positions] the feature's activation at every position of the sample


@dataclass
class SampleExplanation:
    sample_id: str
    prompt: str
    method: str
    score: float
    delta: float
    n_contributing: int
    tokens: list[str]  # every position, spelled
    is_image: np.ndarray  # [n] bool
    weighted: np.ndarray  # [n] sum over contributing features of w_k * z_k at each position
    features: list[FeatureContribution]  # the top contributors by |contribution|
    geometry: ImageGeometry | None = None
    image: Image.Image | None = None
    other_scores: dict | None = None
    one_sided: list[FeatureContribution] | None = None  # weighted features active on one modality only

    @property
    def image_weighted(self) -> np.ndarray:
        return self.weighted[self.is_image]


def explain_sample(sample_id: str, prompt: str, z: torch.Tensor, acts: torch.Tensor, is_image: torch.Tensor,
                   weights: CrossModalWeights, delta: float, method: str = "reference", *, tokens=None,
                   image: Image.Image | None = None, geometry: PatchGeometry | None = None, top_n: int = 6,
                   top_k: int = 10, extra_scores: dict | None = None,
                   run_score: float | None = None) -> SampleExplanation:
    """z: [n, d_sae] codes, acts: [n, d_in] residuals, is_image: [n] of one sample's positions.
    Methods that one sample's codes cannot recompute (shard-level nulls, the model's log-probs)
    show `run_score`, the score the run wrote."""
    is_image = torch.as_tensor(is_image).bool()
    z = torch.as_tensor(z).float()
    stats = sample_stats(sample_id, z, acts, is_image)
    explained = method if method in EXPLAINED_METHODS else "reference"
    scorer = SCORERS.get(method)
    if scorer is not None and (scorer.shard_level or scorer.needs_logp):
        if run_score is None:
            raise ExplainError(f"method {method!r} cannot be recomputed from one sample: pass the run's score")
        s = run_score
    else:
        s = score(stats, method, weights, delta, top_k)
    feats, contrib = contributions(stats, weights, delta, explained, top_k)
    w = weights.weights
    wsum = (z[:, feats].double() * w[feats].double()[None, :]).sum(1) if feats.numel() else torch.zeros(z.shape[0])
    order = torch.argsort(contrib.abs(), descending=True)[:top_n]
    top = [FeatureContribution(int(feats[i]), float(w[feats[i]]), float(contrib[i]), float(stats.text_max[feats[i]]),
                               float(stats.image_max[feats[i]]), z[:, feats[i]].numpy().astype(np.float32))
           for i in order.tolist()]
    x_t, x_i = stats.text_max > delta, stats.image_max > delta
    lone = torch.nonzero((x_t ^ x_i) & weights.has_weight).flatten()
    lone = lone[torch.argsort(w[lone], descending=True)[:top_n]]
    one_sided = [FeatureContribution(int(k), float(w[k]), 0.0, float(stats.text_max[k]), float(stats.image_max[k]),
                                     z[:, k].numpy().astype(np.float32)) for k in lone.tolist()]
    geo = None
    if geometry is not None and image is not None:
        geo = geometry.for_image(image.width, image.height, int(is_image.sum()))
    return SampleExplanation(sample_id, prompt, method, float(s), float(delta), int(feats.numel()),
                             list(tokens) if tokens is not None else [""] * z.shape[0], is_image.numpy(),
                             wsum.float().numpy(), top, geo, image, extra_scores, one_sided)


def patch_scores(z: torch.Tensor, acts: torch.Tensor, is_image: torch.Tensor, weights: CrossModalWeights,
                 delta: float) -> dict[str, np.ndarray]:
    """Per image position, in order: `saev` = sum of w_k z_k over the sample's cross-modal
    features (weighted, active > delta on a text AND an image position: the reference set),
    `l0` = active features at the position, `raw_cosine` = cosine of the position's residual
    with the sample's mean text residual (no SAE)."""
    img = torch.as_tensor(is_image).bool()
    z = torch.as_tensor(z).float()
    feats, _ = contributions(sample_stats("", z, acts, img), weights, delta, "reference")
    zi = z[img]
    saev = (zi[:, feats].double() * weights.weights[feats].double()[None]).sum(1)
    mean_text = acts[~img].double().mean(0, keepdim=True)
    cos = torch.nn.functional.cosine_similarity(acts[img].double(), mean_text, dim=1)
    return {"saev": saev.numpy(), "l0": (zi > 0).sum(1).double().numpy(), "raw_cosine": cos.numpy()}


# ---------------------------------------------------------------- run level
@dataclass
class RunModel:
    """What the run-level views need, loaded once."""

    sources: RunSources
    sae: object
    weights: CrossModalWeights
    geometry: PatchGeometry
    tokenizer: InputTokenizer

    @classmethod
    def load(cls, sources: RunSources) -> "RunModel":
        sae = sources.load_sae()
        cfg, proc = sources.config_and_processor()
        return cls(sources, sae, sources.load_weights(sae), PatchGeometry(cfg, proc), InputTokenizer(cfg, proc))

    def encode(self, acts: torch.Tensor) -> torch.Tensor:
        from saev_core.sae.training import encode

        return encode(self.sae, acts)

    def checked_ids(self, sid: str, record: dict, image: Image.Image, is_image: torch.Tensor) -> torch.Tensor:
        ids = self.tokenizer.input_ids(image, record["prompt"])
        if ids.shape[0] != is_image.shape[0] or not torch.equal(ids == self.tokenizer.image_token_id, is_image):
            raise ExplainError(f"sample {sid}: re-tokenised input ({ids.shape[0]} positions) does not match the "
                               f"cached activations ({is_image.shape[0]}); was the cache made with a response?")
        return ids


def explain_run_samples(rm: RunModel, sample_ids: Sequence[str], top_n: int = 6) -> list[SampleExplanation]:
    """Explanations of several samples (full ids or unique prefixes); the record shards are read once."""
    src = rm.sources
    sids = [src.resolve_sample_id(s) for s in sample_ids]
    recs = src.records(sids)
    out = []
    for sid in sids:
        rec = recs.get(sid)
        if rec is None:
            raise ExplainError(f"sample {sid} is not in the run's record shards")
        acts, is_image = src.activations(sid, rec)
        image = normalize_image(rec["image"])
        ids = rm.checked_ids(sid, rec, image, is_image)
        tokens = [rm.tokenizer.convert_ids_to_tokens(i) for i in ids.tolist()]
        z = rm.encode(acts)
        row = src.scores().filter(pc.equal(pc.field("sample_id"), sid)).to_pylist()
        others = {k: v for k, v in (row[0] if row else {}).items() if isinstance(v, float) and k != "score"}
        out.append(explain_sample(sid, rec["prompt"], z, acts, is_image, rm.weights, src.delta, src.method,
                                  tokens=tokens, image=image, geometry=rm.geometry, top_n=top_n, top_k=src.top_k,
                                  extra_scores=others, run_score=row[0]["score"] if row else None))
    return out


def explain_run_sample(rm: RunModel, sample_id: str, top_n: int = 6) -> SampleExplanation:
    return explain_run_samples(rm, [sample_id], top_n)[0]


def collect_dashboards(rm: RunModel, features: Sequence[int], max_samples: int | None = 1000, n_text: int = 8,
                       n_images: int = 6, context: int = 6) -> dict[int, FeatureDashboard]:
    """One streaming pass over the run's cached activations (record order, up to max_samples)."""
    col = DashboardCollector(int(rm.sae.cfg.d_sae), features, n_text, n_images, context)
    for sid, rec, acts, is_image in rm.sources.iter_samples(max_samples):
        ids = rm.checked_ids(sid, rec, normalize_image(rec["image"]), is_image)
        col.observe(sid, rm.encode(acts), is_image, ids)
    return col.result(rm.weights, rm.tokenizer)


def dashboard_images(rm: RunModel, dashboards: dict[int, FeatureDashboard]) -> dict[str, tuple[Image.Image, ImageGeometry]]:
    """The images (and their geometry) of every sample a dashboard shows."""
    want = {ex.sample_id for d in dashboards.values() for ex in d.top_images}
    recs = rm.sources.records(sorted(want))
    out = {}
    for d in dashboards.values():
        for ex in d.top_images:
            if ex.sample_id in recs and ex.sample_id not in out:
                im = normalize_image(recs[ex.sample_id]["image"])
                out[ex.sample_id] = (im, rm.geometry.for_image(im.width, im.height, int(ex.token_acts.shape[0])))
    return out


def top_cross_modal(weights: CrossModalWeights, n: int) -> list[int]:
    w = torch.where(weights.has_weight, weights.weights, torch.full_like(weights.weights, float("-inf")))
    k = min(n, weights.n_cross_modal)
    return torch.topk(w, k).indices.tolist() if k else []


def build_run_report(sources: RunSources, out_uri: str, n_features: int = 8, n_samples: int = REPORT_SAMPLES,
                     max_samples: int | None = 1000, per_sample_features: int = 3) -> dict:
    """The interpretability report of a run: dashboards of the top cross-modal features (and of
    the features behind the lowest-scored samples), and explanations of the lowest-scored
    samples. Written to `out_uri` (index.html + img/*.png). Returns a summary."""
    from saev_core.interp.render import write_report

    rm = RunModel.load(sources)
    scores = sources.scores()
    ids, vals = scores.column("sample_id").to_pylist(), scores.column("score").to_pylist()
    lowest = lowest_scored(ids, vals, n_samples)
    explanations = explain_run_samples(rm, lowest)
    feats = top_cross_modal(rm.weights, n_features)
    for ex in explanations:
        for fc in ex.features[:per_sample_features]:
            if fc.feature not in feats:
                feats.append(fc.feature)
    dashboards = collect_dashboards(rm, feats, max_samples)
    images = dashboard_images(rm, dashboards)
    meta = {"run": sources.run, "model": sources.model_id, "sae": sources.sae_uri, "method": sources.method,
            "delta": sources.delta, "d_sae": int(rm.sae.cfg.d_sae), "n_cross_modal": rm.weights.n_cross_modal,
            "samples_scanned": min(max_samples or len(ids), len(ids))}
    files = write_report(out_uri, dashboards, explanations, images, meta, feature_order=feats,
                         storage_options=sources.options)
    return {"uri": storage.join(out_uri, "index.html"), "features": feats, "samples": lowest, "files": len(files)}
