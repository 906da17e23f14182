"""benchmarks/dpo_v2.py (DPO study 2): its statistics against scipy and by hand, the pre-stated
pilot and SAE-screen rules, the random subset writer, one real 1-step DPO training with probes,
and the analysis of a partial grid (tables, CSV, forest plot)."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from published_runs import published_run

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())


@pytest.fixture(scope="module")
def v2():
    spec = importlib.util.spec_from_file_location("dpo_v2", ROOT / "benchmarks" / "dpo_v2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------
# statistics


def test_welch_matches_scipy_and_tost_brackets_the_margin(v2):
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = list(rng.normal(0.62, 0.05, 12)), list(rng.normal(0.58, 0.09, 9))
    w = v2.welch(a, b, margin=0.05)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert w["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    ci = ref.confidence_interval(0.95)
    assert w["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-9)
    # TOST: equivalent exactly when the 90% interval is inside the margin
    assert w["equivalent"] == (-0.05 < w["ci90"][0] and w["ci90"][1] < 0.05)
    tight = v2.welch([0.600, 0.601, 0.599, 0.600], [0.602, 0.601, 0.603, 0.602], margin=0.05)
    assert tight["equivalent"] and tight["p_tost"] < 0.001
    far = v2.welch([0.70, 0.71, 0.69, 0.70], [0.60, 0.61, 0.59, 0.60], margin=0.05)
    assert not far["equivalent"] and far["p"] < 0.001
    assert math.isnan(v2.welch([0.5], [0.4, 0.6], 0.05)["p"])


def test_holm_by_hand(v2):
    adj = v2.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": float("nan")})
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06) and adj["b"] == pytest.approx(0.06)
    assert math.isnan(adj["d"])


def test_mde_is_where_power_reaches_the_target(v2):
    m = v2.mde(lambda e: v2.power_two_sample(e, 0.08, 0.06, 24, 24), 0.8)
    assert v2.power_two_sample(m, 0.08, 0.06, 24, 24) == pytest.approx(0.8, abs=1e-4)
    # the normal approximation (1.96 + 0.84) * se is a slight underestimate of the t-based MDE
    se = math.sqrt(0.08 ** 2 / 24 + 0.06 ** 2 / 24)
    assert 2.80 * se < m < 2.95 * se
    # a stricter alpha (Holm's first step) needs a larger effect; more seeds a smaller one
    assert v2.mde(lambda e: v2.power_two_sample(e, 0.08, 0.06, 24, 24, 0.05 / 7)) > m
    assert v2.mde(lambda e: v2.power_two_sample(e, 0.08, 0.06, 48, 48)) < m
    # study 1's figure quoted in issue 21: paired sd 0.15 over 4 seeds -> MDE about 0.3
    assert v2.mde(lambda e: v2.power_paired(e, 0.15, 4)) == pytest.approx(0.32, abs=0.02)
    n = v2.seeds_needed(0.05, 0.08, 0.06)
    assert v2.power_two_sample(0.05, 0.08, 0.06, n, n) >= 0.8 > v2.power_two_sample(0.05, 0.08, 0.06, n - 1, n - 1)


def test_power_stays_finite_for_a_tiny_sd(v2):
    """At a strict (Holm) alpha and small sds, scipy's nct returns NaN for the far tail: the grid's
    analysis stopped there (saev-50 vs all-100, sds 0.030 / 0.035, 24 seeds, alpha 0.05/6)."""
    m = v2.mde(lambda e: v2.power_two_sample(e, 0.02970381235218751, 0.03459898765990049, 24, 24, 0.05 / 6))
    assert math.isfinite(m) and 0.02 < m < 0.06
    assert v2.power_two_sample(m, 0.0297, 0.0346, 24, 24, 0.05 / 6) == pytest.approx(0.8, abs=1e-4)
    assert v2.power_two_sample(0.5, 0.003, 0.003, 6, 6) == pytest.approx(1.0)


def test_equal_epochs_steps(v2):
    assert v2.steps_for(500, 1, 8) == 63 and v2.steps_for(999, 1, 8) == 125
    assert v2.steps_for(500, 2, 8) == 125 and v2.steps_for(999, 2, 8) == 250


# ------------------------------------------------------------------------------------------------
# the pre-stated rules


def _rec(primary, yes=0.5):
    return {"probes": {"primary": primary, "pope_yes_ratio": yes}}


def test_choose_setting_takes_the_smallest_sd_among_candidates_where_oracle_wins(v2):
    pilot = {}
    for s, (oa, ra, ob, rb, oc, rc) in enumerate([(0.80, 0.55, 0.70, 0.60, 0.62, 0.62),
                                                   (0.60, 0.65, 0.72, 0.62, 0.63, 0.63),
                                                   (0.85, 0.50, 0.71, 0.61, 0.62, 0.62)]):
        for cand, o, r in (("A", oa, ra), ("B", ob, rb), ("C", oc, rc)):
            pilot[(cand, "oracle-50", s)] = _rec(o)
            pilot[(cand, "random-50", s)] = _rec(r, yes=0.99 if cand == "A" else 0.6)
    ch = v2.choose_setting(pilot)
    by = {r["candidate"]: r for r in ch["table"]}
    assert not by["C"]["eligible"]  # no gain: the tiny sd of a setting that barely moves does not win
    assert by["A"]["eligible"] and by["B"]["eligible"] and by["B"]["sd"] < by["A"]["sd"]
    assert ch["candidate"] == "B" and ch["lr"] == v2.SETTINGS["pilot"]["candidates"]["B"]["lr"]
    assert by["A"]["collapsed"] == 3 and by["B"]["collapsed"] == 0


def test_choose_sae_prefers_reference_then_explained_variance(v2):
    rows = [{"variant": "L2-16x-joint", "method": "reference", "passes": False, "explained_variance": 0.9},
            {"variant": "L3-16x-per_modality", "method": "reference", "passes": True, "explained_variance": 0.7},
            {"variant": "L1-16x-per_modality", "method": "reference", "passes": True, "explained_variance": 0.8},
            {"variant": "L2-16x-joint", "method": "weighted", "passes": True, "explained_variance": 0.95}]
    assert v2.choose_sae(rows)["variant"] == "L1-16x-per_modality"
    rows = [dict(r, passes=r["method"] == "weighted") for r in rows]
    assert v2.choose_sae(rows)["method"] == "weighted"
    assert v2.choose_sae([dict(r, passes=False) for r in rows]) is None


# ------------------------------------------------------------------------------------------------
# the pipeline: a published-layout run, one real DPO step and the probes, then the analysis


def _published_run(folder: Path, n: int) -> str:
    from saev_core.toyworld import generator as gen

    rows = []
    for i in range(n):
        ex = gen.sample_example(np.random.default_rng([21, i]), kind="colour")
        rows.append({"prompt": ex.text, "chosen": ex.response,
                     "rejected": gen.wrong_response(np.random.default_rng(i), ex.scene, ex.question),
                     "images": [{"bytes": gen.png_bytes(gen.render_scene(ex.scene)[0]), "path": None}],
                     "sample_id": f"s{i:03d}", "score": float(i)})
    return published_run(folder, rows, run_id="anchor")


def test_random_subset_is_seeded_and_trains_one_real_dpo_step(v2, tmp_path):
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from saev_core.toyworld import toy_model_path
    from saev_core.toyworld.probes import build_probes

    torch.set_num_threads(1)
    anchor = _published_run(tmp_path / "anchor", 12)
    r0 = v2.write_random(tmp_path / "w0", anchor, seed=0, n=6)
    r0b = v2.write_random(tmp_path / "w0b", anchor, seed=0, n=6)
    r1 = v2.write_random(tmp_path / "w1", anchor, seed=1, n=6)
    ids = [sorted(pq.read_table(Path(r) / "subsets" / "top-50" / "part-00000.parquet").column("sample_id").to_pylist())
           for r in (r0, r0b, r1)]
    assert len(ids[0]) == 6 and ids[0] == ids[1] and ids[0] != ids[2]
    img = pq.read_table(Path(r0) / "subsets" / "top-50" / "part-00000.parquet").column("images")[0].as_py()[0]
    assert Image.open(io.BytesIO(img["bytes"])).size == (32, 32)  # the rows travel whole

    dpo = v2._load("dpo_train", ROOT / "examples" / "dpo_train.py")
    job = {"key": "random-50/0", "phase": "grid", "arm": "random-50", "seed": 0, "candidate": None, "run": r0,
           "subset": "top-50", "steps": 2, "lr": 1e-4, "beta": 0.1, "composition": {"n": 6, "corrupted": 0.0}}
    rec = v2.train_job(dpo, job, str(toy_model_path()), build_probes(seed=0, n_pope=8, n_attribute=8, n_pairs=4))
    assert rec["rows"] == 6 and rec["finite"] and rec["steps"] == 2
    assert set(v2.PROBE_KEYS) <= set(rec["probes"]) and 0 <= rec["probes"]["primary"] <= 1
    assert rec["collapsed"] == (rec["probes"]["pope_yes_ratio"] >= 0.98)


def _grid_rec(arm, seed, primary, yes=0.6):
    probes = {k: 0.5 for k in ("pope_accuracy", "pope_f1", "pope_adversarial_accuracy", "attribute_accuracy",
                               "colour_accuracy", "shape_accuracy", "sensitivity_changed")}
    probes.update(primary=primary, pope_yes_ratio=yes)
    n = 999 if arm.startswith("all") else 500
    return {"key": f"{arm}/{seed}", "phase": "grid", "arm": arm, "seed": seed, "candidate": None, "steps": 63,
            "lr": 1e-4, "beta": 0.1, "probes": probes, "collapsed": yes >= 0.98, "train_seconds": 40.0,
            "probe_seconds": 5.0, "composition": {"n": n, "corrupted": 0.4, "by_corruption": {"clean": 0.6},
                                                  "question_types": {"exists": 1.0}, "on_policy": 0.2}}


def test_analyze_a_partial_grid(v2, tmp_path):
    work, out = tmp_path / "work", tmp_path / "pub"
    work.mkdir()
    rng = np.random.default_rng(3)
    lines = []
    for seed in range(6):
        lines.append(_grid_rec("random-50", seed, 0.60 + rng.normal(0, 0.02)))
        lines.append(_grid_rec("all-100", seed, 0.50 + rng.normal(0, 0.02), yes=0.99))
        lines.append(_grid_rec("logp_margin-50", seed, 0.72 + rng.normal(0, 0.02)))
        if seed < 4:  # a partial arm
            lines.append(_grid_rec("cooccur_l0-50", seed, 0.60 + rng.normal(0, 0.02)))
    (work / "results-grid-w0.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    pilot = []
    for cand, gain in (("A", 0.2), ("B", 0.1), ("C", 0.0)):
        for arm in ("all-100", "random-50", "oracle-50"):
            for seed in (100, 101, 102):
                r = _grid_rec(arm, seed, 0.6 + (gain if arm == "oracle-50" else 0) + rng.normal(0, 0.01 + gain / 5))
                pilot.append({**r, "key": f"{cand}/{arm}/{seed}", "phase": "pilot", "candidate": cand})
    (work / "results-pilot-w1.jsonl").write_text("\n".join(json.dumps(x) for x in pilot) + "\n")
    choice = v2.choose_setting({(r["candidate"], r["arm"], r["seed"]): r for r in pilot})
    (work / "pilot-choice.json").write_text(json.dumps(choice))
    text = v2.analyze(work, out)
    assert f"Chosen by the pre-stated rule: **{choice['candidate']}**" in text
    assert "| C | " in text and "all-100 0/3, random-50 0/3, oracle-50 0/3" in text
    assert "PARTIAL" in text and "cooccur_l0-50 4/24" in text and "random-50 6/24" in text
    res = json.loads((out / "dpo_grid.json").read_text())
    vr = res["vs_random_50"]
    assert vr["logp_margin-50"]["verdict"] == "better" and vr["all-100"]["verdict"] == "worse"
    assert vr["cooccur_l0-50"]["verdict"] in ("inconclusive", "equivalent (+-0.05)")
    ps = {a: vr[a]["p"] for a in vr}
    assert {a: vr[a]["p_holm"] for a in vr} == pytest.approx(v2.holm(ps))
    assert res["summary"]["all-100"]["collapsed"] == 6 and res["summary"]["random-50"]["collapsed"] == 0
    with open(out / "dpo_grid.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:3] == ["arm", "seed", "primary"] and len(rows) == len(lines)
    svg = (out / "dpo_forest.svg").read_text()
    assert svg.startswith("<svg") and "PARTIAL" in svg and svg.count("<circle") == 3 + 3  # 3 vs random, 3 vs all
