"""Recurring curation (issue 22): a nightly run over a grown dataset with a pinned curation model.

The toy world at N rows (`--rows`, default 1,000) in a folder of Parquet files: a first run that
trains (SAE, weights, delta), promoted to a curation model; then +10% of N appended three times
(a new file each), with a pinned run after each. Each run is the real flow (thread runner, toy
LLaVA on the CPU) in its own process, as a scheduled run would be: against a Prefect server
started once for all runs, as a deployment's runs talk to the running server (`--ephemeral`: each
process starts its own ephemeral API instead, as before 2026-12-03, which adds its start-up to
every run). Printed per run: rows, rows forwarded for scoring, canaries, wall time, the process's
CPU time and the machine's load average (the forwards are tiny single-row passes on 2 intra-op
threads: a loaded machine slows them far more than the first run's batched work); then

- reforwarded_share: rows scored by an earlier run that an incremental run forwarded again, over
  all such rows (target 0: only the new rows are forwarded);
- time_ratio: the slowest incremental run's wall time over the first run's (target <= 0.25);
- unchanged_identical: every score column of every unchanged row equal, byte for byte (float64),
  to the first run's;
- flipped: decisions (score >= the curation model's keep_threshold) of unchanged rows that differ
  from the previous run's (the first run's scores judged by the same threshold; target 0).

    .venv/bin/python benchmarks/recurring_benchmark.py [--rows 1000] [--work DIR] [--out FILE] [--ephemeral]

The last line holds the figures as key=value pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {  # fixed before the first measurement
    "growth": [0.1, 0.1, 0.1],  # of the starting size, appended before each incremental run
    "shard_rows": 128,
    "sae": {"steps": 300, "batch_size": 512, "expansion_factor": 16, "lr": 1e-3},
    "weight_samples": 500,
    "method": "logp_chosen",  # what the demo ranks by (benchmarks/RESULTS.md); SAE-V columns beside it
    "baselines": ["reference", "cooccur_l0"],
    "keep_percents": [25, 50],
    "threads": 2,
}


def _params(work: Path, run_id: str, pinned: str | None) -> dict:
    scoring = {"method": SETTINGS["method"], "baselines": SETTINGS["baselines"],
               "weights": {"weight_samples": SETTINGS["weight_samples"]}}
    if pinned:
        scoring["curation_model"] = pinned
    return {
        "dataset": {"uri": str(work / "data"), "name": "growing", "shard_rows": SETTINGS["shard_rows"]},
        "model": {"model_id": "toy", "layer": 2, "device": "cpu"},
        "sae": SETTINGS["sae"],
        "scoring": scoring,
        "output": {"uri": str(work / "out"), "work_uri": str(work / "work"), "run_id": run_id,
                   "keep_percents": SETTINGS["keep_percents"]},
        # the gate measures ranking quality, not cost; the toy world's SAE-V ranking is at chance
        "validation": {"max_tie_share": 1.0, "min_cross_modal_features": 0},
    }


def _child(work: Path, run_id: str, pinned: str | None) -> None:
    import torch

    torch.set_num_threads(SETTINGS["threads"])
    from flows.curate import curate
    from flows.params import CurateParams

    t0, c0 = time.perf_counter(), time.process_time()
    result = curate(CurateParams.model_validate(_params(work, run_id, pinned)))
    print(json.dumps({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0, "run": result["run"]}))


_API: dict = {}  # PREFECT_API_URL of the server started by _server (none: ephemeral API per process)


def _env(work: Path) -> dict:
    """One Prefect home for every run (its database made once, by the warm-up or the server), a
    patient ephemeral server start (the machine may be shared)."""
    return {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            **_API}


def _server(work: Path) -> subprocess.Popen:
    """`prefect server start` on a free loopback port, its API in the runs' environment."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(work / "prefect-server.log", "w")  # noqa: SIM115 - open for the server's life
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                             str(port), "--log-level", "WARNING"], env=_env(work), stdout=log, stderr=log)
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{api}/health", timeout=3) as r:  # noqa: S310 - loopback only
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the Prefect server did not start: see {work / 'prefect-server.log'}")
        time.sleep(1)
    _API["PREFECT_API_URL"] = api
    return proc


def _warm_up(work: Path) -> None:
    """A trivial flow in its own process, so the first measured run does not pay for creating
    Prefect's database (nor, with a server, for its first flow's registration)."""
    code = "from prefect import flow\nflow(lambda: 1, name='warm-up')()"
    subprocess.run([sys.executable, "-c", code], env=_env(work), check=True, capture_output=True)


def _run(work: Path, run_id: str, pinned: str | None) -> dict:
    env = _env(work)
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--child", run_id, "--work", str(work)]
                         + (["--pinned", pinned] if pinned else []), env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{run_id} failed:\n{res.stderr[-4000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0  # including the interpreter, imports and Prefect's start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run's process and what it started
    out["process_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out["load_before"] = load
    out["manifest"] = json.loads((Path(out["run"]) / "manifest.json").read_text())
    return out


def _stages(manifest: dict) -> dict[str, float]:
    return {s["stage"]: round(s["seconds"], 1) for s in manifest["stages"]}


def _scores(run: str) -> dict[str, tuple]:
    import pyarrow.parquet as pq

    t = pq.read_table(Path(run) / "scores.parquet")
    cols = [c for c in t.column_names if c == "score" or c in SETTINGS["baselines"]]
    ids = t.column("sample_id").to_pylist()
    vals = [t.column(c).to_pylist() for c in cols]
    return {s: tuple(struct.pack("<d", v[i]) if v[i] is not None else b"" for v in vals) for i, s in enumerate(ids)}


def _write_parts(work: Path, n0: int) -> list[tuple[str, int, int]]:
    """The toy rows of every step, generated once; returns (file, start, stop) per step."""
    import pyarrow.parquet as pq

    from saev_core.toyworld.generator import write_preference_dataset

    adds = [round(n0 * g) for g in SETTINGS["growth"]]
    total = n0 + sum(adds)
    src = work / "toy"
    paths = write_preference_dataset(src, total, layout="rlaif-v", corruption_rate=0.3, seed=0)
    table = pq.read_table(paths["parquet"])
    bounds, lo = [], 0
    for i, n in enumerate([n0, *adds]):
        bounds.append((f"part-{i:03d}.parquet", lo, lo + n))
        lo += n
    (work / "data").mkdir(parents=True)
    (work / "pending").mkdir()
    for name, a, b in bounds:
        pq.write_table(table.slice(a, b - a), work / "pending" / name)
    return bounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1000, help="starting size (default 1000)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--out", default=None, help="also write the figures as JSON here")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pinned", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ephemeral", action="store_true",
                    help="each run starts Prefect's ephemeral API (default: one server for all runs)")
    args = ap.parse_args()
    if args.child:
        _child(Path(args.work), args.child, args.pinned)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="recurring-"))
    if args.work:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    print(f"settings: rows={args.rows} {json.dumps(SETTINGS)} prefect={'ephemeral' if args.ephemeral else 'server'}")
    server = None
    try:
        parts = _write_parts(work, args.rows)
        shutil.move(str(work / "pending" / parts[0][0]), work / "data" / parts[0][0])
        if not args.ephemeral:
            server = _server(work)
        _warm_up(work)
        first = _run(work, "run-0", None)
        m = first["manifest"]
        print(f"run-0 (trains): {m['counts']['scored']} rows, {(m.get('canaries') or {}).get('n', 0)} canaries, "
              f"wall {first['wall_s']:.1f} s (process {first['process_s']:.1f} s; cpu {first['cpu_s']:.1f} s in "
              f"the run, {first['process_cpu_s']:.1f} s in all; load {first['load_before']:.1f} before)")
        print(f"  stages (s): {_stages(m)}")
        from saev_core.pipeline.curation_model import promote_run

        card = promote_run(first["run"], "nightly")
        print(f"promoted: {card.ref}, keep threshold {card.threshold:.6g} (top-{card.keep_threshold['percent']}%)")
        previous = {s: v for s, v in _scores(first["run"]).items()}
        first_scores = dict(previous)
        kept_before = {s: struct.unpack("<d", v[0])[0] >= card.threshold for s, v in previous.items()}
        old_forwarded = old_total = flipped = 0
        identical = True
        ratios, rows = [], []
        for k, (name, a, b) in enumerate(parts[1:], start=1):
            shutil.move(str(work / "pending" / name), work / "data" / name)
            r = _run(work, f"run-{k}", "nightly")
            m = r["manifest"]
            inc = m["incremental"]
            scores = _scores(r["run"])
            new_ids = set(scores) - set(previous)
            old_ids = set(scores) & set(previous)
            old_forwarded += max(0, inc["forwarded"] - len(new_ids))  # forwarded beyond the new rows
            old_total += len(old_ids)
            same = all(scores[s] == first_scores[s] for s in old_ids if s in first_scores)
            identical &= same
            kept = {s: struct.unpack("<d", v[0])[0] >= card.threshold for s, v in scores.items()}
            flips = sum(kept[s] != kept_before[s] for s in old_ids)
            flipped += flips
            ratio = r["wall_s"] / first["wall_s"]
            ratios.append(ratio)
            ch = m.get("changes") or {}
            rows.append({"run": f"run-{k}", "rows": len(scores), "new": len(new_ids), "forwarded": inc["forwarded"],
                         "canaries": (m.get("canaries") or {}).get("n", 0), "wall_s": round(r["wall_s"], 1),
                         "process_s": round(r["process_s"], 1), "cpu_s": round(r["cpu_s"], 1),
                         "process_cpu_s": round(r["process_cpu_s"], 1), "load_before": round(r["load_before"], 2),
                         "time_ratio": round(ratio, 3),
                         "unchanged_identical": same, "flipped": flips, "parent": ch.get("parent_run_id"),
                         "manifest_flipped_unchanged": ch.get("flipped_unchanged"),
                         "stages": _stages(m)})
            print(f"run-{k} (pinned {m['curation_model']['ref']}): {len(scores)} rows, {len(new_ids)} new, "
                  f"{inc['forwarded']} forwarded, {rows[-1]['canaries']} canaries; wall {r['wall_s']:.1f} s "
                  f"(x{ratio:.3f} of run-0; cpu {r['cpu_s']:.1f} s in the run, {r['process_cpu_s']:.1f} s in all; "
                  f"load {r['load_before']:.1f} before), unchanged scores identical: {same}, decisions flipped on "
                  f"unchanged rows: {flips} (manifest, vs {ch.get('parent_run_id')}: {ch.get('flipped_unchanged')})")
            print(f"  stages (s): {rows[-1]['stages']}")
            previous, kept_before = scores, kept
        share = old_forwarded / max(old_total, 1)
        figures = {"rows": args.rows, "prefect": "ephemeral" if args.ephemeral else "server",
                   "first_wall_s": round(first["wall_s"], 1), "first_cpu_s": round(first["cpu_s"], 1),
                   "first_stages": _stages(first["manifest"]), "incremental": rows,
                   "reforwarded_share": share, "time_ratio": max(ratios), "unchanged_identical": identical,
                   "flipped": flipped, "settings": SETTINGS}
        if args.out:
            Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"reforwarded_share={share:.4f} time_ratio={max(ratios):.3f} "
              f"unchanged_identical={'true' if identical else 'false'} flipped={flipped}")
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
