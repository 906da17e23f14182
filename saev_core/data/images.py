"""Image bytes -> the RGB picture the model sees: one function for every path that feeds a model.

A plain ``Image.open(...).convert("RGB")`` gets several common files wrong: a 16-bit greyscale
PNG is clipped to near white, a transparent PNG turns its transparent pixels black (or into
whatever colour they hold under the alpha), a phone photo lies on its side when its EXIF
orientation is ignored, and an animated GIF silently gives its first frame. :func:`normalize_image`
does each of these deliberately; :func:`inspect_image` checks bytes at ingest (size limits, full
decode) and says what normalisation will do, so the record can note it.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from saev_core.data.records import Reason

__all__ = ["ImageError", "BACKGROUND", "normalize_image", "inspect_image", "open_image"]

BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as image viewers do
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(ValueError):
    """Bytes that cannot become a model input; ``reason`` is a quarantine reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def open_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """PIL image of ``data`` (lazy), refusing more than ``max_pixels`` pixels before decoding
    (default: PIL's decompression-bomb limit)."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(Reason.IMAGE_TOO_LARGE, f"image too large: {exc}") from None
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, SyntaxError, ...)
        raise ImageError(Reason.IMAGE_DECODE_ERROR, f"PIL cannot open the image: {type(exc).__name__}: {exc}") from None
    w, h = im.size
    if limit and w * h > limit:
        raise ImageError(Reason.IMAGE_TOO_LARGE, f"image is {w}x{h} = {w * h} pixels, above the limit of {limit}")
    return im


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer / float) greyscale scaled to 0..255 by its bit depth, not clipped."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        scale = 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else 1.0
        out = np.nan_to_num(a * scale).clip(0, 255)
    else:
        a = a.astype(np.int64)
        peak = int(a.max(initial=0))
        # PIL opens 16-bit PNGs as I;16 or as I (32-bit) holding 16-bit values
        depth = 16 if im.mode.startswith("I;16") or peak <= 65535 else 32
        out = a.clip(0, None) * 255.0 / (2**depth - 1)
    return Image.fromarray(np.rint(out).astype(np.uint8))


def normalize_image(image: Image.Image | bytes | bytearray | memoryview) -> Image.Image:
    """The RGB picture a model is given: first frame, EXIF orientation applied, 16-bit rescaled to
    8 bits, palette expanded, transparency flattened onto white."""
    im = open_image(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image
    if getattr(im, "n_frames", 1) > 1:
        im.seek(0)
    im.load()
    im = ImageOps.exif_transpose(im) or im
    if im.mode in _HIGH_DEPTH_MODES or im.mode == "F":
        im = _to_8bit(im)
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("LA", "La", "PA", "RGBa", "RGBA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def inspect_image(data: bytes, *, max_pixels: int | None = None, full_decode: bool = True) -> dict[str, Any]:
    """Check that ``data`` decodes (fully, unless ``full_decode`` is off: ``verify()`` misses
    truncated pixel data) within the pixel limit; return notes for the record about what
    :func:`normalize_image` will change (empty when nothing is worth saying)."""
    notes: dict[str, Any] = {}
    im = open_image(data, max_pixels)
    try:
        frames = getattr(im, "n_frames", 1)
        if frames > 1:
            notes["_saev_image_frames"] = f"animated image: first of {frames} frames used"
        if im.mode in _HIGH_DEPTH_MODES:
            notes["_saev_image_depth"] = f"{im.mode} image rescaled to 8 bits"
        im.verify()
        if full_decode:
            normalize_image(open_image(data, max_pixels))
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(Reason.IMAGE_DECODE_ERROR, f"PIL cannot decode the image: {type(exc).__name__}: {exc}") from None
    return notes
