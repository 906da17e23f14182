"""Feature dashboards, collected in one streaming pass with bounded memory.

`DashboardCollector` sees samples one at a time (SAE codes, modality mask, token ids) and keeps:

- for every feature: how many text / image positions it is active on (density per modality);
- for each feature it is asked to follow (a fixed list, e.g. the top cross-modal features):
  its `n_text` best text positions (at most one per sample) with a window of `context`
  positions either side (token ids and the feature's activation there), and its `n_images`
  best samples by image activation with the activation of every image position of that sample
  (for the heatmap over the original picture).

Everything is held in fixed-size arrays ([features, slots, ...]); a slot is replaced only by a
stronger example. The state therefore does not grow with the number of samples scanned; the
only variable part is one per-position vector per image slot, bounded by slots x the largest
image-position count. Images and texts themselves are not kept: the renderer fetches the few
samples it shows by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


@dataclass
class TextExample:
    sample_id: str
    position: int  # position of the top token in the sample
    activation: float
    token_ids: list[int]  # the context window; -1 = outside the sample
    acts: list[float]  # the feature's activation at each window position
    is_image: list[bool]
    center: int  # index of the top token inside the window
    tokens: list[str] = field(default_factory=list)  # filled in by `result(tokenizer=...)`


@dataclass
class ImageExample:
    sample_id: str
    activation: float  # max over the sample's image positions
    token_acts: np.ndarray  # [n_image_positions] float32, sequence order


@dataclass
class FeatureDashboard:
    feature: int
    weight: float | None  # cross-modal weight w_k (None: not cross-modal)
    density: float  # fraction of all positions where the feature is active
    density_text: float
    density_image: float
    n_text_pool: int | None  # text / image positions in the weights' top pool
    n_image_pool: int | None
    top_text: list[TextExample]
    top_images: list[ImageExample]

    @property
    def top_words(self) -> list[str]:
        return [ex.tokens[ex.center] for ex in self.top_text if ex.tokens]


class DashboardCollector:
    def __init__(self, d_sae: int, features: Sequence[int], n_text: int = 8, n_images: int = 6,
                 context: int = 6, threshold: float = 0.0):
        feats = [int(f) for f in features]
        if len(set(feats)) != len(feats):
            raise ValueError("features must be distinct")
        bad = [f for f in feats if not 0 <= f < d_sae]
        if bad:
            raise ValueError(f"features {bad} are outside the SAE's {d_sae} features")
        self.d_sae, self.features = d_sae, feats
        self.n_text, self.n_images, self.context, self.threshold = n_text, n_images, context, threshold
        F, W = len(feats), 2 * context + 1
        self._fidx = torch.tensor(feats, dtype=torch.long)
        self.active_text = torch.zeros(d_sae, dtype=torch.long)
        self.active_image = torch.zeros(d_sae, dtype=torch.long)
        self.n_text_positions = 0
        self.n_image_positions = 0
        self.n_samples = 0
        # text slots (numpy: these arrays are tiny, and numpy has no thread start-up per call),
        # sorted by activation descending within each feature; activation 0 = empty slot
        self.t_act = np.zeros((F, n_text), np.float32)
        self.t_pos = np.full((F, n_text), -1, np.int64)
        self.t_ids = np.full((F, n_text, W), -1, np.int64)
        self.t_ctx = np.zeros((F, n_text, W), np.float32)
        self.t_img = np.zeros((F, n_text, W), bool)
        self.t_sid = np.full((F, n_text), None, dtype=object)
        # image slots
        self.i_act = np.zeros((F, n_images), np.float32)
        self.i_sid = np.full((F, n_images), None, dtype=object)
        self.i_tok = np.full((F, n_images), None, dtype=object)

    # ------------------------------------------------------------ streaming
    @torch.no_grad()
    def observe(self, sample_id: str, z: torch.Tensor, is_image: torch.Tensor, input_ids: torch.Tensor) -> None:
        """One sample: z [n, d_sae] SAE codes of its positions, is_image [n], input_ids [n]."""
        z = torch.as_tensor(z).float()
        img = torch.as_tensor(is_image).bool()
        ids = torch.as_tensor(input_ids).long()
        n = z.shape[0]
        if z.shape[1] != self.d_sae or img.shape != (n,) or ids.shape != (n,):
            raise ValueError(f"shapes: z {tuple(z.shape)}, is_image {tuple(img.shape)}, input_ids "
                             f"{tuple(ids.shape)}, d_sae {self.d_sae}")
        active = z > self.threshold
        self.active_text += active[~img].sum(0)
        self.active_image += active[img].sum(0)
        n_img = int(img.sum())
        self.n_text_positions += n - n_img
        self.n_image_positions += n_img
        self.n_samples += 1
        if not self.features or n == 0:
            return
        zf = z[:, self._fidx].numpy()  # [n, F]
        m = img.numpy()
        if n_img < n:
            self._observe_text(sample_id, zf, m, ids.numpy())
        if n_img:
            self._observe_image(sample_id, zf[m])

    def _observe_text(self, sample_id: str, zf: np.ndarray, img: np.ndarray, ids: np.ndarray) -> None:
        n, F = zf.shape
        zt = np.where(img[:, None], -np.inf, zf)
        pos = zt.argmax(0)  # first maximum: the earliest position on ties
        vals = zt[pos, np.arange(F)]
        better = (vals > 0) & (vals > self.t_act[:, -1])
        if not better.any():
            return
        win = pos[:, None] + np.arange(-self.context, self.context + 1)[None, :]  # [F, W]
        inside = (win >= 0) & (win < n)
        wc = win.clip(0, n - 1)
        c_ids = np.where(inside, ids[wc], -1)
        c_act = np.where(inside, zf[wc, np.arange(F)[:, None]], 0.0).astype(np.float32)
        c_img = inside & img[wc]
        act = np.concatenate([self.t_act, np.where(better, vals, 0.0).astype(np.float32)[:, None]], 1)
        order = np.argsort(-act, axis=1, kind="stable")[:, : self.n_text]
        self.t_act = np.take_along_axis(act, order, 1)
        self.t_pos = np.take_along_axis(np.concatenate([self.t_pos, pos[:, None]], 1), order, 1)
        for name, new in (("t_ids", c_ids), ("t_ctx", c_act), ("t_img", c_img)):
            both = np.concatenate([getattr(self, name), new[:, None, :]], 1)
            setattr(self, name, np.take_along_axis(both, order[:, :, None], 1))
        sids = np.concatenate([self.t_sid, np.full((F, 1), sample_id, dtype=object)], 1)
        self.t_sid = np.take_along_axis(sids, order, 1)

    def _observe_image(self, sample_id: str, zi: np.ndarray) -> None:
        vals = zi.max(0)  # [F]
        for f in np.nonzero((vals > 0) & (vals > self.i_act[:, -1]))[0]:
            row = self.i_act[f]
            k = int(np.sum(row >= vals[f]))  # after equal activations: earlier samples stay first
            self.i_act[f, k + 1:] = row[k:-1].copy()
            self.i_act[f, k] = vals[f]
            self.i_sid[f, k + 1:] = self.i_sid[f, k:-1].copy()
            self.i_sid[f, k] = sample_id
            self.i_tok[f, k + 1:] = self.i_tok[f, k:-1].copy()
            self.i_tok[f, k] = zi[:, f].astype(np.float32).copy()

    # -------------------------------------------------------------- results
    def state_nbytes(self) -> int:
        """Bytes held by the collector's state (tensors, per-slot arrays, sample-id strings)."""
        total = sum(t.element_size() * t.nelement() for t in (self.active_text, self.active_image))
        total += sum(a.nbytes for a in (self.t_act, self.t_pos, self.t_ids, self.t_ctx, self.t_img, self.i_act))
        total += self.t_sid.nbytes + self.i_sid.nbytes + self.i_tok.nbytes
        for arr in self.i_tok.flat:
            total += 0 if arr is None else arr.nbytes
        for s in list(self.t_sid.flat) + list(self.i_sid.flat):
            total += 0 if s is None else len(s)
        return int(total)

    def sample_ids(self) -> set[str]:
        """Ids of every sample an example slot (text or image) refers to."""
        return {s for s in list(self.t_sid.flat) + list(self.i_sid.flat) if s is not None}

    def density(self) -> dict[str, torch.Tensor]:
        n_t, n_i = max(self.n_text_positions, 1), max(self.n_image_positions, 1)
        n_all = max(self.n_text_positions + self.n_image_positions, 1)
        return {"all": (self.active_text + self.active_image).double() / n_all,
                "text": self.active_text.double() / n_t, "image": self.active_image.double() / n_i}

    def result(self, weights=None, tokenizer=None) -> dict[int, FeatureDashboard]:
        """One dashboard per followed feature. `weights`: CrossModalWeights (optional);
        `tokenizer`: anything with convert_ids_to_tokens, to spell the context windows."""
        dens = self.density()
        out: dict[int, FeatureDashboard] = {}
        for i, f in enumerate(self.features):
            texts = []
            for s in range(self.n_text):
                if self.t_sid[i, s] is None or float(self.t_act[i, s]) <= 0:
                    continue
                ids = self.t_ids[i, s].tolist()
                ex = TextExample(self.t_sid[i, s], int(self.t_pos[i, s]), float(self.t_act[i, s]), ids,
                                 self.t_ctx[i, s].tolist(), self.t_img[i, s].tolist(), self.context)
                if tokenizer is not None:
                    ex.tokens = [tokenizer.convert_ids_to_tokens(t) if t >= 0 else "" for t in ids]
                texts.append(ex)
            images = [ImageExample(self.i_sid[i, s], float(self.i_act[i, s]), self.i_tok[i, s])
                      for s in range(self.n_images) if self.i_sid[i, s] is not None]
            w = nt = ni = None
            if weights is not None:
                wf = float(weights.weights[f])
                w = None if np.isnan(wf) else wf
                nt, ni = int(weights.n_text[f]), int(weights.n_image[f])
            out[f] = FeatureDashboard(f, w, float(dens["all"][f]), float(dens["text"][f]), float(dens["image"][f]),
                                      nt, ni, texts, images)
        return out
