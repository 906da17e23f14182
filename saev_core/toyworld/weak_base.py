"""A deliberately imperfect toy LLaVA: the shipped model fine-tuned briefly on a biased mix.

    python -m saev_core.toyworld.weak_base --out DIR

The shipped model answers colour and shape at 0.99-1.00, so preference training has nothing to
fix on it. This fine-tune teaches two known faults in known shares of its training answers:
- ``yes_bias``: an existence question about an ABSENT object is answered "yes. there is ..."
  (object hallucination, what POPE measures);
- ``swap_bias``: a colour question in a two-object scene is answered with the OTHER object's
  colour (an attribute-binding error).
Every other answer is correct. The run is deterministic (one thread, deterministic algorithms,
seeded numpy streams), so the command reproduces ``model.safetensors`` byte for byte; its sha256
and probe scores go into ``weak_base.json`` next to the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pathlib
import sys
from dataclasses import dataclass, field

import numpy as np

from . import generator as gen

WEAK_STREAM = 4_242  # training draws come from numpy stream [seed, WEAK_STREAM]


@dataclass(frozen=True)
class WeakBaseConfig:
    steps: int = 150
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 10
    yes_bias: float = 0.6
    swap_bias: float = 0.6
    kinds: dict = field(default_factory=lambda: {"exists": 0.35, "colour": 0.35, "shape": 0.15, "count": 0.05,
                                                 "position": 0.05, "caption": 0.05})
    p_two: float = 0.75
    seed: int = 0


def biased_example(rng: np.random.Generator, cfg: WeakBaseConfig) -> tuple[gen.Example, str, bool]:
    """One training example and the response taught for it; the flag says whether it is biased."""
    names = list(cfg.kinds)
    p = np.array([cfg.kinds[k] for k in names])
    kind = names[int(rng.choice(len(names), p=p / p.sum()))]
    ex = gen.sample_example(rng, kind=kind, p_two=cfg.p_two)
    roll = rng.random()
    if kind == "exists" and ex.answer == "no" and roll < cfg.yes_bias:
        return ex, gen.wrong_response(rng, ex.scene, ex.question), True
    if kind == "colour" and len(ex.scene.objects) == 2 and roll < cfg.swap_bias:
        return ex, swapped_colour_response(ex.scene, ex.question), True
    return ex, ex.response, False


def swapped_colour_response(scene: gen.Scene, q: gen.QuestionSpec) -> str:
    """The colour answer with the other object's colour (the binding error)."""
    target = gen.referent(scene, q)
    other = next(o for o in scene.objects if o is not target)
    fact = {"size": target.size, "colour": other.colour, "shape": target.shape, "position": target.position}
    return f"{other.colour}. there is {gen.describe(fact)}."


def _batch(rng, processor, cfg: WeakBaseConfig):
    from .model import IMAGE, chat_text

    tok = processor.tokenizer
    images, full, prompts = [], [], []
    for _ in range(cfg.batch):
        ex, resp, _ = biased_example(rng, cfg)
        images.append(gen.render_scene(ex.scene)[0])
        full.append(chat_text(processor, ex.text, resp))
        prompts.append(chat_text(processor, ex.text))
    enc = processor(text=full, images=images, padding=True, return_tensors="pt")
    n_img = int((enc["input_ids"][0] == processor.image_token_id).sum())
    labels = enc["input_ids"].clone()
    for i, t in enumerate(prompts):
        labels[i, :len(tok(t.replace(IMAGE, IMAGE * n_img))["input_ids"])] = -100
    labels[enc["attention_mask"] == 0] = -100
    return enc, labels


def build(out: str | pathlib.Path, cfg: WeakBaseConfig = WeakBaseConfig(), source: str | None = None,
          command: str | None = None, probe_seed: int = 0) -> dict:
    """Fine-tune `source` (default: the shipped toy model) into `out`; returns the info written
    to ``out/weak_base.json``. Vision tower frozen; LM and projector train with AdamW."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import toy_model_path
    from .probes import build_probes, run_probes

    saved = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(cfg.seed)
        src = str(source or toy_model_path())
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(src)
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
        rng = np.random.default_rng([cfg.seed, WEAK_STREAM])
        model.train()
        losses = []
        for _ in tqdm(range(cfg.steps), desc="weak base: biased fine-tune", mininterval=5.0, ncols=100):
            enc, labels = _batch(rng, processor, cfg)
            loss = model(**enc, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
        model.eval()
        out = pathlib.Path(out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        probes = run_probes(model, processor, build_probes(probe_seed))
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])
    info = {"description": "deliberately imperfect toy LLaVA (saev_core.toyworld.weak_base)",
            "command": command or f"python -m saev_core.toyworld.weak_base --out {out}",
            "source": src, "config": dataclasses.asdict(cfg), "final_loss": losses[-1],
            "model_sha256": hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest(),
            "probes": probes, "probe_seed": probe_seed}
    (out / "weak_base.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=WeakBaseConfig.steps)
    ap.add_argument("--yes-bias", type=float, default=WeakBaseConfig.yes_bias)
    ap.add_argument("--swap-bias", type=float, default=WeakBaseConfig.swap_bias)
    args = ap.parse_args(argv)
    cfg = WeakBaseConfig(steps=args.steps, yes_bias=args.yes_bias, swap_bias=args.swap_bias)
    argv = sys.argv[1:] if argv is None else list(argv)
    info = build(args.out, cfg, command=" ".join(["python -m saev_core.toyworld.weak_base", *argv]))
    print(json.dumps({k: info[k] for k in ("model_sha256", "final_loss", "probes")}, indent=2))


if __name__ == "__main__":
    main()
