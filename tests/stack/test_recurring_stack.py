"""Recurring curation through the real services (issue 22): the stack of infra/stack.py with the
deployments of deployments/prefect.yaml. `train-and-promote` trains on a folder in SeaweedFS and
promotes the curation model; two runs of `nightly` are created the way its schedule
creates them (a Scheduled flow run of the deployment, picked up by the process worker), with a
batch of rows appended to the folder between them, the second on the Dask cluster as the nightly
preset runs. The second run forwards only the new rows,
keeps every earlier row's score, and records the batch as added against the first.
"""

from __future__ import annotations

import io
import json
import time

import pytest

from stack_fixtures import prefect_settings, stack, wait_final  # noqa: F401

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(900)]


def _scheduled_run(stack, deployment: str, parameters: dict):
    """A Scheduled flow run of the deployment due now: what the scheduler makes from its cron."""
    from prefect import get_client
    from prefect.states import Scheduled

    with prefect_settings(stack.api), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
        return client.create_flow_run_from_deployment(dep.id, parameters=parameters, state=Scheduled())


def test_nightly_runs_over_a_growing_folder(stack, tmp_path):
    import pyarrow.parquet as pq

    from saev_core.toyworld.generator import write_preference_dataset

    bucket = stack.info.bucket
    fs = stack.filesystem()
    rows = pq.read_table(write_preference_dataset(tmp_path / "toy", 70, layout="rlaif-v", seed=5)["parquet"])

    def upload(name: str, lo: int, n: int) -> None:
        buf = io.BytesIO()
        pq.write_table(rows.slice(lo, n), buf)
        fs.pipe(f"{bucket}/incoming/preferences/{name}", buf.getvalue())

    upload("part-000.parquet", 0, 50)

    def params(run_id: str, **scoring) -> dict:
        p = stack.params(run_id, "recurring")
        p["dataset"] = {"uri": f"s3://{bucket}/incoming/preferences/", "name": "preferences", "shard_rows": 25}
        p["output"]["uri"] = f"s3://{bucket}/recurring"
        p["scoring"].update(scoring)
        return p

    t0 = time.monotonic()
    fr = _scheduled_run(stack, "train-and-promote/train-and-promote", {"params": params("base"), "name": "nightly"})
    run = wait_final(stack, fr.id, timeout=420)
    assert run.state.is_completed(), f"{run.state_name}: {run.state.message}\n{stack.log_tail()}"
    card = json.loads(fs.cat(f"{bucket}/recurring/_models/nightly/v1/curation_model.json"))
    assert card["version"] == 1 and card["source_run"].endswith("/recurring/preferences/base")

    nights = {}
    for night, batch in (("night-1", None), ("night-2", (50, 20))):
        if batch:
            upload("part-001.parquet", *batch)  # a new batch of annotations arrives between two nights
        p = params(night, curation_model="nightly")
        if batch:
            p["dask_address"] = stack.info.dask_address  # the nightly preset's runner: forwards on the Dask worker
        fr = _scheduled_run(stack, "curate/nightly", {"params": p})
        run = wait_final(stack, fr.id, timeout=420)
        assert run.state.is_completed(), f"{night}: {run.state_name}: {run.state.message}\n{stack.log_tail()}"
        nights[night] = json.loads(fs.cat(f"{bucket}/recurring/preferences/{night}/manifest.json"))
    print(f"\ntrain-and-promote and two nights in {time.monotonic() - t0:.1f}s")

    one, two = nights["night-1"], nights["night-2"]
    assert one["curation_model"]["ref"] == two["curation_model"]["ref"] == "nightly@v1"
    assert one["incremental"]["forwarded"] == 0 and one["incremental"]["reused"] == 50
    assert two["incremental"]["forwarded"] == 20 and two["incremental"]["reused"] == 50
    assert two["changes"]["parent_run_id"] == "night-1" and two["parameters"]["dask_address"] == stack.info.dask_address
    assert two["subsets"]["kept"]["rows"] == two["decisions"]["kept"] > 0  # the stable subset, beside top-<p>
    assert fs.exists(f"{bucket}/recurring/preferences/night-2/subsets/kept")
    assert (two["changes"]["added"], two["changes"]["unchanged"], two["changes"]["flipped_unchanged"]) == (20, 50, 0)

    def scores(run: str) -> dict:
        t = pq.read_table(io.BytesIO(fs.cat(f"{bucket}/recurring/preferences/{run}/scores.parquet")))
        return dict(zip(t.column("sample_id").to_pylist(), t.column("score").to_pylist()))

    base, second = scores("base"), scores("night-2")
    assert len(second) == 70 and all(second[s] == v for s, v in base.items())
