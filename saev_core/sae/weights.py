"""Cross-modal feature weights (SAE-V Algorithm 1, stages 1-2), streamed in two passes.

Pass 1 (`observe`) keeps, per feature, its `pool_size` largest positive activations as
(activation, global token index, modality): memory is d_sae x pool_size, whatever the number
of tokens. A chunk costs one pass over its codes plus a sort of the few entries that beat a
pool's last activation (no sort of [tokens x d_sae]), on the codes' device. `plan()` then picks each cross-modal feature's top-k text and top-k image tokens.
Pass 2 (`gather`) replays the same token stream and adds only those tokens' unit-normalised
residual vectors into two running sums per cross-modal feature, using

    mean_{t,v} cos(h_t, h_v) = (mean_t h_t/|h_t|) . (mean_v h_v/|h_v|)

so no residual vector is ever kept for more than one batch. (The reference code kept every
token's vector in Python lists; this is the fix.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CrossModalWeights:
    weights: torch.Tensor  # [d_sae] float32; NaN where the feature is not cross-modal
    n_text: torch.Tensor  # [d_sae] text positions in the feature's top pool
    n_image: torch.Tensor  # [d_sae] image positions in the feature's top pool
    pool_size: int
    k: int

    @property
    def has_weight(self) -> torch.Tensor:
        return ~torch.isnan(self.weights)

    @property
    def n_cross_modal(self) -> int:
        return int(self.has_weight.sum())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weights": self.weights, "n_text": self.n_text, "n_image": self.n_image,
                "params": torch.tensor([self.pool_size, self.k])}  # host: saved to storage

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> "CrossModalWeights":
        pool_size, k = (int(v) for v in t["params"])
        return cls(t["weights"], t["n_text"], t["n_image"], pool_size, k)

    def save(self, uri: str, storage_options: dict | None = None) -> str:
        return save_weights(self, uri, storage_options)

    @classmethod
    def load(cls, uri: str, storage_options: dict | None = None) -> "CrossModalWeights":
        return load_weights(uri, storage_options)


class CrossModalWeightsBuilder:
    """Feed the same token stream twice: `observe` for every chunk, `plan`, then `gather`."""

    def __init__(self, d_sae: int, pool_size: int = 30, k: int = 5, reservoir: int = 200_000, seed: int = 0,
                 sample_rate: float = 1 / 64):
        if k > pool_size:
            raise ValueError(f"k={k} per modality cannot exceed the pool size {pool_size}")
        self.d_sae, self.pool_size, self.k = d_sae, pool_size, k
        self.pool_act = torch.zeros(pool_size, d_sae)  # host: moved to the codes' device by _to_device
        self.pool_idx = torch.full((pool_size, d_sae), -1, dtype=torch.long)  # host: as above
        self.pool_img = torch.zeros(pool_size, d_sae, dtype=torch.bool)  # host: as above
        self.n_tokens = 0
        self.sample_offsets: list[int] = [0]
        self._reservoir = torch.empty(0)  # host: the quantile reservoir stays on the host
        self._reservoir_keys = torch.empty(0)  # host
        self._reservoir_cap = reservoir
        self._gen = torch.Generator().manual_seed(seed)
        self._sample_rate = sample_rate  # fraction of activations looked at for the quantile reservoir
        self._plan: dict | None = None
        self._gathered = 0

    # ---------------------------------------------------------------- pass 1
    @torch.no_grad()
    def observe(self, z: torch.Tensor, is_image: torch.Tensor, sample_lengths: list[int] | None = None) -> None:
        """z: [n, d_sae] feature activations of n consecutive tokens; is_image: [n] bool."""
        if self._plan is not None:
            raise RuntimeError("observe() after plan(): start a new builder for a new stream")
        n = z.shape[0]
        if n == 0:
            return
        if z.shape[1] != self.d_sae or is_image.shape != (n,):
            raise ValueError(f"shapes: z {tuple(z.shape)}, is_image {tuple(is_image.shape)}, d_sae {self.d_sae}")
        z = z.float()
        self._to_device(z.device)
        self._merge(*self._candidates(z, is_image.to(z.device, torch.bool)))
        self._update_reservoir(z)
        self.n_tokens += n
        if sample_lengths is not None:
            if sum(sample_lengths) != n:
                raise ValueError(f"sample_lengths sum to {sum(sample_lengths)}, chunk has {n} tokens")
            for length in sample_lengths:
                self.sample_offsets.append(self.sample_offsets[-1] + length)

    def _to_device(self, device: torch.device) -> None:
        """The pool follows the codes (the SAE's device) from the first chunk on."""
        if self.pool_act.device != device:
            self.pool_act, self.pool_idx, self.pool_img = (t.to(device) for t in
                                                           (self.pool_act, self.pool_idx, self.pool_img))

    def _candidates(self, z: torch.Tensor, is_image: torch.Tensor):
        """The entries of z that can still enter a pool, as (feature, rank, activation, token).

        Only z > the pool's last activation can: a tie with it loses to the pool's earlier token.
        Once the pool has warmed up that is a tiny fraction of z, so the candidates are listed
        sparsely and sorted by (feature, activation descending, token): exact, stable in ties,
        and with no sort of a [tokens x d_sae] array."""
        tok, feat = torch.nonzero(z > self.pool_act[-1], as_tuple=True)  # token-major order
        act = z[tok, feat]
        order = torch.sort(act, descending=True, stable=True).indices  # equal activations: earlier token first
        order = order[torch.sort(feat[order], stable=True).indices]
        tok, feat, act = tok[order], feat[order], act[order]
        counts = torch.bincount(feat, minlength=self.d_sae)
        rank = torch.arange(feat.numel(), device=z.device) - (torch.cumsum(counts, 0) - counts)[feat]
        keep = rank < self.pool_size
        tok, feat, act, rank = tok[keep], feat[keep], act[keep], rank[keep]
        return feat, rank, act, tok + self.n_tokens, is_image[tok]

    def _merge(self, feat, rank, act, idx, img) -> None:
        """Merge the candidates into the pools of the features they touch (pool rows first, so
        equal activations keep the earlier token, as a brute-force stable sort over all tokens would)."""
        touched = torch.unique(feat)
        if touched.numel() == 0:
            return
        col = torch.searchsorted(touched, feat)
        p, t = self.pool_size, touched.numel()
        c_act = torch.zeros(p, t, device=act.device)
        c_idx = torch.full((p, t), -1, dtype=torch.long, device=act.device)
        c_img = torch.zeros(p, t, dtype=torch.bool, device=act.device)
        c_act[rank, col], c_idx[rank, col], c_img[rank, col] = act, idx, img
        all_act = torch.cat([self.pool_act[:, touched], c_act])
        order = torch.sort(all_act, dim=0, descending=True, stable=True).indices[:p]
        new_act = torch.gather(all_act, 0, order)
        self.pool_act[:, touched] = new_act
        self.pool_idx[:, touched] = torch.where(
            new_act > 0, torch.gather(torch.cat([self.pool_idx[:, touched], c_idx]), 0, order), -1)
        self.pool_img[:, touched] = torch.gather(torch.cat([self.pool_img[:, touched], c_img]), 0, order) & (new_act > 0)

    def _update_reservoir(self, z: torch.Tensor) -> None:
        """Uniform sample of positive activations, for deltas given as quantiles: every entry of
        z is looked at with the same probability, and each kept value carries a uniform random
        key; the `cap` smallest keys survive (a reservoir), so every chunk weighs in equally."""
        n = z.numel()
        if self._sample_rate >= 1:
            vals = z.flatten()
        else:  # randomised rounding keeps the expected sample size exactly n * rate
            expected = n * self._sample_rate
            # host: CPU generator (same draw on every device)
            k = int(expected) + int(torch.rand(1, generator=self._gen) < expected - int(expected))
            # host: CPU generator
            vals = z.flatten()[torch.randint(0, n, (k,), generator=self._gen).to(z.device)]  # moved to z's device
        pos = vals[vals > 0].cpu()
        if pos.numel() == 0:
            return
        vals = torch.cat([self._reservoir, pos])
        # host: CPU generator
        keys = torch.cat([self._reservoir_keys, torch.rand(pos.numel(), generator=self._gen)])
        if vals.numel() > self._reservoir_cap:
            keep = torch.topk(keys, self._reservoir_cap, largest=False).indices
            vals, keys = vals[keep], keys[keep]
        self._reservoir, self._reservoir_keys = vals, keys

    def activation_quantile(self, q: float) -> float:
        """The q-quantile of positive feature activations seen in pass 1."""
        if self._reservoir.numel() == 0:
            raise ValueError("no positive activations observed")
        return float(torch.quantile(self._reservoir.double(), q))

    def resolve_delta(self, delta_quantile: float | None, delta: float | None) -> float:
        """The one delta rule (`scoring.weights`): the `delta_quantile` of the positive activations
        seen in pass 1 when it is set (it overrides `delta`), else the fixed `delta`."""
        if delta_quantile is not None:
            return self.activation_quantile(delta_quantile)
        if delta is None:
            raise ValueError("give delta or delta_quantile")
        return float(delta)

    # ------------------------------------------------------------------ plan
    def plan(self) -> None:
        k = self.k
        valid = self.pool_act > 0
        text = valid & ~self.pool_img
        image = valid & self.pool_img
        self.n_text = text.sum(0).cpu()
        self.n_image = image.sum(0).cpu()
        cross = (text.sum(0) >= k) & (image.sum(0) >= k)
        feats = torch.nonzero(cross).flatten()
        compact = torch.full((self.d_sae,), -1, dtype=torch.long, device=feats.device)
        compact[feats] = torch.arange(feats.numel(), device=feats.device)
        # the first k of each modality down the (activation-sorted) pool
        top_text = text & (torch.cumsum(text.long(), 0) <= k) & cross
        top_img = image & (torch.cumsum(image.long(), 0) <= k) & cross
        sel = top_text | top_img
        rows, cols = torch.nonzero(sel, as_tuple=True)
        g = self.pool_idx[rows, cols]
        order = torch.argsort(g)
        self._plan = {
            "feature": compact[cols[order]], "token": g[order], "is_image": self.pool_img[rows, cols][order],
            "n_cross": feats.numel(), "features": feats,
        }
        self._sum_text = None
        self._sum_img = None
        self._gathered = 0

    # ---------------------------------------------------------------- pass 2
    @torch.no_grad()
    def gather(self, acts: torch.Tensor) -> None:
        """acts: [n, d_in] residual vectors of the next n tokens, in pass-1 order."""
        if self._plan is None:
            raise RuntimeError("call plan() between the two passes")
        n = acts.shape[0]
        p = self._plan
        if self._sum_text is None:
            self._sum_text = torch.zeros(p["n_cross"], acts.shape[1], dtype=torch.float64,
                                          device=self.pool_act.device)
            self._sum_img = torch.zeros_like(self._sum_text)
        lo = torch.searchsorted(p["token"], self._gathered)
        hi = torch.searchsorted(p["token"], self._gathered + n)
        if hi > lo:
            tok = p["token"][lo:hi] - self._gathered
            h = acts[tok.to(acts.device)].to(self.pool_act.device, torch.float64)  # only the planned rows
            h = h / h.norm(dim=1, keepdim=True).clamp_min(1e-12)
            feat = p["feature"][lo:hi]
            img = p["is_image"][lo:hi]
            self._sum_text.index_add_(0, feat[~img], h[~img])
            self._sum_img.index_add_(0, feat[img], h[img])
        self._gathered += n

    def result(self) -> CrossModalWeights:
        if self._plan is None:
            raise RuntimeError("call plan() and gather() first")
        if self._gathered != self.n_tokens:
            raise RuntimeError(f"pass 2 saw {self._gathered} tokens, pass 1 saw {self.n_tokens}: streams differ")
        w = torch.full((self.d_sae,), float("nan"))  # host: the result, saved from the host
        if self._plan["n_cross"] > 0:
            per = ((self._sum_text / self.k) * (self._sum_img / self.k)).sum(1)
            w[self._plan["features"].cpu()] = per.float().cpu()
        return CrossModalWeights(w, self.n_text, self.n_image, self.pool_size, self.k)

    def pool_locations(self, feature: int) -> list[tuple[float, int, int, bool]]:
        """(activation, sample index, position in sample, is_image) of a feature's pool entries;
        needs `sample_lengths` to have been given to observe()."""
        offsets = torch.tensor(self.sample_offsets)  # host: offsets of a few pool entries
        out = []
        for a, g, im in zip(self.pool_act[:, feature].cpu(), self.pool_idx[:, feature].cpu(),
                            self.pool_img[:, feature].cpu()):
            if g < 0:
                continue
            s = int(torch.searchsorted(offsets, g, right=True)) - 1
            out.append((float(a), s, int(g - offsets[s]), bool(im)))
        return out


def brute_force_weights(z: torch.Tensor, acts: torch.Tensor, is_image: torch.Tensor, pool_size: int = 30,
                        k: int = 5) -> torch.Tensor:
    """All tokens at once, straight from the definition; for tests and small data only."""
    d_sae = z.shape[1]
    w = torch.full((d_sae,), float("nan"))  # host: test helper
    unit = acts.double() / acts.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    for f in range(d_sae):
        col = z[:, f]
        order = torch.sort(col, descending=True, stable=True).indices[:pool_size]
        order = order[col[order] > 0]
        t = [int(i) for i in order if not is_image[i]][:k]
        v = [int(i) for i in order if is_image[i]][:k]
        if len(t) < k or len(v) < k:
            continue
        w[f] = float((unit[t] @ unit[v].T).mean())
    return w


class PerModalityWeightsBuilder(CrossModalWeightsBuilder):
    """`pool="per_modality"`: each feature's top-k text and top-k image positions come from two
    separate pools, and the feature is cross-modal when the k-th largest of each is above
    `delta`. Under the joint pool (the paper's), a feature whose text activations outscale its
    image activations never gets k image positions into its top 30 although it fires on images.

    delta follows `resolve_delta` (a quantile of positive activations from this builder's own
    reservoir at `plan()`, else the fixed `delta`). The joint pool is still kept (its n_text /
    n_image counts are reported); only the choice of features and tokens differs."""

    def __init__(self, d_sae: int, pool_size: int = 30, k: int = 5, delta: float | None = None,
                 delta_quantile: float | None = None, **kwargs):
        super().__init__(d_sae, pool_size, k, **kwargs)
        if delta is None and delta_quantile is None:
            raise ValueError("per-modality pool: give delta or delta_quantile")
        self.delta, self.delta_quantile = delta, delta_quantile
        # host: moved to the codes' device in observe
        self.modal_act = torch.zeros(2, k, d_sae)  # [text, image] pools of the k largest activations
        self.modal_idx = torch.full((2, k, d_sae), -1, dtype=torch.long)  # host: as above

    @torch.no_grad()
    def observe(self, z: torch.Tensor, is_image: torch.Tensor, sample_lengths: list[int] | None = None) -> None:
        first = self.n_tokens
        super().observe(z, is_image, sample_lengths)
        z = z.float()
        if self.modal_act.device != z.device:  # the pools follow the codes, as the joint pool does
            self.modal_act, self.modal_idx = self.modal_act.to(z.device), self.modal_idx.to(z.device)
        img = is_image.to(z.device, torch.bool)
        for m, rows in enumerate((~img, img)):
            pos = torch.nonzero(rows).flatten()
            if pos.numel() == 0:
                continue
            act = torch.cat([self.modal_act[m], z[pos].float()])
            idx = torch.cat([self.modal_idx[m], (pos + first)[:, None].expand(-1, self.d_sae)])
            # stable: equal activations keep the earlier token
            order = torch.sort(act, dim=0, descending=True, stable=True).indices[: self.k]
            self.modal_act[m] = torch.gather(act, 0, order).clamp_min(0)
            self.modal_idx[m] = torch.where(self.modal_act[m] > 0, torch.gather(idx, 0, order), -1)

    def plan(self) -> None:
        super().plan()  # n_text / n_image of the joint pool, and a reset of the sums
        delta = self.plan_delta = self.resolve_delta(self.delta_quantile, self.delta)
        cross = (self.modal_act[0, -1] > delta) & (self.modal_act[1, -1] > delta)
        feats = torch.nonzero(cross).flatten()
        dev = feats.device
        compact = torch.full((self.d_sae,), -1, dtype=torch.long, device=dev)
        compact[feats] = torch.arange(feats.numel(), device=dev)
        feature, token, is_img = [], [], []
        for m in (0, 1):
            tok = self.modal_idx[m][:, feats]  # [k, n_cross]
            feature.append(compact[feats].expand(self.k, -1).reshape(-1))
            token.append(tok.reshape(-1))
            is_img.append(torch.full((tok.numel(),), bool(m), device=dev))
        feature, token, is_img = torch.cat(feature), torch.cat(token), torch.cat(is_img)
        order = torch.argsort(token, stable=True)
        self._plan = {"feature": feature[order], "token": token[order], "is_image": is_img[order],
                      "n_cross": feats.numel(), "features": feats}


def save_weights(weights: CrossModalWeights, uri: str, storage_options: dict | None = None) -> str:
    """Write the weights as safetensors to a local path or an object-storage URI."""
    from safetensors.torch import save

    from saev_core.data import storage

    storage.write_bytes(uri, save({k: v.contiguous() for k, v in weights.to_tensors().items()}), storage_options)
    return uri


def load_weights(uri: str, storage_options: dict | None = None) -> CrossModalWeights:
    from safetensors.torch import load

    from saev_core.data import storage

    return CrossModalWeights.from_tensors(load(storage.read_bytes(uri, storage_options)))
