"""Does curation help DPO? Every selection method side by side on the toy world (issue 13).

    nice -n 10 .venv/bin/python benchmarks/dpo_benchmark.py --work /tmp/dpo-bench > dpo.log 2>&1

One command, settings fixed in SETTINGS below before the first run. It resumes: finished curate
runs and finished (arm, seed) trainings in --work are reused, so rerunning the same command
finishes an interrupted grid. Steps:

1. the weak base: ``saev_core.toyworld.weak_base`` (the shipped toy LLaVA fine-tuned on a biased
   mix: "yes" to absent objects, the other object's colour) - its probe scores and sha256;
2. the pool: ``saev_core.toyworld.preference_pool`` (on-policy rejected answers of the weak base,
   a known share of corrupted pairs), RLAIF-V parquet + a separate truth file;
3. the arms: one ``flows.curate.curate`` run per scoring method on the pool (one shared
   work_uri, so the activation cache and the SAE are computed once), `random` once per seed;
   `oracle` (a random half of the CLEAN pairs, which needs the truth no user has) is written in
   the published layout from the reference run's top-100 subset. Every subset's composition is
   printed before training;
4. every arm x seed trains exactly as a user would: ``examples/dpo_train.py``'s ``train`` (TRL
   DPOTrainer) on the published subset, same steps, batch, beta and lr for all; then the held-out
   probes (``saev_core.toyworld.probes``) score the trained policy;
5. the pilot gate (oracle vs base and all on the pilot seeds) runs before the rest of the grid;
6. statistics: each arm vs random at the same keep share, paired over seeds: mean difference,
   95% t interval, and TOST equivalence at the margin fixed in SETTINGS; primary probe accuracy
   against each subset's corrupted share (linear fit, SVG plot).
Outputs: <work>/results*.jsonl (one line per arm x seed, one file per worker process), and with --publish DIR the tables
(dpo_grid.md), dpo_grid.csv, dpo_grid.json and dpo_corruption.svg in DIR.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    # the world (the pilot gate may change only these; every change is recorded in DPO_RESULTS.md)
    "weak_base": {"steps": 150, "yes_bias": 0.6, "swap_bias": 0.6},
    "pool": {"n": 1000, "corruption_rate": 0.4, "seed": 0},
    # curation: the curate flow's defaults for the SAE, on the weak base's layer 2
    "curate": {"layer": 2, "keep_percents": [25, 50, 100], "sae_steps": 1500},
    # DPO: identical for every arm
    "dpo": {"steps": 100, "batch_size": 8, "lr": 5e-4, "beta": 0.1},
    "seeds": [0, 1, 2, 3],
    "pilot_seeds": [0, 1],
    # probes: one fixed held-out set
    "probes": {"seed": 0, "n_pope": 240, "n_attribute": 240, "n_pairs": 120},
    # decisions fixed in advance, on `primary` = mean(POPE accuracy, attribute accuracy)
    "gate_margin": 0.03,  # pilot: oracle-50 must beat base AND all by at least this (mean over pilot seeds)
    "equivalence_margin": 0.02,  # TOST: equivalent to random if the 90% paired interval lies inside +-this
    # methods curated; any other method the scoring registry offers is added at run time
    # issue 12's methods landed on main while the 25% arms ran: logp_margin and the SAE-V variant that
    # needs no cross-modal weights (this pool's SAE has 2) were added, the others skipped for budget
    "methods": ["reference", "cooccur_l0", "logp_margin", "null_z_cooccur"],
    "method_skip": ["random", "length", "l0", "paper", "weighted", "raw_cosine",  # not arms (see DPO_RESULTS.md)
                    "coverage", "null_z", "logp_chosen"],
    "keep_grid": [50, 25],  # 50% arms first, then 25% arms
    "workers": 2,  # training processes (one thread each): the machine's 2 cores
}
PRIMARY = "primary"
PROBE_KEYS = ("primary", "pope_accuracy", "pope_f1", "pope_yes_ratio", "pope_adversarial_accuracy",
              "attribute_accuracy", "colour_accuracy", "shape_accuracy", "sensitivity_changed")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _quiet_env(work: Path) -> None:
    for k, v in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                 "TOKENIZERS_PARALLELISM": "false", "PREFECT_HOME": str(work / "prefect-home"),
                 "PREFECT_LOCAL_STORAGE_PATH": str(work / "prefect-home" / "storage"),
                 "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}.items():  # a busy machine
        os.environ.setdefault(k, v)


def _dpo_train_module():
    spec = importlib.util.spec_from_file_location("dpo_train", ROOT / "examples" / "dpo_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------
# world


def build_base(work: Path) -> tuple[Path, dict]:
    from saev_core.toyworld.weak_base import WeakBaseConfig, build

    out = work / "base"
    cfg = WeakBaseConfig(**SETTINGS["weak_base"])
    info_file = out / "weak_base.json"
    if info_file.is_file() and json.loads(info_file.read_text())["config"] == json.loads(
            json.dumps(dataclasses.asdict(cfg))):
        return out, json.loads(info_file.read_text())
    log("building the weak base")
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SETTINGS["weak_base"].items())
    return out, build(out, cfg, command=f"python -m saev_core.toyworld.weak_base --out {out} {flags}",
                      probe_seed=SETTINGS["probes"]["seed"])


def build_pool(work: Path, base: Path) -> tuple[Path, list[dict]]:
    import pyarrow.parquet as pq

    from saev_core.toyworld.preference_pool import PoolConfig, make_pool, policy_predictions, write_pool

    folder = work / "pool"
    if not (folder / "meta.json").is_file():
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        log("building the pool")
        cfg = PoolConfig(**SETTINGS["pool"])
        model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(str(base))
        rows, truth = make_pool(cfg, policy_predictions(model, processor, cfg))
        write_pool(folder, rows, truth, cfg)
    return folder, pq.read_table(folder / "truth" / "truth.parquet").to_pylist()


# ------------------------------------------------------------------------------------------------
# selection


def curate_methods() -> list[str]:
    """SETTINGS' methods plus every other method the scoring registry (and the flow's parameter
    type) offers, minus the ones that are not arms."""
    import typing

    from flows.params import ScoreMethod
    from saev_core.sae.scoring import METHODS

    allowed = set(typing.get_args(ScoreMethod)) & set(METHODS)
    extra = [m for m in METHODS if m in allowed and m not in SETTINGS["methods"] + SETTINGS["method_skip"]]
    return SETTINGS["methods"] + extra


def run_curate(work: Path, pool: Path, base: Path, method: str, seed: int = 0) -> str | None:
    """One curate flow run (resumed if its manifest exists); returns the run folder, or None when
    the flow refused to publish (a user would then have no subset to train on: no arm)."""
    from flows.curate import curate
    from flows.params import CurateParams
    from saev_core.data import publish

    run_id = method if method != "random" else f"random-s{seed}"
    run = str(work / "runs" / "pool" / run_id)
    if publish.is_complete(run):
        return run
    c = SETTINGS["curate"]
    params = CurateParams.model_validate({
        "dataset": {"uri": str(pool / "data" / "train.parquet"), "format": "rlaif_v", "name": "pool"},
        "model": {"model_id": str(base), "layer": c["layer"], "device": "cpu"},
        "sae": {"steps": c["sae_steps"]},
        "scoring": {"method": method, "score": {"seed": seed}},
        "output": {"uri": str(work / "runs"), "keep_percents": c["keep_percents"], "run_id": run_id,
                   "work_uri": str(work / "curate-work")},
    })
    t = time.perf_counter()
    try:
        result = curate(params)
    except Exception as exc:  # the flow's ranking gate refuses to publish a score that cannot rank
        if type(exc).__name__ != "RankingGateFailed":
            raise
        log(f"curate {run_id}: NOT PUBLISHED by the flow's ranking gate: {exc}")
        return None
    log(f"curate {run_id}: {time.perf_counter() - t:.0f}s")
    return result["run"]


def subset_ids(run: str, subset: str) -> list[str]:
    import pyarrow.parquet as pq

    files = sorted((Path(run) / "subsets" / subset).glob("*.parquet"))
    return [x for f in files for x in pq.read_table(f, columns=["sample_id"]).column("sample_id").to_pylist()]


def write_oracle(work: Path, reference_run: str, truth_by_id: dict, seed: int) -> str:
    """A published-layout run whose top-<p> subsets are random CLEAN pairs, p% of the pool each."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    run = work / "runs" / "pool" / f"oracle-s{seed}"
    if (run / "manifest.json").is_file():
        return str(run)
    files = sorted((Path(reference_run) / "subsets" / "top-100").glob("*.parquet"))
    table = pq.read_table(files[0]) if len(files) == 1 else __import__("pyarrow").concat_tables(
        [pq.read_table(f) for f in files])
    ids = table.column("sample_id").to_pylist()
    clean = sorted(i for i in ids if truth_by_id[i]["corruption"] == "clean")
    order = np.random.default_rng([seed, 0x0AC]).permutation(len(clean))
    subsets = {}
    for p in SETTINGS["keep_grid"]:
        keep = {clean[j] for j in order[: round(len(ids) * p / 100)]}
        part = table.filter(pc.is_in(table.column("sample_id"), value_set=__import__("pyarrow").array(sorted(keep))))
        (run / "subsets" / f"top-{p}").mkdir(parents=True, exist_ok=True)
        pq.write_table(part, run / "subsets" / f"top-{p}" / "part-00000.parquet")
        subsets[f"top-{p}"] = {"rows": part.num_rows, "files": [f"subsets/top-{p}/part-00000.parquet"]}
    (run / "manifest.json").write_text(json.dumps({"run_id": f"oracle-s{seed}", "subsets": subsets,
                                                   "note": "oracle: random clean pairs (uses the truth file)"}))
    return str(run)


def composition(ids: list[str], truth_by_id: dict) -> dict:
    """Corrupted share per type, question-type mix and rejected-source mix of a subset."""
    n = len(ids)
    rows = [truth_by_id[i] for i in ids]
    corr = Counter(r["corruption"] for r in rows)
    return {"n": n, "corrupted": 1 - corr.get("clean", 0) / n,
            "by_corruption": {k: v / n for k, v in sorted(corr.items())},
            "question_types": {k: v / n for k, v in sorted(Counter(r["question_type"] for r in rows).items())},
            "on_policy": sum(r["rejected_source"] == "on_policy" for r in rows) / n}


def tie_table(runs: dict[str, str], methods: list[str]) -> str:
    """How much of each method's top 50% / 25% is decided by its score and how much by the
    flow's deterministic tie-break (sample_id order): a score with few distinct values selects
    almost at random."""
    import pyarrow.parquet as pq

    lines = ["| method | distinct scores | cross-modal features | tie-picked share of top-50 | of top-25 |",
             "|---|---|---|---|---|"]
    for m in methods:
        s = sorted(pq.read_table(Path(runs[m]) / "scores.parquet", columns=["score"]).column("score").to_pylist(),
                   reverse=True)
        n_cm = json.loads((Path(runs[m]) / "manifest.json").read_text())["scoring"].get("n_cross_modal")
        cells = []
        for p in (50, 25):
            k = round(len(s) * p / 100)
            cut = s[k - 1]
            above, tied = sum(x > cut for x in s), sum(x == cut for x in s)
            cells.append(f"{(k - above) / k if tied > k - above else 0.0:.3f}")  # a tie cut by the threshold
        lines.append(f"| {m} | {len(set(s))} | {n_cm} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# training and probing


class Grid:
    """Arm x seed results in <work>/results.jsonl, appended as they finish (the resume point)."""

    def __init__(self, work: Path, name: str = "results"):
        self.work, self.file = work, work / f"{name}.jsonl"
        self.done: dict[tuple[str, int], dict] = {}
        self.reload()

    def reload(self) -> None:
        """Read every results*.jsonl of the work folder (worker processes write their own)."""
        for f in sorted(self.work.glob("results*.jsonl")):
            for line in f.read_text().splitlines():
                r = json.loads(line)
                self.done[(r["arm"], r["seed"])] = r

    def add(self, rec: dict) -> None:
        self.done[(rec["arm"], rec["seed"])] = rec
        with open(self.file, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def probe_model(path: str, probe_set) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from saev_core.toyworld.probes import run_probes

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    return run_probes(model, AutoProcessor.from_pretrained(path), probe_set)


def train_arm(dpo, run: str, subset: str, base: Path, seed: int, probe_set) -> dict:
    d = SETTINGS["dpo"]
    with tempfile.TemporaryDirectory(prefix="dpo-arm-") as out:
        t = time.perf_counter()
        res = dpo.train(run, subset=subset, model=str(base), steps=d["steps"], batch_size=d["batch_size"],
                        lr=d["lr"], beta=d["beta"], output_dir=out, seed=seed)
        seconds = time.perf_counter() - t
        probes = probe_model(out, probe_set)
    return {"probes": probes, "train_seconds": round(seconds, 1), "final_loss": res["losses"][-1],
            "mean_loss": res["train_loss"], "finite": res["finite"], "rows": res["rows"]}


# ------------------------------------------------------------------------------------------------
# statistics


def paired(diffs: list[float], margin: float) -> dict:
    """Mean paired difference, 95% t interval, and TOST equivalence (90% interval inside +-margin)."""
    from scipy import stats

    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return {"n": n, "mean": mean, "ci95": [float("nan")] * 2, "equivalent": False}
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
    se = sd / math.sqrt(n)
    t95, t90 = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.95, n - 1)
    lo90, hi90 = mean - t90 * se, mean + t90 * se
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - t95 * se, mean + t95 * se], "ci90": [lo90, hi90],
            "equivalent": bool(-margin < lo90 and hi90 < margin)}


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return float("nan")
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def linear_fit(xs: list[float], ys: list[float]) -> dict:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else float("nan")
    resid = [y - (my + slope * (x - mx)) for x, y in zip(xs, ys)]
    syy = sum((y - my) ** 2 for y in ys)
    return {"slope": slope, "intercept": my - slope * mx,
            "r2": 1 - sum(r * r for r in resid) / syy if syy else float("nan"), "residuals": resid}


def svg_plot(points: list[tuple[float, float, str]], fit: dict, path: Path) -> None:
    """Primary probe accuracy (y) against the subset's corrupted share (x), one labelled dot per arm."""
    w, h, m = 640, 420, 60
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = 0.0, max(0.5, max(xs) + 0.05)
    y0, y1 = min(ys) - 0.02, max(ys) + 0.02
    px = lambda x: m + (x - x0) / (x1 - x0) * (w - 2 * m)  # noqa: E731
    py = lambda y: h - m - (y - y0) / (y1 - y0) * (h - 2 * m)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="black"/>',
           f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 20}" text-anchor="middle">corrupted share of the DPO subset</text>',
           f'<text x="15" y="{h / 2}" transform="rotate(-90 15 {h / 2})" text-anchor="middle">'
           f'primary probe accuracy (mean over seeds)</text>']
    for t in range(6):
        xv = x0 + t * (x1 - x0) / 5
        yv = y0 + t * (y1 - y0) / 5
        out.append(f'<text x="{px(xv)}" y="{h - m + 15}" text-anchor="middle">{xv:.2f}</text>')
        out.append(f'<text x="{m - 5}" y="{py(yv) + 4}" text-anchor="end">{yv:.3f}</text>')
    if not math.isnan(fit["slope"]):
        out.append(f'<line x1="{px(x0)}" y1="{py(fit["intercept"] + fit["slope"] * x0)}" x2="{px(x1)}" '
                   f'y2="{py(fit["intercept"] + fit["slope"] * x1)}" stroke="grey" stroke-dasharray="4 3"/>')
    for x, y, label in points:
        out.append(f'<circle cx="{px(x)}" cy="{py(y)}" r="4" fill="steelblue"/>')
        out.append(f'<text x="{px(x) + 6}" y="{py(y) - 6}">{label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


# ------------------------------------------------------------------------------------------------


def arms_for(methods: list[str], keep: int) -> list[str]:
    return [f"random-{keep}", f"oracle-{keep}"] + [f"{m}-{keep}" for m in methods]


class Bench:
    """The prepared world (base, pool, curated runs) and the training of (arm, seed) pairs."""

    def __init__(self, work: Path, results_name: str = "results", skip: tuple[str, ...] = ()):
        import pyarrow.parquet as pq

        from saev_core.toyworld.probes import build_probes

        self.work = work
        self.base, self.base_info = build_base(work)
        log(f"weak base {self.base}: sha256 {self.base_info['model_sha256']}; probes "
            + ", ".join(f"{k} {self.base_info['probes'][k]:.3f}" for k in PROBE_KEYS))
        self.pool, truth = build_pool(work, self.base)
        self.methods = [m for m in curate_methods() if m not in skip]
        log(f"curate methods: {self.methods}")
        self.runs = {m: run_curate(work, self.pool, self.base, m) for m in self.methods}
        self.refused = [m for m in self.methods if self.runs[m] is None]
        self.methods = [m for m in self.methods if self.runs[m] is not None]
        for seed in SETTINGS["seeds"]:
            self.runs[f"random-s{seed}"] = run_curate(work, self.pool, self.base, "random", seed)
        # the run whose top-100 is "all" and the source of the oracle's rows: any published run
        self.anchor = next(self.runs[k] for k in [*self.methods, "random-s0"] if self.runs.get(k))
        scores = pq.read_table(Path(self.anchor) / "scores.parquet", columns=["sample_id", "row_index"])
        by_row = {t["row"]: t for t in truth}
        self.truth_by_id = {s: by_row[r] for s, r in zip(scores.column("sample_id").to_pylist(),
                                                        scores.column("row_index").to_pylist())}
        for seed in SETTINGS["seeds"]:
            self.runs[f"oracle-s{seed}"] = write_oracle(work, self.anchor, self.truth_by_id, seed)
        self.grid = Grid(work, results_name)
        self.probe_set = build_probes(**SETTINGS["probes"])
        if ("base", -1) not in self.grid.done:
            self.grid.add({"arm": "base", "seed": -1, "probes": probe_model(str(self.base), self.probe_set),
                           "composition": None})
        self.dpo = None

    def source(self, arm: str, seed: int) -> tuple[str, str]:
        name, keep = arm.rsplit("-", 1)
        if name == "all":
            return self.anchor, "top-100"
        if name in ("random", "oracle"):
            return self.runs[f"{name}-s{seed}"], f"top-{keep}"
        return self.runs[name], f"top-{keep}"

    def run_arm(self, arm: str, seed: int) -> dict:
        if (arm, seed) in self.grid.done:
            return self.grid.done[(arm, seed)]
        self.dpo = self.dpo or _dpo_train_module()
        run, subset = self.source(arm, seed)
        comp = composition(subset_ids(run, subset), self.truth_by_id)
        log(f"{arm} seed {seed}: {comp['n']} pairs, corrupted {comp['corrupted']:.3f} "
            f"{ {k: round(v, 3) for k, v in comp['by_corruption'].items()} }, "
            f"questions { {k: round(v, 3) for k, v in comp['question_types'].items()} }, "
            f"on-policy {comp['on_policy']:.3f}")
        rec = {"arm": arm, "seed": seed, "run": run, "subset": subset, "composition": comp,
               **train_arm(self.dpo, run, subset, self.base, seed, self.probe_set)}
        self.grid.add(rec)
        log(f"{arm} seed {seed}: " + ", ".join(f"{k} {rec['probes'][k]:.3f}" for k in PROBE_KEYS)
            + f" ({rec['train_seconds']}s)")
        return rec

    def run_pairs(self, pairs: list[tuple[str, int]], workers: int) -> None:
        """Train the pairs not done yet: in this process, or split over `workers` processes."""
        todo = [p for p in pairs if p not in self.grid.done]
        if workers <= 1 or len(todo) <= 1:
            for arm, seed in todo:
                self.run_arm(arm, seed)
            return
        import subprocess

        plan = self.work / "pairs.json"
        plan.write_text(json.dumps(todo))
        procs = [subprocess.Popen([sys.executable, __file__, "--work", str(self.work), "--worker", str(i),
                                   "--workers", str(workers)]) for i in range(workers)]
        codes = [p.wait() for p in procs]
        self.grid.reload()
        if any(codes):
            raise SystemExit(f"a worker failed: exit codes {codes}")


def pilot_gate(grid: Grid) -> dict:
    """oracle-50 must beat base AND all by SETTINGS' margin in mean `primary` over the pilot seeds."""
    seeds = SETTINGS["pilot_seeds"]

    def mean(arm: str) -> float:
        return sum(grid.done[(arm, s)]["probes"][PRIMARY] for s in seeds) / len(seeds)

    b, al, o = grid.done[("base", -1)]["probes"][PRIMARY], mean("all-100"), mean("oracle-50")
    m = SETTINGS["gate_margin"]
    return {"base": b, "all": al, "oracle": o, "margin": m, "passed": o - b >= m and o - al >= m}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="working folder (resumable)")
    ap.add_argument("--publish", help="write dpo_grid.{md,csv,json} and dpo_corruption.svg here")
    ap.add_argument("--pilot-only", action="store_true", help="stop after the pilot gate")
    ap.add_argument("--report-only", action="store_true", help="train nothing; tabulate what is in --work")
    ap.add_argument("--ignore-gate", action="store_true", help="run the grid even if the pilot gate fails")
    ap.add_argument("--keep", type=int, action="append", help="train only these keep shares (default: all)")
    ap.add_argument("--seed", type=int, action="append", help="train only these seeds (default: all; a process "
                    "started with --seed writes its own results file, so several can share --work)")
    ap.add_argument("--skip-method", action="append", default=[],
                    help="leave this method out of this invocation (its curate run and arms)")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: train pairs.json[worker::workers]
    ap.add_argument("--workers", type=int, default=SETTINGS["workers"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _quiet_env(work)
    import torch

    torch.set_num_threads(1)
    if a.worker is not None:
        bench = Bench(work, f"results-w{a.worker}")
        for arm, seed in json.loads((work / "pairs.json").read_text())[a.worker::a.workers]:
            bench.run_arm(arm, seed)
        return 0
    t_start = time.perf_counter()
    log(f"SETTINGS {json.dumps(SETTINGS)}")
    bench = Bench(work, "results" if not a.seed else "results-s" + "-".join(map(str, a.seed)), tuple(a.skip_method))
    log(f"prepared (base, pool, curate runs) at {time.perf_counter() - t_start:.0f}s")
    grid, methods = bench.grid, bench.methods
    pilot_arms = ("all-100", "oracle-50")
    pilot_pairs = [(arm, s) for s in SETTINGS["pilot_seeds"] for arm in pilot_arms]
    if not a.report_only:
        bench.run_pairs(pilot_pairs, a.workers)
    gate = pilot_gate(grid) if all(p in grid.done for p in pilot_pairs) else None
    if gate:
        log(f"PILOT GATE {'PASSED' if gate['passed'] else 'FAILED'}: oracle-50 {gate['oracle']:.3f} vs base "
            f"{gate['base']:.3f} and all {gate['all']:.3f} (margin {SETTINGS['gate_margin']}) "
            f"at {time.perf_counter() - t_start:.0f}s")
    if not a.report_only and not a.pilot_only and (gate["passed"] or a.ignore_gate):
        for keep in [k for k in SETTINGS["keep_grid"] if not a.keep or k in a.keep]:
            extra = ["all-100"] if keep == SETTINGS["keep_grid"][0] else []
            seeds = [s for s in SETTINGS["seeds"] if not a.seed or s in a.seed]
            bench.run_pairs([(arm, s) for s in seeds for arm in extra + arms_for(methods, keep)], a.workers)
            log(f"{keep}% arms done at {time.perf_counter() - t_start:.0f}s")
    log(f"wall time {time.perf_counter() - t_start:.0f}s")
    report = tabulate(grid, methods)
    report["markdown"] += "\nSelection by score vs by tie-break (the flow keeps ties in sample_id order):\n\n" + \
        tie_table(bench.runs, methods) + "\n" + "".join(
            f"\n`{m}`: not published by the flow's ranking gate (see the log), so no arm.\n" for m in bench.refused)
    print(report["markdown"])
    if a.publish:
        out = Path(a.publish)
        out.mkdir(parents=True, exist_ok=True)
        (out / "dpo_grid.md").write_text(report["markdown"])
        (out / "dpo_grid.json").write_text(json.dumps({"settings": SETTINGS, "gate": gate, "base": bench.base_info,
                                                       "summary": report["summary"],
                                                       "paired": report["paired"], "fit": report["fit"]}, indent=1))
        with open(out / "dpo_grid.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["arm", "seed", "n", "corrupted", *PROBE_KEYS])
            for (arm, seed), r in sorted(grid.done.items()):
                comp = r["composition"] or {"n": 0, "corrupted": float("nan")}
                wr.writerow([arm, seed, comp["n"], f"{comp['corrupted']:.4f}",
                             *[f"{r['probes'][k]:.4f}" for k in PROBE_KEYS]])
        if report["points"]:
            svg_plot(report["points"], report["fit"], out / "dpo_corruption.svg")
    return 0


def tabulate(grid: Grid, methods: list[str]) -> dict:
    """Per-arm means, paired differences against random at the same keep share, and the fit."""
    by_arm: dict[str, dict[int, dict]] = {}
    for (arm, seed), r in grid.done.items():
        by_arm.setdefault(arm, {})[seed] = r
    order = ["base", "all-100"] + [a for k in SETTINGS["keep_grid"] for a in arms_for(methods, k)]
    order = [a for a in order if a in by_arm]
    base = by_arm["base"][-1]["probes"]
    lines = ["| arm | seeds | pairs | corrupted | " + " | ".join(PROBE_KEYS) + " | primary sd over seeds |",
             "|---|---|---|---|" + "---|" * len(PROBE_KEYS) + "---|"]
    summary, points = {}, []
    for arm in order:
        recs = list(by_arm[arm].values())
        mean = {k: sum(r["probes"][k] for r in recs) / len(recs) for k in PROBE_KEYS}
        comp = recs[0]["composition"]
        corr = sum(r["composition"]["corrupted"] for r in recs) / len(recs) if comp else None
        summary[arm] = {"seeds": sorted(by_arm[arm]), "mean": mean, "corrupted": corr}
        lines.append(f"| {arm} | {len(recs) if comp else '-'} | {comp['n'] if comp else '-'} | "
                     f"{'-' if corr is None else f'{corr:.3f}'} | " + " | ".join(f"{mean[k]:.3f}" for k in PROBE_KEYS)
                     + f" | {_sd([r['probes'][PRIMARY] for r in recs]):.3f} |")
        if comp:
            points.append((corr, mean[PRIMARY], arm))
    seed_lines = ["", "`primary` per seed:", "", "| arm | " + " | ".join(f"seed {x}" for x in SETTINGS["seeds"]) + " |",
                  "|---|" + "---|" * len(SETTINGS["seeds"])]
    for arm in order[1:]:
        seed_lines.append(f"| {arm} | " + " | ".join(
            f"{by_arm[arm][x]['probes'][PRIMARY]:.3f}" if x in by_arm[arm] else "-" for x in SETTINGS["seeds"]) + " |")
    comp_lines = seed_lines + ["", "| arm (seed 0) | pairs | " + " | ".join(("clean",) + tuple(
        __import__("saev_core.toyworld.generator", fromlist=["CORRUPTIONS"]).CORRUPTIONS))
        + " | question types | on-policy rejected |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in order[1:]:
        r = by_arm[arm].get(0) or next(iter(by_arm[arm].values()))
        c = r["composition"]
        from saev_core.toyworld.generator import CORRUPTIONS

        comp_lines.append(f"| {arm} | {c['n']} | " + " | ".join(f"{c['by_corruption'].get(k, 0):.3f}" for k in (
            "clean",) + CORRUPTIONS) + " | " + ", ".join(f"{k} {v:.2f}" for k, v in c["question_types"].items())
            + f" | {c['on_policy']:.3f} |")
    m = SETTINGS["equivalence_margin"]
    pair_lines = ["", f"Paired differences in `primary` against random at the same keep share (same seed); "
                  f"equivalence: TOST at +-{m} (90% interval inside the margin).", "",
                  "| arm | vs | seeds | mean diff | 95% interval | 90% interval | verdict |", "|---|---|---|---|---|---|---|"]
    paired_out = {}
    for arm in order[1:]:
        keep = arm.rsplit("-", 1)[1]
        ref = f"random-{keep if keep != '100' else SETTINGS['keep_grid'][0]}"
        if arm == ref or ref not in by_arm:
            continue
        seeds = sorted(set(by_arm[arm]) & set(by_arm[ref]))
        if not seeds:
            continue
        diffs = [by_arm[arm][s]["probes"][PRIMARY] - by_arm[ref][s]["probes"][PRIMARY] for s in seeds]
        p = paired(diffs, m)
        paired_out[arm] = {"vs": ref, **p, "diffs": diffs}
        if p["n"] < 2:
            verdict = "too few seeds"
        elif p["ci95"][0] > 0:
            verdict = "better"
        elif p["ci95"][1] < 0:
            verdict = "worse"
        elif p["equivalent"]:
            verdict = "equivalent"
        else:
            verdict = "inconclusive"
        ci90 = p.get("ci90", [float("nan")] * 2)
        pair_lines.append(f"| {arm} | {ref} | {p['n']} | {p['mean']:+.3f} | [{p['ci95'][0]:+.3f}, {p['ci95'][1]:+.3f}] "
                          f"| [{ci90[0]:+.3f}, {ci90[1]:+.3f}] | {verdict} |")
    fit = linear_fit([p[0] for p in points], [p[1] for p in points]) if len(points) > 2 else \
        {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan"), "residuals": []}
    fit_lines = ["", f"Primary vs corrupted share over {len(points)} trained arms: slope {fit['slope']:.3f}, "
                 f"intercept {fit['intercept']:.3f}, R^2 {fit['r2']:.3f}.", "",
                 "| arm | corrupted | primary | residual from the line |", "|---|---|---|---|"]
    fit_lines += [f"| {lab} | {x:.3f} | {y:.3f} | {r:+.3f} |" for (x, y, lab), r in zip(points, fit["residuals"])]
    md = "\n".join([f"Base (no DPO): primary {base[PRIMARY]:.3f}.", ""] + lines + comp_lines + pair_lines + fit_lines)
    return {"markdown": md + "\n", "summary": summary, "paired": paired_out, "fit": fit, "points": points}


if __name__ == "__main__":
    sys.exit(main())
