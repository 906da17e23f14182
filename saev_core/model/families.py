"""What differs between model families on the input side: how the processor is loaded, how
images are passed to it, and which positions of `input_ids` are image positions.

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

@dataclass(frozen=True)
class Family:
    """What the adapter needs to know about one model type beyond the generic path."""

    name: str
    model_classes: tuple[str, ...]  # the classes the tests build (README table)
    nested_images: bool = False  # the processor wants one list of images per text


FAMILIES: dict[str, Family] = {
    "llava": Family("LLaVA", ("LlavaForConditionalGeneration",)),
    "llava_next": Family("LLaVA-NeXT", ("LlavaNextForConditionalGeneration",)),
    "idefics3": Family("Idefics3", ("Idefics3ForConditionalGeneration",), nested_images=True),
    "smolvlm": Family("SmolVLM", ("SmolVLMForConditionalGeneration",), nested_images=True),
    "idefics2": Family("Idefics2", ("Idefics2ForConditionalGeneration",), nested_images=True),
    "chameleon": Family("Chameleon", ("ChameleonForConditionalGeneration",)),
    "qwen2_vl": Family("Qwen2-VL", ("Qwen2VLForConditionalGeneration",)),
    "qwen2_5_vl": Family("Qwen2.5-VL", ("Qwen2_5_VLForConditionalGeneration",)),
    "qwen3_vl": Family("Qwen3-VL", ("Qwen3VLForConditionalGeneration",)),
    "gemma3": Family("Gemma 3", ("Gemma3ForConditionalGeneration",), nested_images=True),
    "llava_onevision": Family("LLaVA-OneVision", ("LlavaOnevisionForConditionalGeneration",)),
    "internvl": Family("InternVL", ("InternVLForConditionalGeneration",)),
}


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
