"""Do the pictures tell the truth? Localisation and patch masking on the toy world.

    .venv/bin/python benchmarks/interp_benchmark.py            # trains its own SAE (flow defaults)
    .venv/bin/python benchmarks/interp_benchmark.py --run runs/toy-rlaif-v/<run_id>   # a demo run's SAE

1. Activations of the toy LLaVA (hooked layer, prompt + image, as the curate flow caches them)
   on `--train` toy samples; an SAE trained on them with the flow's default recipe (or a run's
   SAE); cross-modal weights and delta (median positive activation) as the flow computes them.
2. Localisation. Every cross-modal feature's dashboard is collected on the training samples; a
   feature whose top text tokens mostly (>= 60%) are one colour or shape word is a "concept
   feature". On held-out scenes containing an object with that colour/shape, its image
   activations are compared with the object's pixel mask (known to the toy world):
   share of activation mass inside the object vs the object's share of the image (what a
   uniform map would get), and IoU of the top-k patches (k = patches the object covers by
   >= half) with those patches vs k random patches. Control: in two-object scenes, the mass on
   the other object.
3. Patch masking (the paper's ImageNet-10 experiment, at toy scale). On held-out colour and
   shape questions, keep the top 25/50/75% of image patches ranked by a patch score, black out
   the rest, and measure the toy model's answer accuracy (greedy first token). Scores: SAE-V
   (sum of w_k z_k over the sample's cross-modal features), L0 (active features at the patch),
   raw cosine (no SAE: patch residual vs mean text residual), random; plus the unmasked image and
   an oracle that ranks patches by how much of any object they cover.

Prints both tables and writes benchmarks/INTERP_RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from saev_core.interp.dashboard import DashboardCollector  # noqa: E402
from saev_core.interp.explain import patch_scores  # noqa: E402
from saev_core.model.mllm import MLLMAdapter
from saev_core.pipeline.sources import resolve_model_id  # noqa: E402
from saev_core.model.image_geometry import top_fraction  # noqa: E402
from saev_core.model.patches import PatchGeometry  # noqa: E402
from saev_core.sae.training import SAETrainConfig, encode, load_sae, train_sae  # noqa: E402
from saev_core.toyworld import generator as gen  # noqa: E402
from saev_core.sae.weights import CrossModalWeightsBuilder  # noqa: E402

KEEP = (25, 50, 75)
METHODS = ("saev", "l0", "raw_cosine", "random", "oracle")


def capture_all(adapter, images, prompts, batch: int = 32):
    out = []
    for s in range(0, len(images), batch):
        out.extend(adapter.capture(images[s:s + batch], prompts[s:s + batch]))
    return out


def train_data(n: int, seed: int):
    rows, truth = gen.make_preference_rows(n, "rlaif-v", corruption_rate=0.0, seed=seed)
    images = [gen.image_from_bytes(r["image"]["bytes"]) for r in rows]
    return images, [r["question"] for r in rows]


def build_weights(sae, caps, pool: int = 30, k: int = 5, q: float = 0.5, chunk: int = 64):
    """As the flow's weights stage: two streamed passes, chunks of samples at a time."""
    b = CrossModalWeightsBuilder(sae.cfg.d_sae, pool, k)
    zs = [encode(sae, c.acts) for c in caps]
    for s in range(0, len(caps), chunk):
        part = caps[s:s + chunk]
        b.observe(torch.cat(zs[s:s + chunk]), torch.cat([c.is_image for c in part]), [c.n_positions for c in part])
    b.plan()
    for s in range(0, len(caps), chunk):
        b.gather(torch.cat([c.acts for c in caps[s:s + chunk]]))
    return b.result(), b.activation_quantile(q), zs


# ------------------------------------------------------------- localisation
def concept_features(sae, weights, caps, zs, tokenizer, min_share: float = 0.6, n_text: int = 10):
    """Features (any, cross-modal or not) active on both modalities whose top text tokens are
    mostly one colour or shape word: {feature: (word, 'colour'|'shape', share)}."""
    col = DashboardCollector(sae.cfg.d_sae, range(sae.cfg.d_sae), n_text=n_text, n_images=1, context=0)
    for i, (z, c) in enumerate(zip(zs, caps)):
        col.observe(str(i), z, c.is_image, c.input_ids)
    boards = {f: d for f, d in col.result(weights, tokenizer).items() if d.density_text > 0 and d.density_image > 0}
    vocab = {w: "colour" for w in gen.COLOURS} | {s: "shape" for s in gen.SHAPES}
    out = {}
    for f, d in boards.items():
        words = [w.strip().lower() for w in d.top_words]
        if len(words) < 5:
            continue
        word, count = Counter(words).most_common(1)[0]
        if word in vocab and count / len(words) >= min_share:
            out[f] = (word, vocab[word], count / len(words))
    return out


def random_iou(k: int, target: np.ndarray, n: int, rng, draws: int = 200) -> float:
    vals = []
    for _ in range(draws):
        pick = np.zeros(n, bool)
        pick[rng.choice(n, k, replace=False)] = True
        vals.append((pick & target).sum() / (pick | target).sum())
    return float(np.mean(vals))


def localisation(adapter, sae, weights, concepts, geometry, n_eval: int, seed: int):
    """Per group ('colour', 'shape', and the same restricted to cross-modal features): lists of
    per-(feature, scene) measurements; and per feature."""
    rng = np.random.default_rng([seed, 99])
    scenes = [gen.sample_scene(rng) for _ in range(n_eval)]
    rendered = [gen.render_scene(s) for s in scenes]
    caps = capture_all(adapter, [im for im, _ in rendered], ["describe the image."] * n_eval)
    acc = defaultdict(lambda: defaultdict(list))
    per_feature = defaultdict(lambda: defaultdict(list))
    has_w = weights.has_weight
    for scene, (im, masks), c in zip(scenes, rendered, caps):
        z = encode(sae, c.acts)[c.is_image]
        geo = geometry.for_image(im.width, im.height, int(c.is_image.sum()))
        covs = [geo.coverage(m) for m in masks]
        for f, (word, kind, _) in concepts.items():
            hit = [i for i, o in enumerate(scene.objects) if (o.colour if kind == "colour" else o.shape) == word]
            if not hit:
                continue
            a = z[:, f].numpy().astype(np.float64)
            rec = {"fires": float(a.max() > 0)}
            if a.max() > 0:
                cov = covs[hit[0]]
                rec["mass_in"] = float((a * cov).sum() / a.sum())
                rec["area"] = float(cov.mean())
                target = cov >= 0.5
                k = int(target.sum())
                if k:
                    top = top_fraction(a, k / a.size, seed=int(rng.integers(1 << 30)))
                    rec["iou"] = float((top & target).sum() / (top | target).sum())
                    rec["iou_random"] = random_iou(k, target, a.size, rng, 50)
                if len(scene.objects) == 2:
                    other = covs[1 - hit[0]]
                    rec["mass_other"] = float((a * other).sum() / a.sum())
                    rec["area_other"] = float(other.mean())
            groups = [kind] + ([f"{kind}, cross-modal only"] if bool(has_w[f]) else [])
            for g in groups:
                for key, v in rec.items():
                    acc[g][key].append(v)
            for key, v in rec.items():
                per_feature[f][key].append(v)
    return acc, per_feature


# ------------------------------------------------------------- patch masking
def masking(adapter, sae, weights, delta, geometry, n_per_kind: int, seed: int):
    from saev_core.toyworld.model import first_token_predictions

    results = {}
    model, processor = adapter.model, adapter.processor
    for kind in ("colour", "shape"):
        rng = np.random.default_rng([seed, 4242, 0 if kind == "colour" else 1])
        exs = [gen.sample_example(rng, kind=kind) for _ in range(n_per_kind)]
        images, masks = zip(*[gen.render_scene(e.scene) for e in exs])
        questions = [e.text for e in exs]
        answers = [e.answer.split()[0] for e in exs]

        def accuracy(imgs) -> float:
            preds = first_token_predictions(model, processor, list(imgs), questions)
            return float(np.mean([p == a for p, a in zip(preds, answers)]))

        caps = capture_all(adapter, list(images), questions)
        scores = []
        for i, c in enumerate(caps):
            z = encode(sae, c.acts)
            s = patch_scores(z, c.acts, c.is_image, weights, delta)
            geo = geometry.for_image(images[i].width, images[i].height, int(c.is_image.sum()))
            s["random"] = np.random.default_rng([seed, i]).random(geo.n_tokens)
            s["oracle"] = geo.coverage(masks[i].any(0))
            scores.append((s, geo))
        res = {"unmasked": accuracy(images)}
        for p in KEEP:
            for m in METHODS:
                masked = []
                for im, (s, geo) in zip(images, scores):
                    keep = geo.keep_mask(top_fraction(s[m], p / 100, seed=seed))
                    arr = np.asarray(im).copy()
                    arr[~keep] = 0
                    masked.append(Image.fromarray(arr))
                res[(m, p)] = accuracy(masked)
        results[kind] = res
    return results


# -------------------------------------------------------------------- report
def fmt_localisation(acc, per_feature, concepts, weights) -> str:
    lines = ["| features naming a | features | (feature, scene) pairs | fires on the image | activation mass inside "
             "the object | object's share of the image (uniform map) | IoU top-k patches | IoU random k patches | "
             "mass on the other object (control) | other object's share |", "|---|---|---|---|---|---|---|---|---|---|"]
    has_w = weights.has_weight
    for group in ("colour", "colour, cross-modal only", "shape", "shape, cross-modal only"):
        kind = group.split(",")[0]
        nf = sum(1 for f, v in concepts.items() if v[1] == kind and ("cross" not in group or bool(has_w[f])))
        r = acc.get(group)
        if not r:
            lines.append(f"| {group} | {nf} | 0 | - | - | - | - | - | - | - |")
            continue
        m = lambda k: f"{np.mean(r[k]):.3f}" if r.get(k) else "-"  # noqa: E731
        lines.append(f"| {group} | {nf} | {len(r['fires'])} | {m('fires')} | {m('mass_in')} | {m('area')} | "
                     f"{m('iou')} | {m('iou_random')} | {m('mass_other')} | {m('area_other')} |")
    lines += ["", "| feature | word | share of its top text tokens | cross-modal weight | scenes with the object | "
              "fires | mass inside | object share | IoU | IoU random |", "|---|---|---|---|---|---|---|---|---|---|"]

    def key(f):  # per kind: cross-modal first, then the features that fire on the most scenes
        pf = per_feature.get(f, {})
        return (concepts[f][1], np.isnan(float(weights.weights[f])), -float(np.sum(pf.get("fires", [0]))))

    shown = Counter()
    for f in sorted(concepts, key=key):
        word, kind, share = concepts[f]
        if shown[kind] >= 8:
            continue
        shown[kind] += 1
        pf = per_feature.get(f, {})
        m = lambda k: f"{np.mean(pf[k]):.3f}" if pf.get(k) else "-"  # noqa: E731
        w = float(weights.weights[f])
        lines.append(f"| {f} | {word} | {share:.0%} | {'-' if np.isnan(w) else f'{w:.3f}'} | {len(pf.get('fires', []))} "
                     f"| {m('fires')} | {m('mass_in')} | {m('area')} | {m('iou')} | {m('iou_random')} |")
    return "\n".join(lines)


def fmt_masking(res) -> str:
    names = {"saev": "SAE-V cross-modal patch score", "l0": "L0 (active features)", "raw_cosine": "raw cosine (no SAE)",
             "random": "random patches", "oracle": "oracle (object pixels)"}
    head = "| patches ranked by | " + " | ".join(f"{k} {p}% kept" for k in res for p in KEEP) + " |"
    lines = [head, "|---|" + "---|" * (len(res) * len(KEEP))]
    for m in METHODS:
        lines.append(f"| {names[m]} | " + " | ".join(f"{res[k][(m, p)]:.3f}" for k in res for p in KEEP) + " |")
    lines.append("| unmasked image | " + " | ".join(f"{res[k]['unmasked']:.3f}" for k in res for _ in KEEP) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy", help="'toy' (the shipped toy LLaVA) or a model folder")
    ap.add_argument("--note", default="", help="a sentence added to the results file (e.g. where the model came from)")
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--train", type=int, default=800, help="toy samples for SAE + weights + dashboards")
    ap.add_argument("--eval", type=int, default=300, help="held-out scenes for localisation")
    ap.add_argument("--mask-eval", type=int, default=200, help="held-out questions per kind for masking")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--expansion", type=int, default=16)
    ap.add_argument("--l1", type=float, default=5.0)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--sae", default=None, help="use this SAELens checkpoint instead of training")
    ap.add_argument("--save-sae", default=None, help="save the trained SAE here (SAELens format)")
    ap.add_argument("--parts", default="localisation,masking", help="which measurements to run")
    ap.add_argument("--run", default=None, help="use a curate run's SAE, weights and delta")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "INTERP_RESULTS.md"))
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    timings = {}
    adapter = MLLMAdapter.from_pretrained(resolve_model_id(args.model), layer=args.layer, device="cpu")
    geometry = PatchGeometry.from_adapter(adapter)
    images, prompts = train_data(args.train, seed=1000 + args.seed)
    t = time.perf_counter()
    caps = capture_all(adapter, images, prompts)
    timings["activations"] = time.perf_counter() - t
    how = ""
    t = time.perf_counter()
    run_weights = None
    if args.run:
        from saev_core.pipeline.run_sources import RunSources

        src = RunSources.from_run(args.run)
        sae = src.load_sae()
        run_weights, delta = src.load_weights(sae), src.delta
        how = f"SAE, weights and delta of run `{args.run}`"
    elif args.sae:
        sae = load_sae(args.sae)
        how = f"SAE `{args.sae}`"
    else:
        cfg = SAETrainConfig(expansion_factor=args.expansion, l1_coefficient=args.l1, lr=args.lr, steps=args.steps,
                             batch_size=args.batch, seed=args.seed)
        sae = train_sae(lambda: (c.acts for c in caps), adapter.hidden_size, cfg)
        if args.save_sae:
            from saev_core.sae.training import save_sae

            save_sae(sae, args.save_sae)
        how = (f"SAE trained here: standard, d_sae {sae.cfg.d_sae}, L1 {args.l1}, lr {args.lr}, {args.steps} steps x "
               f"{args.batch} tokens on {args.train} toy samples (prompt + image)")
    timings["sae"] = time.perf_counter() - t
    t = time.perf_counter()
    weights, q_delta, zs = build_weights(sae, caps)
    if run_weights is not None:
        weights = run_weights
    else:
        delta = q_delta
    timings["weights"] = time.perf_counter() - t
    print(f"{weights.n_cross_modal} cross-modal features of {sae.cfg.d_sae}; delta {delta:.4g}", flush=True)

    parts = set(args.parts.split(","))
    loc = mask = "(not run)"
    concepts = {}
    if "localisation" in parts:
        t = time.perf_counter()
        concepts = concept_features(sae, weights, caps, zs, adapter.processor.tokenizer)
        acc, per_feature = localisation(adapter, sae, weights, concepts, geometry, args.eval, args.seed)
        timings["localisation"] = time.perf_counter() - t
        loc = fmt_localisation(acc, per_feature, concepts, weights)
        print("\nLocalisation\n" + loc, flush=True)
    if "masking" in parts:
        t = time.perf_counter()
        res = masking(adapter, sae, weights, delta, geometry, args.mask_eval, args.seed)
        timings["masking"] = time.perf_counter() - t
        mask = fmt_masking(res)
        print("\nPatch masking (answer accuracy)\n" + mask, flush=True)
    total = time.perf_counter() - t0
    argl = list(argv if argv is not None else sys.argv[1:])
    if "--note" in argl:  # the note is prose for the file, not part of the command
        i = argl.index("--note")
        del argl[i:i + 2]
    cmd = "python benchmarks/interp_benchmark.py " + " ".join(argl)
    md = f"""# Interpretability measurements (toy world)

Reproduce: `.venv/bin/python {cmd.split('python ', 1)[1].strip()}` (from the repository root; {total:.0f} s on
{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads).

Model: `{args.model}` (layer {args.layer}). {args.note} {how}. {weights.n_cross_modal} cross-modal features of
{sae.cfg.d_sae}; delta {delta:.4g} (median positive activation). Timings (s): """ + ", ".join(
        f"{k} {v:.0f}" for k, v in timings.items()) + f"""

## Localisation: do features that name a colour or shape light up that object?

{len(concepts)} concept features: active on both modalities, and a colour or shape word is >= 60% of their
top-10 text tokens (one per sample, prompts of the {args.train} training samples); rows "cross-modal only"
keep those with a cross-modal weight. Held out: {args.eval} fresh scenes with the prompt "describe the image.";
a (feature, scene) pair counts when the scene has an object with the feature's colour/shape. "Mass inside"
is the share of the feature's image activation on that object's pixels; a map with no information
(uniform) gets the object's share of the image. IoU: top-k patches by activation vs the k patches the
object covers by at least half. Control: in two-object scenes, mass on the other object.

{loc}

## Patch masking: keep the top p% of patches by a score, black out the rest

{args.mask_eval} held-out questions per kind; answer = the model's greedy first token. The paper (LLaVA-NeXT-7B,
ImageNet-10, 25% kept): SAE-V 0.677, random 0.431, unmasked 0.896. SAE-V patch score = sum over the
sample's cross-modal features (weighted, active > delta on a text and an image position) of w_k z_k at the
patch. Oracle = ranked by the share of the patch covered by any object (an upper reference).

{mask}
"""
    Path(args.out).write_text(md)
    print(f"\nwritten {args.out} ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
