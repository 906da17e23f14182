"""How good is the SAE: reconstruction statistics and next-token loss with the SAE spliced in.

`ReconstructionStats` accumulates over batches (constant memory) and reports per modality.
`spliced_ce` compares the clean model, the SAE reconstruction and zero-ablation at the hooked
layer, replacing only image positions, only text positions, or all of them, and always scoring
text targets (predicting an image placeholder is not a meaningful loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from saev_core.model.budget import sample_lengths, token_batches
from saev_core.model.mllm import MLLMAdapter


@dataclass
class _Acc:
    n: int = 0
    sq_err: float = 0.0
    sum_x: torch.Tensor | None = None
    sum_sq: float = 0.0
    l0: float = 0.0

    def add(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        x = x.double()
        self.n += x.shape[0]
        self.sq_err += float(((x - x_hat.double()) ** 2).sum())
        s = x.sum(0)
        self.sum_x = s if self.sum_x is None else self.sum_x + s
        self.sum_sq += float((x ** 2).sum())
        self.l0 += float((z > 0).sum())

    def report(self) -> dict[str, float]:
        if self.n == 0:
            return {"n_positions": 0}
        # total variance around the mean, from running sums
        var = self.sum_sq - float((self.sum_x ** 2).sum()) / self.n
        return {"n_positions": self.n, "mse": self.sq_err / self.n,
                "explained_variance": 1.0 - self.sq_err / var if var > 0 else float("nan"),
                "l0": self.l0 / self.n}


@dataclass
class ReconstructionStats:
    d_sae: int
    parts: dict[str, _Acc] = field(default_factory=lambda: {"all": _Acc(), "image": _Acc(), "text": _Acc()})
    fired: torch.Tensor | None = None

    @torch.no_grad()
    def add(self, sae, acts: torch.Tensor, is_image: torch.Tensor) -> None:
        dev = next(sae.parameters()).device
        x = acts.to(dev, sae.dtype)
        z = sae.encode(x)
        x_hat = sae.decode(z).float().cpu()
        z = z.float().cpu()
        acts = acts.float()
        img = is_image.bool()
        self.parts["all"].add(acts, x_hat, z)
        self.parts["image"].add(acts[img], x_hat[img], z[img])
        self.parts["text"].add(acts[~img], x_hat[~img], z[~img])
        f = (z > 0).any(0)
        self.fired = f if self.fired is None else self.fired | f

    def report(self) -> dict:
        out = {name: acc.report() for name, acc in self.parts.items()}
        out["dead_fraction"] = float(1 - self.fired.float().mean()) if self.fired is not None else float("nan")
        return out


@torch.no_grad()
def spliced_ce(adapter: MLLMAdapter, sae, images: Sequence, prompts: Sequence[str],
               responses: Sequence[str], batch_size: int = 8, batch_tokens: int = 8192) -> dict[str, float]:
    """Mean next-token CE on text targets for: clean, and {sae, zero} x {all, image, text}.
    Forwards run in token-bounded batches (saev_core.model.budget); the means are over all
    target tokens of all samples."""
    lengths = sample_lengths(adapter, images, prompts, responses)
    sums: dict[str, float] = {}
    count = 0
    for group in token_batches(lengths, batch_size, batch_tokens):
        part, n = _spliced_ce_sums(adapter, sae, [images[i] for i in group], [prompts[i] for i in group],
                                   [responses[i] for i in group])
        for k, v in part.items():
            sums[k] = sums.get(k, 0.0) + v
        count += n
    return {k: v / count if count else float("nan") for k, v in sums.items()}


def _spliced_ce_sums(adapter: MLLMAdapter, sae, images, prompts, responses) -> tuple[dict[str, float], int]:
    batch = adapter.build_inputs(images, prompts, responses)
    ids = batch["input_ids"]
    mask = batch["attention_mask"].bool()
    is_image = ids == adapter.image_token_id
    # target t+1 must be a real text token
    target_ok = (mask & ~is_image)[:, 1:]
    dev = next(sae.parameters()).device

    def ce(logits: torch.Tensor) -> float:
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll = -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        return float(nll[target_ok].sum())

    out = {"clean": ce(adapter.logits(batch))}
    where = {"all": mask, "image": mask & is_image, "text": mask & ~is_image}
    for kind in ("sae", "zero"):
        for part, pos in where.items():
            def replace(h: torch.Tensor, pos=pos, kind=kind) -> torch.Tensor:
                if kind == "zero":
                    new = torch.zeros_like(h)
                else:
                    new = sae.decode(sae.encode(h.to(dev, sae.dtype))).to(h.device, h.dtype)
                return torch.where(pos[..., None], new, h)

            with adapter.splice(replace):
                out[f"{kind}_{part}"] = ce(adapter.logits(batch))
    return out, int(target_ok.sum())
