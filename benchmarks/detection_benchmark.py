"""What do the scores detect? AUROC of "low score => corrupted" on a fixed toy preference set.

    .venv/bin/python benchmarks/detection_benchmark.py            # prints the table (paste it into benchmarks/RESULTS.md)

Settings are fixed here, before looking at any AUROC (see SETTINGS); every method's direction is
"a low score flags a corrupted sample". The SAE-V variants and baselines read the prompt + image
only, as the authors did. Two model-based yardsticks come from full forward passes over the
same inputs with each response appended. One response-aware SAE-V variant is ours:

    reference_margin = reference(image, prompt + chosen) - reference(image, prompt + rejected)

the cross-modal score with the chosen response appended minus the one with the rejected response
appended, using one SAE and one set of weights (trained / computed on prompt+image activations).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saev_core.model.activation_cache import ActivationCache, CacheSpec  # noqa: E402
from saev_core.sae.evaluation import detection_auroc  # noqa: E402
from saev_core.sae.metrics import ReconstructionStats, response_logprob  # noqa: E402
from saev_core.model.mllm import MLLMAdapter, SampleActivations  # noqa: E402
from saev_core.sae.training import SAETrainConfig, encode, train_sae  # noqa: E402
from saev_core.sae.scoring import METHODS, sample_stats, score_all  # noqa: E402
from saev_core.sae.weights import CrossModalWeightsBuilder  # noqa: E402

SETTINGS = {
    "n_samples": 600, "corruption_rate": 0.4, "data_seed": 1234, "layout": "rlaif-v", "layer": 2,
    "sae": {"architecture": "standard", "expansion_factor": 16, "l1_coefficient": 5.0, "lr": 1e-3,
            "steps": 2000, "batch_size": 512, "seed": 0},
    "weight_samples": 300, "pool_size": 30, "k": 5, "delta_quantile": 0.5, "top_k": 10, "batch_size": 32,
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


def logprobs(adapter, rows, response: str, batch_size: int) -> list[float]:
    from PIL import Image

    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        images = [Image.open(io.BytesIO(r["image"]["bytes"])) for r in chunk]
        out.extend(response_logprob(adapter, images, [r["question"] for r in chunk], [r[response] for r in chunk]))
    return out


def run(model: str, settings: dict) -> dict:
    from saev_core.toyworld.generator import make_preference_rows

    torch.manual_seed(0)
    t0 = time.perf_counter()
    rows, truth = make_preference_rows(settings["n_samples"], settings["layout"], settings["corruption_rate"],
                                       settings["data_seed"])
    labels = [t["corruption"] for t in truth]
    adapter = MLLMAdapter.from_pretrained(model, layer=settings["layer"], device="cpu")
    bs = settings["batch_size"]
    prompt_acts = capture_all(adapter, rows, None, bs)
    chosen_acts = capture_all(adapter, rows, "chosen", bs)
    rejected_acts = capture_all(adapter, rows, "rejected", bs)
    lp_chosen = logprobs(adapter, rows, "chosen", bs)
    lp_rejected = logprobs(adapter, rows, "rejected", bs)
    t_model = time.perf_counter() - t0

    sae = train_sae(lambda: (s.acts for s in prompt_acts), adapter.hidden_size, SAETrainConfig(**settings["sae"]))
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

    def scores_of(acts_list, methods):
        out = {m: [] for m in methods}
        for i, s in enumerate(acts_list):
            st = sample_stats(str(i), encode(sae, s.acts), s.acts, s.is_image)
            for m, v in score_all(st, methods, weights, delta, settings["top_k"]).items():
                out[m].append(v)
        return out

    columns = scores_of(prompt_acts, list(METHODS))
    with_chosen = scores_of(chosen_acts, ["reference"])["reference"]
    with_rejected = scores_of(rejected_acts, ["reference"])["reference"]
    columns["reference_margin (ours)"] = [c - r for c, r in zip(with_chosen, with_rejected)]
    columns["logp_chosen (model)"] = lp_chosen
    columns["logp_margin (model)"] = [c - r for c, r in zip(lp_chosen, lp_rejected)]
    table = {name: detection_auroc(vals, labels) for name, vals in columns.items()}
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
    return "\n".join([
        f"Model: `{model}`, layer {settings['layer']}. Samples per label: {result['counts']}.",
        f"SAE: d_sae {result['d_sae']}, explained variance {result['explained_variance']:.3f} "
        f"(image {result['ev_image']:.3f}, text {result['ev_text']:.3f}), L0 {result['l0']:.1f}, "
        f"dead fraction {result['dead_fraction']:.3f}. Cross-modal features: {result['n_cross_modal']}. "
        f"delta = {result['delta']:.4f} (median positive activation).",
        f"Wall time: {result['seconds']}.", "", *lines, "",
        "Overall AUROC within each question type (types with >= 10 clean and >= 10 corrupted samples):", "",
        *by_q, "", "Mean score of the clean samples per question type:", "", *means])


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
