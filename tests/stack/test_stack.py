"""Through the real services, no mocks: the stack of infra/stack.py (Prefect server + process
worker, SeaweedFS S3, Dask scheduler + a GPU=1 worker) on free loopback ports, the deployments of
deployments/prefect.yaml applied by deployments/setup.py, then:

- the nightly deployment has its next runs scheduled (the SQLAlchemy 2.1 trap);
- the on-demand deployment, triggered through the API like the UI's Run button, publishes to
  SeaweedFS: manifest present, subsets readable with datasets.load_dataset from s3://, and the S3
  credentials appear in no log, artifact or published file;
- the same deployment with dask_address set runs its activation and scoring tasks on the Dask
  worker (the scheduler's task stream records them);
- examples/dpo_train.py trains TRL's DPOTrainer on the published subset with a finite loss;
- headless Chromium renders the Prefect UI with the deployment and its completed run.

One stack for the module (starting it costs ~20 s of a 2-core machine).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stack_fixtures import N_SHARDS, REPO, all_artifacts, all_logs, prefect_settings, stack, trigger, wait_final  # noqa: F401

pytestmark = [pytest.mark.stack, pytest.mark.slow, pytest.mark.timeout(600)]  # stack-up counts in the first test


@pytest.fixture(scope="module")
def on_demand_run(stack):
    """One run of the on-demand deployment (thread runner), shared by the checks below."""
    t0 = time.monotonic()
    fr = trigger(stack, "curate/on-demand", stack.params("ui-run", "ui-run"))
    run = wait_final(stack, fr.id)
    assert run.state.is_completed(), f"{run.state_name}: {run.state.message}\n{stack.log_tail()}"
    print(f"\non-demand run {run.name} completed in {time.monotonic() - t0:.1f}s")
    out = {"flow_run": run, "run_uri": f"s3://{stack.info.bucket}/on-demand/toy-rlaif-v/ui-run"}
    stack.runs["ui-run"] = out
    return out


def test_setup_created_pool_limit_secret_and_nightly_schedule(stack):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter, \
        FlowRunFilterState, FlowRunFilterStateName

    with prefect_settings(stack.api), get_client(sync_client=True) as client:
        pool = client.read_work_pool(stack.info.work_pool)
        assert pool.type == "process"
        assert client.read_global_concurrency_limit_by_name("gpu").limit >= 1
        nightly = client.read_deployment_by_name("curate/nightly")
        on_demand = client.read_deployment_by_name("curate/on-demand")
        promote = client.read_deployment_by_name("train-and-promote/train-and-promote")
        block = client.read_block_document_by_name("saev-s3", "secret", include_secrets=False)
        deadline = time.monotonic() + 60  # the API schedules on create; the scheduler loop would too
        while True:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))))
            if runs or time.monotonic() > deadline:
                break
            time.sleep(2)

    assert block.name == "saev-s3"
    # the nightly preset: cron, the growing folder scored with the pinned curation model (the one
    # nightly story; train-and-promote makes the model), S3 output, Dask, credentials by reference only
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in nightly.schedules] == [("0 2 * * *", "UTC", True)]
    p = nightly.parameters["params"]
    assert p["dataset"]["uri"] == f"s3://{stack.info.bucket}/incoming/preferences/"
    assert p["scoring"]["curation_model"] == "nightly"
    assert promote.parameters["name"] == "nightly" and promote.schedules == []
    assert promote.parameters["params"]["output"]["uri"] == p["output"]["uri"] == f"s3://{stack.info.bucket}/recurring"
    assert p["storage"] == {"endpoint_url": stack.info.s3_endpoint, "credentials_secret": "saev-s3"}
    assert p["dask_address"] == stack.info.dask_address
    assert nightly.work_pool_name == on_demand.work_pool_name == stack.info.work_pool
    assert on_demand.schedules == []
    assert nightly.entrypoint == on_demand.entrypoint == "flows.curate:curate"
    for secret in stack.secrets():
        assert secret not in json.dumps([nightly.parameters, on_demand.parameters])
        assert secret not in stack.runs["setup_output"]

    # next runs are scheduled, in the future, at 02:00 UTC
    assert runs, "the nightly deployment has no scheduled runs (SQLAlchemy 2.1 drops them silently)"
    now = time.time()
    for r in runs:
        t = r.expected_start_time
        assert t.timestamp() > now and (t.hour, t.minute) == (2, 0) and t.utcoffset().total_seconds() == 0


def test_on_demand_run_publishes_to_seaweedfs(stack, on_demand_run):
    import datasets
    from PIL import Image

    run_uri = on_demand_run["run_uri"]
    fs = stack.filesystem()
    manifest = json.loads(fs.cat(f"{run_uri}/manifest.json"))
    assert manifest["run_id"] == "ui-run"
    assert manifest["validation"]["success"]
    assert manifest["subsets"]["top-25"]["rows"] == 15 and manifest["subsets"]["top-50"]["rows"] == 30
    for name in ("scores.parquet", "quarantine.parquet", "validation.json", "report.html"):
        assert fs.exists(f"{run_uri}/{name}"), name

    options = dict(stack.storage_options)
    ds = datasets.load_dataset("parquet", data_files=f"{run_uri}/subsets/top-50/*.parquet",
                               storage_options=dict(options), split="train")
    assert ds.num_rows == 30
    assert set(ds.column_names) >= {"prompt", "chosen", "rejected", "images", "sample_id", "score"}
    assert isinstance(ds[0]["images"][0], Image.Image)
    assert min(ds["score"]) >= manifest["thresholds"]["top-50"]

    # S3 credentials: never in the manifest, the published files, logs or artifacts
    published = b"".join(fs.cat(f"{run_uri}/{n}") for n in ("manifest.json", "validation.json", "report.html"))
    logs = "\n".join(all_logs(stack))
    artifacts = "\n".join(all_artifacts(stack))
    service_logs = "".join(open(s.log, errors="replace").read() for s in stack.info.services)
    assert "ui-run" in logs and artifacts  # we did read the run's logs and artifacts
    # the server's database (runs, events, the encrypted Secret block) and the persisted task results
    prefect_files = [f for f in (Path(stack.info.state) / "prefect").rglob("*") if f.is_file()]
    assert any(f.name == "prefect.db" for f in prefect_files)
    for secret in stack.secrets():
        assert secret.encode() not in published
        assert secret not in logs and secret not in artifacts and secret not in service_logs
        assert not [f.name for f in prefect_files if secret.encode() in f.read_bytes()]


def test_dask_task_runner_runs_scoring_on_dask_workers(stack, on_demand_run):
    from distributed import Client

    # Fresh activations, SAE and scores (own work folder). The SAE is trained here, briefly, on a
    # drawn sample: training, its spliced-CE check and the weights are device tasks, so they must
    # run on the GPU=1 worker like every other model pass (issue 20).
    fs = stack.filesystem()

    with Client(stack.info.dask_address, timeout=30) as client:
        client.get_task_stream()  # switch the scheduler's task-stream recording on
        workers = {a for a, w in client.scheduler_info(n_workers=-1)["workers"].items()
                   if w.get("resources", {}).get("GPU") == 1}
        assert workers
        start = time.time()
        params = stack.params("dask-run", "dask-run", dask_address=stack.info.dask_address)
        params["sae"].update(steps=30, train_samples=10)  # cache ~23 of ~58 samples: the rest is scored fused
        params["scoring"]["weights"] = {**params["scoring"].get("weights", {}), "weight_samples": 10}
        params["scoring"]["baselines"] = ["logp_margin"]  # a log-prob pass too
        fr = trigger(stack, "curate/on-demand", params)
        run = wait_final(stack, fr.id)
        assert run.state.is_completed(), f"{run.state_name}: {run.state.message}\n{stack.log_tail()}"
        stream = client.get_task_stream(start=start)

    ran = {}
    for rec in stream:
        name = str(rec["key"]).rsplit("-", 1)[0]
        ran.setdefault(name, []).append(rec["worker"])
    # one task per record shard for activations, log-probs and scoring, and the report's samples
    # outside the residual sample: every model pass on the GPU=1 worker(s), none in the flow's process
    for name in ("cache_activations", "log_probs", "score_records"):
        assert len(ran.get(name, [])) == N_SHARDS, (name, ran.keys())
    for name in ("cache_report_samples", "train_or_load_sae", "cross_modal_weights"):
        assert len(ran.get(name, [])) == 1, (name, ran.keys())
    assert set().union(*(ran[n] for n in ("cache_activations", "log_probs", "score_records", "cache_report_samples",
                                          "train_or_load_sae", "cross_modal_weights"))) <= workers
    assert all(rec["status"] == "OK" for rec in stream)

    manifest = json.loads(fs.cat(f"s3://{stack.info.bucket}/on-demand/toy-rlaif-v/dask-run/manifest.json"))
    assert manifest["parameters"]["dask_address"] == stack.info.dask_address
    assert manifest["sae"]["trained"] and manifest["sae"]["uri"].startswith(stack.info.work_dir.rstrip("/"))
    assert manifest["counts"]["scored"] == 60 - manifest["counts"]["quarantined"]
    # only the SAE's and the weights' sample is cached (10 samples plus 4 standard deviations of the
    # draw); its rows were scored from the cache and the rest by the fused pass on the workers, which
    # stored statistics instead
    assert manifest["residual_sample"]["fraction"] < 1
    stats_files = list((Path(stack.info.work_dir) / "dask-run" / "stats").rglob("*.safetensors"))
    assert len(stats_files) == N_SHARDS  # no record shard had all its rows drawn


def test_dpo_example_trains_on_published_subset(stack, on_demand_run):
    """examples/dpo_train.py as a separate training job: reads the subset from s3:// with
    credentials from its environment, runs DPOTrainer for a few steps."""
    cmd = [sys.executable, str(REPO / "examples" / "dpo_train.py"), "--run", on_demand_run["run_uri"],
           "--subset", "top-50", "--model", stack.model_dir, "--endpoint-url", stack.info.s3_endpoint,
           "--steps", "3", "--batch-size", "2", "--json"]
    res = subprocess.run(cmd, cwd=REPO, env=stack.client_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["subset"] == "top-50" and out["rows"] == 30 and out["steps"] == 3
    assert len(out["losses"]) == 3 and all(math.isfinite(x) for x in out["losses"]), out
    assert math.isfinite(out["train_loss"])


def test_prefect_ui_shows_deployment_and_completed_run(stack, on_demand_run, tmp_path):
    """Headless Chromium (over WebDriver when chromium-driver is installed) renders the on-demand
    deployment's page with the completed run; the PNG is kept for a human to look at."""
    from PIL import Image

    from infra import ui_screenshot

    if not ui_screenshot.find_chromium():
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    url = ui_screenshot.deployment_url(stack.api, "curate/on-demand")
    run_name = on_demand_run["flow_run"].name
    png, html = ui_screenshot.capture(url, tmp_path / "prefect-ui.png", expect=[run_name, "Completed"], timeout=120)
    assert "on-demand" in html and "saev-process" in html  # the deployment and its work pool
    assert run_name in html and "Completed" in html  # its completed run

    img = Image.open(png).convert("RGB")
    assert img.width >= 1000 and img.height >= 600
    assert len(set(img.resize((140, 100)).getdata())) > 50  # a rendered page, not a blank one
    print(f"\nPrefect UI screenshot: {png}")
