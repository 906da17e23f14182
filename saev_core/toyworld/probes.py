"""Held-out probes of a toy LLaVA, scored from next-token logits (no generation).

Three probes, each built from its own seeded numpy stream (tagged apart from training and pool
streams, so any seed gives scenes no training stage drew):

- ``pope``: POPE-style "is there a <colour> <shape>?", half present, half absent; half of the
  absent objects are adversarial (they share the colour or the shape of a present object).
  A model says "yes" when its logit for "yes" beats its logit for "no". Reported: accuracy,
  precision, recall, F1 (positive = "yes"), the yes-ratio, and the accuracy on adversarial items.
- ``attribute``: "what color is the <shape>?" and "what shape is the <colour> object?" in
  two-object scenes, answered by the argmax over the colour (or shape) words only.
- ``sensitivity``: the same question on two images whose correct answers differ (a colour
  question whose shape has another colour in the second scene; an existence question whose
  object is present in one and absent in the other). The answer must change.

``primary`` = mean of POPE accuracy and attribute accuracy: the benchmark's headline number.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from . import generator as gen

PROBE_STREAM = 9_191  # probe scenes come from numpy streams [seed, PROBE_STREAM, k]


@dataclass
class ProbeSet:
    """Images, questions, the answer options each is scored over, and the correct answers."""

    images: list = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    options: list[tuple[str, ...]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)  # which probe (and sub-kind) an item belongs to
    pair: list[int] = field(default_factory=list)  # sensitivity: index of the pair, else -1

    def add(self, scene: gen.Scene, q: gen.QuestionSpec, options, tag: str, pair: int = -1) -> None:
        self.images.append(gen.render_scene(scene)[0])
        self.questions.append(gen.question_text(q))
        self.options.append(tuple(options))
        self.answers.append(str(gen.answer(scene, q)).split()[0])
        self.tags.append(tag)
        self.pair.append(pair)

    def __len__(self) -> int:
        return len(self.questions)


YES_NO = ("yes", "no")


def _absent_pair(rng, scene: gen.Scene, adversarial: bool) -> tuple[str, str]:
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [(c, s) for c in gen.COLOURS for s in gen.SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == o.colour or s == o.shape for o in scene.objects)]
    far = [p for p in absent if p not in near]
    pool = near if adversarial else (far or absent)
    return pool[int(rng.integers(len(pool)))]


def build_probes(seed: int = 0, n_pope: int = 240, n_attribute: int = 240, n_pairs: int = 120) -> ProbeSet:
    """The fixed probe set (see the module docstring); sizes are item counts (pairs for sensitivity)."""
    ps = ProbeSet()
    rng = np.random.default_rng([seed, PROBE_STREAM, 0])
    for i in range(n_pope):
        scene = gen.sample_scene(rng)
        if i % 2 == 0:
            o = scene.objects[int(rng.integers(len(scene.objects)))]
            ps.add(scene, gen.QuestionSpec("exists", colour=o.colour, shape=o.shape), YES_NO, "pope:present")
        else:
            adversarial = i % 4 == 1
            c, s = _absent_pair(rng, scene, adversarial)
            tag = "pope:adversarial" if adversarial else "pope:random"
            ps.add(scene, gen.QuestionSpec("exists", colour=c, shape=s), YES_NO, tag)
    rng = np.random.default_rng([seed, PROBE_STREAM, 1])
    for i in range(n_attribute):
        scene = gen.sample_scene(rng, n_objects=2)
        o = scene.objects[int(rng.integers(2))]
        if i % 2 == 0:
            ps.add(scene, gen.QuestionSpec("colour", shape=o.shape), tuple(gen.COLOURS), "attribute:colour")
        else:
            ps.add(scene, gen.QuestionSpec("shape", colour=o.colour), gen.SHAPES, "attribute:shape")
    rng = np.random.default_rng([seed, PROBE_STREAM, 2])
    for i in range(n_pairs):
        a = gen.sample_scene(rng, n_objects=2)
        o = a.objects[int(rng.integers(2))]
        if i % 2 == 0:
            q = gen.QuestionSpec("colour", shape=o.shape)
            b = gen.sample_scene(rng)
            while gen.answer(b, q) in (None, o.colour):
                b = gen.sample_scene(rng)
            opts, tag = tuple(gen.COLOURS), "sensitivity:colour"
        else:
            q = gen.QuestionSpec("exists", colour=o.colour, shape=o.shape)
            b = gen.sample_scene(rng)
            while gen.answer(b, q) != "no":
                b = gen.sample_scene(rng)
            opts, tag = YES_NO, "sensitivity:exists"
        ps.add(a, q, opts, tag, pair=i)
        ps.add(b, q, opts, tag, pair=i)
    return ps


def next_token_logits(model, processor, images, questions, batch_size: int = 64):
    """Logits [n, vocab] of the first answer token after each (image, question) chat prompt.
    Prompts are grouped by token length, so no padding is needed."""
    import torch

    from .model import chat_text

    tok = processor.tokenizer
    texts = [chat_text(processor, q) for q in questions]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(texts):
        groups[len(tok(t)["input_ids"])].append(i)
    out = torch.empty(len(texts), len(tok))
    model.eval()
    with torch.no_grad():
        for idx in groups.values():
            for s in range(0, len(idx), batch_size):
                part = idx[s:s + batch_size]
                enc = processor(text=[texts[i] for i in part], images=[images[i] for i in part], return_tensors="pt")
                out[part] = model(**enc).logits[:, -1].float()
    return out


def restricted_argmax(logits, token_ids: list[list[int]], options: list[tuple[str, ...]]) -> list[str]:
    """For each row, the option whose token has the highest logit (ties go to the first option)."""
    preds = []
    for row, ids, opts in zip(logits, token_ids, options):
        vals = row[ids]
        preds.append(opts[int(vals.argmax())])
    return preds


def pope_metrics(pred: list[str], truth: list[str]) -> dict:
    """Accuracy, precision, recall, F1 (positive = 'yes') and the share of 'yes' predictions."""
    p = np.array([x == "yes" for x in pred])
    t = np.array([x == "yes" for x in truth])
    tp, fp, fn = int((p & t).sum()), int((p & ~t).sum()), int((~p & t).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": float((p == t).mean()), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": float(p.mean())}


def summarize(ps: ProbeSet, preds: list[str]) -> dict:
    """Every probe figure from the predictions over `ps` (see the module docstring)."""
    tags = np.array(ps.tags)
    right = np.array([p == a for p, a in zip(preds, ps.answers)])
    pope = tags.astype(str).tolist()
    idx = [i for i, t in enumerate(pope) if t.startswith("pope:")]
    out = {f"pope_{k}": v for k, v in pope_metrics([preds[i] for i in idx], [ps.answers[i] for i in idx]).items()}
    out["pope_adversarial_accuracy"] = float(right[tags == "pope:adversarial"].mean())
    attr = np.char.startswith(tags.astype(str), "attribute:")
    out["attribute_accuracy"] = float(right[attr].mean())
    out["colour_accuracy"] = float(right[tags == "attribute:colour"].mean())
    out["shape_accuracy"] = float(right[tags == "attribute:shape"].mean())
    pairs: dict[int, list[int]] = defaultdict(list)
    for i, k in enumerate(ps.pair):
        if k >= 0:
            pairs[k].append(i)
    changed = [preds[a] != preds[b] for a, b in pairs.values()]
    both = [right[a] and right[b] for a, b in pairs.values()]
    out["sensitivity_changed"] = float(np.mean(changed))
    out["sensitivity_both_right"] = float(np.mean(both))
    out["primary"] = (out["pope_accuracy"] + out["attribute_accuracy"]) / 2
    return out


def run_probes(model, processor, ps: ProbeSet) -> dict:
    """Score `model` on the probe set: next-token logits, restricted argmax, then ``summarize``."""
    tok = processor.tokenizer
    ids = [tok.convert_tokens_to_ids(list(o)) for o in ps.options]
    logits = next_token_logits(model, processor, ps.images, ps.questions)
    return summarize(ps, restricted_argmax(logits, ids, ps.options))
