"""The first real run's checks, on one GPU: a full-size random-weight LLaVA-NeXT-7B-shaped model
(Mistral-7B text config, CLIP-L/336, 672x672 anyres images; nothing downloaded) and a random
65,536-feature SAE, built on the device. One table (issue 20):

  fused == cached     the fused pass (capture on the device -> encode -> statistics) equals the
                      cached path (residuals to the host in the cache dtype, read back)
  forward TFLOP/s     forward to layer 16 at 8k/16k/32k batch_tokens, effective and share of peak
  encode f32 / bf16   encode + statistics time per sample, ratio to the capture, score drift
                      (Spearman of `reference` and `cooccur_l0` scores, bf16 vs float32)
  host vs GPU         input preparation (image processor + tokenizer) per sample vs GPU time
  SAE training        tokens/s in float32 / TF32 / bf16 and hours for 122.9M tokens
  feed                training tokens/s fed from the activation cache vs a GPU-resident tensor
  weights builder     seconds per sample
  log-prob pass       full forwards per sample (chosen + rejected together) and seconds
  SAE load            seconds to load the 65k SAE checkpoint

    .venv/bin/python benchmarks/gpu_check.py            # on a GPU, at most 8 minutes on one H200
    .venv/bin/python benchmarks/gpu_check.py --small    # the same checks on the CPU at reduced shapes
    ... --json                                          # last line: one JSON object of the figures

Settings are fixed in SETTINGS before the first run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

SETTINGS = {
    "full": {
        "text": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=32768),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, projection_dim=768),
        "layer": 16, "image": [672, 672], "d_sae": 65_536, "batch_tokens": [8192, 16384, 32768],
        "samples": 24, "train_steps": 40, "train_batch": 4096, "weight_samples": 8, "logp_samples": 4,
        "device": "cuda", "dtype": torch.bfloat16, "peak_tflops": 989.0,  # H200 dense bf16
    },
    "small": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=4096),
        "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       image_size=56, patch_size=14, projection_dim=32),
        "layer": 2, "image": [112, 112], "d_sae": 512, "batch_tokens": [256, 512, 1024],
        "samples": 12, "train_steps": 20, "train_batch": 256, "weight_samples": 6, "logp_samples": 3,
        "device": "cpu", "dtype": torch.float32, "peak_tflops": None,
    },
    "seed": 0,
    "recipe_tokens": 30_000 * 4_096,
}


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(fn, dev, repeats: int = 3) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_adapter(s: dict):
    """The random-weight model built on the device (no disk, no download) and its processor."""
    from tiny_mllms import make_tokenizer
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, MistralConfig)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from saev_core.model.mllm import MLLMAdapter

    tok = make_tokenizer()
    side = s["vision"]["image_size"]
    pinpoints = [[side, 2 * side], [2 * side, side], [2 * side, 2 * side], [3 * side, side], [side, 3 * side]]
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=s["vision"]["patch_size"],
                              num_additional_image_tokens=1, vision_feature_select_strategy="default",
                              chat_template=tok.chat_template)
    text = MistralConfig(vocab_size=32_064 if s["device"] == "cuda" else len(tok), pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **s["text"])
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**s["vision"]), text_config=text,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                          vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
    torch.manual_seed(SETTINGS["seed"])
    dev = torch.device(s["device"])
    with dev:
        model = LlavaNextForConditionalGeneration(cfg).to(s["dtype"])
    return MLLMAdapter(model, proc, s["layer"], dev, s["dtype"])


def build_sae(d_in: int, d_sae: int, dev: torch.device, folder: Path, calib: torch.Tensor):
    """A random SAE-V-initialised SAE, biases set so each feature fires on 1% of real positions,
    saved as a SAELens checkpoint (for the load time) and returned in float32 on the device."""
    from saev_core.sae.training import SAETrainConfig, _training_sae, load_sae, save_sae

    torch.manual_seed(SETTINGS["seed"])
    sae = _training_sae(SAETrainConfig(d_sae=d_sae, normalize_activations=False), d_in)
    sae.save_inference_model(str(folder))
    sae = load_sae(folder, device=str(dev))
    with torch.no_grad():
        pre = calib[:4096].to(dev, torch.float32) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre.float().cpu(), 0.99, dim=0).to(dev))
    save_sae(sae, folder)
    return sae


def _samples(n: int, size: list[int]):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(SETTINGS["seed"])
    images = [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]
    words = ["what", "colour", "is", "the", "shape", "red", "blue", "circle", "square", "there", "a", "green"]
    prompts = [" ".join(words[(i + j) % len(words)] for j in range(8 + i % 9)) + " ?" for i in range(n)]
    chosen = [" ".join(words[(2 * i + j) % len(words)] for j in range(6 + i % 5)) for i in range(n)]
    rejected = [" ".join(words[(3 * i + j) % len(words)] for j in range(4 + i % 7)) for i in range(n)]
    return images, prompts, chosen, rejected


def check_fused(adapter, sae, images, prompts) -> dict:
    """Fused (on the device, model dtype) vs cached (host copy in the cache dtype, read back)."""
    from saev_core.pipeline.score_stages import _stats_on_device

    batch = adapter.build_inputs(images[:4], prompts[:4])
    cached = adapter.capture(images[:4], prompts[:4], batch=batch, out_dtype=adapter.dtype)
    fused = adapter.capture(images[:4], prompts[:4], batch=batch, on_device=True)
    same = True
    for i, (c, f) in enumerate(zip(cached, fused)):
        assert f.acts.device.type == adapter.device.type and f.is_image.device == f.acts.device
        a = _stats_on_device(str(i), sae, c.acts.float(), c.is_image, c.content)
        b = _stats_on_device(str(i), sae, f.acts, f.is_image, f.content)
        same &= torch.equal(a.text_max, b.text_max) and torch.equal(a.image_max, b.image_max)
        same &= a.raw_cosine == b.raw_cosine
    return {"fused_matches_cached": bool(same), "fused_device": str(fused[0].acts.device)}


def forward_tflops(adapter, images, prompts, s: dict) -> dict:
    from scale_plan import MODEL, capture_flops

    dev = adapter.device
    one = int(adapter.build_inputs(images[:1], prompts[:1]).host_mask.sum())
    m = {**MODEL, "d": s["text"]["hidden_size"], "mlp": s["text"]["intermediate_size"],
         "heads": s["text"]["num_attention_heads"], "kv_heads": s["text"]["num_key_value_heads"],
         "hook": s["layer"], "crops": 1, "crop_tokens": 0, "vision_params": 0}
    out = {"tokens_per_sample": one}
    for bt in s["batch_tokens"]:
        n = max(1, bt // one)
        imgs = (images * (n // len(images) + 1))[:n]
        prm = (prompts * (n // len(prompts) + 1))[:n]
        batch = adapter.build_inputs(imgs, prm)
        seconds = _timed(lambda: adapter.layer_output(batch), dev)
        # the language model to the hook (scale_plan.capture_flops) + the vision tower over 5 crops
        # (anyres at 2x2 tiles + the base image) of (side / patch)^2 patches
        vision = sum(p.numel() for p in adapter.model.model.vision_tower.parameters())
        patches = (s["vision"]["image_size"] // s["vision"]["patch_size"]) ** 2
        flops = n * (capture_flops(m, one) + 2 * vision * patches * 5)
        tf = flops / seconds / 1e12
        out[f"tflops_{bt}"] = round(tf, 3)
        out[f"peak_share_{bt}"] = round(tf / s["peak_tflops"], 3) if s["peak_tflops"] else None
        out[f"capture_s_per_sample_{bt}"] = seconds / n
    return out


def encode_precision(adapter, sae, sae_folder: Path, images, prompts, capture_s: float) -> dict:
    """Encode + statistics per sample in float32 and in bfloat16 (the model's dtype on a GPU), and
    the score drift between the two."""
    from saev_core.pipeline.score_stages import _stats_on_device
    from saev_core.sae.scoring import ScoreContext, score_all
    from saev_core.sae.training import load_sae
    from saev_core.sae.weights import CrossModalWeights

    dev = adapter.device
    caps = []
    for i in range(0, len(images), 4):
        caps += adapter.capture(images[i:i + 4], prompts[i:i + 4], on_device=True)
    low = load_sae(sae_folder, device=str(dev), dtype="bfloat16")  # the model's dtype on a GPU
    d_sae = sae.cfg.d_sae
    g = torch.Generator().manual_seed(SETTINGS["seed"])
    w = torch.full((d_sae,), float("nan"))
    picked = torch.randperm(d_sae, generator=g)[:max(10, d_sae // 100)]
    w[picked] = torch.rand(picked.numel(), generator=g)
    weights = CrossModalWeights(w, torch.zeros(d_sae), torch.zeros(d_sae), 30, 5)
    out, scores = {}, {}
    for name, model in (("float32", sae), ("bf16", low)):
        def run():
            return [_stats_on_device(str(i), model, c.acts, c.is_image, c.content) for i, c in enumerate(caps)]
        out[f"encode_s_per_sample_{name}"] = _timed(run, dev, 3) / len(caps)
        stats = run()
        delta = float(torch.quantile(torch.cat([st.text_max[st.text_max > 0] for st in stats]).double(), 0.5))
        scores[name] = [score_all(st, ["reference", "cooccur_l0"], ScoreContext(weights, delta, 10, 0)) for st in stats]
    for m in ("reference", "cooccur_l0"):
        a = [r[m] for r in scores["float32"]]
        b = [r[m] for r in scores["bf16"]]
        out[f"drift_spearman_{m}"] = _spearman(a, b)
    out["encode_to_capture_float32"] = out["encode_s_per_sample_float32"] / capture_s
    out["encode_to_capture_bf16"] = out["encode_s_per_sample_bf16"] / capture_s
    return out


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return round(cov / var, 5) if var else 1.0


def host_vs_gpu(adapter, images, prompts, gpu_s_per_sample: float) -> dict:
    t0 = time.perf_counter()
    for im, p in zip(images, prompts):
        adapter.build_inputs([im], [p])
    host = (time.perf_counter() - t0) / len(images)
    return {"host_prep_s_per_sample": host, "gpu_s_per_sample": gpu_s_per_sample,
            "host_to_gpu": host / gpu_s_per_sample}


def sae_training(d_in: int, s: dict, dev: torch.device, cache=None, keys=None) -> dict:
    """Tokens/s of SAELens training per precision on a GPU-resident source, then fed from the cache."""
    from saev_core.pipeline.stages import training_source
    from saev_core.sae.training import SAETrainConfig, train_sae

    resident = torch.randn(s["train_batch"] * 8, d_in, device=dev)

    def source():
        for _ in range(10 ** 6):
            yield resident[torch.randint(0, resident.shape[0], (s["train_batch"],), device=dev)]

    out = {}
    precisions = ["float32", "tf32", "bf16"] if dev.type == "cuda" else ["float32", "bf16"]
    for p in precisions:
        cfg = SAETrainConfig(d_sae=s["d_sae"], steps=s["train_steps"], batch_size=s["train_batch"], lr=1e-4,
                             n_batches_for_norm_estimate=2, shuffle_buffer_tokens=s["train_batch"] * 4,
                             device=str(dev), precision=p)
        t0 = time.perf_counter()
        train_sae(source, d_in, cfg)
        _sync(dev)
        rate = s["train_steps"] * s["train_batch"] / (time.perf_counter() - t0)
        out[f"train_tokens_per_s_{p}"] = rate
        out[f"train_hours_recipe_{p}"] = SETTINGS["recipe_tokens"] / rate / 3600
    if cache is not None:
        best = "bf16"
        cfg = SAETrainConfig(d_sae=s["d_sae"], steps=s["train_steps"], batch_size=s["train_batch"], lr=1e-4,
                             n_batches_for_norm_estimate=2, shuffle_buffer_tokens=s["train_batch"] * 4,
                             device=str(dev), precision=best)
        t0 = time.perf_counter()
        train_sae(training_source(cache, keys), d_in, cfg)
        _sync(dev)
        fed = s["train_steps"] * s["train_batch"] / (time.perf_counter() - t0)
        out["feed_tokens_per_s"] = fed
        out["feed_to_resident"] = fed / out[f"train_tokens_per_s_{best}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="reduced shapes on the CPU (under 3 minutes)")
    ap.add_argument("--json", action="store_true", help="last line: one JSON object of the figures")
    args = ap.parse_args()
    s = SETTINGS["small" if args.small else "full"]
    if s["device"] == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --small for the CPU checks")
    from saev_core.model.activation_cache import ActivationCache, CacheSpec
    from saev_core.model.logprobs import LogprobCost, pair_logprobs
    from saev_core.pipeline import stages
    from saev_core.pipeline.specs import WeightsSpec
    from saev_core.sae.training import load_sae

    t_start = time.perf_counter()
    fig: dict = {"mode": "small" if args.small else "full", "device": s["device"]}
    adapter = build_adapter(s)
    dev = adapter.device
    if dev.type == "cuda":
        fig["gpu"] = torch.cuda.get_device_name(dev)
    images, prompts, chosen, rejected = _samples(s["samples"], s["image"])
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    calib = torch.cat([c.acts for c in adapter.capture(images[:2], prompts[:2])])
    sae = build_sae(adapter.hidden_size, s["d_sae"], dev, work / "sae", calib)

    fig.update(check_fused(adapter, sae, images, prompts))
    fwd = forward_tflops(adapter, images, prompts, s)
    fig.update({k: v for k, v in fwd.items() if not k.startswith("capture_s")})
    capture_s = fwd[f"capture_s_per_sample_{s['batch_tokens'][0]}"]
    fig["capture_s_per_sample"] = capture_s
    fig.update(encode_precision(adapter, sae, work / "sae", images, prompts, capture_s))
    fig.update(host_vs_gpu(adapter, images[:8], prompts[:8], capture_s))

    cache = ActivationCache(str(work / "cache"), CacheSpec("gpu-check", s["layer"], storage_dtype="bfloat16"
                                                           if adapter.dtype == torch.bfloat16 else "float32"))
    with cache.writer([str(i) for i in range(s["weight_samples"])]) as w:
        for i, c in enumerate(adapter.capture(images[:s["weight_samples"]], prompts[:s["weight_samples"]],
                                              out_dtype=cache.dtype)):
            w.add(i, c)
        key = w.finish()
    t0 = time.perf_counter()
    stages.build_weights(cache, [key], sae, WeightsSpec(weight_samples=s["weight_samples"]))
    _sync(dev)
    fig["weights_s_per_sample"] = (time.perf_counter() - t0) / s["weight_samples"]

    cost, t0 = LogprobCost(), time.perf_counter()
    for i in range(s["logp_samples"]):
        cost.add(pair_logprobs(adapter, images[i], prompts[i], (chosen[i], rejected[i]))[1])
    _sync(dev)
    fig["logp_s_per_sample"] = (time.perf_counter() - t0) / s["logp_samples"]
    fig["logp_forwards_per_sample"] = round(cost.forwards_per_sample, 3)
    fig["logp_fallbacks"] = cost.fallbacks

    t0 = time.perf_counter()
    load_sae(work / "sae", device=str(dev))
    _sync(dev)
    fig["sae_load_s"] = time.perf_counter() - t0
    del adapter
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    fig.update(sae_training(calib.shape[1], s, dev, cache, [key]))
    fig["wall_s"] = time.perf_counter() - t_start

    print(f"{'figure':40s} value")
    for k, v in fig.items():
        print(f"{k:40s} {v:.4g}" if isinstance(v, float) else f"{k:40s} {v}")
    if args.json:
        print(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in fig.items()}))


if __name__ == "__main__":
    main()
