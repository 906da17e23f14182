"""Headless Chromium look at the stack's Prefect UI: a deployment's page with its runs.

    python infra/ui_screenshot.py [--state .stack] [--deployment curate/on-demand] [--out .stack/ui.png]

Needs Debian's chromium; with chromium-driver too (`apt-get install -y chromium chromium-driver`)
the page is driven over WebDriver and captured once the expected text has rendered (the UI is a
single-page app that fills itself in asynchronously); without it, `chromium --dump-dom` /
`--screenshot` with a virtual-time budget is used. Chromium runs with its background networking
off (this machine only reaches loopback) and a throw-away profile.
"""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
         "--disable-dev-shm-usage"]
SIZE = (1400, 1000)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def find_chromedriver() -> str | None:
    return shutil.which("chromedriver")


class WebDriver:
    """The few WebDriver calls needed, over plain HTTP to a chromedriver on 127.0.0.1."""

    def __init__(self, chromium: str, size: tuple[int, int] = SIZE, timeout: float = 60):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.profile = tempfile.mkdtemp(prefix="saev-chromium-")
        self.proc = subprocess.Popen([find_chromedriver(), f"--port={port}", "--allowed-ips=127.0.0.1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while True:
                with contextlib.suppress(OSError):
                    if self._call("GET", "/status")["ready"]:
                        break
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("chromedriver did not start")
                time.sleep(0.2)
            args = [*FLAGS, f"--user-data-dir={self.profile}", f"--window-size={size[0]},{size[1]}"]
            caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
                "binary": chromium, "args": args}}}}
            self.session = self._call("POST", "/session", caps, timeout=timeout)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict | None = None, timeout: float = 60):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
            return json.loads(r.read())["value"]

    def get(self, url: str) -> None:
        self._call("POST", f"/session/{self.session}/url", {"url": url}, timeout=120)

    def source(self) -> str:
        return self._call("GET", f"/session/{self.session}/source")

    def screenshot(self, out: Path) -> Path:
        out.write_bytes(base64.b64decode(self._call("GET", f"/session/{self.session}/screenshot")))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if getattr(self, "session", None):
                self._call("DELETE", f"/session/{self.session}", timeout=20)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


def _cli(url: str, action: list[str], size: tuple[int, int], budget_ms: int = 20000, timeout: float = 120) -> bytes:
    with tempfile.TemporaryDirectory(prefix="saev-chromium-") as profile:
        argv = [find_chromium(), *FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
                f"--virtual-time-budget={budget_ms}", *action, url]
        res = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        raise RuntimeError(f"chromium failed ({res.returncode}): {res.stderr.decode(errors='replace')[-2000:]}")
    return res.stdout


def capture(url: str, out: str | Path, expect: list[str] = (), timeout: float = 90,
            size: tuple[int, int] = SIZE) -> tuple[Path, str]:
    """Open `url`, wait until every string of `expect` is in the rendered page (or `timeout`),
    then save a PNG. Returns (png path, rendered HTML)."""
    chromium = find_chromium()
    if not chromium:
        raise FileNotFoundError("chromium not found: apt-get install -y chromium chromium-driver")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    html = ""
    if find_chromedriver():
        driver = WebDriver(chromium, size)
        try:
            driver.get(url)
            while True:
                html = driver.source()
                if all(e in html for e in expect) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            time.sleep(0.5)  # let the last paint land
            driver.screenshot(out)
            html = driver.source()
        finally:
            driver.close()
        return out, html
    while True:  # no chromedriver: re-render until the text is there
        html = _cli(url, ["--dump-dom"], size).decode(errors="replace")
        if all(e in html for e in expect) or time.monotonic() > deadline:
            break
    _cli(url, [f"--screenshot={out}"], size)
    return out, html


def deployment_url(api_url: str, deployment: str) -> str:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name(deployment)
    return f"{api_url.removesuffix('/api')}/deployments/deployment/{dep.id}"


def main(argv: list[str] | None = None) -> int:
    import argparse

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stack import DEFAULT_STATE, StackInfo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", default=str(DEFAULT_STATE))
    ap.add_argument("--deployment", default="curate/on-demand")
    ap.add_argument("--out", help="PNG path (default: <state>/ui.png)")
    a = ap.parse_args(argv)
    info = StackInfo.load(a.state)
    url = deployment_url(info.prefect_api_url, a.deployment)
    name = a.deployment.split("/")[-1]
    out, html = capture(url, a.out or Path(a.state) / "ui.png", expect=[name, "Completed"])
    print(f"{out}  ({url})")
    print(f"deployment {name!r} shown: {name in html}; a Completed run shown: {'Completed' in html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
