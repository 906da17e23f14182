"""Why did a sample score what it scored, and what fired where.

- `explain_sample`: a sample's score (any method of `saev_core.sae.scoring`), the cross-modal features
  that made it up with their contributions (they add up to the score for `reference`, `paper`
  and `weighted`), each feature's activation over the image positions and the text positions,
  and the weighted sum over the contributing features, per position.
- `patch_scores`: per image position scores used to rank patches (the SAE-V cross-modal patch
  score, the L0 of the position, and a non-SAE cosine), e.g. for the patch-masking experiment.
- `RunSources`: everything a published (or being-published) run used, found from its manifest:
  activation cache, record shards, SAE, cross-modal weights, model config and processor.
- `collect_dashboards`, `explain_run_sample(s)` and `build_run_report`: the streaming dashboard pass
  over a run's cached activations and the run's interpretability report (rendered by
  `saev_core.interp.render`).
"""

from __future__ import annotations

import dataclasses

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image

from saev_core.data import storage
from saev_core.data.images import normalize_image
from saev_core.model.activation_cache import ActivationCache, CacheSpec, shard_key
from saev_core.interp.dashboard import DashboardCollector, FeatureDashboard
from saev_core.model.mllm import MLLMAdapter
from saev_core.pipeline.sources import resolve_model_id
from saev_core.model.patches import ImageGeometry, PatchGeometry
from saev_core.sae.scoring import SCORERS, SampleStats, sample_stats, score
from saev_core.sae.weights import CrossModalWeights

if TYPE_CHECKING:
    from saev_core.pipeline.manifest import RunManifest

log = logging.getLogger(__name__)

EXPLAINED_METHODS = ("reference", "paper", "weighted")


class ExplainError(ValueError):
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


# ----------------------------------------------------------------- run sources
@dataclass
class RunSources:
    """Where a run's inputs live, found from its manifest (see flows/curate.py)."""

    run: str
    manifest: dict
    work_uri: str
    options: dict | None
    cache: ActivationCache
    record_uris: list[str]
    shard_keys: list[str | None]  # activation shard of each record shard's cached rows (None: none cached)
    sae_uri: str
    weights_uri: str | None
    delta: float
    method: str
    top_k: int
    model_id: str
    revision: str | None
    trust_remote_code: bool
    model_spec: dict | None = None  # the run's ModelSpec: captures samples whose residuals are not cached
    extra_keys: list[str] = field(default_factory=list)  # activation shards of the report's own samples
    _scores: pa.Table | None = field(default=None, init=False, repr=False)
    _adapter: MLLMAdapter | None = field(default=None, init=False, repr=False)
    _extra: dict | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_manifest(cls, manifest: dict | RunManifest, run: str, work_uri: str | None = None,
                      record_uris: list[str] | None = None, options: dict | None = None) -> "RunSources":
        from pydantic import ValidationError

        from saev_core.pipeline.manifest import RunManifest

        try:
            m = manifest if isinstance(manifest, RunManifest) else RunManifest.model_validate(manifest)
        except ValidationError as exc:
            raise ExplainError(f"manifest of {run} is not a curate run's manifest: {exc}") from None
        work = work_uri or _default_work(run, m, options)
        if record_uris is None:
            record_uris = _record_shards(work, m, options)
        from saev_core.data.ingest import read_record_shard

        if m.cache_shards is not None:
            if len(m.cache_shards) != len(record_uris):
                raise ExplainError(f"the manifest pairs {len(m.cache_shards)} activation shards with the run's "
                                   f"record shards, but {len(record_uris)} record shards were given: pass the "
                                   "run's own record shards (or none, to read them from the manifest)")
            keys = list(m.cache_shards)
        else:  # a run from before the residual sample cached every row: shards named by the records' ids
            keys = []
            for uri in record_uris:
                ids = read_record_shard(uri, options, columns=["sample_id"]).column("sample_id").to_pylist()
                keys.append(shard_key(ids) if ids else None)
        cache = _run_cache(work, m, [k for k in keys if k], options)
        sc = m.scoring
        model = m.model.model_dump(exclude={"fingerprint"})
        extra = [k for k in (m.report_shards or []) if cache.is_finished(k)]
        return cls(run, m.to_json(), work, options, cache, list(record_uris), keys, m.sae.uri, sc.weights_uri,
                   float(sc.delta), sc.method, sc.top_k, resolve_model_id(m.model.model_id), m.model.revision,
                   m.model.trust_remote_code, model, extra)

    @classmethod
    def from_run(cls, run: str, work_uri: str | None = None, options: dict | None = None) -> "RunSources":
        from saev_core.data.publish import read_manifest

        return cls.from_manifest(read_manifest(run, options), run, work_uri, None, options)

    # ------------------------------------------------------------- loaders
    def load_sae(self):
        from saev_core.sae.training import load_sae

        return load_sae(self.sae_uri, storage_options=self.options)

    def load_weights(self, sae=None) -> CrossModalWeights:
        """The run's weights file (manifest `scoring.weights_uri`); when the manifest does not name
        it, recomputed from the cache with the run's scoring parameters (same inputs, same result)."""
        from safetensors.torch import load

        uri = self.weights_uri
        if uri is not None and storage.exists(uri, self.options):
            return CrossModalWeights.from_tensors(load(storage.read_bytes(uri, self.options)))
        log.warning("weights file of %s not found: recomputing cross-modal weights from the cache", self.run)
        from saev_core.pipeline.stages import build_weights

        sc = self.manifest["scoring"]
        keys = [k for k in self.shard_keys if k]
        w, _ = build_weights(self.cache, keys, sae or self.load_sae(), sc["pool_size"], sc["k"], sc["weight_samples"])
        return w

    def config_and_processor(self):
        from transformers import AutoConfig

        from saev_core.model.families import load_processor

        cfg = AutoConfig.from_pretrained(self.model_id, revision=self.revision, trust_remote_code=self.trust_remote_code)
        proc = load_processor(self.model_id, cfg.model_type, revision=self.revision,
                              trust_remote_code=self.trust_remote_code)
        return cfg, proc

    def scores(self) -> pa.Table:
        """The run's published scores, read once."""
        if self._scores is None:
            from saev_core.data.publish import read_scores

            self._scores = read_scores(self.run, self.options)
        return self._scores

    # ------------------------------------------------------------- samples
    def resolve_sample_id(self, sample_id: str) -> str:
        """A full id, or a unique prefix of one (reports show the first 12 characters)."""
        ids = self.scores().column("sample_id").to_pylist()
        if sample_id in ids:
            return sample_id
        hits = [s for s in ids if s.startswith(sample_id)]
        if len(hits) == 1:
            return hits[0]
        raise ExplainError(f"sample {sample_id!r}: {'no' if not hits else len(hits)} samples of run {self.run} "
                           "match" + ("" if not hits else "; give more characters"))

    def records(self, sample_ids: Sequence[str]) -> dict[str, dict]:
        """sample_id -> {prompt, image (bytes), chosen, rejected, shard_key, index}: the activation
        shard holding its residuals and its row there (both None when they were not cached)."""
        from saev_core.data.ingest import read_record_shard

        want = set(sample_ids)
        found: dict[str, dict] = {}
        for uri, key in zip(self.record_uris, self.shard_keys):
            t = read_record_shard(uri, self.options, columns=["sample_id", "prompt", "image", "chosen", "rejected"])
            t = t.filter(pc.is_in(t.column("sample_id"), pa.array(sorted(want), pa.string())))
            if not t.num_rows:
                continue
            pos = {s: (key, i) for i, s in enumerate(self._cached_ids(key))}
            for r in t.to_pylist():
                where = pos.get(r["sample_id"]) or self._extra_pos().get(r["sample_id"], (None, None))
                found[r["sample_id"]] = {**r, "shard_key": where[0], "index": where[1]}
            if len(found) == len(want):
                break
        return found

    def _extra_pos(self) -> dict[str, tuple[str, int]]:
        if self._extra is None:
            self._extra = {sid: (k, i) for k in self.extra_keys for i, sid in enumerate(self._cached_ids(k))}
        return self._extra

    def _cached_ids(self, key: str | None) -> list[str]:
        return [] if key is None else self.cache.index(key).column("sample_id").to_pylist()

    def activations(self, sid: str, rec: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(acts float32, is_image) of one sample: its cached residuals (the residual sample, or
        the shard the flow captured for the report), else a capture with the run's model (loaded
        once, on first need: e.g. `explain sample` on a sample outside both)."""
        if rec.get("shard_key") is not None:
            got, acts, is_image = next(self.cache.iter_samples(rec["shard_key"], [rec["index"]]))
            if got != sid:
                raise ExplainError(f"cache shard {rec['shard_key']} holds {got} at row {rec['index']}, not {sid}")
            return acts, is_image
        if self.model_spec is None:
            raise ExplainError(f"sample {sid}: its residuals were not cached and the manifest names no model")
        from saev_core.model.budget import capture_bounded
        from saev_core.pipeline.models import adapter_for
        from saev_core.pipeline.specs import ModelSpec

        spec = ModelSpec(**self.model_spec)
        if self._adapter is None:
            self._adapter = adapter_for(spec)
        cap = capture_bounded(self._adapter, [normalize_image(rec["image"])], [rec["prompt"]], batch_size=1,
                              batch_tokens=spec.batch_tokens)[0]
        return cap.acts.float(), cap.is_image

    def iter_samples(self, max_samples: int | None = None) -> Iterator[tuple[str, dict, torch.Tensor, torch.Tensor]]:
        """(sample_id, record, acts, is_image) of the cached samples in record order, one sample's
        residuals in memory at a time."""
        from saev_core.data.ingest import read_record_shard

        left = max_samples
        for uri, key in zip(self.record_uris, self.shard_keys):
            if key is None:
                continue
            if left is not None and left <= 0:
                return
            rec = read_record_shard(uri, self.options, columns=["sample_id", "prompt", "image"])
            rec = {r["sample_id"]: r for r in rec.to_pylist()}
            for sid, acts, img in self.cache.iter_samples(key):
                if left is not None and left <= 0:
                    return
                if sid not in rec:
                    raise ExplainError(f"cache shard {key} holds sample {sid}, which records {uri} do not")
                yield sid, rec[sid], acts, img
                if left is not None:
                    left -= 1


def _default_work(run: str, m: "RunManifest", options) -> str:
    """<run>/../../_work when it exists (the run folder may have moved with it), else the manifest's."""
    beside = storage.join(storage.parent(storage.parent(run)), "_work")
    if storage.exists(storage.join(beside, "activations"), options):
        return beside
    return m.work_uri or storage.join(m.parameters.get("output", {}).get("uri", "runs"), "_work")


def _rebased(uri: str, old_work: str | None, work: str) -> str:
    """A work-folder URI of the manifest, moved under `work` when the run's work folder moved."""
    if old_work and uri.startswith(old_work.rstrip("/") + "/"):
        return storage.join(work, uri[len(old_work.rstrip("/")) + 1:])
    return uri


def _record_shards(work: str, m: "RunManifest", options) -> list[str]:
    """The record shards the manifest names (relative to its work folder)."""
    if not m.record_uris:
        raise ExplainError("the manifest names no record shards: pass record_uris or --work")
    uris = [_rebased(u, m.work_uri, work) for u in m.record_uris]
    missing = [u for u in uris if not storage.exists(u, options)]
    if missing:
        raise ExplainError(f"record shard {missing[0]} of the run is missing under {work}: pass --work")
    return uris


def _run_cache(work: str, m: "RunManifest", keys: list[str], options) -> ActivationCache:
    """The run's activation cache, named by the manifest's cache spec."""
    if not m.cache:
        raise ExplainError("the manifest names no activation cache")
    names = {f.name for f in dataclasses.fields(CacheSpec)}
    cache = ActivationCache(storage.join(work, "activations"),
                            CacheSpec(**{k: v for k, v in m.cache.items() if k in names}), options)
    missing = [k for k in keys if not cache.is_finished(k)]
    if missing:
        raise ExplainError(f"activation cache {cache.uri} lacks {len(missing)} of the run's {len(keys)} shards")
    return cache


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


REPORT_SAMPLES = 6  # lowest-scored samples a run's report explains


def lowest_scored(sample_ids: Sequence[str], scores: Sequence[float], n: int = REPORT_SAMPLES) -> list[str]:
    """The n lowest-scored samples, ties by sample_id: the ones a run's report explains."""
    return [sample_ids[i] for i in sorted(range(len(sample_ids)), key=lambda i: (scores[i], sample_ids[i]))[:n]]


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
