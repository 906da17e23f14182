"""What a device slot costs a task on the thread runner (issue 15): the global 'gpu' limit taken
per task (as before) vs `tasks.common.device_slot` (one acquisition per burst of this process's
tasks), for a burst of mapped tasks that each hold the slot for a moment. Prefect's ephemeral
API, as `make demo` runs.

    .venv/bin/python benchmarks/slot_benchmark.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {"tasks": 12, "hold_s": 0.05, "rounds": 3}  # fixed before the first run


def main() -> None:
    from prefect import flow, task
    from prefect.concurrency.sync import concurrency

    from tasks.common import GPU_LIMIT, device_slot, ensure_gpu_limit

    def per_task_slot():
        return concurrency(GPU_LIMIT, occupy=1, strict=True)

    @task
    def hold(kind: str) -> None:
        with (per_task_slot() if kind == "per task" else device_slot()):
            time.sleep(SETTINGS["hold_s"])

    @flow
    def burst(kind: str) -> float:
        ensure_gpu_limit()
        t0 = time.perf_counter()
        for f in [hold.submit(kind) for _ in range(SETTINGS["tasks"])]:
            f.result()
        return time.perf_counter() - t0

    print(f"settings: {SETTINGS}")
    times = {"per task": [], "device_slot": []}
    for r in range(SETTINGS["rounds"]):
        for kind in (list(times) if r % 2 == 0 else list(times)[::-1]):
            times[kind].append(burst(kind))
    work = SETTINGS["tasks"] * SETTINGS["hold_s"]
    for kind, v in times.items():
        med = statistics.median(v)
        print(f"{kind:12s}: burst of {SETTINGS['tasks']} tasks {med:.2f} s (median of {SETTINGS['rounds']}), "
              f"overhead per task {(med - work) / SETTINGS['tasks']:.3f} s")
    a, b = (statistics.median(times[k]) for k in times)
    print(f"-> per-task slot / device_slot: {a / b:.1f}x the burst's wall time")


if __name__ == "__main__":
    main()
