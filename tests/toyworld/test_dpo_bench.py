"""Building blocks of benchmarks/dpo_benchmark.py: the weak base's biased mix, the on-policy noisy
pool, probe scoring, and the DPO step (TRL's DPOTrainer through examples/dpo_train.py)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from published_runs import published_run

from saev_core.toyworld import generator as gen
from saev_core.toyworld import preference_pool as pp
from saev_core.toyworld import probes as pr
from saev_core.toyworld.weak_base import WeakBaseConfig, biased_example

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


# ------------------------------------------------------------------------------------------------
# weak base


def test_biased_mix_teaches_exactly_the_two_faults():
    rng = np.random.default_rng(0)
    cfg = WeakBaseConfig(yes_bias=1.0, swap_bias=0.0)
    seen = Counter()
    for _ in range(400):
        ex, resp, biased = biased_example(rng, cfg)
        absent_exists = ex.question.kind == "exists" and ex.answer == "no"
        seen[(absent_exists, biased)] += 1
        if absent_exists:
            assert biased and resp.startswith("yes. there is a")
        else:
            assert not biased and resp == ex.response
    assert seen[(True, True)] > 20
    cfg = WeakBaseConfig(yes_bias=0.0, swap_bias=1.0)
    for _ in range(400):
        ex, resp, biased = biased_example(rng, cfg)
        if ex.question.kind == "colour" and len(ex.scene.objects) == 2:
            other = next(o for o in ex.scene.objects if o.colour != ex.answer)
            assert biased and resp.split(".")[0] == other.colour
        else:
            assert not biased and resp == ex.response


# ------------------------------------------------------------------------------------------------
# pool


def _pool(predict=None, **kw):
    cfg = pp.PoolConfig(**{"n": 80, "corruption_rate": 0.4, "seed": 3, **kw})
    examples = pp.draw_questions(cfg)
    preds = [predict(e) if predict else None for e in examples]
    return cfg, examples, preds, *pp.make_pool(cfg, preds)


def _wrong_word(ex):
    words = pp.ANSWER_WORDS.get(ex.question.kind)
    return next(w for w in words if w != ex.answer) if words else None


def _spec(text: str) -> gen.QuestionSpec:
    """The question spec back from its text (the world's templates are fixed)."""
    w = text.rstrip("?.").split()
    if text.startswith("what color"):
        return gen.QuestionSpec("colour", shape=w[-1])
    if text.startswith("what shape"):
        return gen.QuestionSpec("shape", colour=w[-2])
    if text.startswith("is there") or text.startswith("where"):
        return gen.QuestionSpec("exists" if text.startswith("is") else "position", colour=w[-2], shape=w[-1])
    return gen.QuestionSpec("count" if text.startswith("how") else "caption")


def test_pool_counts_corruptions_exactly_and_uses_the_policys_mistakes():
    cfg, examples, preds, rows, truth = _pool(predict=_wrong_word)
    labels = Counter(t["corruption"] for t in truth)
    assert labels["clean"] == 48 and all(labels[c] == 8 for c in gen.CORRUPTIONS)
    for ex, pred, row, t in zip(examples, preds, rows, truth):
        if t["corruption"] != "clean":
            continue
        assert row["chosen"] == ex.response and row["question"] == ex.text
        if pred is not None:  # the policy's wrong word became the rejected answer
            assert t["rejected_source"] == "on_policy" and row["rejected"].split(".")[0] == pred
        else:
            assert t["rejected_source"] == "synthetic" and row["rejected"] != row["chosen"]


def test_pool_falls_back_to_synthetic_rejected_when_the_policy_is_right():
    _, examples, _, rows, truth = _pool(predict=lambda e: e.answer.split()[0])
    assert all(t["rejected_source"] == "synthetic" for t in truth)
    assert all(t["policy_right"] for t in truth)
    for ex, row, t in zip(examples, rows, truth):
        if t["corruption"] == "clean":
            assert row["rejected"] != row["chosen"] and row["rejected"].split(".")[0] != ex.answer.split(".")[0]


def test_pool_corruptions_make_chosen_wrong_for_the_image_shown():
    _, examples, _, rows, truth = _pool(predict=_wrong_word, n=120)
    for ex, row, t in zip(examples, rows, truth):
        shown = gen.Scene.from_json(t["scene"])
        q = _spec(row["question"])
        right = gen.answer(shown, q)
        if t["corruption"] == "clean":
            assert row["chosen"] == gen.response(shown, q)
        elif t["corruption"] == "flipped":
            assert row["rejected"] == gen.response(shown, q) and row["chosen"] != row["rejected"]
        elif t["corruption"] == "image_swap":
            assert shown != ex.scene and (right is None or row["chosen"] != gen.response(shown, q))
        elif t["corruption"] == "absent_object":
            assert q.kind in ("colour", "shape", "position") and right is None
        else:  # hallucinated attribute: the right answer word, a wrong supporting sentence
            assert row["chosen"] != gen.response(shown, q)
            if q.kind not in ("caption", "count"):
                assert row["chosen"].split(".")[0] == right
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (32, 32)


def test_pool_writes_rlaif_v_parquet_and_a_separate_truth_file(tmp_path):
    cfg, _, _, rows, truth = _pool()
    paths = pp.write_pool(tmp_path, rows, truth, cfg)
    data = pq.read_table(paths["parquet"])
    assert data.column_names == ["question", "image", "chosen", "rejected", "ds_name", "origin_dataset",
                                 "origin_split", "idx", "image_path"]
    assert b"huggingface" in data.schema.metadata
    assert "corruption" not in data.column_names
    t = pq.read_table(paths["truth"]).to_pylist()
    assert [x["row"] for x in t] == list(range(cfg.n))
    assert json.loads(paths["meta"].read_text())["corruption_rate"] == 0.4
    from saev_core.data.formats import detect_format

    assert detect_format(data.column_names) == "rlaif_v"


# ------------------------------------------------------------------------------------------------
# probes


def test_probe_set_balance_and_sensitivity_pairs_differ():
    ps = pr.build_probes(seed=1, n_pope=40, n_attribute=20, n_pairs=10)
    tags = Counter(ps.tags)
    assert tags["pope:present"] == 20 and tags["pope:adversarial"] == 10 and tags["pope:random"] == 10
    for q, options, ans, tag in zip(ps.questions, ps.options, ps.answers, ps.tags):
        assert ans in options, (tag, q, ans)  # every item's answer is one it is scored over
        if tag.startswith("pope:"):
            assert ans == ("yes" if tag == "pope:present" else "no"), (tag, q, ans)
    pairs = {}
    for i, k in enumerate(ps.pair):
        if k >= 0:
            pairs.setdefault(k, []).append(i)
    assert len(pairs) == 10
    for a, b in pairs.values():
        assert ps.questions[a] == ps.questions[b] and ps.answers[a] != ps.answers[b]


def test_pope_metrics_by_hand():
    m = pr.pope_metrics(["yes", "yes", "no", "yes"], ["yes", "no", "no", "no"])
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.75
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == 1.0 and m["f1"] == pytest.approx(0.5)


def test_summarize_scores_planted_predictors():
    ps = pr.build_probes(seed=2, n_pope=40, n_attribute=20, n_pairs=10)
    perfect = pr.summarize(ps, list(ps.answers))
    assert perfect["primary"] == 1.0 and perfect["sensitivity_changed"] == 1.0 and perfect["pope_f1"] == 1.0
    always_yes = [("yes" if o == pr.YES_NO else a) for o, a in zip(ps.options, ps.answers)]
    s = pr.summarize(ps, always_yes)
    assert s["pope_yes_ratio"] == 1.0 and s["pope_accuracy"] == 0.5 and s["pope_adversarial_accuracy"] == 0.0
    assert s["attribute_accuracy"] == 1.0 and s["primary"] == 0.75
    assert s["sensitivity_changed"] == pytest.approx(0.5)  # exists pairs no longer change; colour pairs do


def test_restricted_argmax_ignores_tokens_outside_the_options():
    import torch

    logits = torch.tensor([[9.0, 1.0, 2.0, 0.0], [9.0, 3.0, 2.0, 5.0]])
    preds = pr.restricted_argmax(logits, [[1, 2], [1, 2, 3]], [("a", "b"), ("a", "b", "c")])
    assert preds == ["b", "c"]


# ------------------------------------------------------------------------------------------------
# the DPO step


def _margins(path: str, rows: list[dict]) -> list[float]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from saev_core.model.mllm import MLLMAdapter
    from saev_core.model.logprobs import response_logprob

    adapter = MLLMAdapter.from_pretrained(path, layer=0, device="cpu")
    imgs = [Image.open(io.BytesIO(r["images"][0]["bytes"])) for r in rows]
    q = [r["prompt"] for r in rows]
    c = response_logprob(adapter, imgs, q, [r["chosen"] for r in rows])
    rj = response_logprob(adapter, imgs, q, [r["rejected"] for r in rows])
    del torch, AutoModelForImageTextToText, AutoProcessor
    return [a - b for a, b in zip(c, rj)]


def test_dpo_step_starts_at_log2_and_raises_the_chosen_margin(tmp_path):
    """examples/dpo_train.py (TRL DPOTrainer): the first step's loss is -log sigmoid(0) = log 2
    (policy == reference), and a few steps on the same pairs raise log p(chosen) - log p(rejected)."""
    import torch

    from saev_core.toyworld import toy_model_path

    torch.set_num_threads(1)
    rows = []
    for i in range(4):
        ex = gen.sample_example(np.random.default_rng([11, i]), kind="colour")
        img = gen.png_bytes(gen.render_scene(ex.scene)[0])
        rows.append({"prompt": ex.text, "chosen": ex.response,
                     "rejected": gen.wrong_response(np.random.default_rng(i), ex.scene, ex.question),
                     "images": [{"bytes": img, "path": None}], "sample_id": f"s{i}", "score": 1.0})
    run = published_run(tmp_path / "run", rows)
    spec = importlib.util.spec_from_file_location("dpo_train", ROOT / "examples" / "dpo_train.py")
    dpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dpo)
    out = tmp_path / "policy"
    res = dpo.train(run, subset="top-100", model=str(toy_model_path()), steps=4, batch_size=4, lr=1e-3, beta=0.1,
                    output_dir=str(out), seed=0)
    assert res["losses"][0] == pytest.approx(math.log(2), abs=1e-5)
    before, after = _margins(str(toy_model_path()), rows), _margins(str(out), rows)
    assert np.mean(after) > np.mean(before) + 0.05
