"""Speed and memory of the two hot paths, measured in one run:

1. activation capture with the forward stopped after the hooked layer vs a full forward
   (`output_hidden_states=True`), samples per second, median of repeats;
2. streaming cross-modal weights: the builder's state size as the number of tokens grows
   (must stay flat), and its throughput in tokens per second.

    .venv/bin/python benchmarks/capture_benchmark.py [--model FOLDER] [--layer 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saev_core.model.mllm import MLLMAdapter  # noqa: E402
from saev_core.sae.weights import CrossModalWeightsBuilder  # noqa: E402


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def capture_speed(model: str, layer: int, batch: int, repeats: int) -> dict:
    from saev_core.toyworld.generator import make_preference_rows, image_from_bytes

    rows, _ = make_preference_rows(batch, "rlaif-v", 0.0, seed=7)
    images = [image_from_bytes(r["image"]["bytes"]) for r in rows]
    prompts = [r["question"] for r in rows]
    adapter = MLLMAdapter.from_pretrained(model, layer=layer, device="cpu")
    inputs = adapter.build_inputs(images, prompts)
    adapter.capture(images, prompts)  # warm-up

    def full():
        with torch.no_grad():
            adapter.model(**inputs, output_hidden_states=True, use_cache=False)

    early = _timed(lambda: adapter.layer_output(inputs), repeats)
    whole = _timed(full, repeats)
    return {"layers": adapter.n_layers, "hooked_layer": layer, "batch": batch,
            "early_stop_samples_per_s": batch / early, "full_forward_samples_per_s": batch / whole,
            "speedup": whole / early}


def weights_memory(d_sae: int, d_in: int, chunks: list[int], chunk_tokens: int) -> list[dict]:
    out = []
    for n_chunks in chunks:
        b = CrossModalWeightsBuilder(d_sae, reservoir=50_000)
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(n_chunks):
            z = torch.relu(torch.randn(chunk_tokens, d_sae, generator=g) - 1.5)
            b.observe(z, torch.rand(chunk_tokens, generator=g) < 0.7)
        elapsed = time.perf_counter() - t0
        state = sum(t.numel() * t.element_size() for t in (b.pool_act, b.pool_idx, b.pool_img, b._reservoir))
        out.append({"tokens": n_chunks * chunk_tokens, "state_MB": state / 2**20,
                    "observe_tokens_per_s": n_chunks * chunk_tokens / elapsed,
                    "raw_residuals_MB_if_kept": n_chunks * chunk_tokens * d_in * 4 / 2**20})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder (default: the shipped toy LLaVA)")
    ap.add_argument("--layer", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    from saev_core.toyworld import toy_model_path

    model = args.model or str(toy_model_path())
    cap = capture_speed(model, args.layer, args.batch, args.repeats)
    print(f"capture ({Path(model).name}, hook after layer {cap['hooked_layer']} of {cap['layers']}, "
          f"batch {cap['batch']}, median of {args.repeats}):")
    print(f"  early stop   {cap['early_stop_samples_per_s']:8.1f} samples/s")
    print(f"  full forward {cap['full_forward_samples_per_s']:8.1f} samples/s   -> early stop is "
          f"{cap['speedup']:.2f}x faster")
    print("streaming weights builder (d_sae 2048, d_in 128):")
    for row in weights_memory(2048, 128, [10, 40, 160], 1024):
        print(f"  {row['tokens']:>8} tokens: state {row['state_MB']:6.2f} MB "
              f"(raw residuals would be {row['raw_residuals_MB_if_kept']:7.1f} MB), "
              f"{row['observe_tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
    main()
