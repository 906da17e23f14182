"""What do the scores detect? AUROC of "low score => corrupted" on a fixed toy preference set.

    .venv/bin/python benchmarks/detection_benchmark.py            # prints the table (paste it into benchmarks/RESULTS.md)

Settings are fixed here, before looking at any AUROC (see SETTINGS); every method's direction is
"a low score flags a corrupted sample". The SAE-V variants and baselines read the prompt + image
only, as the authors did. Two model-based yardsticks come from full forward passes over the
same inputs with each response appended. One response-aware SAE-V variant is ours:

    reference_margin = reference(image, prompt + chosen) - reference(image, prompt + rejected)

the cross-modal score with the chosen response appended minus the one with the rejected response
appended, using one SAE and one set of weights (trained / computed on prompt+image activations).

Canaries (issue 12): known-bad copies of clean rows (saev_core.data.canaries: image_swap,
image_swap_near, response_swap, flipped) go through the same captures and scoring, never into SAE
training or the weights. For each method and kind: the paired win rate P(canary < its source),
the unpaired AUROC against all 600 real rows, and recall at 25/50/75% kept. `*_pm` columns use
the per-modality weight pool. Shard-level methods (null_z) score shards of 128 rows, real rows
and canaries in separate shards, as the flow does.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saev_core.data.canaries import CanaryConfig, make_canaries  # noqa: E402
from saev_core.data.records import CanonicalRecord, records_to_table  # noqa: E402
from saev_core.sae.evaluation import canary_table, detection_auroc  # noqa: E402
from saev_core.model.logprobs import response_logprob  # noqa: E402
from saev_core.sae.metrics import ReconstructionStats  # noqa: E402
from saev_core.model.mllm import MLLMAdapter, SampleActivations  # noqa: E402
from saev_core.sae.training import SAETrainConfig, encode, train_sae  # noqa: E402
from saev_core.sae.scoring import (METHODS, SCORERS, ScoreContext, sample_stats, score_all,  # noqa: E402
                                   score_shard_methods)
from saev_core.sae.weights import CrossModalWeightsBuilder, PerModalityWeightsBuilder  # noqa: E402

SETTINGS = {
    "n_samples": 600, "corruption_rate": 0.4, "data_seed": 1234, "layout": "rlaif-v", "layer": 2,
    "sae": {"architecture": "standard", "expansion_factor": 16, "l1_coefficient": 5.0, "lr": 1e-3,
            "steps": 2000, "batch_size": 512, "seed": 0},
    "weight_samples": 300, "pool_size": 30, "k": 5, "delta_quantile": 0.5, "top_k": 10, "batch_size": 32,
    # issue 12, fixed before its first run: canaries from the clean rows (a canary is then bad
    # relative to a known-good source), 400 of them (100 per kind); null_z over 16 other images
    # of the same 128-row shard; per-modality pool with the same k and delta quantile
    "canaries": {"fraction": 0.05, "min_count": 400, "cap": 2000, "seed": 0}, "shard_rows": 128,
    "null_samples": 16, "keep_percents": [25, 50, 75],
}


def capture_all(adapter, rows, response: str | None, batch_size: int) -> list[SampleActivations]:
    from PIL import Image

    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        images = [Image.open(io.BytesIO(r["image"]["bytes"])) for r in chunk]
        resp = None if response is None else [r[response] for r in chunk]
        out.extend(adapter.capture(images, [r["question"] for r in chunk], resp))
    return out


def logprobs(adapter, rows, response: str, batch_size: int, mean: bool = False) -> list[float]:
    from PIL import Image

    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        images = [Image.open(io.BytesIO(r["image"]["bytes"])) for r in chunk]
        out.extend(response_logprob(adapter, images, [r["question"] for r in chunk], [r[response] for r in chunk],
                                    mean=mean))
    return out


def canary_rows(rows, labels, settings):
    """Canaries from the clean rows, in the benchmark's row layout, with each row's sample_id."""
    recs = [CanonicalRecord.build(i, r["question"], r["image"]["bytes"], r["chosen"], r["rejected"])
            for i, r in enumerate(rows)]
    clean = records_to_table([rec for rec, lab in zip(recs, labels) if lab == "clean"])
    table, info = make_canaries(lambda _: clean, 1, CanaryConfig(**settings["canaries"]))
    out = [{"question": r["prompt"], "image": {"bytes": r["image"]}, "chosen": r["chosen"], "rejected": r["rejected"]}
           for r in table.to_pylist()]
    return [rec.sample_id for rec in recs], out, info.to_pylist()


def run(model: str, settings: dict) -> dict:
    from saev_core.toyworld.generator import make_preference_rows

    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows, truth = make_preference_rows(settings["n_samples"], settings["layout"], settings["corruption_rate"],
                                       settings["data_seed"])
    labels = [t["corruption"] for t in truth]
    real_ids, canaries_in, canary_info = canary_rows(rows, labels, settings)
    n_real = len(rows)
    every = rows + canaries_in  # real rows first; canaries never enter SAE training or weights
    adapter = MLLMAdapter.from_pretrained(model, layer=settings["layer"], device="cpu")
    bs = settings["batch_size"]
    t = time.perf_counter()
    prompt_acts = capture_all(adapter, every, None, bs)
    t_capture = time.perf_counter() - t
    chosen_acts = capture_all(adapter, every, "chosen", bs)
    rejected_acts = capture_all(adapter, every, "rejected", bs)
    lp_chosen = logprobs(adapter, every, "chosen", bs)
    lp_rejected = logprobs(adapter, every, "rejected", bs)
    t = time.perf_counter()
    lp_chosen_mean = logprobs(adapter, every, "chosen", bs, mean=True)
    lp_rejected_mean = logprobs(adapter, every, "rejected", bs, mean=True)
    t_logp = time.perf_counter() - t
    t_model = time.perf_counter() - t0

    sae = train_sae(lambda: (s.acts for s in prompt_acts[:n_real]), adapter.hidden_size,
                    SAETrainConfig(**settings["sae"]))
    t_sae = time.perf_counter() - t0 - t_model
    recon = ReconstructionStats(sae.cfg.d_sae)
    for s in prompt_acts[:200]:
        recon.add(sae, s.acts, s.is_image)
    rec = recon.report()

    builder = CrossModalWeightsBuilder(sae.cfg.d_sae, settings["pool_size"], settings["k"])
    subset = prompt_acts[: settings["weight_samples"]]
    for s in subset:
        builder.observe(encode(sae, s.acts), s.is_image)
    builder.plan()
    for s in subset:
        builder.gather(s.acts)
    weights = builder.result()
    delta = builder.activation_quantile(settings["delta_quantile"])
    pm = PerModalityWeightsBuilder(sae.cfg.d_sae, settings["pool_size"], settings["k"],
                                   delta_quantile=settings["delta_quantile"])
    for s in subset:
        pm.observe(encode(sae, s.acts), s.is_image)
    pm.plan()
    for s in subset:
        pm.gather(s.acts)
    weights_pm = pm.result()

    def scores_of(acts_list, methods, w=weights, logp=None):
        """Per-sample methods, then shard-level ones over shards of `shard_rows`, real rows and
        canaries in separate shards."""
        out = {m: [] for m in methods}
        stats = []
        for i, s in enumerate(acts_list):
            st = sample_stats(str(i), encode(sae, s.acts), s.acts, s.is_image, s.content)
            st.logp = None if logp is None else logp[i]
            for m, v in score_all(st, methods, ScoreContext(w, delta, settings["top_k"])).items():
                out[m].append(v)
            stats.append(st)
        shard_methods = [m for m in methods if SCORERS[m].shard_level]
        if shard_methods:
            n, size = len(acts_list), settings["shard_rows"]
            bounds = [*range(0, min(n, n_real), size), *range(n_real, n, size), n]
            bounds = sorted(set(bounds) | {min(n, n_real)})
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                got = score_shard_methods(stats[lo:hi], shard_methods,
                                          ScoreContext(w, delta, settings["top_k"], 0, settings["null_samples"]))
                for m, v in got.items():
                    out[m].extend(v)
        return out

    logp = [{"logp_chosen": c, "logp_rejected": r} for c, r in zip(lp_chosen_mean, lp_rejected_mean)]
    all_columns = scores_of(prompt_acts, list(METHODS), logp=logp)
    pm_columns = scores_of(prompt_acts, ["reference", "paper", "weighted", "coverage", "null_z"], w=weights_pm)
    all_columns.update({f"{m}_pm": v for m, v in pm_columns.items()})
    with_chosen = scores_of(chosen_acts, ["reference"])["reference"]
    with_rejected = scores_of(rejected_acts, ["reference"])["reference"]
    all_columns["reference_margin (ours)"] = [c - r for c, r in zip(with_chosen, with_rejected)]
    all_columns["logp_chosen_sum (model)"] = lp_chosen
    all_columns["logp_margin_sum (model)"] = [c - r for c, r in zip(lp_chosen, lp_rejected)]
    ids = real_ids + [c["canary_id"] for c in canary_info]
    canaries = canary_table({m: dict(zip(ids, v)) for m, v in all_columns.items()}, canary_info, real_ids,
                            settings["keep_percents"])
    columns = {m: v[:n_real] for m, v in all_columns.items()}
    table = {name: detection_auroc(vals, labels) for name, vals in columns.items()}
    # degenerate rankings: the largest share of real rows sharing one score value
    ties = {m: max(np.unique(np.asarray(v), return_counts=True)[1]) / n_real for m, v in columns.items()}
    # diagnostic, not a setting: "low score => corrupted" within each question type, and the clean
    # samples' mean score per type, to see whether a score measures agreement or question type
    qtypes = [t["question_type"] for t in truth]
    by_question = {}
    for q in sorted(set(qtypes)):
        idx = [i for i, t in enumerate(qtypes) if t == q]
        sub = [labels[i] for i in idx]
        if sub.count("clean") >= 10 and len(sub) - sub.count("clean") >= 10:
            by_question[q] = {name: detection_auroc([vals[i] for i in idx], sub)["overall"]
                              for name, vals in columns.items()}
    clean_mean = {q: {name: float(np.mean([vals[i] for i, t in enumerate(qtypes) if t == q and labels[i] == "clean"]))
                      for name, vals in columns.items()} for q in sorted(set(qtypes))}
    return {"table": table, "by_question": by_question, "clean_mean_by_question": clean_mean,
            "canaries": canaries, "largest_tie": ties, "n_cross_modal_pm": weights_pm.n_cross_modal,
            "logp_cost": {"capture_s_per_sample": t_capture / len(every),
                          "logp_two_forwards_s_per_sample": t_logp / len(every),
                          "ratio": t_logp / t_capture},
            "n_cross_modal": weights.n_cross_modal, "d_sae": int(sae.cfg.d_sae), "delta": delta,
            "explained_variance": rec["all"]["explained_variance"], "l0": rec["all"]["l0"],
            "ev_image": rec["image"]["explained_variance"], "ev_text": rec["text"]["explained_variance"],
            "dead_fraction": rec["dead_fraction"], "counts": {k: labels.count(k) for k in sorted(set(labels))},
            "seconds": {"model_passes": round(t_model, 1), "sae_training": round(t_sae, 1),
                        "total": round(time.perf_counter() - t0, 1)}}


def markdown(result: dict, settings: dict, model: str) -> str:
    kinds = ["overall", *sorted(k for k in next(iter(result["table"].values())) if k != "overall")]
    lines = ["| method | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 1) + "|"]
    for name, row in result["table"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in kinds) + " |")
    qs = list(result["by_question"])
    methods = list(result["table"])
    by_q = ["| method | " + " | ".join(qs) + " |", "|---" * (len(qs) + 1) + "|"]
    by_q += [f"| {m} | " + " | ".join(f"{result['by_question'][q][m]:.3f}" for q in qs) + " |" for m in methods]
    means = ["| method | " + " | ".join(result["clean_mean_by_question"]) + " |",
             "|---" * (len(result["clean_mean_by_question"]) + 1) + "|"]
    means += [f"| {m} | " + " | ".join(f"{v[m]:.3g}" for v in result["clean_mean_by_question"].values()) + " |"
              for m in ("reference", "paper", "cooccur_l0", "length")]
    ck = sorted({r["kind"] for r in result["canaries"]})
    by = {(r["method"], r["kind"]): r for r in result["canaries"]}
    pcts = settings["keep_percents"]
    can = ["| method | largest tie | " + " | ".join(f"{k} win / AUROC" for k in ck) + " | "
           + " | ".join(f"image_swap recall top{p}" for p in pcts) + " |", "|---" * (len(ck) + len(pcts) + 2) + "|"]
    for m in methods:
        cells = [f"{by[(m, k)]['paired_win_rate']:.3f} / {by[(m, k)]['auroc']:.3f}" for k in ck]
        rec = [f"{by[(m, 'image_swap')][f'recall_top{p:g}']:.3f}" for p in pcts] if "image_swap" in ck else []
        can.append(f"| {m} | {result['largest_tie'][m]:.3f} | " + " | ".join(cells + rec) + " |")
    n_per_kind = {k: by[(methods[0], k)]["n"] for k in ck}
    cost = result["logp_cost"]
    return "\n".join([
        f"Model: `{model}`, layer {settings['layer']}. Samples per label: {result['counts']}.",
        f"SAE: d_sae {result['d_sae']}, explained variance {result['explained_variance']:.3f} "
        f"(image {result['ev_image']:.3f}, text {result['ev_text']:.3f}), L0 {result['l0']:.1f}, "
        f"dead fraction {result['dead_fraction']:.3f}. Cross-modal features: {result['n_cross_modal']}. "
        f"delta = {result['delta']:.4f} (median positive activation).",
        f"Wall time: {result['seconds']}.", "", *lines, "",
        "Overall AUROC within each question type (types with >= 10 clean and >= 10 corrupted samples):", "",
        *by_q, "", "Mean score of the clean samples per question type:", "", *means, "",
        f"Canaries per kind: {n_per_kind}. Cross-modal features with the per-modality pool: "
        f"{result['n_cross_modal_pm']}. Paired win rate P(canary < its source) / unpaired AUROC vs "
        "the 600 real rows (chance 0.5); recall = share of image-swap canaries a top-p% subset "
        "excludes (chance 1 - p). Largest tie = largest share of real rows with one score value.", "", *can, "",
        f"Log-prob pass (chosen + rejected, two full forwards): {cost['logp_two_forwards_s_per_sample'] * 1000:.1f} "
        f"ms/sample vs prompt capture {cost['capture_s_per_sample'] * 1000:.1f} ms/sample "
        f"({cost['ratio']:.2f}x)."])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the shipped toy LLaVA)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--layer", type=int, default=None,
                    help=f"hook layer (a post-hoc override of the fixed setting {SETTINGS['layer']}: say so when quoting)")
    args = ap.parse_args()
    from saev_core.toyworld import toy_model_path

    model = args.model or str(toy_model_path())
    torch.set_num_threads(args.threads)
    settings = SETTINGS if args.layer is None else {**SETTINGS, "layer": args.layer}
    result = run(model, settings)
    if args.json:
        print(json.dumps(result, indent=2))
    print(markdown(result, settings, Path(model).name))


if __name__ == "__main__":
    main()
