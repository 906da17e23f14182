"""Per-sample scores (SAE-V Algorithm 1, stage 3) and the baselines, each chosen by name.

All methods read one `SampleStats`, computed once per sample from its SAE codes, so a run can
add any number of baseline columns for the price of one forward pass. Higher score = keep.

    reference   sum of w_k over weighted features active (> delta) on >= 1 text AND >= 1 image token
                (what the authors' code ran)
    paper       sum of w_k over weighted features active (> delta) on any token (Algorithm 1 as printed)
    weighted    sum_k w_k x_k / sum_k x_k over the sample's `top_k` most active weighted features,
                x_k = the feature's max activation in the sample (the paper's pipeline figure)
    random      uniform in [0, 1), a pure function of (sample_id, seed)
    l0          mean number of active (> 0) features per position
    cooccur_l0  number of features active (> delta) on both a text and an image position
    raw_cosine  cos(mean image-position residual, mean text-position residual): no SAE
    length      number of positions (a control: active-feature counts grow with length)
    coverage    weight of weighted features active on a content text token AND an image token /
                weight of weighted features active on a content text token (chat-template and
                special tokens excluded), so the score stops measuring what kind of question it is
    null_z      shard-level: z of the sample's `reference` score against a null of the same text
                paired with `null_samples` other samples' images of the same shard:
                (s_ii - mean_j s_ij) / sd_j, from image-side feature sets (no extra forwards)
    null_z_cooccur  the same null on `cooccur_l0` (every feature counts, no weights needed)
    logp_chosen mean per-token log p(chosen | image, prompt): the model itself, full forwards
    logp_margin logp_chosen minus the same for `rejected`

Methods live in one registry (`SCORERS`, filled by `@register`): the flow parameters' Literal,
the JSON schema and the CLI are derived from it, so a new method is one decorated function.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from saev_core.sae.weights import CrossModalWeights


@dataclass
class SampleStats:
    sample_id: str
    text_max: torch.Tensor  # [d_sae] max activation over text positions (0 if none)
    image_max: torch.Tensor  # [d_sae] max activation over image positions
    l0: float  # mean active features per position
    raw_cosine: float
    n_positions: int
    n_image: int
    # [d_sae] max over the text positions that are the prompt's own words (no template or special
    # tokens); None when the activations came without a content mask
    content_max: torch.Tensor | None = None
    # model-based values read from the log-prob cache: {"logp_chosen": .., "logp_rejected": ..}
    logp: dict[str, float] | None = None
    # text tokens the token budget cut from this sample (saev_core.model.budget); 0 = none
    truncated_tokens: int = 0


def sample_stats(sample_id: str, z: torch.Tensor, acts: torch.Tensor, is_image: torch.Tensor,
                 content: torch.Tensor | None = None) -> SampleStats:
    """z: [n, d_sae] codes, acts: [n, d_in] residuals, is_image: [n] bool, for one sample;
    content: [n] bool, the positions of the prompt's own text (optional)."""
    is_image = is_image.bool()
    if not bool(is_image.any()) or bool(is_image.all()):
        raise ValueError(f"sample {sample_id}: needs both image and text positions "
                         f"(has {int(is_image.sum())} image of {len(is_image)})")
    z = z.float()
    text_max = z[~is_image].amax(0).clamp_min(0)
    image_max = z[is_image].amax(0).clamp_min(0)
    mean_img = acts[is_image].double().mean(0)
    mean_txt = acts[~is_image].double().mean(0)
    cos = torch.nn.functional.cosine_similarity(mean_img, mean_txt, dim=0)
    content_max = None
    if content is not None:
        content = content.bool() & ~is_image
        content_max = z[content].amax(0).clamp_min(0) if bool(content.any()) else torch.zeros_like(text_max)
    return SampleStats(sample_id, text_max, image_max, float((z > 0).sum(1).float().mean()), float(cos),
                       int(z.shape[0]), int(is_image.sum()), content_max)


def random_score(sample_id: str, seed: int = 0) -> float:
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class ScoreContext:
    """What a scorer may read beside the sample's stats: the run's weights, delta and options."""

    weights: CrossModalWeights | None = None
    delta: float = 0.0
    top_k: int = 10
    seed: int = 0
    null_samples: int = 16  # null_z: other images per sample


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable  # (SampleStats, ctx) -> float, or (list[SampleStats], ctx) -> list[float] if shard_level
    needs_weights: bool
    summary: str
    shard_level: bool = False  # scores a whole shard at once (a null built from the other samples)
    needs_logp: bool = False  # reads the model's log-probs of the responses (full forwards)


SCORERS: dict[str, Scorer] = {}


def register(name: str, summary: str, needs_weights: bool = False, shard_level: bool = False,
             needs_logp: bool = False):
    """Add a scoring method by name: the parameter schema, the CLI and the flow read this registry."""

    def wrap(fn: Callable):
        if name in SCORERS:
            raise ValueError(f"scoring method {name!r} is registered twice")
        SCORERS[name] = Scorer(name, fn, needs_weights, summary, shard_level, needs_logp)
        return fn

    return wrap


def _weights(ctx: ScoreContext, method: str) -> CrossModalWeights:
    if ctx.weights is None:
        raise ValueError(f"method {method!r} needs cross-modal weights")
    return ctx.weights


def _both(stats: SampleStats, delta: float) -> torch.Tensor:
    return (stats.text_max > delta) & (stats.image_max > delta)


@register("reference", "sum of w_k over weighted features active on a text AND an image token", needs_weights=True)
def _reference(stats: SampleStats, ctx: ScoreContext) -> float:
    w = _weights(ctx, "reference")
    return float(w.weights[_both(stats, ctx.delta) & w.has_weight].double().sum())


@register("paper", "sum of w_k over weighted features active on any token", needs_weights=True)
def _paper(stats: SampleStats, ctx: ScoreContext) -> float:
    w = _weights(ctx, "paper")
    x = torch.maximum(stats.text_max, stats.image_max)
    return float(w.weights[(x > ctx.delta) & w.has_weight].double().sum())


@register("weighted", "activation-weighted mean of w_k over the top_k active weighted features", needs_weights=True)
def _weighted(stats: SampleStats, ctx: ScoreContext) -> float:
    w = _weights(ctx, "weighted")
    x = torch.maximum(stats.text_max, stats.image_max)
    cand = torch.nonzero((x > ctx.delta) & w.has_weight).flatten()
    if cand.numel() == 0:
        return 0.0
    xs = x[cand].double()
    top = torch.topk(xs, min(ctx.top_k, xs.numel())).indices
    xs, ws = xs[top], w.weights[cand[top]].double()
    return float((ws * xs).sum() / xs.sum())


@register("random", "uniform in [0, 1), a pure function of (sample_id, seed)")
def _random(stats: SampleStats, ctx: ScoreContext) -> float:
    return random_score(stats.sample_id, ctx.seed)


@register("l0", "mean number of active features per position")
def _l0(stats: SampleStats, ctx: ScoreContext) -> float:
    return stats.l0


@register("cooccur_l0", "number of features active on both a text and an image position")
def _cooccur_l0(stats: SampleStats, ctx: ScoreContext) -> float:
    return float(_both(stats, ctx.delta).sum())


@register("raw_cosine", "cosine of the mean image and mean text residuals (no SAE)")
def _raw_cosine(stats: SampleStats, ctx: ScoreContext) -> float:
    return stats.raw_cosine


@register("length", "number of positions (a control)")
def _length(stats: SampleStats, ctx: ScoreContext) -> float:
    return float(stats.n_positions)


@register("coverage", "weight of weighted features on a content text AND an image token / weight of those "
          "on a content text token", needs_weights=True)
def _coverage(stats: SampleStats, ctx: ScoreContext) -> float:
    w = _weights(ctx, "coverage")
    if stats.content_max is None:
        raise ValueError(f"method 'coverage' needs a content mask: sample {stats.sample_id}'s activations "
                         "were stored without one (rebuild the activation cache)")
    on_text = (stats.content_max > ctx.delta) & w.has_weight
    den = float(w.weights[on_text].double().sum())
    if den <= 0:
        return 0.0
    return float(w.weights[on_text & (stats.image_max > ctx.delta)].double().sum()) / den


def null_z_scores(stats: list[SampleStats], feature_weights: torch.Tensor, delta: float, null_samples: int,
                  seed: int = 0) -> list[float]:
    """z of s_ii against s_ij, j = `null_samples` other samples of the same list (seeded per
    sample_id), where s_ij = sum of feature_weights over features with text_max_i and
    image_max_j both > delta. sd is floored at 1e-6 so a null without spread cannot divide by 0."""
    n = len(stats)
    if n < 3:
        raise ValueError(f"null_z needs at least 3 samples in a shard to build a null, got {n}")
    text = torch.stack([(s.text_max > delta) for s in stats]).double() * feature_weights.double()
    image = torch.stack([(s.image_max > delta) for s in stats]).double()
    pair = text @ image.T  # [n, n]: s_ij
    out = []
    for i, st in enumerate(stats):
        others = [j for j in range(n) if j != i]
        if len(others) > null_samples:
            g = torch.Generator().manual_seed(int(random_score(st.sample_id, seed) * 2**62))
            # host: CPU generator, same null on every device
            others = [others[j] for j in torch.randperm(len(others), generator=g)[:null_samples].tolist()]
        null = pair[i, others]
        sd = max(float(null.std(unbiased=False)), 1e-6)
        out.append(float((pair[i, i] - null.mean()) / sd))
    return out


@register("null_z", "z of the reference score against the same text with other samples' images (shard-level)",
          needs_weights=True, shard_level=True)
def _null_z(stats: list[SampleStats], ctx: ScoreContext) -> list[float]:
    w = _weights(ctx, "null_z")
    return null_z_scores(stats, torch.nan_to_num(w.weights, nan=0.0), ctx.delta, ctx.null_samples, ctx.seed)


@register("null_z_cooccur", "z of cooccur_l0 against the same text with other samples' images (shard-level)",
          shard_level=True)
def _null_z_cooccur(stats: list[SampleStats], ctx: ScoreContext) -> list[float]:
    return null_z_scores(stats, torch.ones_like(stats[0].text_max), ctx.delta, ctx.null_samples, ctx.seed)


def _logp(stats: SampleStats, key: str) -> float:
    if stats.logp is None or key not in stats.logp:
        raise ValueError(f"sample {stats.sample_id} has no {key}: model-based methods need the log-prob pass")
    return stats.logp[key]


@register("logp_chosen", "mean per-token log p(chosen | image, prompt) under the model", needs_logp=True)
def _logp_chosen(stats: SampleStats, ctx: ScoreContext) -> float:
    return _logp(stats, "logp_chosen")


@register("logp_margin", "mean log p(chosen) minus mean log p(rejected), given image and prompt", needs_logp=True)
def _logp_margin(stats: SampleStats, ctx: ScoreContext) -> float:
    return _logp(stats, "logp_chosen") - _logp(stats, "logp_rejected")


METHODS = tuple(SCORERS)


def _scorer(method: str) -> Scorer:
    scorer = SCORERS.get(method)
    if scorer is None:
        raise ValueError(f"unknown scoring method {method!r}; choose one of {', '.join(SCORERS)}")
    return scorer


def score(stats: SampleStats, method: str, weights: CrossModalWeights | None = None, delta: float = 0.0,
          top_k: int = 10, seed: int = 0) -> float:
    scorer = _scorer(method)
    if scorer.shard_level:
        raise ValueError(f"method {method!r} scores a whole shard: use score_shard_methods")
    return scorer.fn(stats, ScoreContext(weights, delta, top_k, seed))


def score_all(stats: SampleStats, methods: list[str], ctx: ScoreContext) -> dict[str, float]:
    """Every per-sample method of `methods` (shard-level ones are skipped: see score_shard_methods)."""
    return {m: _scorer(m).fn(stats, ctx) for m in methods if not _scorer(m).shard_level}


def score_shard_methods(stats: list[SampleStats], methods: list[str], ctx: ScoreContext) -> dict[str, list]:
    """The shard-level methods of `methods`, each a list aligned with `stats`."""
    return {m: _scorer(m).fn(stats, ctx) for m in methods if _scorer(m).shard_level}
