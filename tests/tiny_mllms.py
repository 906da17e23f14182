"""Tiny, randomly initialised multimodal models of each supported family, saved as real
Hugging Face folders so tests go through `from_pretrained` exactly like a user's model.

Random weights are fine here: these tests check plumbing (hooks, masks, padding, geometry),
not what the features mean. The toy world (saev_core.toyworld) ships a trained model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = ["what", "colour", "is", "the", "shape", "red", "blue", "green", "circle", "square",
         "a", "there", "yes", "no", "describe", "image", "?", ".", "USER:", "ASSISTANT:"]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }} {% endif %}{% endfor %}"
    "{% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }} {% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tokenizer(extra_specials: list[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code; special tokens split out of running text."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>", *extra_specials]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _llama(vocab_size: int, tok) -> "LlamaConfig":
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )


def build_llava(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = make_tokenizer()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=4, num_additional_image_tokens=1,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=4)
    cfg = LlavaConfig(vision_config=vc, text_config=_llama(len(tok), tok),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def build_llava_next(folder: Path) -> Path:
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = make_tokenizer()
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=4, num_additional_image_tokens=1,
                              vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE)
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          image_size=32, patch_size=4)
    cfg = LlavaNextConfig(vision_config=vc, text_config=_llama(len(tok), tok),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                          vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def build_idefics3(folder: Path) -> Path:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    rowcol = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = make_tokenizer(["<fake_token_around_image>", "<end_of_utterance>", "<global-img>", *rowcol])
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                   do_image_splitting=True)
    # image_seq_len = (image_size / patch_size)^2 / scale_factor^2 = (32/4)^2 / 2^2 = 16
    proc = Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=16, chat_template=CHAT_TEMPLATE)
    vc = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=4)
    cfg = Idefics3Config(vision_config=vc, text_config=_llama(len(tok), tok),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    torch.manual_seed(0)
    Idefics3ForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


BUILDERS = {"llava": build_llava, "llava_next": build_llava_next, "idefics3": build_idefics3}


def random_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
