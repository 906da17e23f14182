"""Toy world: scenes of coloured shapes, their texts, and preference datasets with known corruptions.

Everything here is numpy + PIL, seeded and fast (a 32x32 scene renders in well under a millisecond).

A *scene* is 1 or 2 objects, each with a colour, a shape, a size word and a position word, drawn on
a dark noisy background. Every object's pixel mask is kept, so later work can measure how well a
heatmap localises it. In two-object scenes the objects differ in colour, in shape and in position
cell, so every question the world asks has exactly one answer. Objects are aligned to a 4-pixel
grid (the toy model's patches) and are 8 (small) or 12 (big) pixels wide.

Public API
----------
- ``sample_scene(rng, n_objects=None) -> Scene``
- ``render_scene(scene) -> (PIL.Image, masks)``  (masks: bool array [n_objects, 32, 32])
- ``caption(scene) -> str``
- ``sample_example(rng, kind=None, scene=None) -> Example``  one question/answer about a scene
- ``make_preference_rows(n, layout, corruption_rate, seed) -> (rows, truth)``
- ``write_preference_dataset(folder, n, layout, corruption_rate, seed, formats) -> dict of paths``
- ``vocabulary() -> list[str]``  every word the world's texts use (for the tokenizer)

Responses always start with the answer word(s), then one supporting sentence, e.g.
``"red. there is a big red circle at the top left."`` so a model's greedy first token is its answer.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 32

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (40, 180, 50),
    "blue": (40, 80, 235),
    "yellow": (235, 220, 40),
    "purple": (150, 50, 205),
    "orange": (245, 140, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
# side length of the object's bounding box, in pixels
SIZES: dict[str, int] = {"small": 8, "big": 12}
# objects' corners snap to this grid: the toy LLaVA's 4x4 patches, so every object covers whole
# patches (2x2 or 3x3) and each of its patches shows a part of the shape at a fixed offset. A tiny
# ViT trained on a CPU budget does not learn shapes at arbitrary sub-patch offsets.
GRID = 4
# 3x3 cells of the image, row-major; the position word of an object is the cell of its centre
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)
COUNT_WORDS = ("zero", "one", "two")

QUESTION_KINDS: tuple[str, ...] = ("colour", "shape", "exists", "count", "position", "caption")
# how often each kind is drawn when no kind is asked for
KIND_WEIGHTS: dict[str, float] = {
    "colour": 0.22, "shape": 0.22, "exists": 0.18, "count": 0.08, "position": 0.15, "caption": 0.15,
}

CORRUPTIONS: tuple[str, ...] = ("image_swap", "flipped", "absent_object", "hallucinated_attribute")
CLEAN = "clean"
LAYOUTS: tuple[str, ...] = ("rlaif-v", "align-anything")

_JITTER = 14  # +- per channel colour jitter of an object
_NOISE = 6  # +- per pixel noise over the whole image


# --------------------------------------------------------------------------------------------
# scenes


@dataclass(frozen=True)
class ToyObject:
    colour: str
    shape: str
    size: str  # "small" | "big"
    side: int  # bounding box side in pixels
    x0: int  # top-left corner of the bounding box
    y0: int
    tint: tuple[int, int, int]  # the exact RGB drawn (palette colour + jitter)

    @property
    def position(self) -> str:
        return position_word(self.x0 + self.side / 2.0, self.y0 + self.side / 2.0)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1/y1 exclusive."""
        return (self.x0, self.y0, self.x0 + self.side, self.y0 + self.side)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ToyObject, ...]
    background: int  # grey level of the background
    noise_seed: int  # seed of the per-pixel noise

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Scene":
        d = json.loads(text)
        objs = tuple(ToyObject(**{**o, "tint": tuple(o["tint"])}) for o in d["objects"])
        return Scene(objects=objs, background=int(d["background"]), noise_seed=int(d["noise_seed"]))

    def find(self, colour: str | None = None, shape: str | None = None) -> ToyObject | None:
        """The object with this colour and/or shape, or None."""
        for o in self.objects:
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape):
                return o
        return None


def position_word(cx: float, cy: float) -> str:
    col = min(2, int(cx * 3 // IMAGE_SIZE))
    row = min(2, int(cy * 3 // IMAGE_SIZE))
    return POSITIONS[row * 3 + col]


def _corner_candidates(side: int, cell: int) -> np.ndarray:
    """Top-left coordinates along one axis whose object centre lies in `cell` (0..2) with a margin."""
    third = IMAGE_SIZE / 3.0
    lo, hi = cell * third + 0.75, (cell + 1) * third - 0.75
    starts = np.arange(0, IMAGE_SIZE - side + 1, GRID)
    centres = starts + side / 2.0
    return starts[(centres >= lo) & (centres <= hi)]


def _sample_object(rng: np.random.Generator, colour: str, shape: str, cell: int) -> ToyObject:
    size = str(rng.choice(list(SIZES)))
    side = SIZES[size]
    xs, ys = _corner_candidates(side, cell % 3), _corner_candidates(side, cell // 3)
    x0, y0 = int(rng.choice(xs)), int(rng.choice(ys))
    base = np.array(COLOURS[colour])
    tint = tuple(int(v) for v in np.clip(base + rng.integers(-_JITTER, _JITTER + 1, 3), 0, 255))
    return ToyObject(colour=colour, shape=shape, size=size, side=side, x0=x0, y0=y0, tint=tint)


def _overlap(a: ToyObject, b: ToyObject, gap: int = 1) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return not (ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0)


def sample_scene(rng: np.random.Generator, n_objects: int | None = None, p_two: float = 0.5) -> Scene:
    """Draw a random scene of 1 or 2 objects (distinct colours, shapes and cells, no overlap);
    unless `n_objects` is given, a scene has two objects with probability `p_two`."""
    if n_objects is None:
        n_objects = 2 if rng.random() < p_two else 1
    if n_objects not in (1, 2):
        raise ValueError("a toy scene holds 1 or 2 objects")
    colours = rng.choice(list(COLOURS), size=n_objects, replace=False)
    shapes = rng.choice(list(SHAPES), size=n_objects, replace=False)
    for _ in range(200):
        cells = rng.choice(9, size=n_objects, replace=False)
        objs = [_sample_object(rng, str(c), str(s), int(k)) for c, s, k in zip(colours, shapes, cells)]
        if n_objects == 1 or not _overlap(objs[0], objs[1]):
            break
    else:  # pragma: no cover - practically unreachable
        raise RuntimeError("could not place two objects without overlap")
    objs.sort(key=lambda o: POSITIONS.index(o.position))  # reading order: captions are canonical
    return Scene(objects=tuple(objs), background=int(rng.integers(0, 41)), noise_seed=int(rng.integers(2**31)))


def object_mask(obj: ToyObject) -> np.ndarray:
    """Bool [32, 32] pixel mask of one object."""
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    d = ImageDraw.Draw(canvas)
    x0, y0, s = obj.x0, obj.y0, obj.side
    x1, y1 = x0 + s - 1, y0 + s - 1
    if obj.shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=255)
    elif obj.shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=255)
    elif obj.shape == "triangle":
        d.polygon([(x0 + (s - 1) / 2.0, y0), (x0, y1), (x1, y1)], fill=255)
    elif obj.shape == "cross":
        t = max(3, round(s / 3))
        a = (s - t) // 2
        d.rectangle([x0, y0 + a, x1, y0 + a + t - 1], fill=255)
        d.rectangle([x0 + a, y0, x0 + a + t - 1, y1], fill=255)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}")
    return np.asarray(canvas) > 0


def render_scene(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """The RGB image of a scene and the bool masks [n_objects, 32, 32] of its objects."""
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.background, dtype=np.int16)
    masks = np.stack([object_mask(o) for o in scene.objects])
    for o, m in zip(scene.objects, masks):
        img[m] = o.tint
    noise = np.random.default_rng(scene.noise_seed).integers(-_NOISE, _NOISE + 1, img.shape)
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(img, mode="RGB"), masks


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def pack_masks(masks: np.ndarray) -> list[bytes]:
    """Masks [k, 32, 32] bool -> k packed byte strings (128 bytes each); see ``unpack_mask``."""
    return [np.packbits(m.reshape(-1)).tobytes() for m in masks]


def unpack_mask(packed: bytes) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[: IMAGE_SIZE * IMAGE_SIZE]
    return bits.reshape(IMAGE_SIZE, IMAGE_SIZE).astype(bool)


# --------------------------------------------------------------------------------------------
# texts


def _fact(o: ToyObject) -> dict:
    """The words describing one object: size, colour, shape and position."""
    return {"size": o.size, "colour": o.colour, "shape": o.shape, "position": o.position}


def _facts(scene: Scene) -> list[dict]:
    return [_fact(o) for o in scene.objects]


def describe(obj: ToyObject | dict) -> str:
    o = obj if isinstance(obj, dict) else _fact(obj)
    return f"a {o['size']} {o['colour']} {o['shape']} at the {o['position']}"


def caption(scene: Scene | Sequence[dict]) -> str:
    """Canonical caption, e.g. 'there is a big red circle at the top left and a small blue cross at the bottom.'"""
    facts = _facts(scene) if isinstance(scene, Scene) else list(scene)
    return "there is " + " and ".join(describe(f) for f in facts) + "."


@dataclass(frozen=True)
class QuestionSpec:
    """What a question asks, independent of the image: enough to answer it for any scene."""

    kind: str
    colour: str | None = None
    shape: str | None = None


def question_text(q: QuestionSpec) -> str:
    if q.kind == "colour":
        return f"what color is the {q.shape}?"
    if q.kind == "shape":
        return f"what shape is the {q.colour} object?"
    if q.kind == "exists":
        article = "an" if q.colour[0] in "aeiou" else "a"
        return f"is there {article} {q.colour} {q.shape}?"
    if q.kind == "count":
        return "how many objects are there?"
    if q.kind == "position":
        return f"where is the {q.colour} {q.shape}?"
    if q.kind == "caption":
        return "describe the image."
    raise ValueError(f"unknown question kind {q.kind!r}")


def referent(scene: Scene, q: QuestionSpec) -> ToyObject | None:
    if q.kind == "colour":
        return scene.find(shape=q.shape)
    if q.kind == "shape":
        return scene.find(colour=q.colour)
    if q.kind in ("exists", "position"):
        return scene.find(colour=q.colour, shape=q.shape)
    return None


def answer(scene: Scene, q: QuestionSpec) -> str | None:
    """The correct short answer (first words of the response); None if the question's object is absent."""
    o = referent(scene, q)
    if q.kind == "colour":
        return o.colour if o else None
    if q.kind == "shape":
        return o.shape if o else None
    if q.kind == "position":
        return o.position if o else None
    if q.kind == "exists":
        return "yes" if o else "no"
    if q.kind == "count":
        return COUNT_WORDS[len(scene.objects)]
    if q.kind == "caption":
        return caption(scene)
    raise ValueError(q.kind)


def _response_from_facts(q: QuestionSpec, ans: str, facts: list[dict], target: dict | None) -> str:
    if q.kind == "caption":
        return caption(facts)
    if q.kind == "count":
        return f"{ans}. {caption(facts)}"
    if q.kind == "exists" and ans == "no":
        return f"no. there is no {q.colour} {q.shape}."
    return f"{ans}. there is {describe(target)}."


def response(scene: Scene, q: QuestionSpec) -> str:
    """The correct full response: answer word(s), then the supporting sentence."""
    o = referent(scene, q)
    ans = answer(scene, q)
    if ans is None:
        raise ValueError("the question's object is not in the scene")
    return _response_from_facts(q, ans, _facts(scene), _fact(o) if o else None)


@dataclass(frozen=True)
class Example:
    scene: Scene
    question: QuestionSpec
    text: str  # the question text
    answer: str  # short answer
    response: str  # full correct response


def _pick(rng: np.random.Generator, items: Sequence) -> object:
    return items[int(rng.integers(len(items)))]


def sample_question(rng: np.random.Generator, scene: Scene, kind: str | None = None) -> QuestionSpec:
    """A question about the scene whose object (if any) is in the scene, except 'exists' questions
    answered 'no' (half of them), which name an absent colour+shape, often sharing one attribute
    with a present object."""
    if kind is None:
        kinds = list(KIND_WEIGHTS)
        p = np.array([KIND_WEIGHTS[k] for k in kinds])
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    o: ToyObject = _pick(rng, scene.objects)
    if kind == "colour":
        return QuestionSpec(kind, shape=o.shape)
    if kind == "shape":
        return QuestionSpec(kind, colour=o.colour)
    if kind == "position":
        return QuestionSpec(kind, colour=o.colour, shape=o.shape)
    if kind == "exists":
        if rng.random() < 0.5:
            return QuestionSpec(kind, colour=o.colour, shape=o.shape)
        present = {(x.colour, x.shape) for x in scene.objects}
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        near = [(c, s) for c, s in absent if c == o.colour or s == o.shape]
        c, s = _pick(rng, near if (near and rng.random() < 0.5) else absent)
        return QuestionSpec(kind, colour=c, shape=s)
    if kind in ("count", "caption"):
        return QuestionSpec(kind)
    raise ValueError(f"unknown question kind {kind!r}")


def sample_example(rng: np.random.Generator, kind: str | None = None, scene: Scene | None = None,
                   p_two: float = 0.5) -> Example:
    """A scene (drawn unless given; two objects with probability `p_two`) with one question of
    `kind` (drawn unless given) and its answer."""
    scene = scene if scene is not None else sample_scene(rng, p_two=p_two)
    q = sample_question(rng, scene, kind)
    return Example(scene, q, question_text(q), answer(scene, q), response(scene, q))


def vocabulary() -> list[str]:
    """Every word and punctuation token the world's questions, answers and captions use."""
    words = {"there", "is", "a", "an", "at", "the", "and", "no", "yes", "what", "color", "shape", "object",
             "where", "how", "many", "objects", "are", "describe", "image", ".", "?"}
    words |= set(COLOURS) | set(SHAPES) | set(SIZES) | set(COUNT_WORDS)
    for p in POSITIONS:
        words |= set(p.split())
    return sorted(words)


# --------------------------------------------------------------------------------------------
# wrong answers and corruptions


def _other(rng: np.random.Generator, options: Iterable[str], avoid: Iterable[str]) -> str:
    avoid = set(avoid)
    return str(_pick(rng, [x for x in options if x not in avoid]))


# the words each attribute of an object description can take
_ATTR_VALUES: dict[str, Iterable[str]] = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}


def _mutate_fact(rng: np.random.Generator, fact: dict, attrs: Sequence[str], avoid: dict | None = None) -> dict:
    """Change one attribute (chosen among `attrs`) of an object description to a wrong value."""
    attr = str(_pick(rng, list(attrs)))
    bad = {fact[attr]} | ({avoid[attr]} if avoid and attr in avoid else set())
    return {**fact, attr: _other(rng, _ATTR_VALUES[attr], bad)}


def wrong_response(rng: np.random.Generator, scene: Scene, q: QuestionSpec) -> str:
    """A plausible but wrong response: the answer (and its supporting sentence) changed."""
    facts = _facts(scene)
    o = referent(scene, q)
    if q.kind in ("colour", "shape", "position"):
        attr = q.kind
        target = _fact(o)
        if attr == "colour":  # keep the wrong colour off the other object, so the answer stays wrong
            bad = _other(rng, COLOURS, [f["colour"] for f in facts])
        elif attr == "shape":
            bad = _other(rng, SHAPES, [f["shape"] for f in facts])
        else:
            bad = _other(rng, POSITIONS, [target["position"]])
        wrong = {**target, attr: bad}
        return _response_from_facts(q, bad, facts, wrong)
    if q.kind == "exists":
        if o is not None:
            return f"no. there is no {q.colour} {q.shape}."
        fake = {"size": _pick(rng, list(SIZES)), "colour": q.colour, "shape": q.shape,
                "position": _pick(rng, POSITIONS)}
        return f"yes. there is {describe(fake)}."
    if q.kind == "count":
        if len(facts) == 2:
            return f"one. {caption([facts[int(rng.integers(2))]])}"
        extra = {"size": _pick(rng, list(SIZES)), "colour": _other(rng, COLOURS, [facts[0]["colour"]]),
                 "shape": _other(rng, SHAPES, [facts[0]["shape"]]),
                 "position": _other(rng, POSITIONS, [facts[0]["position"]])}
        both = sorted([facts[0], extra], key=lambda f: POSITIONS.index(f["position"]))
        return f"two. {caption(both)}"
    if q.kind == "caption":
        i = int(rng.integers(len(facts)))
        facts = list(facts)
        facts[i] = _mutate_fact(rng, facts[i], ("colour", "shape"),
                                avoid={"colour": facts[1 - i]["colour"], "shape": facts[1 - i]["shape"]}
                                if len(facts) == 2 else None)
        return caption(facts)
    raise ValueError(q.kind)


def hallucinated_response(rng: np.random.Generator, scene: Scene, q: QuestionSpec) -> str:
    """The correct answer word(s), but the supporting sentence states one wrong attribute."""
    facts = _facts(scene)
    ans = answer(scene, q)
    if q.kind in ("colour", "shape", "position", "exists"):
        o = referent(scene, q)
        if o is None:
            raise ValueError("hallucinated attribute needs an object that is present")
        target = _fact(o)
        fixed = q.kind if q.kind in ("colour", "shape", "position") else None
        # never touch the attribute the question asks about, nor one the question names
        attrs = [a for a in ("size", "position", "colour", "shape")
                 if a != fixed and not (q.kind in ("exists", "position") and a in ("colour", "shape"))
                 and not (q.kind == "colour" and a == "shape") and not (q.kind == "shape" and a == "colour")]
        return _response_from_facts(q, ans, facts, _mutate_fact(rng, target, attrs))
    if q.kind in ("count", "caption"):
        i = int(rng.integers(len(facts)))
        facts = list(facts)
        other = facts[1 - i] if len(facts) == 2 else None
        facts[i] = _mutate_fact(rng, facts[i], ("size", "position", "colour", "shape"),
                                avoid={"colour": other["colour"], "shape": other["shape"],
                                       "position": other["position"]} if other else None)
        facts.sort(key=lambda f: POSITIONS.index(f["position"]))
        return _response_from_facts(q, ans, facts, None)
    raise ValueError(q.kind)


def negative_captions(rng: np.random.Generator, scene: Scene) -> list[str]:
    """Hard negative captions for contrastive training (in the spirit of NegCLIP): the scene's
    caption with one object's shape replaced by every other allowed shape, plus one caption with
    another error (a colour, size or position changed, or, in two-object scenes, the objects'
    colours or shapes swapped, a binding error)."""
    facts = _facts(scene)
    i = int(rng.integers(len(facts)))
    other = facts[1 - i] if len(facts) == 2 else None
    out = []
    for shape in SHAPES:
        if shape != facts[i]["shape"] and not (other and other["shape"] == shape):
            alt = list(facts)
            alt[i] = {**facts[i], "shape": shape}
            out.append(caption(alt))
    if other and rng.random() < 0.3:
        attr = "colour" if rng.random() < 0.5 else "shape"
        a, b = facts
        out.append(caption([{**a, attr: b[attr]}, {**b, attr: a[attr]}]))
        return out
    attr = ("colour", "size", "position")[int(rng.choice(3, p=[0.5, 0.25, 0.25]))]
    avoid = {k: other[k] for k in ("colour", "shape", "position")} if other else None
    alt = list(facts)
    alt[i] = _mutate_fact(rng, facts[i], (attr,), avoid=avoid)
    alt.sort(key=lambda f: POSITIONS.index(f["position"]))
    out.append(caption(alt))
    return out


def _absent_question(rng: np.random.Generator, scene: Scene) -> tuple[QuestionSpec, dict]:
    """A colour/shape/position question about an object that is not in the scene, and the imagined
    object the question talks about."""
    kind = str(_pick(rng, ("colour", "shape", "position")))
    colours = [c for c in COLOURS if scene.find(colour=c) is None]
    shapes = [s for s in SHAPES if scene.find(shape=s) is None]
    c, s = str(_pick(rng, colours)), str(_pick(rng, shapes))
    fake = {"size": str(_pick(rng, list(SIZES))), "colour": c, "shape": s, "position": str(_pick(rng, POSITIONS))}
    if kind == "colour":
        return QuestionSpec(kind, shape=s), fake
    if kind == "shape":
        return QuestionSpec(kind, colour=c), fake
    return QuestionSpec(kind, colour=c, shape=s), fake


def _absent_responses(rng: np.random.Generator, q: QuestionSpec, fake: dict) -> tuple[str, str]:
    attr = q.kind  # colour, shape or position
    other = {**fake, attr: _other(rng, _ATTR_VALUES[attr], [fake[attr]])}
    chosen = _response_from_facts(q, fake[attr], [], fake)
    rejected = _response_from_facts(q, other[attr], [], other)
    return chosen, rejected


# --------------------------------------------------------------------------------------------
# preference datasets


def _assign_corruptions(n: int, rate: float, types: Sequence[str], seed: int) -> list[str]:
    """Exactly round(rate * n) corrupted rows, split as evenly as possible over `types`."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError("corruption_rate must be in [0, 1]")
    unknown = set(types) - set(CORRUPTIONS)
    if unknown:
        raise ValueError(f"unknown corruption types {sorted(unknown)}")
    n_bad = int(round(rate * n))
    labels = [CLEAN] * n
    if n_bad and types:
        rng = np.random.default_rng([seed, 0xC0])
        rows = rng.permutation(n)[:n_bad]
        kinds = [types[i % len(types)] for i in range(n_bad)]
        for r, k in zip(sorted(rows.tolist()), rng.permutation(kinds).tolist()):
            labels[r] = k
    return labels


def _swap_scene(rng: np.random.Generator, scene: Scene, q: QuestionSpec, chosen: str) -> Scene:
    """Another scene on which the row's chosen response is wrong (different answer or object absent)."""
    old = answer(scene, q)
    for _ in range(1000):
        new = sample_scene(rng)
        new_ans = answer(new, q)
        if new_ans != old and (new_ans is None or response(new, q) != chosen):
            return new
    raise RuntimeError("no swap scene found")  # pragma: no cover


def make_preference_rows(
    n: int,
    layout: str = "rlaif-v",
    corruption_rate: float = 0.2,
    seed: int = 0,
    corruption_types: Sequence[str] = CORRUPTIONS,
) -> tuple[list[dict], list[dict]]:
    """Build `n` preference rows in `layout` ("rlaif-v" or "align-anything"), a fraction
    `corruption_rate` of them corrupted (types split evenly), and the separate truth table.

    Row i is drawn from its own random stream, so row i with corruption_rate=0 is the clean
    counterpart of row i at any other rate (same scene, question and responses before corruption).

    Returns (rows, truth). Rows hold only the layout's columns; truth[i] describes rows[i]:
    `row`, `idx`, `corruption` ("clean" or one of CORRUPTIONS), `question_type`, `answer` (the
    correct short answer for the image shown, None if the question's object is absent), `scene`
    (JSON of the scene shown), `original_scene` (JSON of the scene before an image swap), and
    `masks` (packed 32x32 bit masks of the objects shown, see ``unpack_mask``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}")
    labels = _assign_corruptions(n, corruption_rate, tuple(corruption_types), seed)
    rows, truth = [], []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng)
        q = sample_question(rng, scene)
        chosen, rejected = response(scene, q), wrong_response(rng, scene, q)
        side = int(rng.integers(2))  # align-anything: which slot holds the chosen response
        label = labels[i]
        crng = np.random.default_rng([seed, i, 1])  # corruption randomness: never shifts clean rows
        shown, original = scene, None
        if label == "image_swap":
            shown, original = _swap_scene(crng, scene, q, chosen), scene
        elif label == "flipped":
            chosen, rejected = rejected, chosen
        elif label == "absent_object":
            q, fake = _absent_question(crng, scene)
            chosen, rejected = _absent_responses(crng, q, fake)
        elif label == "hallucinated_attribute":
            if q.kind == "exists" and referent(scene, q) is None:  # "no ..." has nothing to hallucinate
                q = QuestionSpec("exists", colour=scene.objects[0].colour, shape=scene.objects[0].shape)
                rejected = wrong_response(crng, scene, q)
            chosen = hallucinated_response(crng, scene, q)
        image, masks = render_scene(shown)
        img = {"bytes": png_bytes(image), "path": None}
        text = question_text(q)
        if layout == "rlaif-v":
            rows.append({
                "question": text, "image": img, "chosen": chosen, "rejected": rejected,
                "ds_name": "toyworld", "origin_dataset": "toyworld",
                "origin_split": json.dumps({"generator": "saev_core.toyworld", "type": q.kind}),
                "idx": i, "image_path": f"toyworld/{seed}/{i:06d}.png",
            })
        else:
            r1, r2 = (chosen, rejected) if side == 0 else (rejected, chosen)
            rows.append({"question": text, "image": img, "response_1": r1, "response_2": r2,
                         "overall_response": 1 if side == 0 else 2})
        truth.append({
            "row": i, "idx": i, "corruption": label, "question_type": q.kind, "answer": answer(shown, q),
            "scene": shown.to_json(), "original_scene": original.to_json() if original else None,
            "masks": pack_masks(masks),
        })
    return rows, truth


# --------------------------------------------------------------------------------------------
# writers


def _hf_features(layout: str) -> dict:
    s = {"dtype": "string", "_type": "Value"}
    i64 = {"dtype": "int64", "_type": "Value"}
    img = {"_type": "Image"}
    if layout == "rlaif-v":
        return {"question": s, "image": img, "chosen": s, "rejected": s, "ds_name": s, "origin_dataset": s,
                "origin_split": s, "idx": i64, "image_path": s}
    return {"question": s, "image": img, "response_1": s, "response_2": s, "overall_response": i64}


def _arrow_table(rows: list[dict], layout: str):
    import pyarrow as pa

    feats = _hf_features(layout)
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [pa.field(k, img_t if v["_type"] == "Image" else (pa.int64() if v["dtype"] == "int64" else pa.string()))
              for k, v in feats.items()]
    meta = {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}
    schema = pa.schema(fields, metadata=meta)
    return pa.Table.from_pylist(rows, schema=schema)


def _truth_table(truth: list[dict]):
    import pyarrow as pa

    schema = pa.schema([
        ("row", pa.int64()), ("idx", pa.int64()), ("corruption", pa.string()), ("question_type", pa.string()),
        ("answer", pa.string()), ("scene", pa.string()), ("original_scene", pa.string()),
        ("masks", pa.list_(pa.binary())),
    ])
    return pa.Table.from_pylist(truth, schema=schema)


def write_preference_dataset(
    folder: str | pathlib.Path,
    n: int,
    layout: str = "rlaif-v",
    corruption_rate: float = 0.2,
    seed: int = 0,
    formats: Sequence[str] = ("parquet",),
    corruption_types: Sequence[str] = CORRUPTIONS,
) -> dict[str, pathlib.Path]:
    """Write a toy preference dataset and, apart from it, its truth table.

    Layout of `folder`:
      data/train.parquet        the dataset (HF `Image` feature metadata embedded)   if "parquet" in formats
      data/train.jsonl          one JSON object per row; `image` is {"bytes": null,
                                "path": "images/<idx>.png"} relative to data/     if "jsonl" in formats
      data/images/*.png         the images of the JSON lines file
      truth/truth.parquet       row -> corruption label etc. (see ``make_preference_rows``)
      truth/truth.jsonl         the same without masks
      meta.json                 generator parameters
    Returns the paths written, by name.
    """
    import pyarrow.parquet as pq

    unknown = set(formats) - {"parquet", "jsonl"}
    if unknown:
        raise ValueError(f"unknown formats {sorted(unknown)}")
    folder = pathlib.Path(folder)
    rows, truth = make_preference_rows(n, layout, corruption_rate, seed, corruption_types)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "truth").mkdir(parents=True, exist_ok=True)
    out: dict[str, pathlib.Path] = {}
    if "parquet" in formats:
        out["parquet"] = folder / "data" / "train.parquet"
        pq.write_table(_arrow_table(rows, layout), out["parquet"])
    if "jsonl" in formats:
        (folder / "data" / "images").mkdir(exist_ok=True)
        out["jsonl"] = folder / "data" / "train.jsonl"
        with open(out["jsonl"], "w") as fh:
            for i, r in enumerate(rows):
                rel = f"images/{i:06d}.png"
                (folder / "data" / rel).write_bytes(r["image"]["bytes"])
                fh.write(json.dumps({**r, "image": {"bytes": None, "path": rel}}) + "\n")
    out["truth"] = folder / "truth" / "truth.parquet"
    pq.write_table(_truth_table(truth), out["truth"])
    out["truth_jsonl"] = folder / "truth" / "truth.jsonl"
    with open(out["truth_jsonl"], "w") as fh:
        for t in truth:
            fh.write(json.dumps({k: v for k, v in t.items() if k != "masks"}) + "\n")
    out["meta"] = folder / "meta.json"
    out["meta"].write_text(json.dumps({
        "generator": "saev_core.toyworld.generator", "n": n, "layout": layout, "corruption_rate": corruption_rate,
        "seed": seed, "corruption_types": list(corruption_types), "formats": list(formats),
    }, indent=2))
    return out


def image_from_bytes(data: bytes) -> Image.Image:
    from saev_core.data.images import normalize_image  # the one decoding every model input gets

    return normalize_image(data)

