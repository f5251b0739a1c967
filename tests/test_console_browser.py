"""The first console page in a real headless Chromium: it asks for a login (here the admin's API
token, pasted), then lists the fleet and updates live (over Server-Sent Events, authenticated by
the session cookie, without reloading) when a device goes offline and comes back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from harness import ProcessSet, wait_for
from harness.deploy import Deployment, post

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
    wait_for(lambda: browser.js("!document.getElementById('login-view').hidden"), timeout=15,
             message="the console asks for a login")
    assert browser.js("document.querySelector('main').hidden") is True  # nothing shown before the login
    browser.js("document.getElementById('login-token').value = 'not-a-token'; "
               "document.getElementById('login-form').requestSubmit()")
    wait_for(lambda: "invalid" in browser.js("document.getElementById('login-error').textContent"), timeout=15,
             message="a wrong token refused")
    token = d.token_file.read_text().strip()
    browser.js(f"document.getElementById('login-token').value = {token!r}; "
               "document.getElementById('login-form').requestSubmit()")
    wait_for(lambda: browser.js("document.getElementById('mode').textContent") == "live", timeout=15,
             message="console connected to the live stream")
    assert browser.js("document.getElementById('who').textContent") == "admin \u00b7 admin"
    assert browser.js("document.cookie") == ""  # the session cookie is HttpOnly: no script can read it
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

    # log out: the session ends, a reload asks for a login again; then a password login
    browser.js("document.getElementById('logout').click()")
    wait_for(lambda: browser.js("!document.getElementById('login-view').hidden"), timeout=15,
             message="the login form after logging out")
    post(f"{d.base}/api/v1/accounts", {"username": "vic", "role": "viewer", "password": "vic's console password"})
    browser.goto(d.base + "/")
    wait_for(lambda: browser.js("!document.getElementById('login-view').hidden"), timeout=15,
             message="still logged out after a reload")
    browser.js("document.getElementById('login-user').value = 'vic'; "
               "document.getElementById('login-pass').value = \"vic's console password\"; "
               "document.getElementById('login-form').requestSubmit()")
    wait_for(lambda: browser.js("document.getElementById('mode').textContent") == "live", timeout=15,
             message="a password login connected to the live stream")
    assert browser.js("document.getElementById('who').textContent") == "vic \u00b7 viewer"
    wait_for(lambda: browser.js(ROW_STATE.format(node="dev-2")) == "online", timeout=15, message="fleet shown")
