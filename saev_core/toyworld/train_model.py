"""Train the toy LLaVA the way real MLLMs are made, on 2 CPU cores, deterministically.

    python -m saev_core.toyworld.train_model --out DIR --seed 0

Stages (each with a progress bar):
  0. language pretraining of the Llama LM on the text side of the world (questions + responses
     and captions, no image);
  1. contrastive (CLIP) pretraining of the vision tower with a small text encoder on captions;
     the image side pools the last layer's patch tokens (what the LLaVA reads), not CLS. Two
     dense terms join the caption InfoNCE: every object region and patch must pick its object's
     phrase (RegionCLIP-style), and a shape-salience term makes the raw patch features carry
     shape as strongly as colour (without it the LM learns to find "the red object" but never
     "the circle": colour answers stall at ~0.75 while shape answers reach 1.0). The vision
     tower is then copied into the LLaVA;
  2. projector alignment: only the MLP projector trains, on captioning ("describe the image.");
  3. instruction tuning: projector + LM train on the question/answer templates, and the vision
     tower is fine-tuned at a reduced learning rate (``--freeze-vision`` keeps it frozen).
Data is generated on the fly from numpy streams [seed, stage]; evaluation uses other streams.
The output folder is a standard Hugging Face folder (model + processor) plus `toyworld.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import generator as gen
from .model import (
    IMAGE,
    NUM_IMAGE_TOKENS,
    PATCH_SIZE,
    ModelSpec,
    build_clip_config,
    build_llava_config,
    build_processor,
    build_tokenizer,
    chat_text,
    evaluate,
)


@dataclass(frozen=True)
class StageConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 20


@dataclass(frozen=True)
class TrainConfig:
    spec: ModelSpec = ModelSpec()
    lm_pretrain: StageConfig = StageConfig(steps=200, batch=64, lr=2e-3)
    contrastive: StageConfig = StageConfig(steps=600, batch=128, lr=2e-3, warmup=40)
    projector: StageConfig = StageConfig(steps=200, batch=32, lr=2e-3)
    instruct: StageConfig = StageConfig(steps=1400, batch=32, lr=1e-3, warmup=50)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    clip_temperature_init: float = 0.07
    contrastive_negatives: bool = False  # add hard negative captions (NegCLIP-style) in stage 1
    region_weight: float = 1.0  # weight of stage 1's region-phrase term (0: caption InfoNCE only)
    # weight of stage 1's shape-salience term: each object patch's raw tower output (the features
    # the LLaVA reads), layer-normed, must name its shape under cosine logits at a fixed scale.
    # Colour dominates raw patch features (4x the between-class variance of shape), so without it
    # the LM learns to find "the red object" but not "the circle" (0: off)
    shape_salience_weight: float = 1.0
    shape_salience_scale: float = 10.0
    # weight of a stage 2-3 term that makes the projector put each object patch near the LM's input
    # embeddings of the object's colour and shape words (cosine logits over the vocabulary at a
    # fixed scale of 10). Logit-lens studies find LLaVA's projected patches decode to words of what
    # they show; a toy LM trained from scratch keeps image and text apart without it (0: off)
    word_alignment_weight: float = 0.0
    # stage 3 also fine-tunes the vision tower, at this fraction of the stage's learning rate
    # (LLaVA-1.5 keeps it frozen; LLaVA-NeXT-style recipes tune it; so small a tower needs it)
    tune_vision_in_instruct: bool = True
    vision_lr_scale: float = 0.3
    # question mix of stage 3 (captions included); stage 2 is captions only
    instruct_kinds: dict = field(default_factory=lambda: {
        "colour": 0.25, "shape": 0.25, "exists": 0.2, "count": 0.05, "position": 0.12, "caption": 0.13})
    # share of two-object scenes in stage 3 (binding "the circle" to its colour needs them)
    instruct_p_two: float = 0.75
    eval_n: int = 500
    curve_every: int = 350  # stage 3: quick held-out colour/shape accuracy every this many steps (0: never)

    def scaled(self, factor: float) -> "TrainConfig":
        """Same recipe with every stage's step count multiplied by `factor` (for smoke tests)."""
        def s(c: StageConfig) -> StageConfig:
            return dataclasses.replace(c, steps=max(2, int(round(c.steps * factor))),
                                       warmup=max(1, int(round(c.warmup * factor))))
        return dataclasses.replace(self, lm_pretrain=s(self.lm_pretrain), contrastive=s(self.contrastive),
                                   projector=s(self.projector), instruct=s(self.instruct))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _schedule(opt: torch.optim.Optimizer, cfg: StageConfig):
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def _optimizer(params, cfg: StageConfig, weight_decay: float, slow=(), slow_scale: float = 1.0):
    """AdamW over the trainable `params` (tied weights once); those also in `slow` get lr * slow_scale."""
    seen: set[int] = set()
    params = [p for p in params if p.requires_grad and not (id(p) in seen or seen.add(id(p)))]
    slow_ids = {id(p) for p in slow}
    groups = [{"params": [p for p in params if id(p) not in slow_ids], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in slow_ids], "lr": cfg.lr * slow_scale}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=weight_decay)


def _bar(desc: str, total: int):
    return tqdm(range(total), desc=desc, mininterval=5.0, dynamic_ncols=False, ncols=100)


# ------------------------------------------------------------------------------------------------
# batches


def _text_only_batch(rng, tok, processor, batch: int):
    """Stage 0: chat texts without the image (question + response), and captions alone."""
    texts = []
    for _ in range(batch):
        ex = gen.sample_example(rng)
        if rng.random() < 0.25:
            texts.append(ex.response if ex.question.kind == "caption" else gen.caption(ex.scene))
        else:
            msgs = [{"role": "user", "content": [{"type": "text", "text": ex.text}]},
                    {"role": "assistant", "content": [{"type": "text", "text": ex.response}]}]
            texts.append(processor.apply_chat_template(msgs))
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return enc["input_ids"], enc["attention_mask"], labels


def _caption_ids(tok, captions: list[str]) -> torch.Tensor:
    enc = tok(captions)["input_ids"]  # <s> ... (BOS added by the tokenizer)
    enc = [ids + [tok.eos_token_id] for ids in enc]
    width = max(len(x) for x in enc)
    return torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x in enc])


def _patch_cover(masks: np.ndarray) -> np.ndarray:
    """Share of each 4x4 patch that each object's mask covers: [n_objects, 64], row-major (the
    order of the LLaVA's image tokens; `saev_core.model.patches` derives the same from the config)."""
    g = gen.IMAGE_SIZE // PATCH_SIZE
    return masks.reshape(len(masks), g, PATCH_SIZE, g, PATCH_SIZE).mean(axis=(2, 4)).reshape(len(masks), g * g)


def _multimodal_batch(rng, processor, batch: int, kinds: dict | None, p_two: float = 0.5):
    """Stages 2-3: images with questions (kind drawn from `kinds` weights) and full responses;
    labels cover the response tokens and the closing </s> only. Also returns `patch_words`
    [batch, 64, 2]: the colour and shape word ids of the object covering at least half of each
    patch (-100 elsewhere), for the word-alignment term."""
    tok = processor.tokenizer
    names = list(kinds) if kinds else ["caption"]
    p = np.array([kinds[k] for k in names]) if kinds else np.ones(1)
    images, full, prompts, objects = [], [], [], []
    for _ in range(batch):
        kind = names[int(rng.choice(len(names), p=p / p.sum()))]
        ex = gen.sample_example(rng, kind=kind, p_two=p_two)
        image, masks = gen.render_scene(ex.scene)
        images.append(image)
        objects.append((ex.scene.objects, masks))
        full.append(chat_text(processor, ex.text, ex.response))
        prompts.append(chat_text(processor, ex.text))
    enc = processor(text=full, images=images, padding=True, return_tensors="pt")
    patch_words = torch.full((batch, NUM_IMAGE_TOKENS, 2), -100, dtype=torch.long)
    for b, (objs, masks) in enumerate(objects):
        for o, c in zip(objs, _patch_cover(masks)):
            words = tok.convert_tokens_to_ids([o.colour, o.shape])
            patch_words[b, torch.from_numpy(c >= 0.5)] = torch.tensor(words)
    # prompt lengths in tokens, with the image placeholder expanded like the processor does
    n_img = int((enc["input_ids"][0] == processor.image_token_id).sum())
    plen = [len(tok(t.replace(IMAGE, IMAGE * n_img))["input_ids"]) for t in prompts]
    labels = enc["input_ids"].clone()
    for i, n in enumerate(plen):
        labels[i, :n] = -100
    labels[enc["attention_mask"] == 0] = -100
    return enc, labels, patch_words


def _word_alignment_loss(projected: torch.Tensor, embeddings: torch.Tensor, patch_words: torch.Tensor,
                         scale: float = 10.0) -> torch.Tensor:
    """Cross-entropy of each object patch's colour word and shape word from cosine(projected
    patch, input embedding) * scale over the whole vocabulary."""
    flat = projected.reshape(-1, projected.shape[-1])
    words = patch_words.reshape(-1, 2)
    keep = words[:, 0] >= 0
    logits = scale * F.normalize(flat[keep], dim=-1) @ F.normalize(embeddings, dim=-1).T
    return (F.cross_entropy(logits, words[keep, 0]) + F.cross_entropy(logits, words[keep, 1])) / 2


# ------------------------------------------------------------------------------------------------
# stages


def _lm_logits(llava, input_ids, attention_mask):
    h = llava.model.language_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return llava.lm_head(h)


def stage_lm_pretrain(llava, processor, cfg: TrainConfig, seed: int, log: dict):
    sc = cfg.lm_pretrain
    rng = np.random.default_rng([seed, 0])
    params = list({id(p): p for m in (llava.model.language_model, llava.lm_head) for p in m.parameters()}.values())
    opt = _optimizer(params, sc, cfg.weight_decay)
    sched = _schedule(opt, sc)
    llava.train()
    bar = _bar("stage 0: LM text pretraining", sc.steps)
    for _ in bar:
        ids, mask, labels = _text_only_batch(rng, processor.tokenizer, processor, sc.batch)
        logits = _lm_logits(llava, ids, mask)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    log["lm_pretrain_final_loss"] = float(loss.item())


def object_phrases() -> list[str]:
    """Every object phrase of the world without position, e.g. 'a big red circle' (48 of them),
    index = size * 24 + colour * 4 + shape; then one phrase per attribute value: 'a circle' (4),
    'a red object' (6), 'a big object' (2)."""
    return ([f"a {z} {c} {s}" for z in gen.SIZES for c in gen.COLOURS for s in gen.SHAPES]
            + [f"a {s}" for s in gen.SHAPES] + [f"{'an' if c[0] in 'aeiou' else 'a'} {c} object" for c in gen.COLOURS]
            + [f"a {z} object" for z in gen.SIZES])


_N_CONJ, _N_SHAPE, _N_COLOUR = len(gen.SIZES) * len(gen.COLOURS) * len(gen.SHAPES), len(gen.SHAPES), len(gen.COLOURS)


def _clip_batch(rng, processor, batch: int, negatives: bool = True) -> dict:
    """A contrastive batch: images; their captions, then hard negative captions (if `negatives`);
    the positive mask `same` [n_images, n_texts] (identical captions are all positives:
    duplicates happen in a small world); and for every object, its patch weights `regions`
    [n_objects, n_images * 64] (share of each 4x4 patch its mask covers, normalised) and the
    index `region_labels` of its phrase in ``object_phrases()``; `patch_labels` [n_images * 64]
    gives every patch at least a quarter covered by an object that object's phrase (else -100)."""
    scenes = [gen.sample_scene(rng) for _ in range(batch)]
    caps = [gen.caption(s) for s in scenes]
    texts = caps + ([c for s in scenes for c in gen.negative_captions(rng, s)] if negatives else [])
    rendered = [gen.render_scene(s) for s in scenes]
    pv = processor.image_processor([r[0] for r in rendered], return_tensors="pt")["pixel_values"]
    ids = _caption_ids(processor.tokenizer, texts)
    same = torch.tensor([[a == b for b in texts] for a in caps], dtype=torch.float32)
    phrases = {p: i for i, p in enumerate(object_phrases())}
    n = NUM_IMAGE_TOKENS
    rows, labels = [], []
    patch_labels = np.full(batch * n, -100, dtype=np.int64)
    for b, (scene, (_, masks)) in enumerate(zip(scenes, rendered)):
        for o, c in zip(scene.objects, _patch_cover(masks)):
            row = np.zeros(batch * n, dtype=np.float32)
            row[b * n:(b + 1) * n] = c / c.sum()
            rows.append(row)
            label = phrases[f"a {o.size} {o.colour} {o.shape}"]
            labels.append(label)
            patch_labels[b * n + np.where(c >= 0.25)[0]] = label
    return {"pixel_values": pv, "ids": ids, "same": same, "regions": torch.from_numpy(np.stack(rows)),
            "region_labels": torch.tensor(labels), "patch_labels": torch.from_numpy(patch_labels)}


def _embed_patches(clip, patches: torch.Tensor) -> torch.Tensor:
    """Pooled patch features [..., d] -> normalised joint-space embeddings."""
    return F.normalize(clip.visual_projection(clip.vision_model.post_layernorm(patches)), dim=-1)


def _embed_texts(clip, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    out = clip.text_model(input_ids=ids, attention_mask=(ids != pad_id).long()).pooler_output
    return F.normalize(clip.text_projection(out), dim=-1)


def _clip_logits(clip, pv, ids, pad_id) -> torch.Tensor:
    """Image-to-text logits [n_images, n_texts]. The image embedding pools the PATCH tokens of the
    last layer (mean, then CLIP's post-layernorm and projection) instead of CLS: the LLaVA reads
    exactly those patch tokens (vision_feature_layer=-1, CLS dropped), so they must carry the
    caption-aligned content themselves."""
    patches = clip.vision_model(pixel_values=pv).last_hidden_state[:, 1:]
    return clip.logit_scale.exp() * _embed_patches(clip, patches.mean(1)) @ _embed_texts(clip, ids, pad_id).T


def _info_nce(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE; image->text ranks every text (hard negatives included),
    text->image is computed for the true captions (the first n_images texts) only."""
    n = logits.shape[0]
    li = -(same / same.sum(1, keepdim=True) * F.log_softmax(logits, -1)).sum(-1).mean()
    st = same[:, :n].T
    lt = -(st / st.sum(1, keepdim=True) * F.log_softmax(logits[:, :n].T, -1)).sum(-1).mean()
    return (li + lt) / 2


def _shape_salience_loss(patches: torch.Tensor, patch_labels: torch.Tensor, head: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Cross-entropy of each object patch's shape from cosine(layer_norm(raw feature), head row) *
    a fixed scale: low loss needs the shape directions to hold a large share of the raw feature,
    which a learned projection on top (as in the phrase terms) does not require."""
    flat = patches.reshape(-1, patches.shape[-1])
    keep = patch_labels >= 0
    z = F.normalize(F.layer_norm(flat[keep], flat.shape[-1:]), dim=-1)
    logits = scale * z @ F.normalize(head, dim=-1).T
    return F.cross_entropy(logits, patch_labels[keep] % _N_SHAPE)


def _clip_loss(clip, batch: dict, phrase_ids: torch.Tensor, pad_id: int, region_weight: float,
               salience: tuple | None = None):
    """Image-caption InfoNCE on mean-pooled patches, plus (region_weight > 0) a region-phrase
    term: each object's mask-pooled patches, and each patch it covers on its own, must pick the
    object's phrase among all 48 object phrases (region- and patch-level image-text contrast, as
    in RegionCLIP/GLIP and dense CLIP variants); each covered patch must also pick its shape's,
    colour's and size's own phrase ('a circle', 'a red object', 'a big object'). The patch-level
    part makes every patch of an object carry its attributes along directions shared by all
    objects with that attribute, so the LM can find "the circle" (of any colour) by attention.
    `salience` = (head, weight, scale) adds ``_shape_salience_loss``. Returns the total loss and
    its detached parts {caption, region, salience}."""
    patches = clip.vision_model(pixel_values=batch["pixel_values"]).last_hidden_state[:, 1:]
    scale = clip.logit_scale.exp()
    global_loss = _info_nce(scale * _embed_patches(clip, patches.mean(1)) @ _embed_texts(clip, batch["ids"], pad_id).T,
                            batch["same"])
    total, parts = global_loss, {"caption": global_loss.detach()}
    if salience is not None:
        head, weight, fixed_scale = salience
        sal = _shape_salience_loss(patches, batch["patch_labels"], head, fixed_scale)
        total, parts["salience"] = total + weight * sal, sal.detach()
    if region_weight <= 0:
        return total, parts
    flat = patches.reshape(-1, patches.shape[-1])
    phrases = _embed_texts(clip, phrase_ids, pad_id)
    conj = phrases[:_N_CONJ]
    region_logits = scale * _embed_patches(clip, batch["regions"] @ flat) @ conj.T
    keep = batch["patch_labels"] >= 0
    labels = batch["patch_labels"][keep]
    patch_logits = scale * _embed_patches(clip, flat[keep]) @ phrases.T
    a, b, c = _N_CONJ, _N_CONJ + _N_SHAPE, _N_CONJ + _N_SHAPE + _N_COLOUR
    patch_loss = (F.cross_entropy(patch_logits[:, :a], labels)
                  + F.cross_entropy(patch_logits[:, a:b], labels % _N_SHAPE)
                  + F.cross_entropy(patch_logits[:, b:c], (labels // _N_SHAPE) % _N_COLOUR)
                  + F.cross_entropy(patch_logits[:, c:], labels // (_N_SHAPE * _N_COLOUR))) / 4
    region_loss = (F.cross_entropy(region_logits, batch["region_labels"]) + patch_loss) / 2
    parts["region"] = region_loss.detach()
    return total + region_weight * region_loss, parts


@torch.no_grad()
def _clip_retrieval(clip, processor, seed: int, n: int = 256) -> float:
    """Image->caption top-1 retrieval accuracy within a held-out batch of n (duplicates count as hits)."""
    clip.eval()
    b = _clip_batch(np.random.default_rng([seed, 101]), processor, n, negatives=False)
    pred = _clip_logits(clip, b["pixel_values"], b["ids"], processor.tokenizer.pad_token_id).argmax(-1)
    clip.train()
    return float(b["same"][torch.arange(n), pred].mean())


def stage_contrastive(llava, processor, cfg: TrainConfig, seed: int, log: dict):
    from transformers import CLIPModel

    sc = cfg.contrastive
    clip = CLIPModel(build_clip_config(processor.tokenizer, cfg.spec))
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1 / cfg.clip_temperature_init))
    rng = np.random.default_rng([seed, 1])
    salience = None
    params = list(clip.parameters())
    if cfg.shape_salience_weight > 0:
        head = torch.nn.Parameter(torch.randn(_N_SHAPE, cfg.spec.vision_hidden) * 0.02)
        salience = (head, cfg.shape_salience_weight, cfg.shape_salience_scale)
        params.append(head)
    opt = _optimizer(params, sc, cfg.weight_decay)
    sched = _schedule(opt, sc)
    clip.train()
    log["clip_retrieval_before"] = _clip_retrieval(clip, processor, seed)
    bar = _bar("stage 1: contrastive image-caption", sc.steps)
    pad = processor.tokenizer.pad_token_id
    phrase_ids = _caption_ids(processor.tokenizer, object_phrases())
    for _ in bar:
        batch = _clip_batch(rng, processor, sc.batch, negatives=cfg.contrastive_negatives)
        loss, parts = _clip_loss(clip, batch, phrase_ids, pad, cfg.region_weight, salience)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix({k: f"{v.item():.3f}" for k, v in parts.items()}, refresh=False)
    log["contrastive_final_loss"] = {k: float(v) for k, v in parts.items()}
    log["clip_retrieval_after"] = _clip_retrieval(clip, processor, seed)
    missing = llava.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    assert not missing.missing_keys and not missing.unexpected_keys
    return clip


def _train_multimodal(llava, processor, cfg: TrainConfig, sc: StageConfig, seed: int, stage: int,
                      kinds: dict | None, desc: str, curve: list | None = None, p_two: float = 0.5) -> float:
    rng = np.random.default_rng([seed, stage])
    params = [p for p in llava.parameters() if p.requires_grad]
    opt = _optimizer(params, sc, cfg.weight_decay, slow=list(llava.model.vision_tower.parameters()),
                     slow_scale=cfg.vision_lr_scale)
    sched = _schedule(opt, sc)
    llava.train()
    captured: list[torch.Tensor] = []
    hook = llava.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.append(o))
    bar = _bar(desc, sc.steps)
    for step in bar:
        if curve is not None and cfg.curve_every and step and step % cfg.curve_every == 0:
            acc = evaluate(llava, processor, n=100, seed=seed + 2, kinds=("colour", "shape"))
            curve.append({"step": step, "colour": acc["colour"], "shape": acc["shape"]})
            bar.write(f"  step {step}: held-out colour {acc['colour']:.2f} shape {acc['shape']:.2f}")
            llava.train()
        enc, labels, patch_words = _multimodal_batch(rng, processor, sc.batch, kinds, p_two)
        captured.clear()
        out = llava(**enc, labels=labels)
        loss = out.loss
        if cfg.word_alignment_weight > 0:
            align = _word_alignment_loss(captured[0], llava.get_input_embeddings().weight, patch_words)
            loss = loss + cfg.word_alignment_weight * align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{out.loss.item():.3f}", refresh=False)
    hook.remove()
    return float(out.loss.item())


def _freeze(module, trainable: bool):
    for p in module.parameters():
        p.requires_grad_(trainable)


def stage_projector(llava, processor, cfg: TrainConfig, seed: int, log: dict):
    _freeze(llava, False)
    _freeze(llava.model.multi_modal_projector, True)
    log["projector_final_loss"] = _train_multimodal(llava, processor, cfg, cfg.projector, seed, 2, None,
                                                    "stage 2: projector alignment (captions)")


def stage_instruct(llava, processor, cfg: TrainConfig, seed: int, log: dict):
    _freeze(llava, True)
    _freeze(llava.model.vision_tower, cfg.tune_vision_in_instruct)
    log["instruct_curve"] = []
    log["instruct_final_loss"] = _train_multimodal(llava, processor, cfg, cfg.instruct, seed, 3,
                                                   cfg.instruct_kinds, "stage 3: instruction tuning",
                                                   curve=log["instruct_curve"], p_two=cfg.instruct_p_two)
    _freeze(llava, True)


# ------------------------------------------------------------------------------------------------


def train(out: str | pathlib.Path, seed: int = 0, cfg: TrainConfig = TrainConfig(), threads: int = 2,
          command: str | None = None) -> dict:
    """Run the four stages, evaluate, and save model + processor + toyworld.json into `out`
    (`command` is recorded there; by default the CLI call with `out`, `seed`, `threads`).
    torch's thread count and deterministic mode are set for the run and restored after it."""
    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        return _train(out, seed, cfg, threads, command)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])


def _train(out, seed: int, cfg: TrainConfig, threads: int, command: str | None) -> dict:
    from transformers import LlavaForConditionalGeneration
    import transformers

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    t_start = time.time()
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)

    processor = build_processor()
    config = build_llava_config(processor.tokenizer, cfg.spec)
    llava = LlavaForConditionalGeneration(config)
    torch.manual_seed(seed + 1)  # CLIP's init below is independent of the LLaVA's size
    log: dict = {}
    times: dict = {}

    for name, stage in (("lm_pretrain", stage_lm_pretrain), ("contrastive", stage_contrastive),
                        ("projector", stage_projector), ("instruct", stage_instruct)):
        t = time.time()
        stage(llava, processor, cfg, seed, log)
        times[name] = time.time() - t

    t = time.time()
    llava.eval()
    acc = evaluate(llava, processor, n=cfg.eval_n, seed=seed + 1,
                   kinds=("colour", "shape", "exists", "count", "position"))
    times["evaluate"] = time.time() - t
    t = time.time()
    from .diagnostics import crossmodal_cosines

    geometry = {f"layer_{k}": crossmodal_cosines(llava, processor, n=100, layer=k, seed=seed + 1)
                for k in range(cfg.spec.lm_layers)}
    times["diagnostics"] = time.time() - t
    times["total"] = time.time() - t_start

    llava.save_pretrained(out)
    processor.save_pretrained(out)
    n_params = sum(p.numel() for p in llava.parameters())
    info = {
        "description": "toy LLaVA of saev_core.toyworld (see train_model.py)",
        "command": command or f"python -m saev_core.toyworld.train_model --out {out} --seed {seed} --threads {threads}",
        "seed": seed,
        "threads": threads,
        "train_config": cfg.to_dict(),
        "n_parameters": n_params,
        "accuracy": acc,
        "accuracy_note": "greedy first answer token on held-out scenes (evaluate(..., seed=seed+1))",
        "training_log": log,
        "crossmodal_cosines": geometry,
        "crossmodal_note": "mean cosine of image-token vs caption-word residuals at each LM layer's output "
                           "(saev_core.toyworld.diagnostics.crossmodal_cosines)",
        "seconds": {k: round(v, 1) for k, v in times.items()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    (out / "toyworld.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (HF model + processor + toyworld.json)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's steps (smoke tests)")
    ap.add_argument("--freeze-vision", action="store_true", help="keep the vision tower frozen in stage 3 too")
    ap.add_argument("--shape-salience", type=float, default=TrainConfig.shape_salience_weight,
                    help="weight of stage 1's shape-salience term (0: off)")
    ap.add_argument("--word-alignment", type=float, default=TrainConfig.word_alignment_weight,
                    help="weight of stages 2-3's patch-to-word alignment term (0: off)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = TrainConfig(tune_vision_in_instruct=not args.freeze_vision, shape_salience_weight=args.shape_salience,
                      word_alignment_weight=args.word_alignment)
    if args.scale != 1.0:
        cfg = cfg.scaled(args.scale)
    argv = sys.argv[1:] if argv is None else list(argv)
    info = train(args.out, seed=args.seed, cfg=cfg, threads=args.threads,
                 command=" ".join(["python -m saev_core.toyworld.train_model", *argv]))
    print(json.dumps({"accuracy": info["accuracy"], "seconds": info["seconds"],
                      "training_log": info["training_log"]}, indent=2))


if __name__ == "__main__":
    main()
