"""Fixtures for the tests through the real stack (infra/stack.py): one stack per test module, on
free loopback ports, in a temporary state folder, always stopped at the end (even on failure).

Helpers talk to the stack's Prefect server the way the UI does (the REST API through Prefect's
client) and read outputs from SeaweedFS with explicit credentials.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from infra import stack as stack_mod  # noqa: E402

# A run of the tiny random LLaVA through the whole flow takes ~40 s here.
TINY_PARAMS = {
    "dataset": {"uri": "toy://rlaif-v", "toy_samples": 60, "shard_rows": 25},
    "model": {"layer": 1, "device": "cpu", "batch_size": 16},
    "sae": {"steps": 100, "batch_size": 256, "expansion_factor": 4, "lr": 1e-3},
    # canaries are tested in test_flow.py; a random model ranks nothing, so the ranking gate is opened
    "scoring": {"weights": {"weight_samples": 40}, "canaries": {"enabled": False}},
    "output": {"keep_percents": [25, 50]},
    "validation": {"max_tie_share": 1.0, "min_cross_modal_features": 0},
}
N_SHARDS = 3  # 60 samples / 25 per shard


@dataclass
class Stack:
    info: stack_mod.StackInfo
    creds: dict
    model_dir: str
    runs: dict = field(default_factory=dict)  # name -> {"flow_run_id", "run_uri", ...}

    @property
    def api(self) -> str:
        return self.info.prefect_api_url

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.info.s3_endpoint, "key": self.creds["AWS_ACCESS_KEY_ID"],
                "secret": self.creds["AWS_SECRET_ACCESS_KEY"]}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def secrets(self) -> list[str]:
        return [self.creds["AWS_ACCESS_KEY_ID"], self.creds["AWS_SECRET_ACCESS_KEY"]]

    def client_env(self) -> dict:
        """Environment for a subprocess that uses this stack (and nothing from the test session)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("AWS_", "PREFECT_", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}
        env.update(stack_mod.QUIET_ENV)
        env.update(self.info.env())
        env.update(self.creds)
        env["PREFECT_HOME"] = str(Path(self.info.state) / "client-home")
        env["AWS_EC2_METADATA_DISABLED"] = "true"
        return env

    def log_tail(self, n: int = 60) -> str:
        out = []
        for s in self.info.services:
            out.append(f"--- {s.name} ({s.log})\n{stack_mod._tail(s.log, n)}")
        return "\n".join(out)

    def params(self, name: str, work: str, **extra) -> dict:
        p = json.loads(json.dumps(TINY_PARAMS))
        p["model"]["model_id"] = self.model_dir
        p["output"].update({"uri": f"s3://{self.info.bucket}/on-demand", "run_id": name,
                            "work_uri": str(Path(self.info.work_dir) / work)})
        p["storage"] = {"endpoint_url": self.info.s3_endpoint, "credentials_secret": "saev-s3"}
        p.update(extra)
        return p


def prefect_settings(api: str):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: api})


def trigger(stack: Stack, deployment: str, params: dict):
    """Create a flow run of a deployment through the API, as the UI's 'Run' button does
    (POST /deployments/{id}/create_flow_run); returns the flow run without waiting."""
    from prefect.deployments import run_deployment

    with prefect_settings(stack.api):
        return run_deployment(deployment, parameters={"params": params}, timeout=0)


def wait_final(stack: Stack, flow_run_id, timeout: float = 300.0):
    from prefect import get_client

    deadline = time.monotonic() + timeout
    with prefect_settings(stack.api), get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            if time.monotonic() > deadline:
                pytest.fail(f"flow run {flow_run_id} still {run.state_name} after {timeout:.0f}s\n{stack.log_tail()}")
            time.sleep(2)


def all_logs(stack: Stack) -> list[str]:
    """Every log line the stack's Prefect server holds (flows, sub-flows, tasks, Dask tasks)."""
    from prefect import get_client

    out, offset = [], 0
    with prefect_settings(stack.api), get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(limit=200, offset=offset)
            out += [f"{log.name}: {log.message}" for log in page]
            if len(page) < 200:
                return out
            offset += 200


def all_artifacts(stack: Stack) -> list[str]:
    from prefect import get_client

    with prefect_settings(stack.api), get_client(sync_client=True) as client:
        return [json.dumps(a.data, default=str) + (a.description or "") for a in client.read_artifacts(limit=200)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Stack up (free ports), deployments applied by deployments/setup.py, a tiny LLaVA built;
    stopped at module end whatever happened."""
    from tiny_mllms import build_llava

    state = tmp_path_factory.mktemp("stack")
    model_dir = str(build_llava(tmp_path_factory.mktemp("tiny-llava")))
    with pytest.MonkeyPatch.context() as mp:
        # the stack makes its own credentials; nothing from the session's (moto) environment leaks in
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(k)
        t0 = time.monotonic()
        info = stack_mod.up(state, free_ports=True, dask_workers=1, timeout=150, quiet=True, tie_to_parent=True)
        try:
            creds = stack_mod.load_credentials(state)
            s = Stack(info, creds, model_dir)
            print(f"\nstack up in {time.monotonic() - t0:.1f}s: {info.prefect_ui_url}, S3 {info.s3_endpoint}, "
                  f"Dask {info.dask_address}")
            t0 = time.monotonic()
            res = subprocess.run([sys.executable, str(REPO / "deployments" / "setup.py"), "--stack", str(state)],
                                 cwd=REPO, env=s.client_env(), capture_output=True, text=True, timeout=240)
            assert res.returncode == 0, f"deployments/setup.py failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
            print(f"deployments applied in {time.monotonic() - t0:.1f}s")
            s.runs["setup_output"] = res.stdout + res.stderr
            yield s
        finally:
            stack_mod.down(state, quiet=True)
