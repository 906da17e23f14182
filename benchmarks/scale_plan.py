"""The arithmetic of benchmarks/SCALE.md: storage, GPU hours and memory per worker for curating an
83k-sample dataset with LLaVA-NeXT-7B and a 65,536-feature SAE, on 1, 4 and 8 GPUs.

Shapes come from the model's published config; the GPU's effective throughput is an assumption
(printed, change it with --tflops); the measured inputs (fused-pass overhead, feed rate) are
flags whose defaults are the figures of `benchmarks/scale_benchmark.py` quoted in SCALE.md.

    .venv/bin/python benchmarks/scale_plan.py [--tflops 150] [--gpus 1 4 8] [--sae-tokens-per-s R]
        [--host-prep-s S] [--fused-overhead F]   # the measured figures of benchmarks/gpu_check.py
"""

from __future__ import annotations

import argparse

MODEL = {  # LLaVA-NeXT-Mistral-7B: Mistral-7B LM + CLIP ViT-L/14 at 336 px, hooked after layer 16
    "d": 4096, "layers": 32, "hook": 16, "mlp": 14_336, "heads": 32, "kv_heads": 8, "vocab": 32_000,
    "vision_params": 304e6, "crop_tokens": 577, "crops": 4,  # anyres: base + 2-4 tiles (1,176-2,928 tokens)
}
DATA = {"samples": 83_132, "tokens": 2_700,  # RLAIF-V; 200-250M positions in all (issue 15)
        "response_tokens": 100}  # an assumption (RLAIF-V's responses: a few sentences)
SAE = {"d_sae": 65_536, "train_tokens": 30_000 * 4_096, "weight_samples": 1_000, "shard_rows": 128,
       "buffer_tokens": 131_072, "prefetch": 4, "batch": 4_096, "batch_tokens": 8_192}


def layer_params(m: dict) -> float:
    d, kv = m["d"], m["d"] * m["kv_heads"] // m["heads"]
    return 2 * d * d + 2 * d * kv + 3 * d * m["mlp"]


def capture_flops(m: dict, t: int) -> float:
    """Forward to the hooked layer: weights, attention scores (causal: half of T^2), vision tower."""
    lm = 2 * layer_params(m) * m["hook"] * t + 2 * t * t * m["d"] * m["hook"]
    return lm + 2 * m["vision_params"] * m["crop_tokens"] * m["crops"]


def full_forward_flops(m: dict, t: int, response: int) -> float:
    """Every layer over t positions, and the LM head at the response positions only."""
    return capture_flops({**m, "hook": m["layers"]}, t) + 2 * m["d"] * m["vocab"] * response


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tflops", type=float, default=150.0, help="effective bf16 TFLOP/s per GPU (assumption)")
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--fused-overhead", type=float, default=None,
                    help="measured fused/capture ratio to use instead of the FLOP estimate")
    ap.add_argument("--sae-tokens-per-s", type=float, default=None,
                    help="measured SAE training rate (benchmarks/gpu_check.py, bf16) instead of the FLOP estimate")
    ap.add_argument("--host-prep-s", type=float, default=None,
                    help="measured host input preparation per sample, one thread (benchmarks/gpu_check.py)")
    ap.add_argument("--host-threads", type=int, default=7, help="prefetch threads per GPU (cores per GPU less one)")
    args = ap.parse_args()
    m, n, t, D, r = MODEL, DATA["samples"], DATA["tokens"], SAE["d_sae"], DATA["response_tokens"]
    d, e = m["d"], args.tflops * 1e12
    cap = capture_flops(m, t)
    enc_tok = 2 * d * D
    fused_ratio = args.fused_overhead or (cap + enc_tok * t) / cap
    train_tok = 12 * d * D  # forward (encode + decode) 4dD, backward twice that
    train_rate = args.sae_tokens_per_s or e / train_tok
    train_samples = SAE["train_tokens"] / t
    # log-probs: the image + prompt prefix once, both responses after it (saev_core/model/logprobs.py)
    logp_forwards = (t + 2 * r) / (t + r)
    logp = full_forward_flops(m, t + r, 2 * r) * logp_forwards
    print(f"assumptions: {n:,} samples x {t:,} positions ({r} per response); d {d}, hook after layer {m['hook']}, "
          f"SAE {D:,}; GPU at {args.tflops:.0f} effective TFLOP/s; SAE training at {train_rate:,.0f} positions/s "
          f"({'measured' if args.sae_tokens_per_s else 'FLOP estimate'})")
    print(f"per sample: capture {cap / 1e12:.1f} TFLOP, SAE encode {enc_tok * t / 1e12:.2f} TFLOP "
          f"-> fused/capture {fused_ratio:.3f}; log-prob pass {logp / 1e12:.1f} TFLOP "
          f"({logp_forwards:.3f} full forwards: chosen and rejected after one shared prefix)")

    gb = 1e9
    before = n * t * d * 4
    stats_bound = n * 3 * D * 8  # text, image and content maxima; sparse: int32 index + float32 value each
    weight_cache = SAE["weight_samples"] * t * d * 2
    train_cache = SAE["train_tokens"] * d * 2
    print("\nstorage:")
    print(f"  before: every residual, float32                      {before / 1e12:6.2f} TB")
    print(f"  after:  per-sample statistics (bound: 3 x {D:,} nonzeros x 8 bytes = {3 * D * 8 / 1e6:.2f} MB a sample) "
          f"{stats_bound / gb:6.1f} GB")
    print(f"          weight subset residuals, bfloat16            {weight_cache / gb:6.1f} GB")
    print(f"          SAE training sample ({SAE['train_tokens'] / 1e6:.1f}M positions), bf16 {train_cache / 1e12:6.2f} TB"
          " (0 if trained online)")

    host = args.host_prep_s
    print(f"\nhost preparation: {'%.3f s a sample on one thread' % host if host else 'not measured (gpu_check.py)'}"
          f", {args.host_threads} threads per GPU: it hides behind the device when shorter than the GPU's time")
    print("\nhours (stages one after the other; the SAE trains on one GPU while the others wait):")
    print("  GPUs   capture sample   train SAE   weights   fused scoring   log-probs   wall total   GPU-hours paid")
    for g in args.gpus:
        def per_gpu(samples: float, flops: float) -> float:
            gpu = samples * flops / (g * e)
            prep = samples * host / (g * args.host_threads) if host else 0.0
            return max(gpu, prep)
        stages = [per_gpu(train_samples + SAE["weight_samples"], cap), SAE["train_tokens"] / train_rate,
                  2 * SAE["weight_samples"] * t * enc_tok / e, per_gpu(n, cap * fused_ratio), per_gpu(n, logp)]
        wall = sum(stages)
        print(f"  {g:>4}   {stages[0] / 3600:14.2f}   {stages[1] / 3600:9.2f}   {stages[2] / 3600:7.3f}   "
              f"{stages[3] / 3600:13.2f}   {stages[4] / 3600:9.2f}   {wall / 3600:10.2f}   {g * wall / 3600:14.2f}")

    need = train_tok and e / train_tok
    print(f"\nSAE feed: a GPU at {args.tflops:.0f} TFLOP/s trains on {need:,.0f} positions/s = "
          f"{need * d * 2 / gb:.2f} GB/s of bfloat16 residuals (float32: {need * d * 4 / gb:.2f} GB/s)")

    p_total = layer_params(m) * m["layers"] + 2 * m["vocab"] * d + m["vision_params"] + 21e6
    print("\nmemory per worker:")
    print(f"  GPU: model bf16 {p_total * 2 / gb:.1f} GB; SAE float32 {2 * d * D * 4 / gb:.2f} GB; codes of one "
          f"sample in the fused pass {t * D * 4 / gb:.2f} GB (x2 with the modality split)")
    print(f"  host, capture+cache task: one forward batch ({SAE['batch_tokens']:,} positions) in bf16 "
          f"{SAE['batch_tokens'] * d * 2 / gb:.2f} GB; the shard ({SAE['shard_rows']} samples) is spooled to "
          f"local disk, {SAE['shard_rows'] * t * d * 2 / gb:.1f} GB in bf16, then streamed out")
    print(f"  host, fused scoring task: statistics of {SAE['shard_rows']} samples <= "
          f"{SAE['shard_rows'] * 3 * D * 8 / gb:.3f} GB")
    print(f"  host, SAE training: mixing buffer {SAE['buffer_tokens'] * d * 2 / gb:.2f} GB (bf16) + "
          f"{SAE['prefetch']} prefetched batches {SAE['prefetch'] * SAE['batch'] * d * 4 / gb:.2f} GB")


if __name__ == "__main__":
    main()
