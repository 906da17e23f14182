"""Everything a deployment of `curate` needs on a Prefect server, created by code, then the deploy.

    python deployments/setup.py [--stack .stack] [--gpu-slots 1] [--no-deploy]

1. the `process` work pool the deployments run on (left alone when it exists);
2. the global concurrency limit "gpu" that serialises GPU work (an existing one is left alone,
   so an operator's own slot count wins);
3. the Secret block "saev-s3" holding {"key", "secret"} from AWS_ACCESS_KEY_ID /
   AWS_SECRET_ACCESS_KEY, which the deployments name in `storage.credentials_secret`;
4. `prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml`.

Settings come from the stack's <state>/stack.env (PREFECT_API_URL, SAEV_S3_ENDPOINT, ...), and
credentials from the environment or, for a stack that generated them, <state>/credentials.env.
Against another server/store, set those variables yourself and pass `--stack ''`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
SECRET_BLOCK = "saev-s3"
NEEDED = ("PREFECT_API_URL", "SAEV_S3_ENDPOINT", "SAEV_S3_BUCKET", "SAEV_DASK_ADDRESS", "SAEV_WORK_POOL",
          "SAEV_WORK_DIR", "SAEV_REPO_DIR")


def read_env_file(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip().removeprefix("export ").strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                out[k] = v
    return out


def settings(stack: str | None) -> tuple[dict, dict]:
    """(non-secret settings, credentials). The stack's files win for its own addresses; the caller's
    environment wins for credentials."""
    env = {k: os.environ[k] for k in NEEDED if os.environ.get(k)}
    creds = {}
    if stack:
        state = Path(stack)
        if not (state / "stack.env").exists():
            raise SystemExit(f"no running stack in {state}: run `make stack-up` first")
        env.update(read_env_file(state / "stack.env"))
        creds = read_env_file(state / "credentials.env")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        if os.environ.get(k):
            creds[k] = os.environ[k]
    env.setdefault("SAEV_REPO_DIR", str(REPO))
    missing = [k for k in NEEDED if not env.get(k)]
    if missing:
        raise SystemExit(f"missing settings: {', '.join(missing)}")
    return env, creds


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool if missing; True when created."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(
                name=name, type="process", description="saev-curate flow runs (local process worker)",
                base_job_template=ProcessWorker.get_default_base_job_template()))
            return True


def ensure_secret(creds: dict) -> None:
    from prefect.blocks.system import Secret

    if not (creds.get("AWS_ACCESS_KEY_ID") and creds.get("AWS_SECRET_ACCESS_KEY")):
        raise SystemExit("no S3 credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    Secret(value={"key": creds["AWS_ACCESS_KEY_ID"], "secret": creds["AWS_SECRET_ACCESS_KEY"]}).save(
        SECRET_BLOCK, overwrite=True)


def setup(env: dict, creds: dict, gpu_slots: int = 1) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sys.path.insert(0, str(REPO))
    from tasks.common import GPU_LIMIT, ensure_gpu_limit

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        created = ensure_work_pool(env["SAEV_WORK_POOL"])
        print(f"work pool {env['SAEV_WORK_POOL']!r}: {'created' if created else 'exists'}")
        ensure_gpu_limit(gpu_slots)
        print(f"global concurrency limit {GPU_LIMIT!r}: present")
        ensure_secret(creds)
        print(f"Secret block {SECRET_BLOCK!r}: saved")


def deploy(env: dict, prefect_file: Path = PREFECT_FILE) -> None:
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    run_env.update(env)
    run_env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"})
    prefect = Path(sys.executable).parent / "prefect"
    cmd = [str(prefect) if prefect.exists() else "prefect", "--no-prompt", "deploy", "--all",
           "--prefect-file", str(prefect_file)]
    subprocess.run(cmd, cwd=REPO, env=run_env, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stack", default=str(REPO / ".stack"), help="stack state folder ('' = environment only)")
    ap.add_argument("--gpu-slots", type=int, default=1, help="slots of the 'gpu' limit when it is created")
    ap.add_argument("--no-deploy", action="store_true", help="only create the pool, the limit and the secret")
    a = ap.parse_args(argv)
    env, creds = settings(a.stack or None)
    setup(env, creds, a.gpu_slots)
    if not a.no_deploy:
        deploy(env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
