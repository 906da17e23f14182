"""What a patch geometry is and what it is for: the box of the original image that each image
position of one sample covers (:class:`ImageGeometry`), and the maps made from per-position values
(a heatmap, the coverage of a mask, the pixels kept by a set of positions).

How the boxes are derived from a model family's config and processor is
:mod:`saev_core.model.patches`, one builder per layout; they all fill a :class:`GeometryBuilder`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = ["PATCH", "NEWLINE", "EXTRA", "GeometryError", "ImageGeometry", "GeometryBuilder", "top_fraction"]

PATCH, NEWLINE, EXTRA = 0, 1, 2  # kinds of image positions


class GeometryError(ValueError):
    """A model layout, image or token count that the geometry cannot map to pixels."""


@dataclass
class ImageGeometry:
    """Where each image position of one image lies in that image (pixels, x right, y down)."""

    height: int
    width: int
    boxes: np.ndarray  # [n, 4] float64 (x0, y0, x1, y1), x1/y1 exclusive; NaN for non-patch positions
    kinds: np.ndarray  # [n] int8: PATCH, NEWLINE or EXTRA
    views: np.ndarray  # [n] int16: index into view_names; -1 for non-patch positions
    view_names: tuple[str, ...]
    family: str
    _ranges: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_tokens(self) -> int:
        return int(self.kinds.shape[0])

    @property
    def is_patch(self) -> np.ndarray:
        return self.kinds == PATCH

    def pixel_ranges(self) -> np.ndarray:
        """[n, 4] int (row0, row1, col0, col1) of the pixels whose centres lie in each box
        (at least the pixel under the box centre); -1 rows for non-patch positions."""
        if self._ranges is None:
            r = np.full((self.n_tokens, 4), -1, dtype=np.int64)
            p = self.is_patch
            b = self.boxes[p]
            c0 = np.clip(np.ceil(b[:, 0] - 0.5), 0, self.width).astype(np.int64)
            c1 = np.clip(np.ceil(b[:, 2] - 0.5), 0, self.width).astype(np.int64)
            r0 = np.clip(np.ceil(b[:, 1] - 0.5), 0, self.height).astype(np.int64)
            r1 = np.clip(np.ceil(b[:, 3] - 0.5), 0, self.height).astype(np.int64)
            cx = np.clip(np.floor((b[:, 0] + b[:, 2]) / 2), 0, self.width - 1).astype(np.int64)
            cy = np.clip(np.floor((b[:, 1] + b[:, 3]) / 2), 0, self.height - 1).astype(np.int64)
            empty_c, empty_r = c1 <= c0, r1 <= r0
            c0[empty_c], c1[empty_c] = cx[empty_c], cx[empty_c] + 1
            r0[empty_r], r1[empty_r] = cy[empty_r], cy[empty_r] + 1
            r[p] = np.stack([r0, r1, c0, c1], 1)
            self._ranges = r
        return self._ranges

    def _check(self, values) -> np.ndarray:
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if v.shape[0] != self.n_tokens:
            raise GeometryError(f"{v.shape[0]} values for {self.n_tokens} image positions of this image")
        return v

    def view_maps(self, values) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per view: (mean value per pixel [H, W], pixels covered [H, W] bool)."""
        v = self._check(values)
        ranges = self.pixel_ranges()
        out = []
        for vi in range(len(self.view_names)):
            acc = np.zeros((self.height, self.width))
            cnt = np.zeros((self.height, self.width))
            for j in np.nonzero(self.views == vi)[0]:
                r0, r1, c0, c1 = ranges[j]
                acc[r0:r1, c0:c1] += v[j]
                cnt[r0:r1, c0:c1] += 1
            covered = cnt > 0
            out.append((np.divide(acc, cnt, out=np.zeros_like(acc), where=covered), covered))
        return out

    def heatmap(self, values, view: int | str | None = None) -> np.ndarray:
        """[H, W] float32 map of per-position `values` (non-patch positions ignored). With several
        views (base + high-res, crops + global) the map is the mean over the views covering a
        pixel, unless `view` picks one."""
        maps = self.view_maps(values)
        if view is not None:
            idx = self.view_names.index(view) if isinstance(view, str) else int(view)
            return maps[idx][0].astype(np.float32)
        total = np.zeros((self.height, self.width))
        n = np.zeros((self.height, self.width))
        for m, covered in maps:
            total += np.where(covered, m, 0.0)
            n += covered
        return np.divide(total, n, out=np.zeros_like(total), where=n > 0).astype(np.float32)

    def coverage(self, mask: np.ndarray) -> np.ndarray:
        """[n] fraction of each position's pixels inside the bool [H, W] `mask` (NaN: not a patch)."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.height, self.width):
            raise GeometryError(f"mask shape {mask.shape} is not the image's {(self.height, self.width)}")
        out = np.full(self.n_tokens, np.nan)
        for j, (r0, r1, c0, c1) in enumerate(self.pixel_ranges()):
            if r0 >= 0:
                out[j] = float(mask[r0:r1, c0:c1].mean())
        return out

    def keep_mask(self, keep) -> np.ndarray:
        """[H, W] bool: pixels covered by at least one kept patch position."""
        keep = np.asarray(keep, dtype=bool).reshape(-1)
        if keep.shape[0] != self.n_tokens:
            raise GeometryError(f"{keep.shape[0]} keep flags for {self.n_tokens} image positions")
        out = np.zeros((self.height, self.width), dtype=bool)
        ranges = self.pixel_ranges()
        for j in np.nonzero(keep & self.is_patch)[0]:
            r0, r1, c0, c1 = ranges[j]
            out[r0:r1, c0:c1] = True
        return out


class GeometryBuilder:
    """Accumulates positions in sequence order."""

    def __init__(self):
        self.boxes: list[tuple[float, float, float, float]] = []
        self.kinds: list[int] = []
        self.views: list[int] = []

    def patch(self, box, view: int) -> None:
        self.boxes.append(tuple(float(v) for v in box))
        self.kinds.append(PATCH)
        self.views.append(view)

    def other(self, kind: int) -> None:
        self.boxes.append((math.nan,) * 4)
        self.kinds.append(kind)
        self.views.append(-1)

    def build(self, height, width, view_names, family) -> ImageGeometry:
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        # a feature cell may reach a little into the processor's padding (rounding in the model's
        # unpadding): its region of the image is the part inside the image
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, float(width))
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, float(height))
        return ImageGeometry(int(height), int(width), boxes, np.asarray(self.kinds, dtype=np.int8),
                             np.asarray(self.views, dtype=np.int16), tuple(view_names), family)


def top_fraction(scores: Sequence[float], fraction: float, eligible=None, seed: int = 0) -> np.ndarray:
    """Bool mask of the round(fraction * n) highest-scoring eligible positions (random tie-break)."""
    s = np.asarray(scores, dtype=np.float64)
    ok = np.ones_like(s, dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    idx = np.nonzero(ok)[0]
    k = int(round(fraction * idx.size))
    rng = np.random.default_rng(seed)
    jitter = rng.permutation(idx.size)
    order = np.lexsort((jitter, -s[idx]))  # by score descending, ties in random order
    keep = np.zeros_like(ok)
    keep[idx[order[:k]]] = True
    return keep
