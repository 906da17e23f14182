"""What decides whether the pipeline scales to an 83k-sample dataset on LLaVA-NeXT-7B (issue 15).

Every comparison is A/B alternated in one run (the machine is shared); medians and ratios printed.

1. weights builder, first pass (`observe`), seconds per sample at 3,000 tokens x 65,536 features:
   the previous sort-based merge (kept below as `SortMergeBuilder`) vs the current sparse merge,
   on the same codes; the two pools must be identical.
2. SAE feed at d_in 4,096 (LLaVA-NeXT-7B's width; 1,176-2,928 positions a sample as its anyres
   tiles give), float32 on local disk: tokens/s delivered by the previous feed (whole shards in
   order, shuffled within 8 batches, no prefetch) and the current one (seeded sample, ranged reads,
   mixing buffer in a background thread), vs cycling batches already in memory; then SAELens SAE
   training steps fed by each (a CPU-sized SAE, one thread for the step, as a GPU would leave the
   host's cores to the feed).
3. the same on the toy world: real activations of the shipped toy LLaVA, the demo's SAE shape.
4. peak memory of drawing + feeding 50 batches from a 1,000- vs a 10,000-sample cache (subprocesses).
5. fused scoring (forward -> SAE encode -> per-sample statistics, nothing else stored) vs capture
   alone vs capture + writing the residual cache, on a random-weight LLaVA-NeXT-shaped model at
   reduced width and depth (SAE 16x, ~1% of features active) and on the toy LLaVA; bytes stored.

    .venv/bin/python benchmarks/scale_benchmark.py [--only weights,feed,toy,memory,fused] [--work DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from saev_core.data import storage  # noqa: E402
from saev_core.model.activation_cache import ActivationCache, CacheSpec  # noqa: E402
from saev_core.model.mllm import SampleActivations  # noqa: E402
from saev_core.sae.feed import CacheFeed, batch_provider, draw_training_sample  # noqa: E402
from saev_core.sae.weights import CrossModalWeightsBuilder  # noqa: E402

SETTINGS = {
    "threads": 1,
    "weights": {"tokens": 3000, "d_sae": 65_536, "density": 0.01, "image_fraction": 0.6, "samples": 4,
                "seed": 0},
    "feed": {"d_in": 4096, "samples": 48, "shard_rows": 16, "min_len": 1176, "max_len": 2928,
             "storage_dtype": "float32", "batch_size": 4096, "buffer_tokens": 65_536, "batches": 24,
             "rounds": 3, "sae_d_sae": 256, "sae_steps": 12, "seed": 0},
    "toy": {"samples": 512, "shard_rows": 128, "layer": 2, "capture_batch": 32, "batch_size": 512,
            "buffer_tokens": 65_536, "batches": 200, "rounds": 3, "sae_d_sae": 2048, "sae_steps": 60, "seed": 0},
    "memory": {"d_in": 128, "length": 100, "shard_rows": 128, "sizes": [1_000, 10_000], "batch_size": 4096,
               "batches": 50, "buffer_tokens": 65_536},
    # LLaVA-NeXT-7B's structure (CLIP tower at 336 px / patch 14, anyres tiles, image_newline,
    # Mistral-style LM with grouped KV) at reduced width and depth, hooked halfway like layer 16 of 32
    "fused": {"text": {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8,
                       "num_attention_heads": 8, "num_key_value_heads": 2}, "layer": 4,
              "vision": {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "image_size": 336, "patch_size": 14},
              "image_size": [672, 336], "expansion": 16, "samples": 4, "batch": 2, "rounds": 3,
              "toy_samples": 64, "toy_batch": 16, "toy_layer": 2, "toy_d_sae": 2048, "seed": 0},
}


# ---------------------------------------------------------------- 1. weights builder
class SortMergeBuilder(CrossModalWeightsBuilder):
    """The first pass as it was before issue 15: two stable sorts of [tokens x d_sae] per chunk."""

    @torch.no_grad()
    def observe(self, z, is_image, sample_lengths=None):
        n, z = z.shape[0], z.float()
        m = min(self.pool_size, n)
        cand_act, cand_pos = torch.sort(z, dim=0, descending=True, stable=True)
        cand_act, cand_pos = cand_act[:m], cand_pos[:m]
        act = torch.cat([self.pool_act, cand_act])
        idx = torch.cat([self.pool_idx, cand_pos + self.n_tokens])
        img = torch.cat([self.pool_img, is_image.to(torch.bool)[cand_pos]])
        order = torch.sort(act, dim=0, descending=True, stable=True).indices[: self.pool_size]
        self.pool_act = torch.gather(act, 0, order).clamp_min(0)
        self.pool_idx = torch.where(self.pool_act > 0, torch.gather(idx, 0, order), -1)
        self.pool_img = torch.gather(img, 0, order) & (self.pool_act > 0)
        self._update_reservoir(z)
        self.n_tokens += n


def bench_weights(s: dict) -> dict:
    g = torch.Generator().manual_seed(s["seed"])
    base = torch.randn(s["tokens"], s["d_sae"], generator=g)
    cut = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - s["density"])))
    base = base.sub_(cut).relu_()  # codes with the given share of positive entries
    img = torch.rand(s["tokens"], generator=g) < s["image_fraction"]
    old, new = SortMergeBuilder(s["d_sae"]), CrossModalWeightsBuilder(s["d_sae"])
    times = {"before": [], "after": []}
    for i in range(s["samples"]):
        z = base.roll(i * 701, dims=0)  # a different sample: same distribution, other order
        for name, b in (("before", old), ("after", new)) if i % 2 == 0 else (("after", new), ("before", old)):
            t0 = time.perf_counter()
            b.observe(z, img)
            times[name].append(time.perf_counter() - t0)
        del z
    same = all(torch.equal(getattr(old, a), getattr(new, a)) for a in ("pool_act", "pool_idx", "pool_img"))
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    return {"before_s": b, "after_s": a, "speedup": b / a, "identical_pools": same,
            "after_per_sample": times["after"], "before_per_sample": times["before"]}


# ---------------------------------------------------------------- 2-3. the SAE feed
def _old_source(cache: ActivationCache, keys: list[str]):
    """The previous read path: each shard read whole (bytes, then tensors, then float32), in order."""
    from safetensors.torch import load

    def source():
        for key in keys:
            yield load(storage.read_bytes(cache._uri(key, ".safetensors"), cache.so))["acts"].float()
    return source


def _old_batches(source, batch_size: int, shuffle_batches: int = 8, seed: int = 0):
    """The previous batch_provider: a buffer of 8 batches, concatenated and permuted per drain."""
    gen = torch.Generator().manual_seed(seed)
    cap, buf = batch_size * shuffle_batches, []

    def drain(min_tokens):
        held = sum(b.shape[0] for b in buf)
        if held < min_tokens or held < batch_size:
            return
        pool = torch.cat(buf)[torch.randperm(held, generator=gen)]
        n_out = (held // batch_size) * batch_size
        buf[:] = [pool[n_out:]]
        for start in range(0, n_out, batch_size):
            yield pool[start:start + batch_size]

    while True:
        for chunk in source():
            buf.append(chunk.reshape(-1, chunk.shape[-1]).float())
            yield from drain(cap)
        yield from drain(batch_size)


def _feeds(cache, keys, s) -> dict:
    sample = draw_training_sample(cache, keys, seed=s["seed"])
    batches = [b for b, _ in zip(_old_batches(_old_source(cache, keys), s["batch_size"]), range(8))]
    return {
        "in-memory": lambda: itertools.cycle(batches),
        "before": lambda: _old_batches(_old_source(cache, keys), s["batch_size"]),
        "after": lambda: batch_provider(CacheFeed(cache, sample), s["batch_size"], s["buffer_tokens"], s["seed"]),
    }


def _drain(make, n: int) -> float:
    it = make()
    next(it)  # start-up (first fill) is not throughput
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return dt


def _train(make, d_in: int, d_sae: int, steps: int, batch_size: int) -> float:
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    from saev_core.sae.training import SAETrainConfig, _training_sae

    cfg = SAETrainConfig(d_sae=d_sae, steps=steps, batch_size=batch_size, lr=1e-3, n_batches_for_norm_estimate=2)
    torch.manual_seed(0)
    sae = _training_sae(cfg, d_in)
    tc = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=1e-3,
                          lr_end=0.0, lr_scheduler_name="constant", lr_warm_up_steps=0, lr_decay_steps=0,
                          adam_beta1=0.9, adam_beta2=0.999, device="cpu", dead_feature_window=steps,
                          feature_sampling_window=steps, n_checkpoints=0, save_final_checkpoint=False,
                          n_batches_for_norm_estimate=2)
    it = make()
    next(it)
    t0 = time.perf_counter()
    SAETrainer(tc, sae, it).fit()
    dt = time.perf_counter() - t0
    if hasattr(it, "close"):
        it.close()
    return dt


def _compare(feeds: dict, s: dict, d_in: int) -> dict:
    rates = {"feed": {k: [] for k in feeds}, "train": {k: [] for k in feeds}}
    names = list(feeds)
    for r in range(s["rounds"]):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            rates["feed"][name].append(s["batches"] * s["batch_size"] / _drain(feeds[name], s["batches"]))
        for name in order:
            steps = s["sae_steps"]
            rates["train"][name].append((steps + 2) * s["batch_size"]
                                        / _train(feeds[name], d_in, s["sae_d_sae"], steps, s["batch_size"]))
    return {part: {k: statistics.median(v) for k, v in by.items()} for part, by in rates.items()}


def _write_synthetic_cache(root: str, s: dict) -> tuple[ActivationCache, list[str]]:
    g = torch.Generator().manual_seed(s["seed"])
    cache = ActivationCache(root, CacheSpec("synthetic-llava-next", 16, storage_dtype=s["storage_dtype"]))
    keys = []
    for start in range(0, s["samples"], s["shard_rows"]):
        samples = []
        for i in range(start, min(start + s["shard_rows"], s["samples"])):
            n = int(torch.randint(s["min_len"], s["max_len"] + 1, (1,), generator=g))
            img = torch.zeros(n, dtype=torch.bool)
            img[5:5 + n - 60] = True
            samples.append((f"x{i}", SampleActivations(torch.randn(n, s["d_in"], generator=g), img, torch.arange(n))))
        keys.append(cache.write_shard(samples))
    return cache, keys


def bench_feed(s: dict, work: str) -> dict:
    cache, keys = _write_synthetic_cache(str(Path(work) / "feed-cache"), s)
    out = _compare(_feeds(cache, keys, s), s, s["d_in"])
    out["tokens"] = draw_training_sample(cache, keys).n_tokens
    return out


def bench_toy(s: dict, work: str) -> dict:
    from saev_core.model.mllm import MLLMAdapter
    from saev_core.toyworld import toy_model_path
    from saev_core.toyworld.generator import image_from_bytes, make_preference_rows

    rows, _ = make_preference_rows(s["samples"], "rlaif-v", 0.0, seed=s["seed"])
    adapter = MLLMAdapter.from_pretrained(str(toy_model_path()), layer=s["layer"], device="cpu")
    cache = ActivationCache(str(Path(work) / "toy-cache"), CacheSpec("toy-llava", s["layer"]))
    keys, shard = [], []
    for start in range(0, len(rows), s["capture_batch"]):
        chunk = rows[start:start + s["capture_batch"]]
        caps = adapter.capture([image_from_bytes(r["image"]["bytes"]) for r in chunk], [r["question"] for r in chunk])
        shard += [(f"t{start + i}", c) for i, c in enumerate(caps)]
        if len(shard) >= s["shard_rows"]:
            keys.append(cache.write_shard(shard))
            shard = []
    if shard:
        keys.append(cache.write_shard(shard))
    out = _compare(_feeds(cache, keys, s), s, adapter.model.config.text_config.hidden_size)
    out["tokens"] = draw_training_sample(cache, keys).n_tokens
    return out


# ---------------------------------------------------------------- 5. fused scoring
def _llava_next(folder: Path, s: dict) -> Path:
    """A random-weight LLaVA-NeXT folder (saved, loaded back like a user's model)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_mllms import make_tokenizer
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, MistralConfig)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = make_tokenizer()
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-NeXT's own
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                              vision_feature_select_strategy="default", chat_template=tok.chat_template)
    text = MistralConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, **s["text"])
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**s["vision"]), text_config=text,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                          vision_feature_select_strategy="default", image_grid_pinpoints=pinpoints)
    torch.manual_seed(s["seed"])
    LlavaNextForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def _random_sae(d_in: int, d_sae: int, folder: Path, seed: int):
    """An SAE-V-initialised SAE (W_enc = W_dec^T, rows of norm 0.1), saved and loaded back."""
    from saev_core.sae.training import SAETrainConfig, _training_sae, load_sae

    torch.manual_seed(seed)
    sae = _training_sae(SAETrainConfig(d_sae=d_sae, normalize_activations=False), d_in)
    sae.save_inference_model(str(folder))
    return load_sae(folder)


def _calibrate(sae, acts: torch.Tensor, active: float = 0.01) -> None:
    """Set each feature's bias so that it fires on `active` of these positions, as in a trained SAE."""
    with torch.no_grad():
        pre = acts.to(sae.W_enc.dtype) @ sae.W_enc
        sae.b_enc.copy_(-torch.quantile(pre[:4096], 1 - active, dim=0))


def _images(n: int, size: list[int], seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _fused_compare(adapter, sae, images, prompts, batch: int, rounds: int, work: Path) -> dict:
    from saev_core.pipeline.score_stages import _stats_on_device
    from saev_core.sae.stats_store import stats_bytes

    cache = ActivationCache(str(work / "fused-cache"), CacheSpec("bench", adapter.layer))
    state = {"cache_bytes": 0, "stats_bytes": 0, "n": 0}

    def capture():
        for i in range(0, len(images), batch):
            adapter.capture(images[i:i + batch], prompts[i:i + batch])

    def capture_and_cache():
        shutil.rmtree(work / "fused-cache", ignore_errors=True)
        caps = []
        for i in range(0, len(images), batch):
            caps += adapter.capture(images[i:i + batch], prompts[i:i + batch])
        key = cache.write_shard([(f"b{j}", c) for j, c in enumerate(caps)])
        state["cache_bytes"] = Path(cache._uri(key, ".safetensors")).stat().st_size
        state["n"] = len(caps)

    def fused():
        stats = []
        for i in range(0, len(images), batch):
            caps = adapter.capture(images[i:i + batch], prompts[i:i + batch], on_device=True)
            stats += [_stats_on_device(f"b{i + j}", sae, c.acts, c.is_image) for j, c in enumerate(caps)]
        state["stats_bytes"] = len(stats_bytes(stats))
        state["tokens"] = sum(st.n_positions for st in stats)

    _calibrate(sae, torch.cat([c.acts for c in adapter.capture(images[:batch], prompts[:batch])]))
    fns = {"capture": capture, "capture + cache": capture_and_cache, "fused": fused}
    times = {k: [] for k in fns}
    capture()  # warm-up
    for r in range(rounds):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"s_per_sample": {k: v / len(images) for k, v in med.items()},
            "fused_over_capture": med["fused"] / med["capture"],
            "cache_over_capture": med["capture + cache"] / med["capture"],
            "cache_bytes_per_sample": state["cache_bytes"] / state["n"],
            "stats_bytes_per_sample": state["stats_bytes"] / state["n"],
            "tokens_per_sample": state["tokens"] / state["n"]}


def bench_fused(s: dict, work: str) -> dict:
    from saev_core.model.mllm import MLLMAdapter
    from saev_core.toyworld import toy_model_path
    from saev_core.toyworld.generator import image_from_bytes, make_preference_rows

    work = Path(work)
    folder = _llava_next(work / "llava-next", s)
    adapter = MLLMAdapter.from_pretrained(str(folder), layer=s["layer"], device="cpu")
    d = adapter.hidden_size
    sae = _random_sae(d, s["expansion"] * d, work / "sae-next", s["seed"])
    prompts = ["describe the image ."] * s["samples"]
    out = {"llava-next": _fused_compare(adapter, sae, _images(s["samples"], s["image_size"], s["seed"]), prompts,
                                        s["batch"], s["rounds"], work)}
    rows, _ = make_preference_rows(s["toy_samples"], "rlaif-v", 0.0, seed=s["seed"])
    toy = MLLMAdapter.from_pretrained(str(toy_model_path()), layer=s["toy_layer"], device="cpu")
    toy_sae = _random_sae(toy.hidden_size, s["toy_d_sae"], work / "sae-toy", s["seed"])
    out["toy"] = _fused_compare(toy, toy_sae, [image_from_bytes(r["image"]["bytes"]) for r in rows],
                                [r["question"] for r in rows], s["toy_batch"], s["rounds"], work)
    return out


# ---------------------------------------------------------------- 4. memory
def _memory_child(n_samples: int, work: str, s: dict) -> None:
    """Child process: write a cache of n_samples, then draw + feed; prints peak RSS (MB) of the feed."""
    g = torch.Generator().manual_seed(0)
    cache = ActivationCache(work, CacheSpec("memory", 0))
    keys = []
    for start in range(0, n_samples, s["shard_rows"]):
        samples = [(f"m{i}", SampleActivations(torch.randn(s["length"], s["d_in"], generator=g),
                                               torch.arange(s["length"]) < 60, torch.arange(s["length"])))
                   for i in range(start, min(start + s["shard_rows"], n_samples))]
        keys.append(cache.write_shard(samples))
    del samples
    import gc
    gc.collect()
    before = _peak_mb()
    it = batch_provider(CacheFeed(cache, draw_training_sample(cache, keys)), s["batch_size"], s["buffer_tokens"])
    for _ in range(s["batches"]):
        next(it)
    it.close()
    print(json.dumps({"peak_mb": _peak_mb(), "peak_before_feed_mb": before}))


def _peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss it does not carry the parent's
    peak across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def bench_memory(s: dict, work: str) -> dict:
    out = {}
    for n in s["sizes"]:
        folder = Path(work) / f"memory-{n}"
        res = subprocess.run([sys.executable, __file__, "--memory-child", str(n), "--work", str(folder)],
                             capture_output=True, text=True, check=True)
        out[n] = json.loads(res.stdout.strip().splitlines()[-1])
        shutil.rmtree(folder, ignore_errors=True)
    return out


def _print_feed(title: str, r: dict, s: dict) -> None:
    f, t = r["feed"], r["train"]
    print(f"{title} ({r['tokens']:,} cached positions, batch {s['batch_size']}, median of {s['rounds']} rounds):")
    print("  feed alone, tokens/s:   " + "   ".join(f"{k} {v:,.0f}" for k, v in f.items()))
    print(f"    -> after/before {f['after'] / f['before']:.2f}x; after/in-memory {f['after'] / f['in-memory']:.2f}")
    print(f"  SAE training (d_sae {s['sae_d_sae']}, {s['sae_steps']} steps), tokens/s:   "
          + "   ".join(f"{k} {v:,.0f}" for k, v in t.items()))
    print(f"    -> after/in-memory {t['after'] / t['in-memory']:.3f}; before/in-memory {t['before'] / t['in-memory']:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="weights,feed,toy,memory,fused")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(SETTINGS["threads"])
    if args.memory_child is not None:
        _memory_child(args.memory_child, args.work, SETTINGS["memory"])
        return
    work = args.work or tempfile.mkdtemp(prefix="scale-bench-")
    parts = args.only.split(",")
    print(f"settings: {json.dumps({k: v for k, v in SETTINGS.items() if k in parts or k == 'threads'})}")
    try:
        if "weights" in parts:
            s = SETTINGS["weights"]
            r = bench_weights(s)
            print(f"weights builder, first pass, {s['tokens']} tokens x {s['d_sae']:,} features "
                  f"({s['density']:.0%} positive), median s/sample of {s['samples']}:")
            print(f"  before {r['before_s']:.2f} s   after {r['after_s']:.2f} s   -> {r['speedup']:.1f}x faster; "
                  f"identical pools: {r['identical_pools']}")
            print(f"  per sample, after: {', '.join(f'{t:.2f}' for t in r['after_per_sample'])}; "
                  f"before: {', '.join(f'{t:.2f}' for t in r['before_per_sample'])}")
        if "feed" in parts:
            _print_feed(f"SAE feed, d_in {SETTINGS['feed']['d_in']}, {SETTINGS['feed']['storage_dtype']} on local disk",
                        bench_feed(SETTINGS["feed"], work), SETTINGS["feed"])
        if "toy" in parts:
            _print_feed("SAE feed, toy LLaVA (layer 2, d_in 128)", bench_toy(SETTINGS["toy"], work), SETTINGS["toy"])
        if "memory" in parts:
            m = bench_memory(SETTINGS["memory"], work)
            a, b = (m[n]["peak_mb"] for n in SETTINGS["memory"]["sizes"])
            print("peak RSS of draw + feed (process total, MB): "
                  + "   ".join(f"{n:,} samples {v['peak_mb']:.0f}" for n, v in m.items())
                  + f"   -> ratio {b / a:.2f}")
        if "fused" in parts:
            for name, r in bench_fused(SETTINGS["fused"], work).items():
                print(f"fused scoring vs capture, {name} ({r['tokens_per_sample']:,.0f} positions a sample, "
                      f"median of {SETTINGS['fused']['rounds']}), s/sample: "
                      + "   ".join(f"{k} {v:.3f}" for k, v in r["s_per_sample"].items()))
                print(f"  -> fused/capture {r['fused_over_capture']:.3f}; capture+cache/capture "
                      f"{r['cache_over_capture']:.3f}; stored per sample: residual cache (float32) "
                      f"{r['cache_bytes_per_sample'] / 1e6:.3f} MB, statistics {r['stats_bytes_per_sample'] / 1e6:.4f} MB")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
