"""The toy MLLM's tokenizer, processor and configurations, and its accuracy measure.

`train_model.py` builds everything through these functions, and the tests compare the shipped
model against them, so the shipped folder and the script cannot drift apart silently.

Public API
----------
- ``build_tokenizer() -> PreTrainedTokenizerFast``  word-level, lower-cased, BOS added
- ``build_processor(tokenizer=None) -> LlavaProcessor``  32x32 CLIP PIL image processor, chat template
- ``build_llava_config(tokenizer, spec=ModelSpec()) -> LlavaConfig``
- ``build_clip_config(tokenizer, spec=ModelSpec()) -> CLIPConfig``  (contrastive stage only)
- ``chat_text(processor, question, response=None) -> str``
- ``evaluate(model, processor, n=200, seed=..., kinds=...) -> dict``  held-out answer accuracy
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from . import generator as gen

PAD, BOS, UNK, EOS, IMAGE = "<pad>", "<s>", "<unk>", "</s>", "<image>"
# id 2 is deliberately not EOS: CLIP's text model treats eos_token_id == 2 as a legacy config
SPECIAL_TOKENS = (PAD, BOS, UNK, EOS, IMAGE)
CHAT_WORDS = ("user", "assistant", ":")

# user: <image> what color is the circle? assistant: red. there is ...</s>
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}user: {% elif message['role'] == 'assistant' -%}assistant: "
    "{% else -%}{{ message['role'] }}: {% endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<image> ' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{{ ' ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}assistant:{%- endif -%}"
)

IMAGE_SIZE = gen.IMAGE_SIZE
PATCH_SIZE = 4
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of the toy MLLM (and of the contrastive stage's text encoder)."""

    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp: int = 256
    lm_hidden: int = 128
    lm_layers: int = 4
    lm_heads: int = 4
    lm_mlp: int = 384
    lm_max_positions: int = 128
    clip_text_hidden: int = 64
    clip_text_layers: int = 2
    clip_text_heads: int = 4
    clip_projection: int = 64


def build_tokenizer():
    """Word-level tokenizer over the toy world's vocabulary (lower-cased, punctuation split off),
    with <pad>, <s> (added at the start of every encoding), <unk>, </s> and the <image> token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIAL_TOKENS) + list(CHAT_WORDS) + gen.vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        add_bos_token=True, add_eos_token=False,
        clean_up_tokenization_spaces=True,
        model_max_length=256,
        padding_side="right",
    )


def build_image_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=False, do_rescale=True, do_normalize=True, do_convert_rgb=True,
    )


def build_processor(tokenizer=None):
    """LlavaProcessor: each <image> becomes 64 image tokens (8x8 patches; CLS dropped by 'default')."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer if tokenizer is not None else build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token the vision tower adds (and 'default' removes)
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE,
    )


def _vision_config(spec: ModelSpec):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=spec.vision_hidden, intermediate_size=spec.vision_mlp, num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, num_channels=3,
        projection_dim=spec.clip_projection, hidden_act="gelu", attention_dropout=0.0,
    )


def build_llava_config(tokenizer, spec: ModelSpec = ModelSpec()):
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.lm_hidden, intermediate_size=spec.lm_mlp,
        num_hidden_layers=spec.lm_layers, num_attention_heads=spec.lm_heads, num_key_value_heads=spec.lm_heads,
        max_position_embeddings=spec.lm_max_positions, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0,
    )
    return LlavaConfig(
        vision_config=_vision_config(spec), text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
    )


def build_clip_config(tokenizer, spec: ModelSpec = ModelSpec()):
    from transformers import CLIPConfig, CLIPTextConfig

    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.clip_text_hidden, intermediate_size=4 * spec.clip_text_hidden,
        num_hidden_layers=spec.clip_text_layers, num_attention_heads=spec.clip_text_heads,
        max_position_embeddings=32, hidden_act="gelu", projection_dim=spec.clip_projection,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=_vision_config(spec).to_dict(),
                      projection_dim=spec.clip_projection)


def chat_text(processor, question: str, response: str | None = None) -> str:
    """The chat-template text of one user turn (image + question) and, if given, the assistant's
    response; without a response it ends with the generation prompt 'assistant:'."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if response is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    return processor.apply_chat_template(msgs, add_generation_prompt=response is None)


@torch.no_grad()
def first_token_predictions(model, processor, images, questions, batch_size: int = 64) -> list[str]:
    """Greedy first answer token for each (image, question), as a word. Prompts are grouped by
    length, so no padding is needed."""
    tok = processor.tokenizer
    texts = [chat_text(processor, q) for q in questions]
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[n].append(i)
    out: list[str | None] = [None] * len(texts)
    model.eval()
    for idx in groups.values():
        for s in range(0, len(idx), batch_size):
            part = idx[s : s + batch_size]
            enc = processor(text=[texts[i] for i in part], images=[images[i] for i in part], return_tensors="pt")
            logits = model(**enc).logits[:, -1]
            for i, t in zip(part, logits.argmax(-1).tolist()):
                out[i] = tok.convert_ids_to_tokens(t)
    return out  # type: ignore[return-value]


EVAL_STREAM = 7_777  # evaluation scenes come from random streams tagged apart from training's


def evaluate(model, processor, n: int = 200, seed: int = 1, kinds=("colour", "shape", "exists", "count")) -> dict:
    """Answer accuracy on `n` fresh scenes per question kind (greedy first answer token).

    Colour/shape questions pick a random object of each scene; 'exists' is half yes, half no;
    'count' is one vs two. Scenes are drawn from numpy streams [seed, EVAL_STREAM, k], which the
    training script never uses, so any seed gives held-out scenes. Returns {kind: accuracy, 'n': n}."""
    result: dict = {"n": n}
    for k, kind in enumerate(kinds):
        rng = np.random.default_rng([seed, EVAL_STREAM, k])
        images, questions, answers = [], [], []
        for _ in range(n):
            ex = gen.sample_example(rng, kind=kind)
            images.append(gen.render_scene(ex.scene)[0])
            questions.append(ex.text)
            answers.append(ex.answer.split()[0])
        preds = first_token_predictions(model, processor, images, questions)
        result[kind] = float(np.mean([p == a for p, a in zip(preds, answers)]))
    return result
