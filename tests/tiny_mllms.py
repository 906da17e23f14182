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
    return _save(folder, LlavaForConditionalGeneration, cfg, proc)


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
    return _save(folder, LlavaNextForConditionalGeneration, cfg, proc)


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
    return _save(folder, Idefics3ForConditionalGeneration, cfg, proc)


BUILDERS = {"llava": build_llava, "llava_next": build_llava_next, "idefics3": build_idefics3}


# ------------------------------------------------------------------ families added for issue 16
def chat_template(image_text: str) -> str:
    """CHAT_TEMPLATE with the family's own image placeholder text."""
    return CHAT_TEMPLATE.replace("<image>", image_text)


TEXT_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
    "{% else %}ASSISTANT: {{ m['content'] }} </s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_named_tokenizer(named: dict[str, str], extra_specials: list[str] = ()) -> PreTrainedTokenizerFast:
    """make_tokenizer plus named special tokens (tokenizer.<name> / <name>_id), as the Qwen, Gemma 3
    and InternVL processors read them."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", **named)
    fast.add_special_tokens({"additional_special_tokens": ["<image>", *named.values(), *extra_specials]},
                            replace_extra_special_tokens=False)
    return fast


def _save(folder: Path, model_cls, cfg, processor) -> Path:
    """A randomly initialised model (seed 0) and its processor, saved as a from_pretrained folder."""
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _tiny_siglip():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=4)


def _images_only(cls):
    from saev_core.model.families import images_only_processor

    return images_only_processor(cls)


def _qwen_tokenizer():
    return make_named_tokenizer({"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                 "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def _qwen_ids(tok) -> dict:
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def _qwen_text(tok, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0,
                                 **extra})


QWEN_TEMPLATE = "<|vision_start|><|image_pad|><|vision_end|>"


def _qwen_processor(cls_name: str, tok, patch_size: int):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=2, temporal_patch_size=2,
                                  min_pixels=16 * 16, max_pixels=48 * 48)
    return _images_only(getattr(transformers, cls_name))(image_processor=ip, tokenizer=tok,
                                                         chat_template=chat_template(QWEN_TEMPLATE))


def build_qwen2_vl(folder: Path) -> Path:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tok = _qwen_tokenizer()
    cfg = Qwen2VLConfig(text_config=_qwen_text(tok), **_qwen_ids(tok),
                        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2))
    return _save(folder, Qwen2VLForConditionalGeneration, cfg, _qwen_processor("Qwen2VLProcessor", tok, 4))


def build_qwen2_5_vl(folder: Path) -> Path:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    cfg = Qwen2_5_VLConfig(text_config=_qwen_text(tok), **_qwen_ids(tok),
                           vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                              out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                              temporal_patch_size=2, window_size=16, fullatt_block_indexes=[1]))
    return _save(folder, Qwen2_5_VLForConditionalGeneration, cfg, _qwen_processor("Qwen2_5_VLProcessor", tok, 4))


def build_qwen3_vl(folder: Path) -> Path:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tok = _qwen_tokenizer()
    text = _qwen_text(tok, mrope_interleaved=True)
    text["head_dim"] = 16
    cfg = Qwen3VLConfig(text_config=text, **_qwen_ids(tok),
                        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                           out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                           temporal_patch_size=2, num_position_embeddings=64,
                                           deepstack_visual_indexes=[0]))
    return _save(folder, Qwen3VLForConditionalGeneration, cfg, _qwen_processor("Qwen3VLProcessor", tok, 4))


def _vq_code_name(code: int) -> str:
    """Chameleon's BPE name of VQ code `code`: digits spelled A..J, framed as IMGIMG...Z."""
    return "IMGIMG" + "".join(chr(ord("A") + int(d)) for d in str(code)) + "Z"


def build_chameleon(folder: Path) -> Path:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor
    from transformers.models.chameleon.configuration_chameleon import ChameleonVQVAEConfig
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    n_codes = 32
    tok = make_named_tokenizer({"boi_token": "<racm3:break>", "eoi_token": "<eoss>", "image_token": "<image>"},
                               ["<reserved08706>", *[_vq_code_name(i) for i in range(n_codes)]])
    tok.sep_token = "<reserved08706>"
    # ChameleonProcessor takes no chat template: the tokenizer carries a text-only one
    tok.chat_template = TEXT_CHAT_TEMPLATE
    ip = ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    # 32 px, two downsamplings (channel_multiplier of length 3): an 8 x 8 grid of codes
    proc = ChameleonProcessor(image_processor=ip, tokenizer=tok, image_seq_length=64)
    vq = ChameleonVQVAEConfig(embed_dim=8, num_embeddings=n_codes, latent_channels=8, resolution=32,
                              base_channels=32, channel_multiplier=[1, 1, 1], num_res_blocks=1)
    cfg = ChameleonConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          vq_config=vq.to_dict(), vocabulary_map=tok.get_vocab())
    return _save(folder, ChameleonForConditionalGeneration, cfg, proc)


def build_gemma3(folder: Path) -> Path:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = make_named_tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                "image_token": "<image_soft_token>"})
    ip = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, do_pan_and_scan=False)
    # 32 px / 4 px patches = 8 x 8, average-pooled to 4 x 4 = 16 image tokens
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=16,
                           chat_template=chat_template("<start_of_image>"))
    vc = _tiny_siglip()
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=16,
                sliding_window=8, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    ids = tok.convert_tokens_to_ids
    cfg = Gemma3Config(text_config=text, vision_config=vc.to_dict(), mm_tokens_per_image=16,
                       boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                       image_token_index=ids("<image_soft_token>"))
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(cfg)
    # the projector's weight is initialised to zeros (a checkpoint always overwrites it): give it
    # values, or every image position would get the same (zero) vector
    torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def build_llava_onevision(folder: Path) -> Path:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = make_tokenizer(["<video>"])
    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64], [64, 96], [96, 64]]
    ip = LlavaOnevisionImageProcessorPil(size={"height": 32, "width": 32}, image_grid_pinpoints=pinpoints)
    # anyres_max_2: a high-resolution grid above 2 x 8 x 8 features is downsampled (bilinear) by the model
    proc = _images_only(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=64, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE, vision_aspect_ratio="anyres_max_2")
    vc = _tiny_siglip()
    ids = tok.convert_tokens_to_ids
    cfg = LlavaOnevisionConfig(vision_config=vc.to_dict(), text_config=_llama(len(tok), tok).to_dict(),
                               image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_2")
    return _save(folder, LlavaOnevisionForConditionalGeneration, cfg, proc)


def build_internvl(folder: Path) -> Path:
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = make_named_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    # 32 px / 4 px patches = 8 x 8, pixel-shuffled by 0.5 to 4 x 4 = 16 tokens per tile
    proc = _images_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=16,
                                           chat_template=chat_template("<IMG_CONTEXT>"))
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=[32, 32], patch_size=[4, 4])
    text = dict(model_type="qwen2", vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=4, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = InternVLConfig(vision_config=vc, text_config=text, image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                         image_seq_length=16, downsample_ratio=0.5)
    return _save(folder, InternVLForConditionalGeneration, cfg, proc)


BUILDERS.update({
    "chameleon": build_chameleon, "qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl,
    "qwen3_vl": build_qwen3_vl, "gemma3": build_gemma3, "llava_onevision": build_llava_onevision,
    "internvl": build_internvl,
})


def random_image(seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
