"""A whole curate run at 1,000 and 10,000 samples (issue 15): is memory flat in the data, and what
is stored per sample once only the residual sample is cached?

Each run is the real flow (Prefect ephemeral API, thread runner, toy world, toy LLaVA on the CPU)
in its own subprocess, which reports its peak resident memory (VmHWM), the bytes the run left
under <work>/activations (residuals) and <work>/stats (fused per-sample statistics), and its stage
timings. Runs:

- `sample-1k`, `sample-10k`: the SAE trains on a 500-sample draw and the weights use 500 samples,
  so residuals are cached for ~550 samples whatever the dataset's size; the rest is scored by the
  fused pass.
- `all-1k`: the same at 1,000 samples with `train_samples` unset (every residual cached, every
  shard scored from the cache): what a run stored before the fused pass was wired in.

    .venv/bin/python benchmarks/run_scale_benchmark.py [--work DIR] [--only sample-1k,...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# fixed before the first run
SETTINGS = {
    "runs": {"sample-1k": {"samples": 1000, "train_samples": 500},
             "sample-10k": {"samples": 10_000, "train_samples": 500},
             "all-1k": {"samples": 1000, "train_samples": None}},
    "shard_rows": 128,
    "sae": {"steps": 300, "batch_size": 512, "expansion_factor": 16, "lr": 1e-3},
    "weight_samples": 500,
    "threads": 2,
}


def _params(name: str, run: dict, work: Path) -> dict:
    return {
        "dataset": {"uri": "toy://rlaif-v", "toy_samples": run["samples"], "shard_rows": SETTINGS["shard_rows"]},
        "model": {"model_id": "toy", "layer": 2, "device": "cpu"},
        "sae": {**SETTINGS["sae"], "train_samples": run["train_samples"]},
        "scoring": {"weights": {"weight_samples": SETTINGS["weight_samples"]}},
        "output": {"uri": str(work / "out"), "work_uri": str(work / "work"), "run_id": name, "keep_percents": [50]},
        # the SAE-V ranking fails the gate on the toy world (benchmarks/RESULTS.md); this measures cost only
        "validation": {"max_tie_share": 1.0, "min_cross_modal_features": 0},
    }


def _bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


def _child(name: str, work: Path) -> None:
    import torch

    torch.set_num_threads(SETTINGS["threads"])
    from flows.curate import curate
    from scale_benchmark import _peak_mb  # this process's VmHWM (benchmarks/ is on sys.path)
    from flows.params import CurateParams

    t0 = time.perf_counter()
    result = curate(CurateParams.model_validate(_params(name, SETTINGS["runs"][name], work)))
    wall = time.perf_counter() - t0
    manifest = json.loads((Path(result["run"]) / "manifest.json").read_text())
    print(json.dumps({"peak_mb": _peak_mb(), "wall_s": wall, "kept": manifest["counts"]["kept"],
                      "canaries": (manifest.get("canaries") or {}).get("n", 0),
                      "fraction": manifest["residual_sample"]["fraction"],
                      "activations_bytes": _bytes(work / "work" / "activations"),
                      "stats_bytes": _bytes(work / "work" / "stats"),
                      "stages": {s["stage"]: round(s["seconds"], 1) for s in result["stages"]}}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--only", default=",".join(SETTINGS["runs"]))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="run-scale-"))
    if args.child:
        _child(args.child, work)
        return
    print(f"settings: {json.dumps(SETTINGS)}")
    out = {}
    try:
        for name in args.only.split(","):
            folder = work / name
            shutil.rmtree(folder, ignore_errors=True)
            (folder / "prefect").mkdir(parents=True)
            env = {**os.environ, "PREFECT_HOME": str(folder / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
            res = subprocess.run([sys.executable, __file__, "--child", name, "--work", str(folder)], env=env,
                                 capture_output=True, text=True)
            if res.returncode:
                print(f"{name}: failed\n{res.stderr[-3000:]}")
                continue
            r = out[name] = json.loads(res.stdout.strip().splitlines()[-1])
            scored = r["kept"] + r["canaries"]
            print(f"{name}: {r['kept']:,} samples + {r['canaries']} canaries, residual fraction {r['fraction']:.3f}: "
                  f"peak RSS {r['peak_mb']:,.0f} MB, wall {r['wall_s']:.0f} s; stored: residuals "
                  f"{r['activations_bytes'] / 1e6:.1f} MB, statistics {r['stats_bytes'] / 1e6:.1f} MB "
                  f"-> {(r['activations_bytes'] + r['stats_bytes']) / scored / 1e3:.1f} KB per scored sample")
            print(f"  stages (s): {r['stages']}")
        if {"sample-1k", "sample-10k"} <= set(out):
            a, b = out["sample-1k"], out["sample-10k"]
            print(f"peak RSS 10k / 1k: {b['peak_mb'] / a['peak_mb']:.2f}; residual bytes 10k / 1k: "
                  f"{b['activations_bytes'] / max(a['activations_bytes'], 1):.2f}")
        if {"sample-1k", "all-1k"} <= set(out):
            a, b = out["sample-1k"], out["all-1k"]
            print(f"stored at 1k, every residual / residual sample + statistics: "
                  f"{b['activations_bytes'] + b['stats_bytes']:,} / {a['activations_bytes'] + a['stats_bytes']:,} "
                  f"bytes = {(b['activations_bytes'] + b['stats_bytes']) / (a['activations_bytes'] + a['stats_bytes']):.2f}x")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
