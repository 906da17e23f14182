"""Does curation help DPO? Study 2 (issue 21): a DPO setting chosen on a pilot, equal epochs,
SAE-V arms that pass the flow's ranking gate, 24 seeds per arm, unpaired statistics.

    # the whole study, resumable (rerun the same command to finish an interrupted grid):
    nohup nice -n 19 .venv/bin/python benchmarks/dpo_v2.py --work /work/dpo-v2-work run \
        >> /work/dpo-v2-work/run.log 2>&1 &
    # tables, MDE, Holm, TOST and the forest plot from whatever rows exist (trains nothing):
    .venv/bin/python benchmarks/dpo_v2.py --work /work/dpo-v2-work analyze --publish benchmarks/dpo_v2
    # the design's power figures from study 1's published grid (benchmarks/dpo/dpo_grid.csv):
    .venv/bin/python benchmarks/dpo_v2.py power-v1

The design is fixed in SETTINGS below (and in benchmarks/DPO_RESULTS.md, "Study 2") before the
first run. `run` does, in order, each step skipped when its output is already in --work:
1. the world of study 1, unchanged (``dpo_benchmark.build_base`` / ``build_pool``: the weak base,
   the 1000-pair noisy pool and its truth file);
2. the model-based curate runs (``logp_margin`` on the weak base: the anchor whose top-100 is
   "all" and whose rows the random and oracle subsets are cut from; ``logp_chosen``;
   ``logp_margin`` judged by the shipped toy model);
3. the pilot: base / all-100 / random-50 / oracle-50 under each candidate DPO setting on the
   pilot seeds; the setting is picked by the rule in SETTINGS["pilot"] (``choose_setting``);
4. the SAE-side screen: one curate run per SAE variant (the gate relaxed so every figure is
   recorded), its SAE figures and each SAE-V method's ranking-gate verdict at the default
   thresholds; the variant is picked by ``choose_sae`` from those figures alone;
5. the selection arms' own curate runs with the DEFAULT gate (a refusal is recorded with its
   reason and that arm is left out);
6. the grid: every arm x seed, seed-major (all arms of seed 0, then seed 1, ...), in
   SETTINGS["workers"] processes that claim (arm, seed) pairs one at a time; one line per pair
   is appended to <work>/results-grid-w*.jsonl as it finishes.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    # the world, probes and primary metric: study 1's (benchmarks/dpo_benchmark.py), unchanged
    "batch_size": 8,
    "collapse_yes_ratio": 0.98,  # a run "collapsed" when its POPE yes-ratio is at least this
    "pilot": {
        "seeds": [100, 101, 102, 103],  # disjoint from the grid's seeds: the pick is not scored again
        "arms": ["all-100", "random-50", "oracle-50"],  # plus base (no DPO); no selection arm
        # equal epochs: steps = ceil(epochs * rows / batch) (all-100: 999 rows, a 50% arm: 500)
        "candidates": {"A": {"lr": 5e-4, "beta": 0.1, "epochs": 1},
                       "B": {"lr": 1e-4, "beta": 0.1, "epochs": 2},
                       "C": {"lr": 1e-4, "beta": 0.5, "epochs": 2}},
        # rule: among candidates whose mean oracle-50 minus mean random-50 is >= min_oracle_gain,
        # the smallest sd of that difference, sqrt(sd_oracle^2 + sd_random^2) over the pilot seeds;
        # within tie_sd of the smallest: fewer collapsed pilot runs, then the order above. None
        # eligible: the largest gain / sd, reported as such.
        "min_oracle_gain": 0.03,
        "tie_sd": 0.005,
    },
    "curate": {"layer": 2, "keep_percents": [50, 100], "sae_steps": 1500, "judge_sae_steps": 300},
    "screen": {
        # SAE variants on the weak base's pool; weight_samples stays 1000 (>= the 999 scored rows:
        # every row already feeds the weights, "more weight samples" is not possible on this pool)
        "variants": {"L2-16x-joint": {"layer": 2, "expansion": 16, "pool": "joint"},  # the flow's defaults
                     "L2-16x-per_modality": {"layer": 2, "expansion": 16, "pool": "per_modality"},
                     "L3-16x-per_modality": {"layer": 3, "expansion": 16, "pool": "per_modality"},
                     "L1-16x-per_modality": {"layer": 1, "expansion": 16, "pool": "per_modality"},
                     "L2-4x-per_modality": {"layer": 2, "expansion": 4, "pool": "per_modality"}},
        # rule: the first method in this order that passes the default gate (>= 10 cross-modal
        # features, <= 5% tie-picked at every keep share) on some variant; among its passing
        # variants the highest explained variance, ties to the order above. cooccur_l0 uses the
        # chosen variant's SAE (the default variant's if none passes).
        "methods": ["reference", "weighted", "paper"],
        "report_keep": [25, 50],
    },
    # the 50% arms; all-100 at equal epochs (twice a 50% arm's steps); all-100-fixed = all data at
    # a 50% arm's steps (the secondary, fixed-steps comparison); saev-50 = the screen's pick
    "arms": ["all-100", "random-50", "oracle-50", "saev-50", "cooccur_l0-50", "logp_chosen-50",
             "logp_margin-50", "logp_margin_judge-50", "all-100-fixed"],
    "seeds": list(range(24)),
    # statistics, on `primary`: Welch (unpaired; seeds do not pair arms, which train on other rows)
    "alpha": 0.05,
    "power": 0.80,
    "equivalence_margin": 0.05,  # TOST: equivalent when the 90% interval lies inside +-this
    "workers": 2,  # training processes, one thread each
}
PRIMARY = "primary"
PROBE_KEYS = ("primary", "pope_accuracy", "pope_f1", "pope_yes_ratio", "pope_adversarial_accuracy",
              "attribute_accuracy", "colour_accuracy", "shape_accuracy", "sensitivity_changed")
ALL_ROWS, HALF_ROWS = 999, 500  # the pool's scored rows and a 50% subset (checked when jobs are made)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def v1():
    """Study 1's module: its world builders, oracle writer, composition and probe helpers."""
    return _load("dpo_benchmark", ROOT / "benchmarks" / "dpo_benchmark.py")


# ------------------------------------------------------------------------------------------------
# statistics (pure functions; tests/test_dpo_v2.py checks them)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n if n else float("nan")
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else float("nan")
    return m, sd


def welch(a: list[float], b: list[float], margin: float, alpha: float = 0.05) -> dict:
    """mean(a) - mean(b): Welch's t (two-sided p), its 95% and 90% intervals, and TOST against
    +-margin (p_tost = the larger of the two one-sided p-values; equivalent when < alpha, i.e. the
    90% interval lies inside the margin)."""
    from scipy import stats

    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    na, nb, diff = len(a), len(b), ma - mb
    out = {"n_a": na, "n_b": nb, "diff": diff}
    if na < 2 or nb < 2:
        return {**out, "se": float("nan"), "df": float("nan"), "ci95": [float("nan")] * 2,
                "ci90": [float("nan")] * 2, "p": float("nan"), "p_tost": float("nan"), "equivalent": False}
    va, vb = sa * sa / na, sb * sb / nb
    se = math.sqrt(va + vb)
    if se == 0:
        df = float(na + nb - 2)
        p = 1.0 if diff == 0 else 0.0
        p_tost = 0.0 if abs(diff) < margin else 1.0
        return {**out, "se": 0.0, "df": df, "ci95": [diff, diff], "ci90": [diff, diff], "p": p, "p_tost": p_tost,
                "equivalent": p_tost < alpha}
    df = (va + vb) ** 2 / (va * va / (na - 1) + vb * vb / (nb - 1))
    t95, t90 = stats.t.ppf(1 - alpha / 2, df), stats.t.ppf(1 - alpha, df)
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    p_low = float(stats.t.sf((diff + margin) / se, df))  # H0: diff <= -margin
    p_high = float(stats.t.cdf((diff - margin) / se, df))  # H0: diff >= +margin
    p_tost = max(p_low, p_high)
    return {**out, "se": se, "df": df, "ci95": [diff - t95 * se, diff + t95 * se],
            "ci90": [diff - t90 * se, diff + t90 * se], "p": p, "p_tost": p_tost, "equivalent": p_tost < alpha}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (NaN entries are left out of the family and stay NaN)."""
    items = sorted(((p, k) for k, p in pvalues.items() if not math.isnan(p)))
    m, out, running = len(items), {k: float("nan") for k in pvalues}, 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def power_two_sample(effect: float, sd_a: float, sd_b: float, n_a: int, n_b: int, alpha: float = 0.05) -> float:
    """Power of the two-sided Welch t-test at level alpha to detect a true difference `effect`
    (noncentral t with the Welch degrees of freedom of the given sds and sizes)."""
    from scipy import stats

    va, vb = sd_a * sd_a / n_a, sd_b * sd_b / n_b
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (n_a - 1) + vb * vb / (n_b - 1))
    return _nct_power(stats.t.ppf(1 - alpha / 2, df), df, effect / se)


def _nct_power(crit: float, df: float, ncp: float) -> float:
    """P(|T| > crit) for T noncentral t. scipy's nct gives NaN for a tail far from the noncentrality
    (seen at ncp 7, crit 2.8), where the normal approximation of that tail is used instead."""
    from scipy import stats

    upper, lower = float(stats.nct.sf(crit, df, ncp)), float(stats.nct.cdf(-crit, df, ncp))
    if not math.isfinite(upper):
        upper = float(stats.norm.sf(crit - ncp))
    if not math.isfinite(lower):
        lower = float(stats.norm.cdf(-crit - ncp))
    return upper + lower


def power_paired(effect: float, sd_diff: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired (one-sample) t-test on n differences with sd `sd_diff`."""
    from scipy import stats

    df, crit, ncp = n - 1, stats.t.ppf(1 - alpha / 2, n - 1), effect / (sd_diff / math.sqrt(n))
    return _nct_power(crit, df, ncp)


def mde(power_fn, target: float = 0.8) -> float:
    """The smallest effect whose power reaches `target` (power_fn is increasing in the effect)."""
    from scipy.optimize import brentq

    hi = 1e-3
    while power_fn(hi) < target:
        hi *= 2
        if hi > 1e3:
            return float("inf")
    return float(brentq(lambda e: power_fn(e) - target, 0.0, hi, xtol=1e-6))


def seeds_needed(effect: float, sd_a: float, sd_b: float, alpha: float = 0.05, target: float = 0.8) -> int:
    """Seeds per arm (equal in both arms) for the Welch test to reach `target` power at `effect`."""
    n = 2
    while power_two_sample(effect, sd_a, sd_b, n, n, alpha) < target:
        n += 1
        if n > 100_000:
            return -1
    return n


def steps_for(rows: int, epochs: float, batch: int) -> int:
    return max(1, math.ceil(epochs * rows / batch))


def collapsed(probes: dict) -> bool:
    return probes["pope_yes_ratio"] >= SETTINGS["collapse_yes_ratio"]


def choose_setting(pilot: dict[tuple[str, str, int], dict]) -> dict:
    """Apply SETTINGS["pilot"]'s rule to pilot records {(candidate, arm, seed): record}."""
    cfg = SETTINGS["pilot"]
    rows = []
    for name in cfg["candidates"]:
        o = [r["probes"][PRIMARY] for (c, a, _), r in pilot.items() if c == name and a == "oracle-50"]
        rnd = [r["probes"][PRIMARY] for (c, a, _), r in pilot.items() if c == name and a == "random-50"]
        (mo, so), (mr, sr) = mean_sd(o), mean_sd(rnd)
        n_coll = sum(collapsed(r["probes"]) for (c, _, _), r in pilot.items() if c == name)
        sd = math.sqrt(so * so + sr * sr)
        rows.append({"candidate": name, "gain": mo - mr, "sd": sd, "collapsed": n_coll,
                     "eligible": mo - mr >= cfg["min_oracle_gain"], "n": min(len(o), len(rnd))})
    order = list(cfg["candidates"])
    eligible = [r for r in rows if r["eligible"] and not math.isnan(r["sd"])]
    if eligible:
        best_sd = min(r["sd"] for r in eligible)
        near = [r for r in eligible if r["sd"] <= best_sd + cfg["tie_sd"]]
        pick = min(near, key=lambda r: (r["collapsed"], order.index(r["candidate"])))
        how = "smallest sd among candidates with oracle-50 >= random-50 + min_oracle_gain"
    else:
        pick = max(rows, key=lambda r: (r["gain"] / r["sd"] if r["sd"] > 0 else -math.inf))
        how = "NO candidate reached min_oracle_gain: the largest gain / sd"
    return {"candidate": pick["candidate"], **cfg["candidates"][pick["candidate"]], "how": how, "table": rows}


def choose_sae(screen: list[dict]) -> dict | None:
    """Apply SETTINGS["screen"]'s rule to the screen rows (one per variant x method with `passes`
    and `explained_variance`); None when no SAE-V method passes on any variant."""
    order = list(SETTINGS["screen"]["variants"])
    for method in SETTINGS["screen"]["methods"]:
        ok = [r for r in screen if r["method"] == method and r["passes"]]
        if ok:
            return max(ok, key=lambda r: (r["explained_variance"], -order.index(r["variant"])))
    return None


# ------------------------------------------------------------------------------------------------
# selection: curate runs and the subsets written in the published layout


def _quiet_env(work: Path) -> None:
    for k, val in {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "GX_ANALYTICS_ENABLED": "false",
                   "TOKENIZERS_PARALLELISM": "false", "PREFECT_HOME": str(work / "prefect-home"),
                   "PREFECT_LOCAL_STORAGE_PATH": str(work / "prefect-home" / "storage"),
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}.items():
        os.environ.setdefault(k, val)


def curate_run(work: Path, run_id: str, *, model_id: str, method: str, layer: int, expansion: int = 16,
               pool: str = "joint", sae_steps: int | None = None, baselines: list[str] | None = None,
               relaxed_gate: bool = False, root: str = "runs") -> tuple[str | None, str | None]:
    """One curate flow run on the pool: (run folder, None) when published, (None, the gate's
    reason) when the ranking gate refused it. Finished runs and refusals are read back, not rerun."""
    from flows.curate import curate
    from flows.params import CurateParams
    from saev_core.data import publish

    run = work / root / "pool" / run_id
    refused = work / root / f"{run_id}.refused.json"
    if publish.is_complete(str(run)):
        return str(run), None
    if refused.is_file():
        return None, json.loads(refused.read_text())["reason"]
    scoring = {"method": method, "weights": {"pool": pool}}
    if baselines is not None:
        scoring["baselines"] = baselines
    params = CurateParams.model_validate({
        "dataset": {"uri": str(work / "pool" / "data" / "train.parquet"), "format": "rlaif_v", "name": "pool"},
        "model": {"model_id": model_id, "layer": layer, "device": "cpu"},
        "sae": {"steps": sae_steps or SETTINGS["curate"]["sae_steps"], "expansion_factor": expansion},
        "scoring": scoring,
        "output": {"uri": str(work / root), "keep_percents": SETTINGS["curate"]["keep_percents"], "run_id": run_id,
                   "work_uri": str(work / "curate-work")},
        # the screen records every figure; the arms' runs keep the flow's default gate
        **({"validation": {"max_tie_share": 1.0, "min_cross_modal_features": 0}} if relaxed_gate else {}),
    })
    t = time.perf_counter()
    try:
        result = curate(params)
    except Exception as exc:
        if type(exc).__name__ != "RankingGateFailed":
            raise
        refused.parent.mkdir(parents=True, exist_ok=True)
        refused.write_text(json.dumps({"run_id": run_id, "reason": str(exc)}))
        log(f"curate {run_id}: REFUSED by the flow's ranking gate: {exc}")
        return None, str(exc)
    log(f"curate {run_id}: published in {time.perf_counter() - t:.0f}s")
    return result["run"], None


def write_random(work: Path, anchor: str, seed: int, n: int = HALF_ROWS) -> str:
    """A published-layout run whose top-50 is a seeded uniform draw of 50% of the anchor's rows
    (what the flow's `random` method selects, without a curate run per seed)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    run = work / "runs" / "pool" / f"random-s{seed}"
    if (run / "manifest.json").is_file():
        return str(run)
    table = pa.concat_tables([pq.read_table(f) for f in sorted((Path(anchor) / "subsets" / "top-100").glob("*.parquet"))])
    ids = sorted(table.column("sample_id").to_pylist())
    order = np.random.default_rng([seed, 0x2A2]).permutation(len(ids))
    keep = sorted(ids[j] for j in order[:n])
    part = table.filter(pc.is_in(table.column("sample_id"), value_set=pa.array(keep)))
    (run / "subsets" / "top-50").mkdir(parents=True, exist_ok=True)
    pq.write_table(part, run / "subsets" / "top-50" / "part-00000.parquet")
    (run / "manifest.json").write_text(json.dumps({"run_id": f"random-s{seed}", "subsets": {
        "top-50": {"rows": part.num_rows, "files": ["subsets/top-50/part-00000.parquet"]}},
        "note": "random: a seeded uniform 50% of the pool (benchmarks/dpo_v2.py write_random)"}))
    return str(run)


# ------------------------------------------------------------------------------------------------
# results: one JSON line per finished training, one file per process (the resume point)


class Store:
    def __init__(self, work: Path, phase: str):
        self.work, self.phase = work, phase
        self.done: dict[str, dict] = {}
        self.reload()

    def reload(self) -> None:
        for f in sorted(self.work.glob(f"results-{self.phase}*.jsonl")):
            for line in f.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.done[r["key"]] = r

    def add(self, rec: dict, name: str) -> None:
        self.done[rec["key"]] = rec
        with open(self.work / f"results-{self.phase}-{name}.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def job_key(phase: str, arm: str, seed: int, candidate: str | None = None) -> str:
    return f"{candidate}/{arm}/{seed}" if phase == "pilot" else f"{arm}/{seed}"


def train_job(dpo, job: dict, base: str, probe_set) -> dict:
    """DPO exactly as a user would run it (examples/dpo_train.py's train), then the probes."""
    with tempfile.TemporaryDirectory(prefix="dpo-v2-") as out:
        t = time.perf_counter()
        res = dpo.train(job["run"], subset=job["subset"], model=base, steps=job["steps"],
                        batch_size=SETTINGS["batch_size"], lr=job["lr"], beta=job["beta"], output_dir=out,
                        seed=job["seed"])
        t_train = time.perf_counter() - t
        probes = v1().probe_model(out, probe_set)
        t_probe = time.perf_counter() - t - t_train
    return {**{k: job[k] for k in ("key", "phase", "arm", "seed", "candidate", "run", "subset", "steps", "lr",
                                     "beta", "composition")},
            "probes": probes, "collapsed": collapsed(probes), "train_seconds": round(t_train, 1),
            "probe_seconds": round(t_probe, 1), "final_loss": res["losses"][-1], "mean_loss": res["train_loss"],
            "finite": res["finite"], "rows": res["rows"]}


def worker_main(work: Path, jobs_file: Path, name: str) -> int:
    """Claim jobs in order (an O_EXCL claim file per key), train, append the result."""
    import torch

    from saev_core.toyworld.probes import build_probes

    torch.set_num_threads(1)
    spec = json.loads(jobs_file.read_text())
    store = Store(work, spec["phase"])
    probe_set = build_probes(**v1().SETTINGS["probes"])
    dpo = _load("dpo_train", ROOT / "examples" / "dpo_train.py")
    claims = work / "claims" / spec["phase"]
    claims.mkdir(parents=True, exist_ok=True)
    for job in spec["jobs"]:
        if job["key"] in store.done:
            continue
        try:
            os.close(os.open(claims / (job["key"].replace("/", "__") + ".claim"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        log(f"[{name}] start {job['key']} ({job['steps']} steps, lr {job['lr']:g}, beta {job['beta']:g})")
        rec = train_job(dpo, job, spec["base"], probe_set)
        store.add(rec, name)
        log(f"[{name}] done {job['key']}: " + ", ".join(f"{k} {rec['probes'][k]:.3f}" for k in PROBE_KEYS[:4])
            + f"{' COLLAPSED' if rec['collapsed'] else ''} (train {rec['train_seconds']}s, probe {rec['probe_seconds']}s)")
    return 0


def run_jobs(work: Path, phase: str, jobs: list[dict], base: str, workers: int) -> Store:
    """Train the jobs not done yet in `workers` processes (claims of a previous, killed runner are
    cleared first: the lock in `main` guarantees no other runner is alive)."""
    store = Store(work, phase)
    todo = [j for j in jobs if j["key"] not in store.done]
    log(f"{phase}: {len(jobs) - len(todo)} of {len(jobs)} trainings already done, {len(todo)} to go")
    if not todo:
        return store
    claims = work / "claims" / phase
    if claims.is_dir():
        for f in claims.iterdir():
            f.unlink()
    jobs_file = work / f"jobs-{phase}.json"
    jobs_file.write_text(json.dumps({"phase": phase, "base": base, "jobs": todo}))
    procs = [subprocess.Popen([sys.executable, __file__, "--work", str(work), "worker", "--jobs", str(jobs_file),
                               "--name", f"w{i}"]) for i in range(workers)]
    codes = [p.wait() for p in procs]
    store.reload()
    if any(codes):
        raise SystemExit(f"a training worker failed: exit codes {codes} (see the log above); rerun to resume")
    return store


# ------------------------------------------------------------------------------------------------
# the study


class Study:
    def __init__(self, work: Path):
        import pyarrow.parquet as pq

        from saev_core.toyworld import toy_model_path

        self.work, self.v1 = work, v1()
        self.base, self.base_info = self.v1.build_base(work)
        log(f"weak base {self.base}: sha256 {self.base_info['model_sha256']}; probes "
            + ", ".join(f"{k} {self.base_info['probes'][k]:.3f}" for k in PROBE_KEYS))
        self.pool, truth = self.v1.build_pool(work, self.base)
        layer = SETTINGS["curate"]["layer"]
        self.runs: dict[str, str | None] = {}
        self.refusals: dict[str, str] = {}
        for arm, model, method, steps, baselines in (
                ("logp_margin", str(self.base), "logp_margin", None, None),
                ("logp_chosen", str(self.base), "logp_chosen", None, None),
                ("logp_margin_judge", str(toy_model_path()), "logp_margin", SETTINGS["curate"]["judge_sae_steps"], [])):
            self._arm_run(arm, model_id=model, method=method, layer=layer, sae_steps=steps, baselines=baselines)
        self.anchor = self.runs["logp_margin"]
        if self.anchor is None:
            raise SystemExit("the anchor run (logp_margin) was refused: no rows to cut all/random/oracle from")
        scores = pq.read_table(Path(self.anchor) / "scores.parquet", columns=["sample_id", "row_index"])
        by_row = {t["row"]: t for t in truth}
        self.truth_by_id = {s: by_row[r] for s, r in zip(scores.column("sample_id").to_pylist(),
                                                        scores.column("row_index").to_pylist())}
        if len(self.truth_by_id) != ALL_ROWS:
            raise SystemExit(f"the anchor scored {len(self.truth_by_id)} rows, the design assumes {ALL_ROWS}")

    def _arm_run(self, arm: str, **kw) -> None:
        run, reason = curate_run(self.work, arm, **kw)
        self.runs[arm] = run
        if reason:
            self.refusals[arm] = reason

    def source(self, arm: str, seed: int) -> tuple[str, str]:
        name = arm.rsplit("-", 1)[0] if not arm.startswith("all-100") else "all"
        if name == "all":
            return self.anchor, "top-100"
        if name == "random":
            return write_random(self.work, self.anchor, seed), "top-50"
        if name == "oracle":
            return self.v1.write_oracle(self.work, self.anchor, self.truth_by_id, seed), "top-50"
        return self.runs[name], "top-50"

    def job(self, phase: str, arm: str, seed: int, setting: dict, candidate: str | None = None) -> dict:
        run, subset = self.source(arm, seed)
        comp = self.v1.composition(self.v1.subset_ids(run, subset), self.truth_by_id)
        if arm != "all-100" and arm != "all-100-fixed" and comp["n"] != HALF_ROWS:
            raise SystemExit(f"{arm} seed {seed}: {comp['n']} rows, the design assumes {HALF_ROWS}")
        rows = ALL_ROWS if arm == "all-100" else HALF_ROWS  # all-100-fixed: a 50% arm's steps
        return {"key": job_key(phase, arm, seed, candidate), "phase": phase, "arm": arm, "seed": seed,
                "candidate": candidate, "run": run, "subset": subset, "lr": setting["lr"], "beta": setting["beta"],
                "steps": steps_for(rows, setting["epochs"], SETTINGS["batch_size"]), "composition": comp}

    def base_probes(self) -> dict:
        f = self.work / "base-probes.json"
        if not f.is_file():
            from saev_core.toyworld.probes import build_probes

            f.write_text(json.dumps(self.v1.probe_model(str(self.base), build_probes(**self.v1.SETTINGS["probes"]))))
        return json.loads(f.read_text())

    # -- pilot
    def pilot(self, workers: int) -> dict:
        cfg = SETTINGS["pilot"]
        jobs = [self.job("pilot", arm, s, cand, name) for s in cfg["seeds"] for name, cand in cfg["candidates"].items()
                for arm in cfg["arms"]]
        store = run_jobs(self.work, "pilot", jobs, str(self.base), workers)
        recs = {(r["candidate"], r["arm"], r["seed"]): r for r in store.done.values()}
        choice = choose_setting(recs)
        (self.work / "pilot-choice.json").write_text(json.dumps(choice, indent=1))
        log(f"PILOT: setting {choice['candidate']} (lr {choice['lr']:g}, beta {choice['beta']:g}, "
            f"epochs {choice['epochs']:g}) by {choice['how']}; " + "; ".join(
                f"{r['candidate']}: gain {r['gain']:+.3f}, sd {r['sd']:.3f}, collapsed {r['collapsed']}"
                for r in choice["table"]))
        return choice

    # -- SAE-side screen
    def screen(self) -> list[dict]:
        import pyarrow.parquet as pq

        from saev_core.pipeline.specs import ValidationSpec
        from saev_core.sae.ranking_gate import check_ranking, tie_picked
        from saev_core.sae.scoring import SCORERS

        f = self.work / "screen.json"
        if f.is_file():
            return json.loads(f.read_text())
        gate = ValidationSpec()
        rows = []
        for name, var in SETTINGS["screen"]["variants"].items():
            run, reason = curate_run(self.work, f"screen-{name}", model_id=str(self.base), method="reference",
                                     layer=var["layer"], expansion=var["expansion"], pool=var["pool"],
                                     baselines=["weighted", "paper", "cooccur_l0"], relaxed_gate=True, root="screen")
            if run is None:
                raise SystemExit(f"screen run {name} refused although its gate was relaxed: {reason}")
            man = json.loads((Path(run) / "manifest.json").read_text())
            met = man["sae"]["metrics"] or json.loads((Path(man["sae"]["uri"]) / "metrics.json").read_text())
            table = pq.read_table(Path(run) / "scores.parquet")
            ids = table.column("sample_id").to_pylist()
            for method in [*SETTINGS["screen"]["methods"], "cooccur_l0"]:
                col = "score" if method == "reference" else method
                scores = table.column(col).to_pylist()
                chk = check_ranking(ids, scores, SETTINGS["curate"]["keep_percents"], method=method,
                                    max_tie_share=gate.max_tie_share, needs_weights=SCORERS[method].needs_weights,
                                    n_cross_modal=man["scoring"]["n_cross_modal"],
                                    min_cross_modal=gate.min_cross_modal_features)
                rows.append({"variant": name, **var, "method": method, "explained_variance": met["all"]["explained_variance"],
                             "l0": met["all"]["l0"], "dead_fraction": met["dead_fraction"],
                             "ev_text": met["text"]["explained_variance"], "ev_image": met["image"]["explained_variance"],
                             "n_cross_modal": man["scoring"]["n_cross_modal"], "delta": man["scoring"]["delta"],
                             "distinct_scores": len(set(scores)),
                             **{f"tie_share_{p}": tie_picked(ids, scores, p)["share"]
                                for p in SETTINGS["screen"]["report_keep"]},
                             "passes": not chk["failures"], "failures": chk["failures"]})
            log(f"screen {name}: EV {met['all']['explained_variance']:.3f}, L0 {met['all']['l0']:.1f}, "
                f"dead {met['dead_fraction']:.3f}, cross-modal {man['scoring']['n_cross_modal']}; gate: " + "; ".join(
                    f"{r['method']} {'passes' if r['passes'] else 'fails'}" for r in rows if r["variant"] == name))
        f.write_text(json.dumps(rows, indent=1))
        return rows

    def sae_arms(self, screen: list[dict]) -> dict | None:
        pick = choose_sae(screen)
        (self.work / "sae-choice.json").write_text(json.dumps(pick, indent=1))
        default = SETTINGS["screen"]["variants"]["L2-16x-joint"]
        var = pick or {**default, "variant": "L2-16x-joint"}
        if pick:
            log(f"SAE pick: {pick['method']} on {pick['variant']} (EV {pick['explained_variance']:.3f}, "
                f"{pick['n_cross_modal']} cross-modal features)")
            self._arm_run("saev", model_id=str(self.base), method=pick["method"], layer=var["layer"],
                          expansion=var["expansion"], pool=var["pool"])
        else:
            self.runs["saev"] = None
            self.refusals["saev"] = "no SAE variant of the screen passes the default ranking gate (see screen.json)"
            log("SAE pick: none passes the gate; no saev arm")
        self._arm_run("cooccur_l0", model_id=str(self.base), method="cooccur_l0", layer=var["layer"],
                      expansion=var["expansion"], pool=var["pool"])
        return pick

    # -- grid
    def grid_jobs(self, setting: dict) -> list[dict]:
        arms = [a for a in SETTINGS["arms"] if self._arm_ok(a)]
        return [self.job("grid", arm, s, setting) for s in SETTINGS["seeds"] for arm in arms]

    def _arm_ok(self, arm: str) -> bool:
        name = arm.rsplit("-", 1)[0]
        return arm.startswith("all-100") or name in ("random", "oracle") or self.runs.get(name) is not None


def _alive(f: Path) -> int | None:
    """The pid in lock file `f` when that process is still running, else None."""
    if not f.is_file():
        return None
    pid = int(f.read_text().strip() or 0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    return pid if pid != os.getpid() else None


def lock(work: Path, name: str) -> None:
    f = work / f"{name}.lock"
    pid = _alive(f)
    if pid:
        raise SystemExit(f"another {name} process (pid {pid}) is working in {work}; wait for it or stop it first")
    f.write_text(str(os.getpid()))


def screen_main(work: Path) -> int:
    """The SAE-side screen and the selection arms' curate runs (may run beside `run`'s pilot)."""
    import torch

    torch.set_num_threads(1)
    lock(work, "screen")
    study = Study(work)
    study.sae_arms(study.screen())
    for arm, reason in study.refusals.items():
        log(f"arm {arm}: REFUSED by the ranking gate: {reason}")
    return 0


def run_main(work: Path, workers: int, until: str) -> int:
    import torch

    torch.set_num_threads(1)
    lock(work, "runner")
    log(f"SETTINGS {json.dumps(SETTINGS)}")
    study = Study(work)
    log(f"base probes: {study.base_probes()}")
    choice = study.pilot(workers)
    if until == "pilot":
        return 0
    while _alive(work / "screen.lock"):  # a `screen` process started beside the pilot: use its result
        log("waiting for the screen process to finish")
        time.sleep(120)
    screen = study.screen()
    study.sae_arms(screen)
    for arm, reason in study.refusals.items():
        log(f"arm {arm}: REFUSED by the ranking gate: {reason}")
    if until == "screen":
        return 0
    jobs = study.grid_jobs(choice)
    log(f"grid: {len(jobs)} trainings ({len(SETTINGS['seeds'])} seeds x "
        f"{len({j['arm'] for j in jobs})} arms), setting {choice['candidate']}")
    run_jobs(work, "grid", jobs, str(study.base), workers)
    log("grid complete")
    return 0


def time_one(work: Path) -> int:
    """Time one training of a 50% arm at each candidate's steps (seed 999: no pilot or grid seed);
    prints seconds only (the probe outcome is not shown: this measures speed)."""
    import torch

    from saev_core.toyworld.probes import build_probes

    torch.set_num_threads(1)
    study = Study(work)
    dpo = _load("dpo_train", ROOT / "examples" / "dpo_train.py")
    probe_set = build_probes(**study.v1.SETTINGS["probes"])
    setting = SETTINGS["pilot"]["candidates"]["A"]
    job = study.job("timing", "random-50", 999, setting)
    rec = train_job(dpo, job, str(study.base), probe_set)
    per_step = rec["train_seconds"] / job["steps"]
    print(json.dumps({"steps": job["steps"], "train_seconds": rec["train_seconds"], "probe_seconds": rec["probe_seconds"],
                      "seconds_per_step": round(per_step, 3), "load_average": os.getloadavg()}))
    return 0


# ------------------------------------------------------------------------------------------------
# analysis: every table from whatever rows exist in --work (trains nothing)


def _grid_by_arm(work: Path) -> dict[str, dict[int, dict]]:
    by_arm: dict[str, dict[int, dict]] = {}
    for r in Store(work, "grid").done.values():
        by_arm.setdefault(r["arm"], {})[r["seed"]] = r
    return by_arm


def _prim(by_arm: dict, arm: str) -> list[float]:
    return [by_arm[arm][s]["probes"][PRIMARY] for s in sorted(by_arm.get(arm, {}))]


def _f(x: float, fmt: str = "+.3f") -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def compare(by_arm: dict, ref: str, arms: list[str]) -> dict[str, dict]:
    """Each arm minus `ref` (Welch), Holm over the family, TOST at the margin, MDE and verdict."""
    alpha, margin, target = SETTINGS["alpha"], SETTINGS["equivalence_margin"], SETTINGS["power"]
    out = {}
    fam = [a for a in arms if a != ref and a in by_arm and ref in by_arm]
    for a in fam:
        x, y = _prim(by_arm, a), _prim(by_arm, ref)
        w = welch(x, y, margin, alpha)
        (_, sx), (_, sy) = mean_sd(x), mean_sd(y)
        ok = len(x) > 1 and len(y) > 1 and sx + sy > 0
        w["mde"] = mde(lambda e: power_two_sample(e, sx, sy, len(x), len(y), alpha), target) if ok else float("nan")
        n_plan = len(SETTINGS["seeds"])
        w["mde_planned"] = mde(lambda e: power_two_sample(e, sx, sy, n_plan, n_plan, alpha), target) if ok else float("nan")
        w["mde_planned_holm"] = (mde(lambda e: power_two_sample(e, sx, sy, n_plan, n_plan, alpha / len(fam)), target)
                                 if ok else float("nan"))
        w["sd_a"], w["sd_b"] = sx, sy
        out[a] = w
    adj = holm({a: w["p"] for a, w in out.items()})
    for a, w in out.items():
        w["p_holm"] = adj[a]
        if math.isnan(w["p"]):
            w["verdict"] = "too few seeds"
        elif w["p_holm"] < alpha:
            w["verdict"] = "better" if w["diff"] > 0 else "worse"
        elif w["equivalent"]:
            w["verdict"] = f"equivalent (+-{margin:g})"
        else:
            w["verdict"] = "inconclusive"
    return out


def _cmp_table(title: str, ref: str, res: dict[str, dict]) -> list[str]:
    m = SETTINGS["equivalence_margin"]
    lines = ["", title, "",
             f"| arm | seeds (arm / {ref}) | mean diff | 95% interval | p | Holm p | 90% interval | TOST p (+-{m:g}) "
             "| verdict | MDE now | MDE at 24 seeds | MDE at 24, Holm level |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a, w in res.items():
        lines.append(f"| {a} | {w['n_a']} / {w['n_b']} | {_f(w['diff'])} | [{_f(w['ci95'][0])}, {_f(w['ci95'][1])}] | "
                     f"{_f(w['p'], '.4f')} | {_f(w['p_holm'], '.4f')} | [{_f(w['ci90'][0])}, {_f(w['ci90'][1])}] | "
                     f"{_f(w['p_tost'], '.4f')} | {w['verdict']} | {_f(w['mde'], '.3f')} | {_f(w['mde_planned'], '.3f')} | "
                     f"{_f(w['mde_planned_holm'], '.3f')} |")
    return lines


def forest_svg(panels: list[tuple[str, dict[str, dict]]], title: str, path: Path) -> None:
    """One row per arm, its mean difference and 95% interval; one panel per reference arm; the
    zero line solid, the equivalence margin dashed."""
    margin = SETTINGS["equivalence_margin"]
    arms = list(dict.fromkeys(a for _, res in panels for a in res))
    vals = [v for _, res in panels for w in res.values() for v in (*w["ci95"], w["diff"]) if not math.isnan(v)]
    lo, hi = min(vals + [-margin]) - 0.02, max(vals + [margin]) + 0.02
    pw, left, top, row = 300, 190, 60, 26
    w, h = left + len(panels) * (pw + 30), top + row * len(arms) + 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="10" y="18" font-size="13">{title}</text>']
    for i, a in enumerate(arms):
        out.append(f'<text x="{left - 8}" y="{top + row * i + 4}" text-anchor="end">{a}</text>')
    for k, (name, res) in enumerate(panels):
        x0 = left + k * (pw + 30)
        px = lambda v: x0 + (v - lo) / (hi - lo) * pw  # noqa: E731
        out.append(f'<text x="{x0 + pw / 2}" y="{top - 22}" text-anchor="middle" font-weight="bold" font-size="10">'
                   f'primary: arm minus {name} (95% Welch interval)</text>')
        out.append(f'<line x1="{px(0)}" y1="{top - 12}" x2="{px(0)}" y2="{top + row * len(arms) - 10}" stroke="black"/>')
        for v in (-margin, margin):
            out.append(f'<line x1="{px(v)}" y1="{top - 12}" x2="{px(v)}" y2="{top + row * len(arms) - 10}" '
                       'stroke="grey" stroke-dasharray="4 3"/>')
        for t in range(5):
            v = lo + t * (hi - lo) / 4
            out.append(f'<text x="{px(v)}" y="{top + row * len(arms) + 8}" text-anchor="middle">{v:+.2f}</text>')
        for i, a in enumerate(arms):
            if a not in res or math.isnan(res[a]["diff"]):
                continue
            y, r = top + row * i, res[a]
            colour = {"better": "darkgreen", "worse": "firebrick"}.get(r["verdict"], "steelblue")
            if not math.isnan(r["ci95"][0]):
                out.append(f'<line x1="{px(r["ci95"][0])}" y1="{y}" x2="{px(r["ci95"][1])}" y2="{y}" '
                           f'stroke="{colour}" stroke-width="2"/>')
            out.append(f'<circle cx="{px(r["diff"])}" cy="{y}" r="4" fill="{colour}"/>')
            out.append(f'<text x="{x0 + pw + 4}" y="{y + 4}" font-size="9">n={r["n_a"]}</text>')
    out.append(f'<text x="10" y="{h - 10}" font-size="10">dashed: the equivalence margin +-{margin:g}; '
               'green/red: Holm-adjusted p &lt; 0.05</text>')
    out.append("</svg>")
    path.write_text("\n".join(out))


def _refusals(work: Path) -> dict[str, str]:
    out = {}
    for f in sorted((work / "runs").glob("*.refused.json")):
        r = json.loads(f.read_text())
        out[r["run_id"]] = r["reason"]
    choice = work / "sae-choice.json"
    if choice.is_file() and json.loads(choice.read_text()) is None:
        out["saev"] = "no SAE variant of the screen passes the default ranking gate"
    return out


def _gate_lines(work: Path) -> list[str]:
    """What the flow's ranking gate recorded for each published selection run (flags do not refuse)."""
    lines = []
    for name in ("saev", "logp_chosen", "logp_margin", "logp_margin_judge"):
        f = work / "runs" / "pool" / name / "manifest.json"
        if not f.is_file():
            continue
        gate = json.loads(f.read_text()).get("ranking_gate") or {}
        c = gate.get("canary_image_swap") or {}
        win = (f"image_swap canary paired win rate {c['paired_win_rate']:.3f} (95% interval {c['ci95'][0]:.3f}-"
               f"{c['ci95'][1]:.3f})" if c else "no canary figure")
        lines.append(f"- `{name}`: published; {win}; flags: {len(gate.get('flags', []))}")
    return ["", "Ranking gate of the published selection runs:", "", *lines] if lines else []


def analyze(work: Path, publish: Path | None) -> str:
    by_arm = _grid_by_arm(work)
    base = json.loads((work / "base-probes.json").read_text()) if (work / "base-probes.json").is_file() else None
    order = [a for a in SETTINGS["arms"] if a in by_arm]
    n_plan = len(SETTINGS["seeds"])
    counts = {a: len(by_arm[a]) for a in order}
    partial = not order or min(counts.values()) < n_plan
    md = [f"Grid progress: {sum(counts.values())} (arm, seed) trainings; seeds per arm: "
          + ", ".join(f"{a} {c}/{n_plan}" for a, c in counts.items())
          + (" - PARTIAL: every figure below is from the seeds done so far." if partial else " - complete."), ""]
    if base:
        md.append(f"Base (no DPO): primary {base[PRIMARY]:.3f}, POPE yes-ratio {base['pope_yes_ratio']:.3f}.")
    choice = json.loads((work / "pilot-choice.json").read_text()) if (work / "pilot-choice.json").is_file() else None
    md += pilot_tables(work, choice)
    md += screen_tables(work)
    refused = _refusals(work)
    if refused:
        md += ["", "Arms refused by the flow's ranking gate (nothing published, so no arm):", ""]
        md += [f"- `{k}`: {v}" for k, v in refused.items()]
    md += _gate_lines(work)
    md += ["", "Arms (equal epochs: all-100 trains twice a 50% arm's steps; all-100-fixed = all data at a 50% arm's "
           "steps):", "",
           "| arm | seeds | pairs | corrupted | steps | collapsed | primary sd | " + " | ".join(PROBE_KEYS) + " |",
           "|---|---|---|---|---|---|---|" + "---|" * len(PROBE_KEYS)]
    summary = {}
    for a in order:
        recs = [by_arm[a][s] for s in sorted(by_arm[a])]
        mean = {k: sum(r["probes"][k] for r in recs) / len(recs) for k in PROBE_KEYS}
        corr = sum(r["composition"]["corrupted"] for r in recs) / len(recs)
        n_coll = sum(r["collapsed"] for r in recs)
        summary[a] = {"seeds": sorted(by_arm[a]), "mean": mean, "corrupted": corr, "collapsed": n_coll,
                      "sd": mean_sd(_prim(by_arm, a))[1]}
        md.append(f"| {a} | {len(recs)} | {recs[0]['composition']['n']} | {corr:.3f} | {recs[0]['steps']} | "
                  f"{n_coll}/{len(recs)} | {_f(summary[a]['sd'], '.3f')} | " + " | ".join(f"{mean[k]:.3f}" for k in PROBE_KEYS) + " |")
    half = [a for a in order if a.endswith("-50")]
    vs_random = compare(by_arm, "random-50", [a for a in order if a != "all-100-fixed"])
    vs_all = compare(by_arm, "all-100", half)
    vs_fixed = compare(by_arm, "all-100-fixed", half)
    md += _cmp_table("**Primary comparison** (equal epochs): each arm minus random-50. Welch t (seeds do not pair arms); "
                     "Holm over this table's arms; verdict: Holm p < 0.05 -> better/worse, else TOST p < 0.05 -> "
                     "equivalent, else inconclusive. MDE: the true difference the Welch test detects with 80% power "
                     "at alpha 0.05 from the observed sds (now: at the seeds done; at 24 seeds; at 24 seeds and the "
                     "Holm level alpha/k).", "random-50", vs_random)
    md += _cmp_table("Each 50% arm minus all-100 (equal epochs).", "all-100", vs_all)
    md += _cmp_table("**Secondary (fixed steps)**: each 50% arm minus all-100-fixed (all data at the 50% arms' steps).",
                     "all-100-fixed", vs_fixed)
    seeds = sorted({s for a in order for s in by_arm[a]})
    md += ["", "`primary` per seed:", "", "| arm | " + " | ".join(str(s) for s in seeds) + " |",
           "|---|" + "---|" * len(seeds)]
    for a in order:
        md.append(f"| {a} | " + " | ".join(_f(by_arm[a][s]["probes"][PRIMARY], ".3f") if s in by_arm[a] else "-"
                                          for s in seeds) + " |")
    from saev_core.toyworld.generator import CORRUPTIONS

    md += ["", "Composition (seed 0 where done; random and oracle draw a new subset per seed):", "",
           "| arm | pairs | " + " | ".join(("clean", *CORRUPTIONS)) + " | question types | on-policy rejected |",
           "|---|---|" + "---|" * (len(CORRUPTIONS) + 3)]
    for a in order:
        c = (by_arm[a].get(0) or next(iter(by_arm[a].values())))["composition"]
        md.append(f"| {a} | {c['n']} | " + " | ".join(f"{c['by_corruption'].get(k, 0):.3f}" for k in ("clean", *CORRUPTIONS))
                  + " | " + ", ".join(f"{k} {v:.2f}" for k, v in c["question_types"].items()) + f" | {c['on_policy']:.3f} |")
    secs = [r["train_seconds"] + r["probe_seconds"] for a in order for r in by_arm[a].values()]
    if secs:
        md += ["", f"Wall time per training (train + probe, 2 processes on the shared 2-core machine): median "
               f"{sorted(secs)[len(secs) // 2]:.0f}s, min {min(secs):.0f}s, max {max(secs):.0f}s over {len(secs)} trainings."]
    text = "\n".join(md) + "\n"
    if publish:
        publish.mkdir(parents=True, exist_ok=True)
        (publish / "dpo_grid.md").write_text(text)
        (publish / "dpo_grid.json").write_text(json.dumps(
            {"settings": SETTINGS, "seeds_per_arm": counts, "partial": partial, "base": base, "pilot": choice,
             "summary": summary, "vs_random_50": vs_random, "vs_all_100": vs_all, "vs_all_100_fixed": vs_fixed,
             "refused": refused}, indent=1))
        with open(publish / "dpo_grid.csv", "w", newline="") as fh:
            wr = csv.writer(fh)
            wr.writerow(["arm", "seed", *PROBE_KEYS, "collapsed", "n", "corrupted", "steps", "lr", "beta",
                         "train_seconds", "probe_seconds"])
            for a in order:
                for s in sorted(by_arm[a]):
                    r = by_arm[a][s]
                    wr.writerow([a, s, *[f"{r['probes'][k]:.4f}" for k in PROBE_KEYS], int(r["collapsed"]),
                                 r["composition"]["n"], f"{r['composition']['corrupted']:.4f}", r["steps"], r["lr"],
                                 r["beta"], r["train_seconds"], r["probe_seconds"]])
        if vs_random or vs_all:
            seeds_txt = (f"{min(counts.values())}-{max(counts.values())}" if counts else "0") + f" of {n_plan} seeds per arm"
            forest_svg([("random-50", vs_random), ("all-100", vs_all)],
                       f"DPO study 2 (toy world): {seeds_txt}{' - PARTIAL' if partial else ''}", publish / "dpo_forest.svg")
    return text


def pilot_tables(work: Path, choice: dict | None) -> list[str]:
    recs = list(Store(work, "pilot").done.values())
    if not recs:
        return ["", "Pilot: no training done yet."]
    cfg = SETTINGS["pilot"]
    md = ["", f"Pilot (seeds {cfg['seeds']}; `primary` mean +- sd over seeds, collapsed = POPE yes-ratio >= "
          f"{SETTINGS['collapse_yes_ratio']}):", "",
          "| setting | lr | beta | epochs | steps (50% / all) | " + " | ".join(cfg["arms"]) + " | collapsed per arm |",
          "|---|---|---|---|---|" + "---|" * len(cfg["arms"]) + "---|"]
    for name, c in cfg["candidates"].items():
        cells, coll = [], []
        for a in cfg["arms"]:
            rs = [r for r in recs if r["candidate"] == name and r["arm"] == a]
            m, sd = mean_sd([r["probes"][PRIMARY] for r in rs]) if rs else (float("nan"), float("nan"))
            cells.append(f"{_f(m, '.3f')} +- {_f(sd, '.3f')} (n={len(rs)})")
            coll.append(f"{a} {sum(r['collapsed'] for r in rs)}/{len(rs)}")
        md.append(f"| {name} | {c['lr']:g} | {c['beta']:g} | {c['epochs']:g} | "
                  f"{steps_for(HALF_ROWS, c['epochs'], SETTINGS['batch_size'])} / "
                  f"{steps_for(ALL_ROWS, c['epochs'], SETTINGS['batch_size'])} | " + " | ".join(cells)
                  + " | " + ", ".join(coll) + " |")
    if choice:
        n_plan = len(SETTINGS["seeds"])
        md += ["", "| setting | oracle-50 minus random-50 | sd of the difference | eligible (gain >= "
               f"{cfg['min_oracle_gain']}) | collapsed runs | Welch MDE at {n_plan} seeds from these sds |",
               "|---|---|---|---|---|---|"]
        for r in choice["table"]:
            sds = [mean_sd([x["probes"][PRIMARY] for x in recs if x["candidate"] == r["candidate"] and x["arm"] == a])[1]
                   for a in ("oracle-50", "random-50")]
            m = mde(lambda e: power_two_sample(e, sds[0], sds[1], n_plan, n_plan, SETTINGS["alpha"]), SETTINGS["power"])
            md.append(f"| {r['candidate']} | {r['gain']:+.3f} | {r['sd']:.3f} | {r['eligible']} | {r['collapsed']} | "
                      f"{m:.3f} |")
        md += ["", f"Chosen by the pre-stated rule: **{choice['candidate']}** (lr {choice['lr']:g}, beta "
               f"{choice['beta']:g}, {choice['epochs']:g} epoch(s)) - {choice['how']}."]
    return md


def screen_tables(work: Path) -> list[str]:
    f = work / "screen.json"
    if not f.is_file():
        return ["", "SAE-side screen: not done yet."]
    rows = json.loads(f.read_text())
    md = ["", "SAE-side screen (no DPO; gate verdicts at the flow's default thresholds: >= 10 cross-modal features "
          "for weight-based methods, <= 5% tie-picked at keep 50 and 100):", "",
          "| variant | EV | EV text | EV image | L0 | dead | cross-modal | delta |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        if r["variant"] in seen:
            continue
        seen.add(r["variant"])
        md.append(f"| {r['variant']} | {r['explained_variance']:.3f} | {r['ev_text']:.3f} | {r['ev_image']:.3f} | "
                  f"{r['l0']:.1f} | {r['dead_fraction']:.3f} | {r['n_cross_modal']} | {r['delta']:.4g} |")
    md += ["", "| variant | method | distinct scores | tie-picked top-25 | tie-picked top-50 | gate |", "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['method']} | {r['distinct_scores']} | {r['tie_share_25']:.3f} | "
                  f"{r['tie_share_50']:.3f} | {'passes' if r['passes'] else 'fails: ' + '; '.join(r['failures'])} |")
    pick = json.loads((work / "sae-choice.json").read_text()) if (work / "sae-choice.json").is_file() else "?"
    md += ["", "SAE-V arm (`saev-50`): " + ("none: no variant passes" if pick is None else "not chosen yet" if pick == "?"
                                           else f"`{pick['method']}` on {pick['variant']} (by the pre-stated rule)") + "."]
    return md


def power_v1(csv_path: Path) -> str:
    """MDE at 80% power from study 1's published grid: paired (as study 1 analysed it) and Welch."""
    rows = list(csv.DictReader(open(csv_path)))
    by = {}
    for r in rows:
        by.setdefault(r["arm"], {})[int(r["seed"])] = float(r[PRIMARY])
    alpha, target, n_plan, eff = SETTINGS["alpha"], SETTINGS["power"], len(SETTINGS["seeds"]), SETTINGS["equivalence_margin"]
    lines = [f"Study 1 (benchmarks/dpo/dpo_grid.csv): power at alpha {alpha}, target power {target}.", "",
             "| arm vs random-50 | seeds | paired sd | paired MDE (n) | power at +0.05, paired (n) | seeds for MDE 0.05, "
             "paired | sd arm | sd random | Welch MDE at 24 | Welch MDE at 24, alpha/7 | seeds for MDE 0.05, Welch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    ref = by["random-50"]
    for arm in ("all-100", "oracle-50", "reference-50", "cooccur_l0-50", "logp_margin-50"):
        seeds = sorted(set(by[arm]) & set(ref))
        d = [by[arm][s] - ref[s] for s in seeds]
        n, (_, sd_d) = len(d), mean_sd(d)
        (_, sa), (_, sr) = mean_sd([by[arm][s] for s in seeds]), mean_sd([ref[s] for s in seeds])
        pm = mde(lambda e: power_paired(e, sd_d, n, alpha), target)
        p05 = power_paired(eff, sd_d, n, alpha)
        need_p = next(k for k in range(2, 100_000) if power_paired(eff, sd_d, k, alpha) >= target)
        wm = mde(lambda e: power_two_sample(e, sa, sr, n_plan, n_plan, alpha), target)
        wh = mde(lambda e: power_two_sample(e, sa, sr, n_plan, n_plan, alpha / 7), target)
        lines.append(f"| {arm} | {n} | {sd_d:.3f} | {pm:.3f} | {p05:.3f} | {need_p} | {sa:.3f} | {sr:.3f} | {wm:.3f} | "
                     f"{wh:.3f} | {seeds_needed(eff, sa, sr, alpha, target)} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/work/dpo-v2-work", help="working folder (resumable)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="prepare, pilot, screen, arms, grid (each resumed)")
    r.add_argument("--until", choices=["pilot", "screen", "grid"], default="grid")
    r.add_argument("--workers", type=int, default=SETTINGS["workers"])
    an = sub.add_parser("analyze", help="tables, MDE, Holm, TOST, forest plot from the rows that exist")
    an.add_argument("--publish", help="write dpo_grid.{md,csv,json} and dpo_forest.svg here")
    sub.add_parser("power-v1", help="the design's power figures from study 1's grid")
    sub.add_parser("time-one", help="time one 50%% training (speed only)")
    sub.add_parser("prepare", help="the world and the model-based curate runs, then stop")
    sub.add_parser("screen", help="the SAE-side screen and the selection arms' curate runs")
    w = sub.add_parser("worker", help=argparse.SUPPRESS)
    w.add_argument("--jobs", required=True)
    w.add_argument("--name", required=True)
    a = ap.parse_args(argv)
    work = Path(a.work).resolve()
    if a.cmd == "power-v1":
        print(power_v1(ROOT / "benchmarks" / "dpo" / "dpo_grid.csv"))
        return 0
    if a.cmd == "analyze":
        print(analyze(work, Path(a.publish) if a.publish else None))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    _quiet_env(work)
    if a.cmd == "worker":
        return worker_main(work, Path(a.jobs), a.name)
    if a.cmd == "time-one":
        return time_one(work)
    if a.cmd == "screen":
        return screen_main(work)
    if a.cmd == "prepare":
        import torch

        torch.set_num_threads(1)
        lock(work, "runner")
        log(f"prepared; base probes {Study(work).base_probes()}")
        return 0
    return run_main(work, a.workers, a.until)


if __name__ == "__main__":
    sys.exit(main())
