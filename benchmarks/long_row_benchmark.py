"""Peak memory of one long row among short ones, with and without the token budgets.

16 samples on a tiny random LLaVA (tests/tiny_mllms.py, context 2,048 tokens), one of them with a
question of `--reps` x "what colour is the circle ? " (28 characters each); activation capture
and the spliced-CE metrics (7 forwards) over all 16. Each setting runs in a fresh process and
prints its peak resident memory:

    budget:    text cut to the context, forwards of at most 4,096 padded tokens (the pipeline)
    no-budget: neither (what ran before: every batch padded to the long row)

    .venv/bin/python benchmarks/long_row_benchmark.py [--reps 800]

Settings are fixed here; --reps above ~1,500 makes the no-budget run need more than 10 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH, BATCH_TOKENS = 16, 4096


def _one(reps: int, budget: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from tiny_mllms import build_llava, random_image

    from saev_core.model import budget as budget_mod
    from saev_core.model.mllm import MLLMAdapter
    from saev_core.sae.metrics import spliced_ce

    if not budget:
        budget_mod.context_tokens = lambda adapter: None
    tokens = BATCH_TOKENS if budget else 10**12
    with tempfile.TemporaryDirectory() as tmp:
        adapter = MLLMAdapter.from_pretrained(str(build_llava(Path(tmp))), layer=1, device="cpu")
    prompts = ["what colour is the circle ? " * reps] + ["describe the image ."] * (BATCH - 1)
    images = [random_image(i) for i in range(BATCH)]
    caps = budget_mod.capture_bounded(adapter, images, prompts, batch_size=BATCH, batch_tokens=tokens)

    class Identity(torch.nn.Module):
        dtype = torch.float32

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def encode(self, h):
            return h

        def decode(self, z):
            return z

    spliced_ce(adapter, Identity(), images, prompts, ["red circle ."] * BATCH, batch_size=BATCH, batch_tokens=tokens)
    return {"long_row_tokens": caps[0].n_positions, "truncated_tokens": caps[0].truncated_tokens,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=800)
    ap.add_argument("--child", choices=["budget", "no-budget"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_one(args.reps, args.child == "budget")))
        return
    print(f"long row: {28 * args.reps} characters; {BATCH} samples; batch_tokens {BATCH_TOKENS}")
    for setting in ("budget", "no-budget"):
        out = subprocess.run([sys.executable, __file__, "--reps", str(args.reps), "--child", setting],
                             capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else f"failed: {out.stderr[-500:]}"
        print(f"{setting:>10}: {line}")


if __name__ == "__main__":
    main()
