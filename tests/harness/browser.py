"""A real headless Chromium driven over the DevTools protocol (no extra packages: `websockets`
comes with amqtt). Debian's `chromium` is installed by `make test` when run as root."""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

from .ports import free_port
from .wait import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
# flags that keep Chromium off the (closed) network and quiet, per this machine's notes
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


class Browser:
    def __init__(self, width: int = 1400, height: int = 900) -> None:
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="cwsnet-chromium-")
        self.log = Path(self.profile) / "chromium.log"
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=open(self.log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

        def page_ws() -> str | None:
            with opener.open(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
            return pages[0]["webSocketDebuggerUrl"] if pages else None

        url = wait_for(page_ws, timeout=30, message=f"Chromium DevTools on port {self.port}")
        self.ws = connect(url, max_size=None, open_timeout=10)
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv(timeout=30))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise TimeoutError(method)

    def goto(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)
        wait_for(lambda: self.js("document.readyState") == "complete", timeout=15, message=f"{url} loaded")

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error in {expression!r}: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)
