"""The one registry of model families (`register_family`: input strategy + patch-geometry layout per
family) and what differs between them on the input side: how the processor is loaded, how images
are passed to it, and which positions of `input_ids` are image positions.

Every family marks image positions with one placeholder id (`image_token_id`) that its
processor repeats once per image position; the model replaces those positions' embeddings
(soft vision features, or Chameleon's VQ-code embeddings) but never `input_ids` itself, so the
modality mask is read from the processor's `input_ids` before the forward pass.

Positions are always the model's own: the adapter passes every processor output through, and
Qwen2/2.5/3-VL compute their multimodal rotary positions (M-RoPE) from `input_ids`,
`mm_token_type_ids`, `image_grid_thw` and `attention_mask`; Gemma 3 makes image blocks attend
bidirectionally from `token_type_ids`. Anything that edits the token sequence (truncation) must
edit these per-position tensors alike and never cut inside an image's block.

Without torchvision (this project's install), processors that also own a video processor
(Qwen2/2.5/3-VL, LLaVA-OneVision, InternVL) cannot be built by transformers: the video
processor needs torchvision. `images_only_processor` gives the same processor class without
its video part; image inputs go through exactly the class's own code.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from enum import Enum


class ImageInput(str, Enum):
    """How the processor wants the batch's images."""

    FLAT = "flat"  # one image per text, as one flat list
    NESTED = "nested"  # one list of images per text


class Layout(str, Enum):
    """Which pixels each image position stands for; `saev_core.model.patches` holds one builder per
    layout (and checks at import that none is missing)."""

    CLIP_GRID = "clip_grid"  # one square patch grid after resize + centre crop (LLaVA)
    ANYRES = "anyres"  # base view + unpadded high-res tiles, a newline per row (LLaVA-NeXT)
    ANYRES_MAX = "anyres_max"  # ANYRES plus the anyres_max_N bilinear shrink (LLaVA-OneVision)
    CROPS_GLOBAL = "crops_global"  # rows x cols crops + a global view, pixel-shuffled (Idefics3)
    VQ_GRID = "vq_grid"  # the VQ-GAN code grid of the resized + cropped image (Chameleon)
    DYNAMIC = "dynamic"  # smart-resized image in merge x merge patch blocks (Qwen-VL)
    POOLED_GRID = "pooled_grid"  # the squashed image's patch grid average-pooled (Gemma 3)
    TILES_THUMBNAIL = "tiles_thumbnail"  # rows x cols tiles + a thumbnail, pixel-shuffled (InternVL)


@dataclass(frozen=True)
class NoGeometry:
    """A family whose image positions are not mapped to pixels, and why (the `GeometryError` text)."""

    reason: str


@dataclass(frozen=True)
class Family:
    """Everything the adapter and the patch geometry need to know about one model type beyond the
    generic path; one entry per family, so adding a family is one `register_family` call."""

    model_type: str
    name: str
    model_classes: tuple[str, ...]  # the classes the README table lists
    images: ImageInput
    geometry: Layout | NoGeometry

    @property
    def nested_images(self) -> bool:
        return self.images is ImageInput.NESTED


FAMILIES: dict[str, Family] = {}


def register_family(model_type: str, *, name: str, model_classes: tuple[str, ...], images: ImageInput,
                    geometry: Layout | NoGeometry, registry: dict[str, Family] | None = None) -> Family:
    """Add one family; every part is required and checked here, so a family missing its input
    strategy or its geometry fails when this module is imported, not when a run reaches it."""
    registry = FAMILIES if registry is None else registry
    if model_type in registry:
        raise ValueError(f"model family {model_type!r} is already registered")
    if not name or not model_classes or not all(isinstance(c, str) and c for c in model_classes):
        raise ValueError(f"model family {model_type!r}: give a display name and at least one model class")
    if not isinstance(images, ImageInput):
        raise TypeError(f"model family {model_type!r}: images must be an ImageInput, not {images!r}")
    if not isinstance(geometry, (Layout, NoGeometry)) or (isinstance(geometry, NoGeometry) and not geometry.reason):
        raise TypeError(f"model family {model_type!r}: geometry must be a Layout, or NoGeometry with the reason "
                        f"its image positions are not mapped, not {geometry!r}")
    family = Family(model_type, name, tuple(model_classes), images, geometry)
    registry[model_type] = family
    return family


_FLAT, _NESTED = ImageInput.FLAT, ImageInput.NESTED
register_family("llava", name="LLaVA", model_classes=("LlavaForConditionalGeneration",), images=_FLAT,
                geometry=Layout.CLIP_GRID)
register_family("llava_next", name="LLaVA-NeXT", model_classes=("LlavaNextForConditionalGeneration",),
                images=_FLAT, geometry=Layout.ANYRES)
register_family("idefics3", name="Idefics3", model_classes=("Idefics3ForConditionalGeneration",), images=_NESTED,
                geometry=Layout.CROPS_GLOBAL)
register_family("smolvlm", name="SmolVLM", model_classes=("SmolVLMForConditionalGeneration",), images=_NESTED,
                geometry=NoGeometry("its Idefics3-style crops are not checked here (the tests build no tiny "
                                    "SmolVLM)"))
register_family("idefics2", name="Idefics2", model_classes=("Idefics2ForConditionalGeneration",), images=_NESTED,
                geometry=NoGeometry("a perceiver resampler pools each view's patches into a fixed number of "
                                    "latents, so an image position stands for no region of the image"))
register_family("chameleon", name="Chameleon", model_classes=("ChameleonForConditionalGeneration",), images=_FLAT,
                geometry=Layout.VQ_GRID)
register_family("qwen2_vl", name="Qwen2-VL", model_classes=("Qwen2VLForConditionalGeneration",), images=_FLAT,
                geometry=Layout.DYNAMIC)
register_family("qwen2_5_vl", name="Qwen2.5-VL", model_classes=("Qwen2_5_VLForConditionalGeneration",),
                images=_FLAT, geometry=Layout.DYNAMIC)
register_family("qwen3_vl", name="Qwen3-VL", model_classes=("Qwen3VLForConditionalGeneration",), images=_FLAT,
                geometry=Layout.DYNAMIC)
register_family("gemma3", name="Gemma 3", model_classes=("Gemma3ForConditionalGeneration",), images=_NESTED,
                geometry=Layout.POOLED_GRID)
register_family("llava_onevision", name="LLaVA-OneVision",
                model_classes=("LlavaOnevisionForConditionalGeneration",), images=_FLAT, geometry=Layout.ANYRES_MAX)
register_family("internvl", name="InternVL", model_classes=("InternVLForConditionalGeneration",), images=_FLAT,
                geometry=Layout.TILES_THUMBNAIL)


# model types SAE-V cannot read, with the reason
UNSUPPORTED: dict[str, str] = {
    "mllama": "images enter through cross-attention layers, not as positions of the token sequence, so there "
              "are no image positions in the residual stream for SAE-V to read",
}


class UnsupportedFamily(ValueError):
    pass


def family_of(model_type: str) -> Family | None:
    return FAMILIES.get(model_type)


def check_supported(model_type: str) -> None:
    """Raise for a family SAE-V cannot work with, naming it and what is missing."""
    if model_type in UNSUPPORTED:
        raise UnsupportedFamily(f"model type {model_type!r} is not supported: {UNSUPPORTED[model_type]}")


@functools.lru_cache(maxsize=None)
def images_only_processor(cls):
    """`cls` (a ProcessorMixin subclass) without its `video_processor` attribute. Same name, same
    image/text code; a video input raises inside the class as it would without a video processor."""
    if "video_processor" not in cls.get_attributes():
        return cls

    attributes = [a for a in cls.get_attributes() if a != "video_processor"]

    def get_attributes(_sub) -> list[str]:
        # ProcessorMixin pairs its positional arguments with these names (the class's own
        # __init__ passes video_processor=None as a third one, which the pairing then drops)
        # and loads / saves exactly these sub-processors
        return list(attributes)

    # same __name__ (save_pretrained writes it as processor_class), but a qualname in this module so
    # that pickle finds the subclass again (see __getattr__ below)
    sub = type(cls.__name__, (cls,), {"get_attributes": classmethod(get_attributes), "__module__": __name__,
                                      "__doc__": cls.__doc__, "__qualname__": _IMAGES_ONLY + cls.__name__})
    return sub


_IMAGES_ONLY = "_ImagesOnly"


def __getattr__(name: str):
    """Unpickling an images-only processor in a fresh process rebuilds its class."""
    if name.startswith(_IMAGES_ONLY):
        import transformers

        base = getattr(transformers, name[len(_IMAGES_ONLY):], None)
        if base is not None:
            return images_only_processor(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _processor_class_name(model_id: str, model_type: str) -> str | None:
    """The processor class a model folder names (processor_config / preprocessor_config), else the
    one transformers maps its model type to."""
    if os.path.isdir(model_id):
        for name in ("processor_config.json", "preprocessor_config.json"):
            path = os.path.join(model_id, name)
            if os.path.isfile(path):
                with open(path) as fh:
                    value = json.load(fh).get("processor_class")
                if value:
                    return value
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return PROCESSOR_MAPPING_NAMES.get(model_type)


def _needs_video_fallback(exc: Exception) -> bool:
    text = str(exc).lower()
    return "video processor" in text or "torchvision" in text or "videoprocessor" in text


def load_processor(model_id: str, model_type: str, **kwargs):
    """AutoProcessor, or - when only its video processor cannot be built here - the same processor
    class without it. Any other failure propagates."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_id, **kwargs)
    except (OSError, ImportError, ValueError, AttributeError, TypeError) as exc:
        if not _needs_video_fallback(exc):
            raise
        import transformers

        name = _processor_class_name(model_id, model_type)
        cls = getattr(transformers, name, None) if name else None
        if cls is None:
            raise
        return images_only_processor(cls).from_pretrained(model_id, **kwargs)
