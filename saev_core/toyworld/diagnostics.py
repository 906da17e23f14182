"""Sanity checks of the toy model's geometry: do image tokens and the words naming them share
directions in the LM's residual stream?

``crossmodal_cosines(model, processor, n, layer, seed)`` runs the captioning conversation
(image + "describe the image." + the correct caption, teacher forced), takes the raw output of
LM decoder layer `layer` (``model.model.language_model.layers[layer]``) and reports the mean
cosine between image-token residuals and the residuals of the caption's words, by word category.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from saev_core.model.patches import PatchGeometry
from . import generator as gen
from .model import chat_text


@torch.no_grad()
def crossmodal_cosines(model, processor, n: int = 100, layer: int = 2, seed: int = 3) -> dict:
    """Mean cosine similarities at the output of LM layer `layer` (0-based) over `n` scenes.

    Keys: `image_vs_<category>` for word categories colour, shape, size, position, function
    (there/is/a/at/the/and/.), each the mean over samples of the mean over (image token, word
    token) pairs; `object_patch_vs_own_colour` / `_own_shape` (patches at least half covered by
    an object vs that object's colour/shape word) and `background_patch_vs_colour` / `_shape`
    (patches no object touches vs the same words); `image_vs_image` and `text_vs_text` (mean
    pairwise cosine within each modality, self-pairs excluded) for scale."""
    tok = processor.tokenizer
    question = "describe the image."
    # each image position's patch, and the prompt's length once its <image> is expanded: the
    # caption's words are everything after it
    geo = PatchGeometry(model.config, processor).for_image(gen.IMAGE_SIZE, gen.IMAGE_SIZE)
    n_prompt = len(tok(chat_text(processor, question).replace(
        processor.image_token, processor.image_token * geo.n_tokens))["input_ids"])
    layers = model.model.language_model.layers
    store = {}

    def hook(_module, _inp, out):
        store["h"] = out[0] if isinstance(out, tuple) else out

    handle = layers[layer].register_forward_hook(hook)
    cats = {"colour": set(gen.COLOURS), "shape": set(gen.SHAPES), "size": set(gen.SIZES),
            "position": {w for p in gen.POSITIONS for w in p.split()},
            "function": {"there", "is", "a", "at", "the", "and", "."}}
    sums: dict[str, list[float]] = defaultdict(list)
    rng = np.random.default_rng([seed, 4242])
    model.eval()
    try:
        for _ in range(n):
            scene = gen.sample_scene(rng)
            image, masks = gen.render_scene(scene)
            cap = gen.caption(scene)
            enc = processor(text=[chat_text(processor, question, cap)], images=[image],
                            return_tensors="pt")
            model(**enc)
            h = store["h"][0].float()
            h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            ids = enc["input_ids"][0]
            img_pos = (ids == model.config.image_token_id).nonzero().squeeze(-1)
            if len(img_pos) != geo.n_tokens:
                raise ValueError(f"{len(img_pos)} image tokens, but the patch geometry has {geo.n_tokens}")
            hi = h[img_pos]  # [64, d]
            words = tok.convert_ids_to_tokens(ids[n_prompt:].tolist())
            pos = list(range(n_prompt, len(ids)))
            for cat, vocab in cats.items():
                sel = [p for p, w in zip(pos, words) if w in vocab]
                if sel:
                    sums[f"image_vs_{cat}"].append(float((hi @ h[sel].T).mean()))
            cover = np.stack([geo.coverage(m) for m in masks])  # [n_objects, 64]
            background = np.where(cover.sum(0) == 0)[0]
            for o, c in zip(scene.objects, cover):
                own = np.where(c >= 0.5)[0]
                for attr in ("colour", "shape"):
                    word = getattr(o, attr)
                    sel = [p for p, w in zip(pos, words) if w == word]
                    if not sel:
                        continue
                    if len(own):
                        sums[f"object_patch_vs_own_{attr}"].append(float((hi[own] @ h[sel].T).mean()))
                    if len(background):
                        sums[f"background_patch_vs_{attr}"].append(float((hi[background] @ h[sel].T).mean()))
            ii = hi @ hi.T
            sums["image_vs_image"].append(float((ii.sum() - ii.diagonal().sum()) / (len(hi) * (len(hi) - 1))))
            ht = h[pos]
            tt = ht @ ht.T
            sums["text_vs_text"].append(float((tt.sum() - tt.diagonal().sum()) / (len(ht) * (len(ht) - 1))))
    finally:
        handle.remove()
    return {"layer": layer, "n": n, **{k: round(float(np.mean(v)), 4) for k, v in sorted(sums.items())}}
