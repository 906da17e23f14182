"""Patch geometry: which pixels of the ORIGINAL image each image-token position stands for.

The MLLM adapter marks a sample's image positions (`is_image`); this module says, for each of
them in sequence order, which rectangle of the image the user gave it covers, so per-token
values (a feature's activation, a patch score) become a heatmap over the original picture.

Everything is derived from the model's config and its processor, never from fixed counts:

- LLaVA (`llava`): one square grid of `vision_config.image_size / patch_size` per side, after the
  image processor's resize (shortest edge or fixed size) and centre crop; a CLS position first
  when `vision_feature_select_strategy == "full"` (it covers no patch).
- LLaVA-NeXT (`llava_next`, anyres): the base grid (the whole image squashed to the processor's
  size, then centre-cropped) and then the high-resolution grid: the image is resized into the
  best of `image_grid_pinpoints` keeping its aspect, padded to it, cut into tiles, the tiles'
  grids are joined, the padding rows/columns are removed again (the model's `unpad_image`), and
  each remaining row is followed by one `image_newline` position, which covers no patch.
- Idefics3 (`idefics3`): with image splitting, `rows x cols` crops (row-major) that tile the
  resized image, then one global view of the whole image; each view holds `image_seq_len`
  positions, a row-major grid of `scale_factor x scale_factor` blocks of vision patches
  (the connector's pixel shuffle). Without splitting, only the global view.
- Chameleon (`chameleon`): the resized + centre-cropped image's VQ-GAN code grid,
  vq_config.resolution / 2^(len(channel_multiplier) - 1) codes per side, row-major.
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the image smart-resized to a multiple of patch x merge
  (the grid is read back from the image processor's `image_grid_thw`), one position per
  merge x merge block of patches, row-major over the whole (squashed) image.
- Gemma 3 (`gemma3`): the image squashed to the vision size, its patch grid average-pooled to
  sqrt(mm_tokens_per_image) positions per side. Pan-and-scan crops are not mapped.
- LLaVA-OneVision (`llava_onevision`): LLaVA-NeXT's layout (SigLIP, no CLS), plus the model's
  `anyres_max_N` rule that bilinearly shrinks a large unpadded grid.
- InternVL (`internvl`): rows x cols tiles of the image resized to the tile grid (row-major),
  then a thumbnail of the whole image when there are several tiles; each tile's patch grid is
  pixel-shuffled by `downsample_ratio`.

Which family uses which layout is its `geometry` entry in the family registry
(`saev_core.model.families`); this module holds one builder per `Layout`, each filling a
`GeometryBuilder` into an `ImageGeometry` (`saev_core.model.image_geometry`). Other model types, and
registered families without geometry, raise `GeometryError` naming the model type and why, rather
than draw a wrong picture.
"""

from __future__ import annotations

import math
from typing import Any

from saev_core.model.families import FAMILIES, Layout, NoGeometry
from saev_core.model.image_geometry import EXTRA, NEWLINE, GeometryBuilder, GeometryError, ImageGeometry

# the registered families whose image positions are mapped (derived from the one family registry)
SUPPORTED_FAMILIES = tuple(t for t, f in FAMILIES.items() if isinstance(f.geometry, Layout))
# layouts whose vision tower sees fixed square views of vision_config.image_size pixels
_VISION_GRID_LAYOUTS = (Layout.CLIP_GRID, Layout.ANYRES, Layout.ANYRES_MAX, Layout.CROPS_GLOBAL,
                        Layout.POOLED_GRID, Layout.TILES_THUMBNAIL)


def _get(obj: Any, key: str, default=None):
    """Read a field of a processor size (plain dict or SizeDict)."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _side(value) -> int:
    """A square size given as an int or as [h, w] (InternVL); 0 when missing or not square."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if len(value) == 2 and value[0] == value[1] else 0
    return int(value or 0)


def _grid_boxes(b: GeometryBuilder, x0: float, y0: float, x1: float, y1: float, rows: int, cols: int,
               view: int) -> None:
    """A row-major rows x cols grid of equal boxes tiling the rectangle (x0, y0)-(x1, y1)."""
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    for r in range(rows):
        for c in range(cols):
            b.patch((x0 + c * cw, y0 + r * ch, x0 + (c + 1) * cw, y0 + (r + 1) * ch), view)


def _shortest_edge_size(height: int, width: int, shortest: int) -> tuple[int, int]:
    """Output (h, w) of a shortest-edge resize that keeps the aspect ratio (transformers' rule)."""
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = shortest, int(shortest * long / short)
    return (new_short, new_long) if height <= width else (new_long, new_short)


def _crop_offsets(size_hw: tuple[int, int], crop_hw: tuple[int, int]) -> tuple[float, float]:
    """(top, left) of a centre crop inside an image of size_hw; negative when the crop pads."""
    (h, w), (ch, cw) = size_hw, crop_hw
    top = int((h - ch) / 2.0) if h >= ch else -((ch - h) // 2)
    left = int((w - cw) / 2.0) if w >= cw else -((cw - w) // 2)
    return float(top), float(left)


class PatchGeometry:
    """The image-position layout of one model family, built from its config and processor."""

    def __init__(self, config, processor):
        self.config = config
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", None)
        self.family = getattr(config, "model_type", "")
        registered = FAMILIES.get(self.family)
        if registered is None:
            raise GeometryError(
                f"no patch geometry for model type {self.family!r}: supported are {', '.join(SUPPORTED_FAMILIES)}")
        if isinstance(registered.geometry, NoGeometry):
            raise GeometryError(f"no patch geometry for model type {self.family!r}: {registered.geometry.reason}; "
                                f"supported are {', '.join(SUPPORTED_FAMILIES)}")
        self.layout: Layout = registered.geometry
        if self.image_processor is None:
            raise GeometryError(f"processor {type(processor).__name__} has no image_processor")
        self.vision_size = self.patch_size = 0
        if self.layout in _VISION_GRID_LAYOUTS:
            vc = getattr(config, "vision_config", None)
            size, patch = _side(getattr(vc, "image_size", None)), _side(getattr(vc, "patch_size", None))
            if not size or not patch:
                raise GeometryError(f"{self.family} config lacks vision_config.image_size/patch_size")
            self.vision_size, self.patch_size = size, patch
        self._cache: dict[tuple[int, int], ImageGeometry] = {}

    @classmethod
    def from_adapter(cls, adapter) -> "PatchGeometry":
        return cls(adapter.model.config, adapter.processor)

    @classmethod
    def from_pretrained(cls, model_id: str, revision: str | None = None,
                        trust_remote_code: bool = False) -> "PatchGeometry":
        """Config + processor only: no weights are loaded."""
        from transformers import AutoConfig

        from saev_core.model.families import load_processor

        cfg = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
        proc = load_processor(model_id, cfg.model_type, revision=revision, trust_remote_code=trust_remote_code)
        return cls(cfg, proc)

    # ------------------------------------------------------------------ API
    def for_image(self, width: int, height: int, n_tokens: int | None = None) -> ImageGeometry:
        """The geometry of one image of this size; `n_tokens` (the sample's image-position count)
        is checked against it, so a processor/config mismatch fails loudly."""
        if width <= 0 or height <= 0:
            raise GeometryError(f"bad image size {width}x{height}")
        key = (int(width), int(height))
        if key not in self._cache:
            self._cache[key] = _BUILDERS[self.layout](self, int(height), int(width))
        geo = self._cache[key]
        if n_tokens is not None and n_tokens != geo.n_tokens:
            raise GeometryError(
                f"{self.family}: the sample has {n_tokens} image positions but the geometry of a "
                f"{width}x{height} image has {geo.n_tokens}; the processor settings and the model config disagree "
                "or the sample holds more than one image")
        return geo

    # -------------------------------------------------------------- helpers
    def _strategy(self) -> str:
        s = getattr(self.config, "vision_feature_select_strategy", "default")
        if s not in ("default", "full"):
            raise GeometryError(f"{self.family}: unknown vision_feature_select_strategy {s!r}")
        return s

    def _processed_frame(self, height: int, width: int) -> tuple[tuple[int, int], tuple[float, float], tuple[int, int]]:
        """CLIP-style resize + centre crop: (resized (h, w), crop (top, left), crop (h, w))."""
        ip = self.image_processor
        size = getattr(ip, "size", None)
        resized = (height, width)
        if getattr(ip, "do_resize", True):
            if _get(size, "shortest_edge"):
                resized = _shortest_edge_size(height, width, int(_get(size, "shortest_edge")))
            elif _get(size, "height") and _get(size, "width"):
                resized = (int(_get(size, "height")), int(_get(size, "width")))
            else:
                raise GeometryError(f"{self.family}: unsupported image processor size {size!r}")
        crop = resized
        offset = (0.0, 0.0)
        if getattr(ip, "do_center_crop", False):
            cs = getattr(ip, "crop_size", None)
            crop = (int(_get(cs, "height")), int(_get(cs, "width")))
            offset = _crop_offsets(resized, crop)
        return resized, offset, crop

    def _grid(self) -> int:
        if self.vision_size % self.patch_size:
            raise GeometryError(f"vision image_size {self.vision_size} is not a multiple of patch_size {self.patch_size}")
        return self.vision_size // self.patch_size

    # --------------------------------------------------------------- LLaVA
    def _llava(self, height: int, width: int) -> ImageGeometry:
        g = self._grid()
        resized, (top, left), crop = self._processed_frame(height, width)
        if crop != (self.vision_size, self.vision_size):
            raise GeometryError(f"llava: the processor yields {crop[1]}x{crop[0]} pixels but the vision tower "
                                f"expects {self.vision_size}x{self.vision_size}; unsupported layout")
        sy, sx = height / resized[0], width / resized[1]
        cell = self.vision_size / g
        b = GeometryBuilder()
        if self._strategy() == "full":
            b.other(EXTRA)  # the vision tower's CLS position
        for r in range(g):
            for c in range(g):
                b.patch(((left + c * cell) * sx, (top + r * cell) * sy,
                         (left + (c + 1) * cell) * sx, (top + (r + 1) * cell) * sy), 0)
        return b.build(height, width, ("image",), self.family)

    # ---------------------------------------------------------- LLaVA-NeXT
    def _llava_next(self, height: int, width: int) -> ImageGeometry:
        from transformers.image_processing_utils import select_best_resolution

        # LLaVA-NeXT drops CLIP's CLS ("default"); OneVision's SigLIP has none and the model itself
        # checks that each view gives exactly (image_size / patch_size)^2 features
        if self.layout is Layout.ANYRES and self._strategy() != "default":
            raise GeometryError("llava_next: only vision_feature_select_strategy='default' is supported")
        pinpoints = getattr(self.config, "image_grid_pinpoints", None)
        if not pinpoints:
            raise GeometryError("llava_next: config has no image_grid_pinpoints")
        ip = self.image_processor
        if getattr(ip, "image_grid_pinpoints", pinpoints) and \
                [list(p) for p in getattr(ip, "image_grid_pinpoints", pinpoints)] != [list(p) for p in pinpoints]:
            raise GeometryError("llava_next: processor and model config disagree on image_grid_pinpoints")
        g = self._grid()
        V = self.vision_size
        size = getattr(ip, "size", None)
        if _get(size, "height") and _get(size, "width"):
            base_hw = (int(_get(size, "height")), int(_get(size, "width")))
        elif _get(size, "shortest_edge"):
            s = int(_get(size, "shortest_edge"))
            base_hw = (s, s)
        else:
            raise GeometryError(f"llava_next: unsupported image processor size {size!r}")
        cs = getattr(ip, "crop_size", None)
        tile = int(_get(cs, "height")) if _get(cs, "height") else base_hw[0]
        # every processed view (base image, tile) goes through resize(size) then centre crop
        crop = (int(_get(cs, "height")), int(_get(cs, "width"))) if getattr(ip, "do_center_crop", False) else None

        def view_frame(hw):
            """(resized hw, crop offset, final hw) of a view of size hw after resize(size) + crop."""
            res = hw
            if getattr(ip, "do_resize", True):
                res = _shortest_edge_size(hw[0], hw[1], int(_get(size, "shortest_edge"))) \
                    if _get(size, "shortest_edge") else base_hw
            if crop is None:
                return res, (0.0, 0.0), res
            return res, _crop_offsets(res, crop), crop

        b = GeometryBuilder()
        # base view: the whole image squashed to base_hw
        res, (top, left), final = view_frame(base_hw)
        if final != (V, V):
            raise GeometryError(f"llava_next: processed base view is {final}, vision tower expects {(V, V)}")
        sy, sx = height / res[0], width / res[1]
        cell = V / g
        for r in range(g):
            for c in range(g):
                b.patch(((left + c * cell) * sx, (top + r * cell) * sy,
                         (left + (c + 1) * cell) * sx, (top + (r + 1) * cell) * sy), 0)
        # high-resolution view
        best_h, best_w = select_best_resolution((height, width), pinpoints)
        if best_h % tile or best_w % tile:
            raise GeometryError(f"llava_next: pinpoint {(best_h, best_w)} is not a multiple of the tile {tile}")
        # the model counts tiles with vision_config.image_size; the processor cuts tiles of crop height
        if tile != V:
            raise GeometryError(f"llava_next: processor tiles of {tile} px but vision image_size {V}")
        nth, ntw = best_h // V, best_w // V
        t_res, (t_top, t_left), t_final = view_frame((tile, tile))
        if t_final != (V, V):
            raise GeometryError(f"llava_next: processed tile is {t_final}, vision tower expects {(V, V)}")
        # resize keeping aspect into the pinpoint, then centre padding (get_patch_output_size)
        scale_w, scale_h = best_w / width, best_h / height
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(width * scale_h), best_w)
        pad_y, pad_x = (best_h - new_h) // 2, (best_w - new_w) // 2
        # full feature grid and the model's unpad_image
        H_f, W_f = nth * g, ntw * g
        if width / height > W_f / H_f:
            new_hf = int(round(height * (W_f / width), 7))
            p = (H_f - new_hf) // 2
            rows, cols = range(p, H_f - p), range(W_f)
        else:
            new_wf = int(round(width * (H_f / height), 7))
            p = (W_f - new_wf) // 2
            rows, cols = range(H_f), range(p, W_f - p)
        # feature cell -> processed tile pixels -> tile pixels -> padded canvas -> original
        t_scale = tile / t_res[0]

        def to_original(x, y):
            return (x - pad_x) * width / new_w, (y - pad_y) * height / new_h

        factor = self._onevision_downsample(len(rows), len(cols), g)
        if factor is None:
            for R in rows:
                for C in cols:
                    ty, tx = R // g, C // g
                    y0 = ty * tile + (t_top + (R % g) * cell) * t_scale
                    x0 = tx * tile + (t_left + (C % g) * cell) * t_scale
                    y1, x1 = y0 + cell * t_scale, x0 + cell * t_scale
                    b.patch((*to_original(x0, y0), *to_original(x1, y1)), 1)
                b.other(NEWLINE)
        else:
            # OneVision's bilinear downsampling of the unpadded grid: each new cell resamples an
            # equal share of the unpadded region (feature rows/cols are linear in canvas pixels
            # when the tiles are not centre-cropped)
            if t_top or t_left or abs(cell * g * t_scale - tile) > 1e-9:
                raise GeometryError("llava_onevision: downsampled features of centre-cropped tiles are not mapped")
            n_r, n_c = factor
            step = cell * t_scale
            y_lo, x_lo = rows[0] * step, cols[0] * step
            ch, cw = len(rows) * step / n_r, len(cols) * step / n_c
            for r in range(n_r):
                for c in range(n_c):
                    b.patch((*to_original(x_lo + c * cw, y_lo + r * ch), *to_original(x_lo + (c + 1) * cw,
                                                                                     y_lo + (r + 1) * ch)), 1)
                b.other(NEWLINE)
        return b.build(height, width, ("base", "high-res"), self.family)

    def _onevision_downsample(self, n_rows: int, n_cols: int, g: int) -> tuple[int, int] | None:
        """The model's `anyres_max_N` rule: an unpadded grid of more than ~N views' features is
        bilinearly resized to (rows // ratio, cols // ratio); None when it is kept."""
        if self.layout is not Layout.ANYRES_MAX:
            return None
        aspect = str(getattr(self.config, "vision_aspect_ratio", "anyres_max_9"))
        proc_aspect = getattr(self.processor, "vision_aspect_ratio", aspect)
        if proc_aspect != aspect:
            raise GeometryError(f"llava_onevision: processor vision_aspect_ratio {proc_aspect!r} != config {aspect!r}")
        try:
            max_views = int(aspect.strip("anyres_max_"))
        except ValueError:
            raise GeometryError(f"llava_onevision: unsupported vision_aspect_ratio {aspect!r}") from None
        ratio = math.sqrt(n_rows * n_cols / (max_views * g * g))
        if ratio <= 1.1:
            return None
        return int(n_rows // ratio), int(n_cols // ratio)

    # ------------------------------------------------------------- Idefics3
    def _idefics3(self, height: int, width: int) -> ImageGeometry:
        from PIL import Image

        s = int(getattr(self.config, "scale_factor", 1) or 1)
        ip = self.image_processor
        M = int(_get(getattr(ip, "max_image_size", None), "longest_edge") or 0)
        if not M:
            raise GeometryError("idefics3: image processor has no max_image_size['longest_edge']")
        if M % self.patch_size:
            raise GeometryError(f"idefics3: crop size {M} is not a multiple of patch_size {self.patch_size}")
        side = M // self.patch_size
        if side % s:
            raise GeometryError(f"idefics3: {side} patches per side do not split into scale_factor {s} blocks")
        t = side // s
        seq = int(getattr(self.processor, "image_seq_len", t * t))
        if seq != t * t:
            raise GeometryError(f"idefics3: processor image_seq_len {seq} != ({M}/{self.patch_size}/{s})^2 = {t * t}")
        # rows/cols straight from the image processor (ground truth for this image size)
        out = ip(images=[[Image.new("RGB", (width, height))]], return_row_col_info=True)
        n_rows, n_cols = int(out["rows"][0][0]), int(out["cols"][0][0])
        b = GeometryBuilder()

        def view(x0, y0, x1, y1, v):
            cw, ch = (x1 - x0) / t, (y1 - y0) / t
            for R in range(t):
                for C in range(t):
                    b.patch((x0 + C * cw, y0 + R * ch, x0 + (C + 1) * cw, y0 + (R + 1) * ch), v)

        names: tuple[str, ...] = ("global",)
        if n_rows and n_cols:
            names = ("crops", "global")
            for r in range(n_rows):
                for c in range(n_cols):
                    view(c * width / n_cols, r * height / n_rows, (c + 1) * width / n_cols,
                         (r + 1) * height / n_rows, 0)
        view(0.0, 0.0, float(width), float(height), len(names) - 1)
        return b.build(height, width, names, self.family)


    # ------------------------------------------------------------ Chameleon
    def _chameleon(self, height: int, width: int) -> ImageGeometry:
        """VQ codes: the processed (resized + centre-cropped) image is encoded by a conv VQ-GAN into
        a row-major grid of resolution / 2^(levels - 1) codes per side, one image position each."""
        vq = getattr(self.config, "vq_config", None)
        res, mult = getattr(vq, "resolution", None), getattr(vq, "channel_multiplier", None)
        if not res or not mult:
            raise GeometryError("chameleon: config lacks vq_config.resolution/channel_multiplier")
        side = int(res) // 2 ** (len(mult) - 1)
        seq = int(getattr(self.processor, "image_seq_length", side * side))
        if seq != side * side:
            raise GeometryError(f"chameleon: processor image_seq_length {seq} != VQ grid {side}x{side}")
        resized, (top, left), crop = self._processed_frame(height, width)
        sy, sx = height / resized[0], width / resized[1]
        b = GeometryBuilder()
        _grid_boxes(b, left * sx, top * sy, (left + crop[1]) * sx, (top + crop[0]) * sy, side, side, 0)
        return b.build(height, width, ("image",), self.family)

    # ------------------------------------------------------------- Qwen-VL
    def _qwen(self, height: int, width: int) -> ImageGeometry:
        """Dynamic resolution: the image is resized to a multiple of patch_size x merge_size on each
        side (the processor's smart_resize, read back from image_grid_thw), cut into patches, and
        each merge x merge block of patches is one image position, row-major."""
        from PIL import Image

        ip = self.image_processor
        merge = int(getattr(ip, "merge_size", 0) or 0)
        patch = int(getattr(ip, "patch_size", 0) or 0)
        vc = getattr(self.config, "vision_config", None)
        if not merge or not patch:
            raise GeometryError(f"{self.family}: image processor lacks patch_size/merge_size")
        if vc is not None and (int(vc.spatial_merge_size) != merge or _side(vc.patch_size) != patch):
            raise GeometryError(f"{self.family}: processor patch {patch}/merge {merge} != vision config "
                                f"{vc.patch_size}/{vc.spatial_merge_size}")
        t, gh, gw = (int(v) for v in ip(images=[Image.new("RGB", (width, height))])["image_grid_thw"][0])
        if t != 1 or gh % merge or gw % merge:
            raise GeometryError(f"{self.family}: unexpected image grid {(t, gh, gw)} for a still image")
        b = GeometryBuilder()
        # the resized image (gh * patch x gw * patch) is the whole original image, squashed
        _grid_boxes(b, 0.0, 0.0, float(width), float(height), gh // merge, gw // merge, 0)
        return b.build(height, width, ("image",), self.family)

    # ------------------------------------------------------------- Gemma 3
    def _gemma3(self, height: int, width: int) -> ImageGeometry:
        """The image squashed to the vision size, its patch grid average-pooled to
        sqrt(mm_tokens_per_image) positions per side, row-major."""
        ip = self.image_processor
        if getattr(ip, "do_pan_and_scan", False):
            raise GeometryError("gemma3: pan-and-scan crops are not mapped (they become extra images in the "
                                "prompt); set the image processor's do_pan_and_scan=False")
        n = int(getattr(self.config, "mm_tokens_per_image", 0) or 0)
        side = math.isqrt(n)
        if side * side != n or self._grid() % side:
            raise GeometryError(f"gemma3: mm_tokens_per_image {n} is not a square pooling of the "
                                f"{self._grid()}x{self._grid()} patch grid")
        seq = int(getattr(self.processor, "image_seq_length", n))
        if seq != n:
            raise GeometryError(f"gemma3: processor image_seq_length {seq} != config mm_tokens_per_image {n}")
        resized, (top, left), crop = self._processed_frame(height, width)
        if crop != (self.vision_size, self.vision_size):
            raise GeometryError(f"gemma3: the processor yields {crop[1]}x{crop[0]} pixels but the vision tower "
                                f"expects {self.vision_size}x{self.vision_size}")
        sy, sx = height / resized[0], width / resized[1]
        b = GeometryBuilder()
        _grid_boxes(b, left * sx, top * sy, (left + crop[1]) * sx, (top + crop[0]) * sy, side, side, 0)
        return b.build(height, width, ("image",), self.family)

    # ------------------------------------------------------------ InternVL
    def _internvl(self, height: int, width: int) -> ImageGeometry:
        """rows x cols tiles (row-major) of the image resized to the tile grid, then a thumbnail of
        the whole image when there is more than one tile; each tile's patch grid is pixel-shuffled
        by downsample_ratio into a row-major grid of positions."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        ip = self.image_processor
        size = getattr(ip, "size", None)
        tile = (int(_get(size, "height") or 0), int(_get(size, "width") or 0))
        if tile != (self.vision_size, self.vision_size):
            raise GeometryError(f"internvl: processor tiles of {tile} px but vision image_size {self.vision_size}")
        ratio = float(getattr(self.config, "downsample_ratio", 0.5))
        side = self._grid() * ratio
        if side != int(side):
            raise GeometryError(f"internvl: {self._grid()} patches per side do not shuffle by {ratio}")
        side = int(side)
        seq = int(getattr(self.processor, "image_seq_length", side * side))
        if seq != side * side:
            raise GeometryError(f"internvl: processor image_seq_length {seq} != ({self._grid()} * {ratio})^2")
        n_cols, n_rows = 1, 1
        if getattr(ip, "crop_to_patches", False) and int(getattr(ip, "max_patches", 1)) > 1:
            n_cols, n_rows = get_optimal_tiled_canvas((height, width), tile, int(ip.min_patches), int(ip.max_patches))
        b = GeometryBuilder()
        names: tuple[str, ...] = ("image",)
        if n_rows * n_cols > 1:
            names = ("tiles", "thumbnail")
            for r in range(n_rows):
                for c in range(n_cols):
                    _grid_boxes(b, c * width / n_cols, r * height / n_rows, (c + 1) * width / n_cols,
                                (r + 1) * height / n_rows, side, side, 0)
        _grid_boxes(b, 0.0, 0.0, float(width), float(height), side, side, len(names) - 1)
        return b.build(height, width, names, self.family)

# one builder per layout; a layout without one fails here, when the module is imported
_BUILDERS = {Layout.CLIP_GRID: PatchGeometry._llava, Layout.ANYRES: PatchGeometry._llava_next,
             Layout.ANYRES_MAX: PatchGeometry._llava_next, Layout.CROPS_GLOBAL: PatchGeometry._idefics3,
             Layout.VQ_GRID: PatchGeometry._chameleon, Layout.DYNAMIC: PatchGeometry._qwen,
             Layout.POOLED_GRID: PatchGeometry._gemma3, Layout.TILES_THUMBNAIL: PatchGeometry._internvl}
if set(_BUILDERS) != set(Layout):
    raise ImportError(f"patch geometry has no builder for layout(s) {sorted(set(Layout) - set(_BUILDERS))}")
