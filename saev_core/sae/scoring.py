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


def sample_stats(sample_id: str, z: torch.Tensor, acts: torch.Tensor, is_image: torch.Tensor) -> SampleStats:
    """z: [n, d_sae] codes, acts: [n, d_in] residuals, is_image: [n] bool, for one sample."""
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
    return SampleStats(sample_id, text_max, image_max, float((z > 0).sum(1).float().mean()), float(cos),
                       int(z.shape[0]), int(is_image.sum()))


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


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: Callable[[SampleStats, ScoreContext], float]
    needs_weights: bool
    summary: str


SCORERS: dict[str, Scorer] = {}


def register(name: str, summary: str, needs_weights: bool = False):
    """Add a scoring method by name: the parameter schema, the CLI and the flow read this registry."""

    def wrap(fn: Callable[[SampleStats, ScoreContext], float]):
        if name in SCORERS:
            raise ValueError(f"scoring method {name!r} is registered twice")
        SCORERS[name] = Scorer(name, fn, needs_weights, summary)
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


METHODS = tuple(SCORERS)


def score(stats: SampleStats, method: str, weights: CrossModalWeights | None = None, delta: float = 0.0,
          top_k: int = 10, seed: int = 0) -> float:
    scorer = SCORERS.get(method)
    if scorer is None:
        raise ValueError(f"unknown scoring method {method!r}; choose one of {', '.join(SCORERS)}")
    return scorer.fn(stats, ScoreContext(weights, delta, top_k, seed))


def score_all(stats: SampleStats, methods: list[str], weights: CrossModalWeights | None, delta: float,
              top_k: int = 10, seed: int = 0) -> dict[str, float]:
    return {m: score(stats, m, weights, delta, top_k, seed) for m in methods}
