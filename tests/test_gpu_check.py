"""benchmarks/gpu_check.py --small: every check of the GPU run, on the CPU at reduced shapes
(issue 20). Figures are printed, not asserted as timings; what is asserted is what must hold on
any device."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the whole benchmark end to end (capture, SAE training, weights, scores): ~30 s on 2 cores
def test_gpu_check_small_runs_every_check():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--small", "--json"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    fig = json.loads(out.stdout.strip().splitlines()[-1])
    assert fig["mode"] == "small" and fig["fused_matches_cached"] is True
    assert fig["logp_fallbacks"] == 0 and 1.0 < fig["logp_forwards_per_sample"] <= 1.3
    # bf16 encoding ranks samples nearly as float32 does; issue 20's target is Spearman >= 0.999, which
    # cooccur_l0 missed on this check (0.979 over 12 samples), so float32 stays the encode default
    assert fig["drift_spearman_reference"] >= 0.9 and fig["drift_spearman_cooccur_l0"] >= 0.9
    for key in ("tflops_1024", "encode_to_capture_float32", "encode_to_capture_bf16", "host_prep_s_per_sample",
                "train_tokens_per_s_float32", "train_tokens_per_s_bf16", "train_hours_recipe_bf16",
                "feed_to_resident", "weights_s_per_sample", "sae_load_s"):
        assert isinstance(fig[key], (int, float)) and fig[key] >= 0, key
