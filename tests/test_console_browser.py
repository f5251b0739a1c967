"""The first console page in a real headless Chromium: it lists the fleet and updates live
(over Server-Sent Events, without reloading) when a device goes offline and comes back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from harness import ProcessSet, wait_for
from harness.deploy import Deployment

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("CWSNET_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts"))

ROW_STATE = """(() => {{
  const row = [...document.querySelectorAll('#fleet tr')].find(r => r.cells[0].textContent.startsWith('{node}'));
  return row ? row.cells[2].textContent.trim() : null;
}})()"""


@pytest.fixture
def browser():  # noqa: ANN201
    from harness.browser import CHROMIUM, Browser

    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail("Chromium is not installed: `make test` installs Debian's chromium when run as root")
    b = Browser()
    try:
        yield b
    finally:
        b.close()


def test_console_lists_fleet_and_updates_live(tmp_path: Path, procs: ProcessSet, browser) -> None:  # noqa: ANN001
    d = Deployment(tmp_path, procs, devices=2)
    d.start_cloud()
    d.start("gateway", d.topo.gateway)
    agents = {dev: d.start("agent", dev) for dev in d.topo.devices}
    wait_for(lambda: d.online() == {"dev-1", "dev-2"}, timeout=30, message="devices online")

    browser.goto(d.base + "/")
    wait_for(lambda: browser.js("document.getElementById('mode').textContent") == "live", timeout=15,
             message="console connected to the live stream")
    for node in ("gw-home", "dev-1", "dev-2"):
        wait_for(lambda n=node: browser.js(ROW_STATE.format(node=n)) == "online", timeout=15,
                 message=f"{node} shown online")
    # nothing reloads the page from here on: what changes arrives over the stream
    browser.js("window.__marker = 'same page'")
    agents["dev-1"].terminate(timeout=10)
    wait_for(lambda: browser.js(ROW_STATE.format(node="dev-1")) == "offline", timeout=15,
             message="dev-1 shown offline live")
    assert browser.js(ROW_STATE.format(node="dev-2")) == "online"
    agents["dev-1"].restart()
    wait_for(lambda: browser.js(ROW_STATE.format(node="dev-1")) == "online", timeout=30,
             message="dev-1 shown online again live")
    assert browser.js("window.__marker") == "same page"
    assert browser.js("document.getElementById('mode').textContent") == "live"
    events = browser.js("document.body.innerText")
    assert "dev-1 disconnected" in events and "dev-1 connected" in events
    shot = browser.screenshot(ARTIFACTS / "console-fleet.png")
    assert shot.stat().st_size > 10_000
