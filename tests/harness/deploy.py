"""A home lab provisioned by `cwsnet init` whose daemons a test starts one by one (real processes)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from cwsnet.homelab import HomeLab, Topology

from .ports import free_port
from .proc import ProcessSet
from .wait import wait_for

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
#: cloud base URL -> the file holding its admin API token (written by the cloud at its first start)
TOKEN_FILES: dict[str, Path] = {}


def authenticate(base: str, token_file: Path) -> None:
    """Send ``Authorization: Bearer {token_file's token}`` with every request under ``base``."""
    TOKEN_FILES[base.rstrip("/")] = token_file


def request(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
            method: str | None = None) -> urllib.request.Request:
    """A request to ``url``, with the admin token of its cloud when :func:`authenticate` named one."""
    req = urllib.request.Request(url, data, headers=headers or {}, method=method)
    for base, token_file in TOKEN_FILES.items():
        if url.startswith(base + "/") and token_file.exists():
            req.add_header("Authorization", f"Bearer {token_file.read_text().strip()}")
    return req


def text(url: str) -> str:
    with OPENER.open(request(url), timeout=5) as r:
        return r.read().decode()


def get(url: str) -> Any:
    with OPENER.open(request(url), timeout=5) as r:
        return json.loads(r.read())


def prometheus(url: str) -> dict[str, float]:
    """A Prometheus text page as ``{"name{labels}": value}``."""
    with OPENER.open(request(url), timeout=5) as r:
        out = {}
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


def post(url: str, body: dict) -> Any:
    req = request(url, json.dumps(body).encode(), headers={"content-type": "application/json"})
    with OPENER.open(req, timeout=5) as r:
        return json.loads(r.read())


class Deployment:
    """A home lab provisioned by `cwsnet init`, whose configs a test then rewires."""

    def __init__(self, tmp: Path, procs: ProcessSet, devices: int = 2) -> None:
        self.lab = HomeLab(tmp / "lab")
        self.topo = self.lab.init(Topology(devices=[f"dev-{i}" for i in range(1, devices + 1)],
                                           cloud_mqtt_port=free_port(), gateway_mqtt_port=free_port(),
                                           cloud_mqtts_port=free_port(), gateway_mqtts_port=free_port(),
                                           http_port=free_port(), telemetry_interval=0.3))
        self.procs = procs
        self.base = f"http://127.0.0.1:{self.topo.http_port}"
        authenticate(self.base, self.token_file)

    def edit(self, node: str, change: dict) -> None:
        p = self.lab.config_path(node)
        cfg = yaml.safe_load(p.read_text())
        for key, value in change.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key].update(value)
            else:
                cfg[key] = value
        p.write_text(yaml.safe_dump(cfg))

    @property
    def token_file(self) -> Path:
        """The admin's API token, written by the cloud at its first start (config key admin_token_file)."""
        return self.lab.path("admin.token")

    def bundle(self, node: str) -> dict:
        return json.loads(self.lab.bundle_path(node).read_text())

    def start(self, kind: str, node: str) -> Any:
        return self.procs.start(node, [sys.executable, "-m", "cwsnet", kind, "--config",
                                       str(self.lab.config_path(node))])

    def start_cloud(self) -> Any:
        p = self.start("cloud", "cloud")
        p.wait_http(f"{self.base}/healthz", timeout=30, status=200)
        return p

    def online(self) -> set[str]:
        return {d["id"] for d in get(f"{self.base}/api/v1/devices")["items"] if d["online"]}

    def check_flow(self) -> None:
        devices = set(self.topo.devices)
        wait_for(lambda: self.online() == devices, timeout=30, message=f"{devices} online")
        wait_for(lambda: len(get(f"{self.base}/api/v1/devices/dev-1/telemetry?limit=20")["items"]) >= 5,
                 timeout=20, message="telemetry from dev-1")
        task = post(f"{self.base}/api/v1/tasks", {"target": "dev-1", "handler": "echo", "args": {"x": 1}})
        done = wait_for(lambda: (t := get(f"{self.base}/api/v1/tasks/{task['id']}"))["state"] == "succeeded"
                        and t, timeout=20, message="echo task")
        assert done["result"] == {"x": 1}


