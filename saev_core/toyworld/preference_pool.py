"""A noisy, on-policy preference pool for DPO experiments, with a separate truth table.

Each row is a question about a scene, the correct response as `chosen`, and as `rejected` the
policy's OWN mistake when it makes one (its greedy first answer token turned into a full response:
on-policy, like RLAIF-V's sampled answers), else the world's plausible wrong response (synthetic).
A known share of rows is then corrupted, as real pools are (types split evenly, see
``generator.CORRUPTIONS``): the image swapped for one on which `chosen` is wrong, the question
replaced by one about an absent object, the preference flipped, or one wrong attribute stated in
`chosen`'s supporting sentence. Rows are written in the RLAIF-V layout (``write_pool``); the truth
table (corruption, question type, rejected source, whether the policy was right) goes apart.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import asdict, dataclass, field

import numpy as np

from . import generator as gen

POOL_STREAM = 5_151  # row i comes from numpy stream [seed, POOL_STREAM, i]
ANSWER_WORDS = {"colour": tuple(gen.COLOURS), "shape": gen.SHAPES, "exists": ("yes", "no")}


@dataclass(frozen=True)
class PoolConfig:
    n: int = 1000
    corruption_rate: float = 0.4
    corruption_types: tuple[str, ...] = gen.CORRUPTIONS
    # mostly the questions the weak base gets wrong, plus the world's other kinds (as a real pool mixes)
    kinds: dict = field(default_factory=lambda: {"exists": 0.35, "colour": 0.3, "shape": 0.1, "count": 0.05,
                                                 "position": 0.1, "caption": 0.1})
    p_two: float = 0.75
    seed: int = 0


def draw_questions(cfg: PoolConfig) -> list[gen.Example]:
    """The pool's clean examples (scene, question, correct response), one numpy stream per row."""
    names = list(cfg.kinds)
    p = np.array([cfg.kinds[k] for k in names])
    out = []
    for i in range(cfg.n):
        rng = np.random.default_rng([cfg.seed, POOL_STREAM, i])
        kind = names[int(rng.choice(len(names), p=p / p.sum()))]
        out.append(gen.sample_example(rng, kind=kind, p_two=cfg.p_two))
    return out


def on_policy_rejected(ex: gen.Example, predicted: str | None, rng: np.random.Generator) -> tuple[str, str]:
    """(rejected response, source): the policy's own wrong answer as a full response when it gave
    one of the question's answer words, else the world's synthetic wrong response."""
    q, scene = ex.question, ex.scene
    if predicted is not None and predicted != ex.answer.split()[0] and predicted in ANSWER_WORDS.get(q.kind, ()):
        if q.kind == "exists":
            if ex.answer == "yes":
                return f"no. there is no {q.colour} {q.shape}.", "on_policy"
            return gen.wrong_response(rng, scene, q), "on_policy"  # "yes. there is a ..." (hallucinated)
        target = gen.referent(scene, q)
        fact = {"size": target.size, "colour": target.colour, "shape": target.shape, "position": target.position}
        fact[q.kind] = predicted
        return f"{predicted}. there is {gen.describe(fact)}.", "on_policy"
    return gen.wrong_response(rng, scene, q), "synthetic"


def make_pool(cfg: PoolConfig, predictions: list[str | None]) -> tuple[list[dict], list[dict]]:
    """RLAIF-V rows and truth rows from the clean examples and the policy's greedy answers to them
    (``predictions[i]`` for ``draw_questions(cfg)[i]``; None = no policy, all rejected synthetic)."""
    examples = draw_questions(cfg)
    if len(predictions) != len(examples):
        raise ValueError("one prediction per pool row is needed")
    labels = gen._assign_corruptions(cfg.n, cfg.corruption_rate, tuple(cfg.corruption_types), cfg.seed)
    rows, truth = [], []
    for i, (ex, pred, label) in enumerate(zip(examples, predictions, labels)):
        rng = np.random.default_rng([cfg.seed, POOL_STREAM, i, 1])
        scene, q = ex.scene, ex.question
        chosen = ex.response
        rejected, source = on_policy_rejected(ex, pred, rng)
        shown = scene
        if label == "image_swap":
            shown = gen._swap_scene(rng, scene, q, chosen)
        elif label == "flipped":
            chosen, rejected = rejected, chosen
        elif label == "absent_object":
            q, fake = gen._absent_question(rng, scene)
            chosen, rejected = gen._absent_responses(rng, q, fake)
            source = "synthetic"
        elif label == "hallucinated_attribute":
            if q.kind == "exists" and gen.referent(scene, q) is None:  # "no ..." has nothing to hallucinate
                o = scene.objects[0]
                q = gen.QuestionSpec("exists", colour=o.colour, shape=o.shape)
                rejected, source = gen.wrong_response(rng, scene, q), "synthetic"
            chosen = gen.hallucinated_response(rng, scene, q)
        image = gen.render_scene(shown)[0]
        rows.append({
            "question": gen.question_text(q), "image": {"bytes": gen.png_bytes(image), "path": None},
            "chosen": chosen, "rejected": rejected, "ds_name": "toyworld-dpo", "origin_dataset": "toyworld",
            "origin_split": json.dumps({"generator": "saev_core.toyworld.preference_pool", "type": q.kind}),
            "idx": i, "image_path": f"toyworld-dpo/{cfg.seed}/{i:06d}.png",
        })
        truth.append({"row": i, "idx": i, "corruption": label, "question_type": q.kind,
                      "rejected_source": source, "policy_answer": pred, "policy_right": pred == ex.answer.split()[0],
                      "scene": shown.to_json()})
    return rows, truth


def policy_predictions(model, processor, cfg: PoolConfig) -> list[str]:
    """The policy's greedy first answer token for every clean pool question (before corruption)."""
    from .model import first_token_predictions

    examples = draw_questions(cfg)
    return first_token_predictions(model, processor, [gen.render_scene(e.scene)[0] for e in examples],
                                   [e.text for e in examples])


def write_pool(folder: str | pathlib.Path, rows: list[dict], truth: list[dict], cfg: PoolConfig) -> dict:
    """data/train.parquet (RLAIF-V layout, HF Image metadata), truth/truth.parquet, meta.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = pathlib.Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "truth").mkdir(parents=True, exist_ok=True)
    paths = {"parquet": folder / "data" / "train.parquet", "truth": folder / "truth" / "truth.parquet",
             "meta": folder / "meta.json"}
    pq.write_table(gen._arrow_table(rows, "rlaif-v"), paths["parquet"])
    pq.write_table(pa.Table.from_pylist(truth), paths["truth"])
    paths["meta"].write_text(json.dumps({"generator": "saev_core.toyworld.preference_pool", **asdict(cfg)}, indent=2))
    return paths
