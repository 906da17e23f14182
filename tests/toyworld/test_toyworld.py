"""Toy world: generator determinism and corruption labels, and the shipped toy LLaVA."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from saev_core.toyworld import generator as gen

RLAIF_COLUMNS = ["question", "image", "chosen", "rejected", "ds_name", "origin_dataset", "origin_split", "idx",
                 "image_path"]
AA_COLUMNS = ["question", "image", "response_1", "response_2", "overall_response"]


def _chosen(row: dict) -> str:
    return row["chosen"] if "chosen" in row else row[f"response_{row['overall_response']}"]


def _rejected(row: dict) -> str:
    return row["rejected"] if "rejected" in row else row[f"response_{3 - row['overall_response']}"]


# ------------------------------------------------------------------------------------------------
# generator


def test_scene_render_is_deterministic_and_masks_match_pixels():
    for k in range(30):
        s1, s2 = gen.sample_scene(np.random.default_rng(k)), gen.sample_scene(np.random.default_rng(k))
        assert s1 == s2 and gen.Scene.from_json(s1.to_json()) == s1
        (im1, m1), (im2, m2) = gen.render_scene(s1), gen.render_scene(s2)
        assert gen.png_bytes(im1) == gen.png_bytes(im2) and np.array_equal(m1, m2)
        px = np.asarray(im1).astype(int)
        assert m1.shape == (len(s1.objects), 32, 32)
        assert not (m1.sum(0) > 1).any(), "objects overlap"
        for o, m in zip(s1.objects, m1):
            assert m.sum() >= 20
            assert np.abs(px[m] - np.array(o.tint)).max() <= 6  # object pixels = its colour + noise
        if len(s1.objects) == 2:
            a, b = s1.objects
            assert a.colour != b.colour and a.shape != b.shape and a.position != b.position


def test_every_text_uses_the_vocabulary():
    vocab = set(gen.vocabulary())
    rows, _ = gen.make_preference_rows(200, "rlaif-v", 1.0, seed=5)
    rows += gen.make_preference_rows(200, "rlaif-v", 0.0, seed=5)[0]
    for r in rows:
        for text in (r["question"], r["chosen"], r["rejected"]):
            words = text.replace(".", " . ").replace("?", " ? ").split()
            assert set(words) <= vocab, text


@pytest.mark.parametrize("layout", gen.LAYOUTS)
def test_preference_rows_deterministic_and_layout_columns(layout):
    rows_a, truth_a = gen.make_preference_rows(60, layout, 0.4, seed=3)
    rows_b, truth_b = gen.make_preference_rows(60, layout, 0.4, seed=3)
    rows_c, _ = gen.make_preference_rows(60, layout, 0.4, seed=4)
    assert rows_a == rows_b and truth_a == truth_b
    assert rows_a != rows_c
    cols = RLAIF_COLUMNS if layout == "rlaif-v" else AA_COLUMNS
    for r in rows_a:
        assert list(r) == cols
        assert set(r["image"]) == {"bytes", "path"} and r["image"]["path"] is None
        assert Image.open(io.BytesIO(r["image"]["bytes"])).size == (32, 32)
        if layout == "align-anything":
            assert r["overall_response"] in (1, 2)
    if layout == "align-anything":  # the better response is not always in the same slot
        assert {r["overall_response"] for r in rows_a} == {1, 2}
    # exact counts, split evenly over the four types
    labels = [t["corruption"] for t in truth_a]
    assert labels.count("clean") == 36
    assert all(labels.count(c) == 6 for c in gen.CORRUPTIONS)


@pytest.mark.parametrize("layout", gen.LAYOUTS)
def test_truth_table_stays_out_of_the_dataset(layout):
    rows, truth = gen.make_preference_rows(80, layout, 0.5, seed=11)
    labels = set(gen.CORRUPTIONS) | {gen.CLEAN}
    for r, t in zip(rows, truth):
        assert not set(t) & (set(r) - {"idx"})
        for v in r.values():
            text = json.dumps(v) if not isinstance(v, dict) else ""
            assert not any(lbl in text for lbl in labels)


@pytest.mark.parametrize("layout", gen.LAYOUTS)
def test_corruptions_against_clean_counterparts(layout):
    clean, _ = gen.make_preference_rows(60, layout, 0.0, seed=7)
    bad, truth = gen.make_preference_rows(60, layout, 1.0, seed=7)
    seen = set()
    for c, b, t in zip(clean, bad, truth):
        kind = t["corruption"]
        seen.add(kind)
        if kind == "image_swap":
            assert b["image"]["bytes"] != c["image"]["bytes"]
            assert b["question"] == c["question"] and _chosen(b) == _chosen(c) and _rejected(b) == _rejected(c)
            shown = gen.Scene.from_json(t["scene"])
            q_kind = t["question_type"]
            if q_kind != "caption":  # the chosen answer is wrong for the swapped image
                assert t["answer"] is None or not _chosen(b).startswith(t["answer"] + ".")
            else:
                assert _chosen(b) != gen.caption(shown)
            assert t["original_scene"] is not None and t["original_scene"] != t["scene"]
        elif kind == "flipped":
            assert b["image"] == c["image"] and b["question"] == c["question"]
            assert _chosen(b) == _rejected(c) and _rejected(b) == _chosen(c)
        elif kind == "absent_object":
            assert b["image"] == c["image"]
            assert t["answer"] is None and t["question_type"] in ("colour", "shape", "position")
        elif kind == "hallucinated_attribute":
            assert b["image"] == c["image"]
            scene = gen.Scene.from_json(t["scene"])
            assert _chosen(b) != _correct_response(scene, b["question"])
            if t["question_type"] != "caption":  # the answer word itself is right
                assert _chosen(b).split(".")[0] == t["answer"]
    assert seen == set(gen.CORRUPTIONS)


def _correct_response(scene, question_text):
    for kind in gen.QUESTION_KINDS:
        for c in [None, *gen.COLOURS]:
            for s in [None, *gen.SHAPES]:
                q = gen.QuestionSpec(kind, colour=c, shape=s)
                try:
                    if gen.question_text(q) == question_text:
                        return gen.response(scene, q)
                except (TypeError, ValueError):
                    continue
    raise AssertionError(question_text)


def test_clean_rows_prefer_the_correct_response():
    rows, truth = gen.make_preference_rows(80, "rlaif-v", 0.0, seed=2)
    for r, t in zip(rows, truth):
        scene = gen.Scene.from_json(t["scene"])
        assert r["chosen"] == _correct_response(scene, r["question"])
        assert r["rejected"] != r["chosen"]
        assert r["image"]["bytes"] == gen.png_bytes(gen.render_scene(scene)[0])
        for packed, m in zip(t["masks"], gen.render_scene(scene)[1]):
            assert np.array_equal(gen.unpack_mask(packed), m)


@pytest.mark.parametrize("layout", gen.LAYOUTS)
def test_writer_parquet_and_jsonl(tmp_path, layout):
    import pyarrow.parquet as pq

    paths = gen.write_preference_dataset(tmp_path, 40, layout, 0.25, seed=1, formats=("parquet", "jsonl"))
    table = pq.read_table(paths["parquet"])
    cols = RLAIF_COLUMNS if layout == "rlaif-v" else AA_COLUMNS
    assert table.column_names == cols and table.num_rows == 40
    hf = json.loads(table.schema.metadata[b"huggingface"])
    assert hf["info"]["features"]["image"] == {"_type": "Image"}
    rows, truth = gen.make_preference_rows(40, layout, 0.25, seed=1)
    assert table.to_pylist() == rows
    lines = [json.loads(x) for x in paths["jsonl"].read_text().splitlines()]
    assert [list(x) for x in lines] == [cols] * 40
    first = lines[0]["image"]["path"]
    assert (paths["jsonl"].parent / first).read_bytes() == rows[0]["image"]["bytes"]
    tt = pq.read_table(paths["truth"]).to_pylist()
    assert [t["corruption"] for t in tt] == [t["corruption"] for t in truth]
    assert sum(t["corruption"] != "clean" for t in tt) == 10
    assert paths["truth"].parent != paths["parquet"].parent


# ------------------------------------------------------------------------------------------------
# the shipped toy LLaVA


@pytest.fixture(scope="module")
def shipped(monkeypatch_module):
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from saev_core.toyworld import toy_model_path

    torch.set_num_threads(2)
    path = toy_model_path()
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    model.eval()
    return path, model, processor


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    yield mp
    mp.undo()


_VOLATILE = {"transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype", "output_attentions",
             "output_hidden_states", "return_dict", "use_cache", "_attn_implementation_autoset"}


def _stable(d):
    if isinstance(d, dict):
        return {k: _stable(v) for k, v in d.items() if k not in _VOLATILE}
    return d


def test_shipped_model_matches_the_training_script(shipped):
    from saev_core.toyworld.model import CHAT_TEMPLATE, ModelSpec, build_llava_config, build_tokenizer
    from saev_core.toyworld.train_model import TrainConfig

    path, model, processor = shipped
    info = json.loads((path / "toyworld.json").read_text())
    spec = ModelSpec(**info["train_config"]["spec"])
    assert spec == TrainConfig().spec  # shipped with the script's default sizes
    # ... and with its whole default recipe, so `train_model --seed 0` rebuilds what ships
    assert info["train_config"] == json.loads(json.dumps(TrainConfig().to_dict()))
    assert info["seed"] == 0
    expected = build_llava_config(build_tokenizer(), spec)
    assert _stable(model.config.to_dict()) == _stable(expected.to_dict())
    assert model.config.vision_feature_layer == -1
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.get_vocab() == build_tokenizer().get_vocab()
    assert processor.chat_template == CHAT_TEMPLATE
    assert processor.patch_size == 4 and processor.vision_feature_select_strategy == "default"
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"
    assert {"colour", "shape"} <= set(info["accuracy"])
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size < 10_000_000


def test_processor_expands_image_to_64_tokens(shipped):
    import torch

    _, model, processor = shipped
    scene = gen.sample_scene(np.random.default_rng(0))
    image = gen.render_scene(scene)[0]
    msgs = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "what color is the circle?"}]}]
    enc = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 64
    assert enc["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    assert int((enc["input_ids"] == processor.tokenizer.bos_token_id).sum()) == 1
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    assert text.endswith("assistant:")
    enc2 = processor(text=text, images=image, return_tensors="pt")
    assert torch.equal(enc["input_ids"], enc2["input_ids"])
    assert enc["pixel_values"].shape == (1, 3, 32, 32)


def test_shipped_model_meets_the_accuracy_bar_on_fresh_images(shipped):
    """Issue 3's bar: colour and shape answers each >= 0.95 on held-out images, both as recorded
    in toyworld.json at training time and re-measured here on 300 other fresh scenes per kind
    (half of them two-object scenes, where "what color is the circle?" needs binding)."""
    from saev_core.toyworld.model import evaluate

    path, model, processor = shipped
    recorded = json.loads((path / "toyworld.json").read_text())["accuracy"]
    acc = evaluate(model, processor, n=300, seed=20_261, kinds=("colour", "shape"))
    for kind in ("colour", "shape"):
        assert recorded[kind] >= 0.95, (kind, recorded)
        assert acc[kind] >= 0.95, (kind, acc)


def test_shipped_model_generates_a_full_answer(shipped):
    import torch

    _, model, processor = shipped
    rng = np.random.default_rng([99, 1])
    hits = 0
    for _ in range(4):
        ex = gen.sample_example(rng, kind="colour")
        image = gen.render_scene(ex.scene)[0]
        msgs = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": ex.text}]}]
        enc = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False)
        text = processor.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        # a well-formed answer in the response template: "<colour>. there is a ..."
        first, _, rest = text.partition(".")
        assert first in gen.COLOURS and rest.strip().startswith("there is"), (text, ex.response)
        hits += text.startswith(ex.answer)
    assert hits >= 3


def test_shape_salience_loss_rewards_shape_holding_a_large_share_of_the_feature():
    """The term exists because colour dominated raw patch features: the same perfectly separable
    shape signal must cost more when a large colour component swamps it."""
    import torch

    from saev_core.toyworld.train_model import _N_SHAPE, _shape_salience_loss

    torch.manual_seed(0)
    n, d = 256, 16
    shape = torch.randint(0, _N_SHAPE, (n,))
    colour = torch.randint(0, 6, (n,))
    shape_dirs, colour_dirs = torch.eye(d)[:_N_SHAPE], torch.eye(d)[_N_SHAPE:_N_SHAPE + 6]
    head = shape_dirs.clone()
    labels = colour * _N_SHAPE + shape  # the patch-label layout: shape = label % 4

    def loss(colour_scale):
        feats = shape_dirs[shape] + colour_scale * colour_dirs[colour]
        return float(_shape_salience_loss(feats[None], labels, head, scale=10.0))

    assert loss(0.2) < loss(1.0) < loss(5.0)


@pytest.mark.slow  # ~45 s on 2 cores: trains the toy model
def test_training_script_runs_end_to_end_and_records_its_command(tmp_path):
    """A 1%-length run of the real script (all four stages, both optional terms on) writes a
    folder that the Auto classes load, with the exact command and recipe recorded."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from saev_core.toyworld import train_model
    from saev_core.toyworld.model import chat_text

    out = tmp_path / "toy"
    argv = ["--out", str(out), "--seed", "3", "--threads", "1", "--scale", "0.01", "--word-alignment", "0.5"]
    threads = torch.get_num_threads()
    train_model.main(argv)
    assert torch.get_num_threads() == threads  # the run's settings do not leak into the caller
    info = json.loads((out / "toyworld.json").read_text())
    assert info["command"] == "python -m saev_core.toyworld.train_model " + " ".join(argv)
    assert info["train_config"]["word_alignment_weight"] == 0.5
    assert info["train_config"]["shape_salience_weight"] == train_model.TrainConfig().shape_salience_weight
    losses = info["training_log"]["contrastive_final_loss"]
    assert {"caption", "region", "salience"} <= set(losses)
    assert all(np.isfinite(v) for v in losses.values())
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    ex = gen.sample_example(np.random.default_rng(0), kind="colour")
    enc = processor(images=gen.render_scene(ex.scene)[0], text=chat_text(processor, ex.text), return_tensors="pt")
    logits = model(**enc).logits
    assert logits.shape[-1] == len(processor.tokenizer) and bool(logits.isfinite().all())
